"""MoonViT: the Kimi-VL native-resolution vision encoder, in plain PyTorch.

Images of different sizes are packed into one sequence of patches (no padding). Attention
stays inside each image: one attention call per run of same-size images (never a dense L x L
mask over the pack, which is O(L^2) memory and was the remote code's OOM bug). Everything
that depends only on the grids (cu_seqlens, RoPE angles, resampled position embeddings,
the 2x2 merge gather) is computed once per forward in `VisionMeta` and shared by all blocks.

Parameter names follow the Kimi-VL checkpoint (`wqkv`, `wo`, `norm0/1`, `mlp.fc0/fc1`,
`final_layernorm`), so its layout loads with a prefix rename only. The fused `wqkv` keeps
Kimi-VL's interleaved-complex RoPE layout; transformers' kimi_k25 stores q/k rotate-half
(see load.py for the permutation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.models.kimivl.config import MoonViTConfig
from mmkit.nn.activation import gelu_tanh


@dataclass
class VisionMeta:
    """Per-batch metadata derived from `grid_thw` once and reused by every block."""

    groups: list[tuple[int, int, int]]  # (start, n_images, tokens_per_image): runs of same-size images
    cu_seqlens: torch.Tensor  # (n_images + 1,) int32
    freqs_cis: torch.Tensor  # (L, hd/2) complex64: exp(i * angle), Kimi-VL's rope table rows
    merge_index: torch.Tensor  # (L,) gather that reorders patches into 2x2 groups [TL, TR, BL, BR]
    sizes: list[tuple[int, int]]  # (h, w) per image


def _grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int]]:
    out = []
    for t, h, w in grid_thw.tolist():
        if int(t) != 1:
            raise ValueError(f"MoonViT takes still images (t=1); got grid {(t, h, w)}")
        out.append((int(h), int(w)))
    return out


def rope_2d_angles(sizes: list[tuple[int, int]], head_dim: int, theta: float, device) -> torch.Tensor:
    """Angles (L, head_dim/2) in Kimi-VL order: complex pair 2i rotates by x * f_i (width),
    pair 2i+1 by y * f_i (height), f_i = theta^(-4i/head_dim)."""
    n_freq = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, n_freq, device=device, dtype=torch.float32) * 4 / head_dim))
    parts = []
    for h, w in sizes:
        y = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # (h*w,)
        x = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
        ang = torch.stack([x[:, None] * inv_freq, y[:, None] * inv_freq], dim=-1)  # (hw, n_freq, 2)
        parts.append(ang.flatten(1))
    return torch.cat(parts)


def apply_rope_2d(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (L, ..., hd) with (2i, 2i+1) complex pairs; freqs_cis (L, hd/2) complex64.
    fp32 complex multiply, as Kimi-VL's `apply_rope`."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (L, ..., hd/2)
    f = freqs_cis.view((freqs_cis.shape[0],) + (1,) * (x.dim() - 2) + (freqs_cis.shape[1],))
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


def bicubic_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """Cached `_bicubic_matrix`, always built outside inference mode: a cached inference tensor
    (first built during generation) could not be saved for a later training backward."""
    with torch.inference_mode(False):
        return _bicubic_matrix(out_size, in_size)


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) fp32 matrix M with M @ v == F.interpolate(v, out, mode="bicubic",
    align_corners=False) along one axis (Keys a=-0.75, border-clamped taps, no antialias).

    The 2-D resample of the position grid is then two small matmuls, Mh @ T @ Mw^T: faster
    than upsample_bicubic2d forward and much faster backward on CPU, same numbers (1e-7).
    """
    idx = torch.arange(out_size, dtype=torch.float64)
    src = (idx + 0.5) * in_size / out_size - 0.5  # half-pixel centres
    floor = torch.floor(src)
    offsets = torch.arange(-1, 3, dtype=torch.float64)
    d = (src[:, None] - floor[:, None] - offsets).abs()  # (out, 4)
    a = -0.75
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = torch.where(d <= 1, near, far)
    taps = (floor[:, None].long() + offsets.long()).clamp(0, in_size - 1)
    m = torch.zeros(out_size, in_size, dtype=torch.float64).scatter_add_(1, taps, w)
    return m.float()


class PatchEmbed(nn.Module):
    """Conv patch projection + learned absolute position grid resampled bicubically per image."""

    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = nn.Module()
        self.pos_emb.weight = nn.Parameter(torch.empty(cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size))
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def position_embeddings(self, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """(L, D): the table resampled to each (h, w), computed once per distinct size."""
        table = self.pos_emb.weight  # (H0, W0, D)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for hw in sizes:
            if hw not in cache:
                if hw == tuple(table.shape[:2]):
                    cache[hw] = table.flatten(0, 1)
                else:
                    # bicubic, align_corners=False, no antialias: what Kimi-VL and kimi_k25 compute
                    (h0, w0, d), (h, w) = table.shape, hw
                    mh = bicubic_matrix(h, h0).to(table.device, table.dtype)  # (h, H0)
                    mw = bicubic_matrix(w, w0).to(table.device, table.dtype)  # (w, W0)
                    rows = (mh @ table.reshape(h0, w0 * d)).view(h, w0, d)  # (h, W0, D)
                    cache[hw] = torch.matmul(mw, rows).flatten(0, 1)  # (h, w, D) -> (h*w, D)
            parts.append(cache[hw])
        return torch.cat(parts)

    def forward(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]], use_pos_emb: bool = True):
        # A conv whose kernel covers the whole (3, p, p) patch is a matmul; F.linear is faster on CPU.
        w = self.proj.weight.flatten(1)  # (D, 3*p*p)
        x = F.linear(pixel_values.flatten(1).to(w.dtype), w, self.proj.bias)  # (L, D)
        if use_pos_emb:
            x = x + self.position_embeddings(sizes).to(x.dtype)
        return x


