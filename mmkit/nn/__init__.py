"""Shared leaf layers (pure PyTorch): norms, rotary embeddings, MLPs, KV caches."""

from mmkit.nn.kv_cache import StaticKVCache
from mmkit.nn.mlp import SwiGLU
from mmkit.nn.norm import RMSNorm
from mmkit.nn.rope import apply_rope_interleaved, apply_rope_rotate_half, rope_cos_sin

__all__ = ["RMSNorm", "StaticKVCache", "SwiGLU", "apply_rope_interleaved", "apply_rope_rotate_half", "rope_cos_sin"]
