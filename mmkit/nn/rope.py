"""1-D rotary position embeddings, in both layouts found in checkpoints.

rotate-half (Llama/HF Chameleon): dims [0, d/2) pair with [d/2, d).
interleaved (Meta/DeepSeek/Kimi): dims (2i, 2i+1) form one complex pair.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, dim/2) in fp32 math (cast to `dtype` at the end)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.int64).float() / dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, dim/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D/2)."""
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)  # (B, 1, T, D)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with (2i, 2i+1) pairs; cos/sin (B, T, D/2)."""
    cos = cos.unsqueeze(1)  # (B, 1, T, D/2)
    sin = sin.unsqueeze(1)
    xr, xi = x[..., 0::2], x[..., 1::2]
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2)