def _explicit_attention(q: torch.Tensor, max_score_bytes: int = 1 << 28) -> bool:
    """Use bmm-softmax-bmm instead of SDPA: CPU, half precision, scores <= 256 MiB."""
    n, h, t, _ = q.shape
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and n * h * t * t * 2 <= max_score_bytes


class VisionAttention(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, meta: VisionMeta, use_rope: bool = True) -> torch.Tensor:  # (L, D)
        L, H, hd = x.shape[0], self.num_heads, self.head_dim
        qkv = self.wqkv(x).view(L, 3, H, hd)  # head-major, as Kimi-VL's wqkv
        if use_rope:
            qk, v = qkv.split([2, 1], dim=1)  # split, not slicing: one cheap SplitBackward
            qkv = torch.cat([apply_rope_2d(qk, meta.freqs_cis), v], dim=1)  # q and k rotated in one pass
        # one copy into (3, H, L, hd); images are then split along L (strided (H, t, hd) views)
        q, k, v = qkv.permute(1, 2, 0, 3).contiguous().unbind(0)
        sizes = [n * t for _, n, t in meta.groups]
        outs = []
        for (_, n, t), qi, ki, vi in zip(meta.groups, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)):
            qi, ki, vi = (z.unflatten(1, (n, t)).transpose(0, 1) for z in (qi, ki, vi))  # (n, H, t, hd)
            if _explicit_attention(qi):
                # CPU + bf16/fp16: two bmm + softmax is ~2x faster (fwd+bwd) than the CPU flash
                # kernel at ViT sizes; scores are per image, so memory is bounded by the largest
                # image, never by the pack.
                o = torch.softmax((qi * hd ** -0.5) @ ki.transpose(-1, -2), dim=-1) @ vi
            else:
                o = F.scaled_dot_product_attention(qi, ki, vi)
            outs.append(o.transpose(0, 1).flatten(1, 2))  # (H, n*t, hd)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (H, L, hd)
        return self.wo(out.transpose(0, 1).reshape(L, H * hd))


class VisionMLP(nn.Module):
    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.fc0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        h = self.fc0(x)
        # tanh GELU through mmkit.nn.gelu_tanh: same values, ~1.6x faster forward on CPU bf16
        return self.fc1(gelu_tanh(h) if self.approximate == "tanh" else F.gelu(h))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.norm0 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, meta: VisionMeta, use_rope: bool = True) -> torch.Tensor:
        x = x + self.attn(self.norm0(x), meta, use_rope)
        return x + self.mlp(self.norm1(x))


class MoonViT(nn.Module):
    """Packed patches (L, 3, p, p) + grid rows (n, 3) -> per-patch features (L, D).

    `merge_2x2(features, meta)` regroups them into (L/4, 4, D) merged tokens for the projector.
    """

    def __init__(self, cfg: MoonViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def build_meta(self, grid_thw: torch.Tensor, device) -> VisionMeta:
        sizes = _grid_list(grid_thw)
        kh, kw = self.config.merge_kernel_size
        hd = self.config.hidden_size // self.config.num_attention_heads
        groups, start, counts = [], 0, []
        for i, (h, w) in enumerate(sizes):
            t = h * w
            if i and sizes[i - 1] == (h, w):  # consecutive same-size images: one batched SDPA call
                s, n, _ = groups[-1]
                groups[-1] = (s, n + 1, t)
            else:
                groups.append((start, 1, t))
            start += t
            counts.append(t)
        cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        ang = rope_2d_angles(sizes, hd, self.config.rope_theta, device)
        merge_parts, off = [], 0
        for h, w in sizes:
            if h % kh or w % kw:
                raise ValueError(f"grid {(h, w)} is not a multiple of the merge kernel {(kh, kw)}")
            idx = torch.arange(off, off + h * w, device=device).view(h // kh, kh, w // kw, kw)
            merge_parts.append(idx.permute(0, 2, 1, 3).flatten())  # (h/2, w/2, 2, 2) -> TL, TR, BL, BR
            off += h * w
        return VisionMeta(groups=groups, cu_seqlens=cu, freqs_cis=torch.polar(torch.ones_like(ang), ang),
                          merge_index=torch.cat(merge_parts), sizes=sizes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, meta: VisionMeta | None = None,
                use_rope: bool | None = None, use_pos_emb: bool = True) -> torch.Tensor:
        meta = meta or self.build_meta(grid_thw, pixel_values.device)
        use_rope = self.config.use_rope if use_rope is None else use_rope
        x = self.patch_embed(pixel_values, meta.sizes, use_pos_emb)  # (L, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, meta, use_rope, use_reentrant=False)
            else:
                x = block(x, meta, use_rope)
        return self.final_layernorm(x)

    def merge_2x2(self, features: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """(L, D) -> (L/4, 4, D): one gather, sub-tokens in [TL, TR, BL, BR] order."""
        kh, kw = self.config.merge_kernel_size
        return features.index_select(0, meta.merge_index).view(-1, kh * kw, features.shape[-1])
