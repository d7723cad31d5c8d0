"""SwiGLU feed-forward with the gate and up projections fused into one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `w13` holds [gate; up] stacked (Meta's fused `w13`).

    One (D -> 2I) matmul instead of two (D -> I): fewer kernel launches and one read of x.
    Checkpoints with separate gate/up weights load with `torch.cat([gate, up], 0)`.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D)
        gate, up = self.w13(x).chunk(2, dim=-1)  # (..., I) each
        return self.w2(F.silu(gate) * up)
