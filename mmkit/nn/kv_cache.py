"""Preallocated (static-shape) KV cache: the contract between models and the sampler.

A model that supports fast generation accepts `cache=` and `cache_position=` in forward:
for each attention layer `i` it calls `k_all, v_all = cache.update(i, k, v, cache_position)`
with k/v of shape (B, H_kv, T_new, D) and attends over the returned (B, H_kv, T_used, D)
views, using the cache's `attention_mask` (B, T_max; 0 = left padding) for padded rows.
Families with another cache layout (MLA keeps the compressed latent) provide their own
class with the same `update` / `reset` / `max_len` surface.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """k, v buffers (L, B, H_kv, T_max, D) allocated once; `update` writes in place."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 v_head_dim: int | None = None):
        shape_k = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        shape_v = (num_layers, batch_size, num_kv_heads, max_len, v_head_dim or head_dim)
        self.k = torch.zeros(shape_k, dtype=dtype, device=device)
        self.v = torch.zeros(shape_v, dtype=dtype, device=device)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.max_len = max_len
        self.attention_mask: torch.Tensor | None = None  # (B, T_max) long, 1 = real token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: int):
        """Write k/v (B, H, T_new, D) at [cache_position, cache_position+T_new) (cast to the
        cache dtype); return the used prefix (B, H, cache_position+T_new, D)."""
        end = cache_position + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.max_len}")
        kl, vl = self.k_layers[layer], self.v_layers[layer]
        kl[:, :, cache_position:end] = k
        vl[:, :, cache_position:end] = v
        return kl[:, :, :end], vl[:, :, :end]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.attention_mask = None
