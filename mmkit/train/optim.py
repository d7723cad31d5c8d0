"""AdamW with decay only on matrices, and the learning-rate schedules.

Weight decay on norms' gains, biases and embedding tables pulls them toward zero for no
benefit (nanoGPT, torchtitan, Megatron all exempt them); the rule here is "decay iff the
parameter has >= 2 dims and is not owned by an nn.Embedding".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmkit.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (1-D params + embeddings)."""
    # recurse: a parametrized table keeps its weight (and its parametrization's parameters) below it
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim >= 2 and id(p) not in embedding_params:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused when every parameter sits on a device with a fused kernel (CPU, CUDA)."""
    groups = param_groups(model, cfg.weight_decay)
    impl = cfg.adamw
    if impl == "auto":
        devices = {p.device.type for g in groups for p in g["params"]}
        impl = "fused" if devices <= {"cpu", "cuda"} else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


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
