"""Multi-head latent attention (DeepSeek-V2/V3, Moonlight) and its compressed KV cache.

Keys and values are produced from a per-token latent c (kv_lora_rank, RMS-normed) by
`kv_b_proj`; a single rope key (qk_rope_head_dim) is shared by all heads. The cache stores
only (c, k_rope): kv_lora_rank + qk_rope_head_dim numbers per token and layer instead of
H * (qk_nope + qk_rope + v).

RoPE is the interleaved (complex-pair) layout of the original checkpoints, i.e.
transformers' `DeepseekV3Config.rope_interleave=True`. transformers de-interleaves while
rotating (its output is in rotate-half order); we keep the interleaved order. q and k are
permuted alike, so q.k and the attention output are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.nn import RMSNorm, apply_rope_interleaved
from mmkit.nn.attention import attention


class MLACache:
    """Static latent cache: `latent` (L, B, T_max, C) and `k_rope` (L, B, T_max, R).

    Same surface as `mmkit.nn.StaticKVCache`: `update(layer, latent, k_rope, cache_position)`
    writes (B, T_new, C) / (B, T_new, R) in place and returns the used prefixes;
    `attention_mask` (B, T_max) long (0 = left padding) may be set by the sampler; `reset()`.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.latent = torch.zeros(num_layers, batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(num_layers, batch_size, max_len, rope_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self.attention_mask: torch.Tensor | None = None

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, cache_position: int):
        end = cache_position + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.max_len}")
        self.latent[layer, :, cache_position:end] = latent
        self.k_rope[layer, :, cache_position:end] = k_rope
        return self.latent[layer, :, :end], self.k_rope[layer, :, :end]

    def reset(self) -> None:
        self.latent.zero_()
        self.k_rope.zero_()
        self.attention_mask = None


class MLA(nn.Module):
    """MLA with optional q low-rank path; parameter names as transformers' DeepseekV3Attention."""

    def __init__(self, hidden_size: int, num_heads: int, *, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, attention_bias: bool = False,
                 rms_norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim ** -0.5
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            # transformers builds this norm with its default eps (1e-6), not rms_norm_eps
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                cache: MLACache | None = None, cache_position: int = 0, layer_idx: int = 0) -> torch.Tensor:
        """x (B, T, D); cos/sin (B, T, R/2); attn_mask (B, 1, T, S) bool or None (= causal)."""
        b, t, _ = x.shape
        h = self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, h, self.qk_head_dim).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C)
        q_rope = apply_rope_interleaved(q_rope, cos.to(q_rope.dtype), sin.to(q_rope.dtype))
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(1), cos.to(k_rope.dtype), sin.to(k_rope.dtype))[:, 0]
        if cache is not None:  # (B, S, C), (B, S, R): the whole prefix
            latent, k_rope = cache.update(layer_idx, latent.to(cache.latent.dtype), k_rope.to(cache.k_rope.dtype),
                                          cache_position)
        s = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, s, h, self.nope + self.v_dim).transpose(1, 2)  # (B, H, S, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).to(k_nope.dtype).expand(b, h, s, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope.to(q_nope.dtype)], dim=-1)  # (B, H, T, nope+rope)
        # training / full forward: mmkit's blocked attention on CPU half precision (faster than the
        # CPU flash kernel, see mmkit/nn/attention.py); cached decoding keeps SDPA
        sdpa = F.scaled_dot_product_attention if cache is not None else attention
        out = sdpa(q, k, v.to(q.dtype) if v.dtype != q.dtype else v, attn_mask=attn_mask,
                   is_causal=attn_mask is None and t > 1, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * self.v_dim))  # (B, T, D)
