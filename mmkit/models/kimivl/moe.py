"""Mixture-of-Experts feed-forward for the DeepSeek-V3 / Moonlight decoder.

Three ways to run the routed experts, all on the same fused weights
(`gate_up_proj` (E, 2I, D), `down_proj` (E, D, I): transformers' DeepseekV3Experts layout,
so checkpoints convert without copies):

- `grouped_mm`: sort the (token, slot) pairs by expert, two `F.grouped_mm` calls over the
  whole sorted batch, un-sort and combine the top-k slots with one `bmm`. Dropless.
- `loop`: the same sort, then one matmul per expert over `unbind(0)` views (for torch
  builds / devices without a grouped GEMM).
- `reference`: the plain per-expert mask + `index_add_` loop, kept for tests.

Never index the fused weights `W[e]` under autograd: every such index materialises a full
(E, ...) zero gradient in backward (REFERENCE 4: 6.6 s vs 0.19 s). `unbind(0)` does not.

`F.grouped_mm` is not autocast-aware, so under autocast we cast the expert weights to the
autocast dtype ourselves (transformers runs them in fp32 there, which is why its experts
are slow under CPU bf16 autocast).

Routing follows transformers' `DeepseekV3TopkRouter` exactly (fp32 logits, sigmoid or
softmax scores, `e_score_correction_bias` for the choice only, group-limited top-k,
weights from the unbiased scores, norm_topk_prob, routed_scaling_factor). Aux-loss-free
balancing (torchtitan): training forwards count tokens per expert; the trainer calls
`update_balancing_bias()` after each optimizer step, which moves the fp32 bias by
gamma * sign(mean - count) (zero-mean) and clears the counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.nn import CPU_GEMM_ROW_BLOCK

_HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
CPU_GROUP_BLOCK = CPU_GEMM_ROW_BLOCK  # rows: CPU expert groups are padded to multiples of this (`expert_layout`)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (S, K) @ w (E, K, N) per expert group given by int32 cumulative offsets -> (S, N)."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, w, offs=offs)
    return torch._grouped_mm(x, w, offs=offs)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether this torch/device/dtype has a usable grouped GEMM for these matrix widths (REFERENCE 4).

    The kernels need every row stride to be a multiple of 16 bytes (e.g. widths % 8 in bf16).
    """
    if not _HAS_GROUPED_MM:
        return False
    if any(d * torch.empty((), dtype=dtype).element_size() % 16 for d in dims):
        return False
    if device.type == "cpu":
        # torch >= 2.9 has a CPU kernel (fp32/bf16); older builds lack it and need 16-byte alignment
        return hasattr(F, "grouped_mm") and dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8 and dtype == torch.bfloat16
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's CPU backward fails on a stride-0 (expanded) grad, e.g. from `out.sum()`.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _gather_rows(x: torch.Tensor, src: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """x (N, D) -> x[src] (P, D); index N (padding rows, only when P > n_pairs) reads zeros."""
    if src.numel() > n_pairs:
        x = torch.cat([x, x.new_zeros(1, x.shape[-1])])
    return x.index_select(0, src)


class _DispatchRows(torch.autograd.Function):
    """x (N, D) -> x[src] (P, D): each token copied to its K expert slots, sorted by expert.

    `src` (P,) is the token of each row (N = a zero row: the padding of a CPU expert group) and
    `inv` (N*K,) the row of each (token, slot). Hand-written backward: the gradient is gathered
    back with `inv` and summed over the K slots (a gather + a reshape-sum) instead of autograd's
    index_put with accumulation.
    """

    @staticmethod
    def forward(ctx, x, src, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return _gather_rows(x, src, inv.numel())

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv).view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _CombineRows(torch.autograd.Function):
    """y (P, D) sorted by expert -> (N, D): sum each token's K slots (padding rows are dropped).

    The exact transpose of `_DispatchRows`, so each one's backward is the other's forward.
    """

    @staticmethod
    def forward(ctx, y, src, inv, k):
        ctx.save_for_backward(src, inv)
        ctx.k = k
        return y.index_select(0, inv).view(-1, k, y.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, g):
        src, inv = ctx.saved_tensors
        return _gather_rows(g.contiguous(), src, inv.numel()), None, None, None


