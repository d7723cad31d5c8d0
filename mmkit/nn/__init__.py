"""Shared leaf layers (pure PyTorch): norms, rotary embeddings, MLPs, KV caches, fast CPU kernels."""

from mmkit.nn.activation import gelu_tanh
from mmkit.nn.attention import blocked_attention  # `attention` (SDPA drop-in): import from mmkit.nn.attention
from mmkit.nn.kv_cache import StaticKVCache
from mmkit.nn.mlp import SwiGLU
from mmkit.nn.norm import RMSNorm
from mmkit.nn.rope import apply_rope_interleaved, apply_rope_rotate_half, rope_cos_sin

# Rows of a CPU GEMM whose count changes from step to step are padded to a multiple of this:
# oneDNN compiles (~1 ms) and keeps a kernel for every new row count (MoE expert groups,
# the Chameleon training head on supervised rows; docs/moe.md).
CPU_GEMM_ROW_BLOCK = 64

__all__ = ["CPU_GEMM_ROW_BLOCK", "RMSNorm", "StaticKVCache", "SwiGLU", "apply_rope_interleaved", "apply_rope_rotate_half",
           "blocked_attention", "gelu_tanh", "rope_cos_sin"]
