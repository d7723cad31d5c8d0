"""AdamW with decay only on matrices, Muon for the hidden matrices, and the learning-rate schedules.

Weight decay on norms' gains, biases and embedding tables pulls them toward zero for no
benefit (nanoGPT, torchtitan, Megatron all exempt them); the rule here is "decay iff the
parameter has >= 2 dims and is not owned by an nn.Embedding or a norm layer".

`train.optimizer: muon` (Moonlight, "Muon is Scalable for LLM Training"): the hidden 2-D
matrices take torch's `Muon` (its Newton-Schulz steps batched over same-shape matrices:
`BatchedMuon`) with its update RMS matched to AdamW's
(`adjust_lr_fn="match_rms_adamw"`), so `train.lr` and `train.weight_decay` mean what they
mean for AdamW; embeddings, the output head, norms and biases keep AdamW.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from mmkit.train.config import TrainConfig


def _is_norm(module: nn.Module) -> bool:
    """torch's norm layers and any module class named *Norm* (RMSNorm, QK-norm's per-head
    HeadwiseLayerNorm, whose (H, hd) gains and biases are 2-D)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) \
        or "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (1-D params, embeddings, norms)."""
    # embeddings recurse: a parametrized table keeps its weight (and its parametrization's
    # parameters) below it; a norm's own parameters only (a class named *Norm* may hold a model)
    exempt = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    exempt |= {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim >= 2 and id(p) not in exempt:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def newton_schulz_batched(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                          eps: float) -> torch.Tensor:
    """torch's Muon orthogonalisation (quintic Newton-Schulz in bf16) of a stack of same-shape
    matrices: G (k, A, B) -> (k, A, B) bf16, each matrix as `torch.optim.Muon` computes it."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.shape[1] > G.shape[2]
    if tall:
        X = X.transpose(1, 2)
    X = X / X.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        gram = X @ X.transpose(1, 2)  # (k, m, m), m = min(A, B)
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.transpose(1, 2) if tall else X


class BatchedMuon(torch.optim.Muon):
    """torch's `Muon` (same hyperparameters, state and update) with the Newton-Schulz steps of
    same-shape matrices run as one batch of `bmm`s.

    Why: a transformer's hidden matrices come in a few shapes, one per layer; one at a time
    they are many small matmuls (the quickstart's Chameleon: 16 matrices of 4 shapes, 13.8 ms
    a step at 2 threads) and batched they cost 6.9 ms (benchmarks/muon.py). Same arithmetic,
    and the same bits as torch's on every matrix we compared (tested) except tiny ones: for a
    side below `BATCH_MIN_SIDE` bmm and mm rounded differently now and then (one bf16 ulp in 1
    of 960 (4, 32) tables over 60 quickstart steps), so those keep torch's one-at-a-time path.
    """

    BATCH_MIN_SIDE = 16

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, wd, mom = float(group["lr"]), group["weight_decay"], group["momentum"]
            ns_args = group["ns_coefficients"], group["ns_steps"], group["eps"]
            updates = []
            for g, buf in zip(grads, bufs):
                buf.lerp_(g, 1 - mom)
                updates.append(g.lerp(buf, mom) if group["nesterov"] else buf)
            same_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                same_shape[(tuple(u.shape), u.device)].append(i)
            for (shape, _), idx in same_shape.items():
                if min(shape) >= self.BATCH_MIN_SIDE:
                    ortho = newton_schulz_batched(torch.stack([updates[i] for i in idx]), *ns_args)  # (k, A, B)
                else:
                    ortho = [_zeropower_via_newtonschulz(updates[i], *ns_args) for i in idx]
                for o, i in zip(ortho, idx):
                    p = params[i]
                    p.mul_(1 - lr * wd)
                    p.add_(o, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices + AdamW on the rest, as one optimizer.

    Why one object: the engine, accelerate's wrapper, the LR scheduler and the checkpoints
    all expect a single optimizer. `param_groups` are the inner optimizers' own group dicts,
    so a scheduler that sets `lr` on them reaches both.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.inner = [muon, adamw]
        super().__init__([p for opt in self.inner for g in opt.param_groups for p in g["params"]], {})
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]  # the inner dicts themselves

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # a closure runs backward: it needs autograd, as in torch's optimizers
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """One state dict in torch's format (what the checkpoint writer reads): the AdamW
        half's parameter indices follow the Muon half's."""
        m, a = (opt.state_dict() for opt in self.inner)
        n = sum(len(g["params"]) for g in m["param_groups"])
        return {"state": {**m["state"], **{i + n: st for i, st in a["state"].items()}},
                "param_groups": m["param_groups"] + [{**g, "params": [i + n for i in g["params"]]}
                                                     for g in a["param_groups"]]}

    def load_state_dict(self, state_dict: dict) -> None:
        k = len(self.inner[0].param_groups)
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != k + len(self.inner[1].param_groups) or any("ns_steps" not in g for g in groups[:k]):
            raise ValueError("this optimizer state was not written by train.optimizer: muon with the same "
                             "parameters; resume with the optimizer it was written with")
        n = sum(len(g["params"]) for g in groups[:k])
        self.inner[0].load_state_dict({"state": {i: st for i, st in state.items() if int(i) < n},
                                       "param_groups": groups[:k]})
        self.inner[1].load_state_dict({"state": {int(i) - n: st for i, st in state.items() if int(i) >= n},
                                       "param_groups": [{**g, "params": [i - n for i in g["params"]]}
                                                        for g in groups[k:]]})
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]


def muon_params(model: nn.Module, decayed: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden matrices: the decayed 2-D weights (`param_groups` already leaves out embedding
    tables, norms and biases) other than the output head's."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    return [p for p in decayed if p.ndim == 2 and id(p) not in skip]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused when every parameter sits on a device with a fused kernel: CPU, CUDA),
    or Muon + AdamW (`train.optimizer: muon`)."""
    groups = param_groups(model, cfg.weight_decay)
    hidden = muon_params(model, groups[0]["params"]) if cfg.optimizer == "muon" else []
    if hidden:
        ids = {id(p) for p in hidden}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        groups = [g for g in groups if g["params"]]
    impl = cfg.adamw
    if impl == "auto":
        devices = {p.device.type for g in groups for p in g["params"]}
        impl = "fused" if devices <= {"cpu", "cuda"} else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
    if not hidden:
        return adamw
    muon = BatchedMuon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                       adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based: the step about to be taken).

    cosine: linear warmup, then cosine from 1 to min_lr at max_steps.
    wsd:    linear warmup, constant, then linear decay to min_lr over the last decay_frac.
    constant: linear warmup, then 1.
    """
    if cfg.warmup > 0 and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup)
        t = min(1.0, (step - cfg.warmup) / span)
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    # wsd
    decay_steps = max(1, round(cfg.decay_frac * cfg.max_steps))
    decay_start = max(cfg.warmup, cfg.max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return 1.0 - (1 - cfg.min_lr) * t


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure (not a callable object) so LambdaLR.state_dict() stays JSON-able.
    def fn(step: int) -> float:
        return lr_factor(step, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