def expert_layout(flat: torch.Tensor, num_experts: int, k: int, block: int = 1):
    """Where each (token, slot) pair goes in the expert-sorted batch.

    flat (S,) expert of each pair (S = N*K) -> src (P,) token of each row (N for a padding row),
    inv (S,) row of each pair, order (P,) pair of each row (S for padding), counts (E,) rows per
    expert. `block` > 1 rounds every expert's group up to a multiple of `block` with zero rows.

    Why pad on CPU: oneDNN JIT-compiles a GEMM for every new row count, about 1 ms each, and
    dropless routing gives every expert a new count every step; that compile was 40 of the
    ~170 ms of a quickstart Kimi-VL step and grew as the balancing spread the tokens. Groups
    in multiples of 64 rows repeat, so the compiled kernels are reused (docs/moe.md).
    """
    s = flat.numel()
    order = torch.argsort(flat, stable=True)  # (S,) pairs sorted by expert
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    pos = torch.arange(s, device=flat.device)  # (S,) row of each sorted pair
    if block > 1:
        padded = (counts + block - 1) // block * block
        shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # (E,) padding before each group
        pos = pos + shift[flat[order]]
        counts = padded
        rows = torch.full((int(padded.sum()),), s, dtype=order.dtype, device=flat.device)
        order = rows.index_copy_(0, pos, order)  # (P,) pair of each row, S for padding
    inv = torch.empty(s, dtype=pos.dtype, device=flat.device)
    inv[order[pos]] = pos
    src = torch.where(order < s, torch.div(order, k, rounding_mode="floor"), s // k)
    return src, inv, order, counts


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class DenseMLP(nn.Module):
    """SwiGLU MLP (dense layers and shared experts); key names as transformers."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Scores (N, E) -> top-k expert ids and combine weights (N, K); selection uses the bias."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring_func: str = "sigmoid",
                 topk_method: str = "noaux_tc", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
        super().__init__()
        if num_experts % n_group:
            raise ValueError(f"n_routed_experts {num_experts} not divisible by n_group {n_group}")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring_func, self.topk_method = scoring_func, topk_method
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        # fp32 always (transformers keeps it in fp32 strictly): tiny updates must not round away
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # keep the correction bias in fp32 through .to(bf16) / .half()
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> (scores (N, E) fp32, topk_idx (N, K) long, topk_weight (N, K) fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32, as transformers
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias  # (N, E): selection only
            if self.n_group > 1 and self.topk_group < self.n_group:
                grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
                if self.topk_method == "group_limited_greedy":  # DeepSeek-V2: best expert per group
                    group_scores = grouped.amax(dim=-1)
                else:  # noaux_tc (V3): sum of the top-2 per group
                    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
                group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
                choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)
            topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # (N, K)
        topk_weight = scores.gather(1, topk_idx)  # unbiased scores
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, topk_weight * self.routed_scaling_factor


class GroupedExperts(nn.Module):
    """E SwiGLU experts in fused tensors; dropless; see the module docstring for the paths."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"):
        super().__init__()
        self.num_experts, self.impl = num_experts, impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # (E, D, I)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (N, D), topk_idx/topk_weight (N, K) -> (N, D)."""
        impl = self.impl
        if impl == "auto":
            e, d, i = self.down_proj.shape
            impl = "grouped_mm" if grouped_mm_supported(x.device, _compute_dtype(x), d, i) else "loop"
        if impl == "reference":
            return self.forward_reference(x, topk_idx, topk_weight)
        return self.forward_sorted(x, topk_idx, topk_weight, use_grouped_mm=impl == "grouped_mm")

    def forward_sorted(self, x, topk_idx, topk_weight, use_grouped_mm: bool = True) -> torch.Tensor:
        n, k = topk_idx.shape
        dtype = _compute_dtype(x)
        block = CPU_GROUP_BLOCK if x.device.type == "cpu" else 1
        src, inv, order, counts = expert_layout(topk_idx.reshape(-1), self.num_experts, k, block)
        xs = _DispatchRows.apply(x.to(dtype), src, inv, k)  # (P, D) gathered inputs, grouped by expert
        w13 = self.gate_up_proj.to(dtype).transpose(1, 2)  # (E, D, 2I) view
        w2 = self.down_proj.to(dtype).transpose(1, 2)  # (E, I, D) view
        if use_grouped_mm:
            offs = counts.cumsum(0).to(torch.int32)
            h = _ContiguousGrad.apply(_grouped_mm(xs, w13, offs))  # (P, 2I)
            gate, up = h.chunk(2, dim=-1)
            ys = _ContiguousGrad.apply(_grouped_mm(F.silu(gate) * up, w2, offs))  # (P, D)
        else:
            outs = []
            for xe, w13e, w2e in zip(xs.split(counts.tolist()), w13.unbind(0), w2.unbind(0)):
                gate, up = (xe @ w13e).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ w2e)
            ys = torch.cat(outs)  # (P, D)
        flat_w = topk_weight.reshape(-1)
        if order.numel() > flat_w.numel():
            flat_w = torch.cat([flat_w, flat_w.new_zeros(1)])  # padding rows: weight 0
        ws = flat_w[order].to(ys.dtype)  # (P,) combine weights in sorted order
        return _CombineRows.apply(ys * ws[:, None], src, inv, k)  # (N, D)

    def forward_reference(self, x, topk_idx, topk_weight) -> torch.Tensor:
        """Plain loop over experts (tests only): mask, gather, SwiGLU, weighted index_add."""
        out = torch.zeros(x.shape[0], self.down_proj.shape[1], dtype=torch.float32, device=x.device)
        for e, (w13e, w2e) in enumerate(zip(self.gate_up_proj.unbind(0), self.down_proj.unbind(0))):
            tok, slot = torch.where(topk_idx == e)
            if tok.numel() == 0:
                continue
            gate, up = F.linear(x[tok], w13e).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2e)
            out.index_add_(0, tok, (y * topk_weight[tok, slot, None]).float())
        return out.to(x.dtype)


