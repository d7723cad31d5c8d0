"""Kimi-VL's projector: 2x2 merged ViT sub-tokens -> decoder embeddings.

Each of the 4 sub-tokens is LayerNorm'ed on its own (the norm has the ViT width), *then*
they are concatenated, so the norm is not over the 4D concat: Linear(4D, 4D) -> exact
(erf) GELU -> Linear(4D, d_text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchMergerProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, merge: int = 4, eps: float = 1e-5):
        super().__init__()
        self.merged_dim = vision_dim * merge
        self.pre_norm = nn.LayerNorm(vision_dim, eps=eps)
        self.linear_1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_2 = nn.Linear(self.merged_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, 4, Dv) -> (M, Dt)
        x = self.pre_norm(x).flatten(1)  # (M, 4*Dv), sub-tokens [TL, TR, BL, BR]
        return self.linear_2(F.gelu(self.linear_1(x)))