class MoE(nn.Module):
    """Routed experts + shared experts; counts tokens per expert and builds the aux loss."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, n_shared_experts: int,
                 num_experts_per_tok: int, *, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1,
                 topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, aux_loss_alpha=0.0,
                 seq_aux=True, experts_impl="auto"):
        super().__init__()
        self.num_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.aux_loss_alpha, self.seq_aux = aux_loss_alpha, seq_aux
        self.gate = TopKRouter(hidden_size, n_routed_experts, num_experts_per_tok, scoring_func=scoring_func,
                               topk_method=topk_method, n_group=n_group, topk_group=topk_group,
                               norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
        self.experts = GroupedExperts(n_routed_experts, hidden_size, moe_intermediate_size, impl=experts_impl)
        self.shared_experts = (DenseMLP(hidden_size, moe_intermediate_size * n_shared_experts)
                               if n_shared_experts > 0 else None)
        # tokens routed to each expert since the last bias update (training forwards only)
        self.register_buffer("tokens_per_expert", torch.zeros(n_routed_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), token_mask (B, T) bool (False = padding, not counted) -> (B, T, D)."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)  # (N, D)
        scores, topk_idx, topk_weight = self.gate(flat)
        if self.training:
            with torch.no_grad():
                idx = topk_idx if token_mask is None else topk_idx[token_mask.reshape(-1)]
                self.tokens_per_expert += torch.bincount(idx.reshape(-1), minlength=self.num_experts).float()
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self._aux_loss(scores.view(b, t, -1), topk_idx.view(b, t, -1), token_mask)
        out = self.experts(flat, topk_idx, topk_weight).view(b, t, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.to(x.dtype)

    def _aux_loss(self, scores, topk_idx, token_mask) -> torch.Tensor:
        """Sequence-wise (or batch-wise) balance loss alpha * sum_i f_i P_i (DeepSeek-V3 eq. 17-20)."""
        b, t, e = scores.shape
        m = (torch.ones(b, t, device=scores.device) if token_mask is None else token_mask.float())  # (B, T)
        if not self.seq_aux:  # one "sequence" = the whole batch
            scores, topk_idx, m = scores.reshape(1, b * t, e), topk_idx.reshape(1, b * t, -1), m.reshape(1, -1)
        probs = scores / scores.sum(-1, keepdim=True)  # normalised affinities
        n_tok = m.sum(-1).clamp(min=1)  # (B',)
        onehot = torch.zeros(*topk_idx.shape[:2], e, device=scores.device).scatter_(2, topk_idx, 1.0)  # (B', T, E)
        f = (onehot * m[..., None]).sum(1) * e / (self.top_k * n_tok[:, None])  # (B', E), no grad
        p = (probs * m[..., None]).sum(1) / n_tok[:, None]  # (B', E)
        return self.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """One balancing step (torchtitan): bias += gamma * sign(mean - count), zero-mean; clear counts."""
        counts = self.tokens_per_expert
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        if gamma > 0 and counts.sum() > 0:
            delta = gamma * torch.sign(counts.mean() - counts)
            self.gate.e_score_correction_bias += delta - delta.mean()
        counts.zero_()
