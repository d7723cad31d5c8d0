"""VQGAN-style image tokenizer: conv encoder -> quantizer -> conv decoder.

The encoder/decoder follow the taming-transformers layout (the one Chameleon, LlamaGen and
HF `ChameleonVQVAE` share: `conv_in`, `down.{i}.block.{j}`, `mid.block_1/attn_1/block_2`,
`norm_out`, `conv_out`, `quant_conv`, `post_quant_conv`), so foreign encoder weights load
by name. The quantizer comes from vector-quantize-pytorch and is picked by config:

- `vq`: `VectorQuantize`, cosine (l2-normalised) codes with EMA updates (LlamaGen-style;
  the library refuses cosine + a learnable codebook) or Euclidean codes (Chameleon).
- `fsq`: finite scalar quantization (no codebook, no auxiliary loss).
- `lfq`: lookup-free quantization (binary codes + entropy loss).

Every quantizer parameter is set explicitly because the library defaults differ from the
published recipes (rotation trick on, commitment 1.0, EMA decay 0.8).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.config import from_dict, to_dict
from mmkit.errors import ConfigError, MmkitError, UsageError

MODEL_TYPE = "mmkit_vq"


@dataclass
class VQConfig:
    """Architecture + quantizer. Defaults are the `shapes-f8` preset (64 px -> 8x8 codes)."""

    in_channels: int = 3
    resolution: int = 64  # nominal training resolution (any multiple of `downsample` works)
    base_channels: int = 16
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # f = 2**(len-1)
    num_res_blocks: int = 1
    # decoder blocks per level; None = num_res_blocks + 1 (taming). 1 makes a step ~16% cheaper
    # for the shapes recipe (the decoder holds ~3/4 of its MACs); see docs/tokenizers.md.
    decoder_res_blocks: int | None = None
    attn_levels: list[int] = field(default_factory=list)  # encoder levels (0 = full res) with attention
    mid_attn: bool = True  # attention block at the lowest resolution (encoder and decoder)
    latent_channels: int = 32  # encoder output channels ("z_channels")
    embed_dim: int = 8  # quant_conv output = code vector dim (LlamaGen: 256 -> 8)
    norm: Literal["group", "channel"] = "group"  # channel: per-pixel LayerNorm over channels
    norm_groups: int = 8  # GroupNorm groups (clipped to divide the channel count)
    dropout: float = 0.0
    quantizer: Literal["vq", "fsq", "lfq"] = "vq"
    codebook_size: int = 512
    # vq
    use_cosine_sim: bool = True
    ema_decay: float = 0.99
    commitment_weight: float = 0.25
    threshold_ema_dead_code: float = 2.0  # codes whose EMA cluster size falls below are re-seeded
    kmeans_init: bool = False
    # fsq (codebook_size must equal prod(levels))
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8])
    # lfq (codebook_size must be a power of two)
    lfq_entropy_weight: float = 0.1
    lfq_diversity_gamma: float = 1.0

    def __post_init__(self):
        if self.in_channels < 1 or self.base_channels < 1 or not self.channel_multiplier:
            raise ValueError("in_channels, base_channels and channel_multiplier must be positive/non-empty")
        if self.quantizer == "fsq" and math.prod(self.fsq_levels) != self.codebook_size:
            raise ValueError(f"fsq: prod(fsq_levels)={math.prod(self.fsq_levels)} != codebook_size={self.codebook_size}")
        if self.quantizer == "lfq" and (self.codebook_size & (self.codebook_size - 1)):
            raise ValueError(f"lfq: codebook_size {self.codebook_size} is not a power of two")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 1:
            raise ValueError(f"decoder_res_blocks must be >= 1 (or null), got {self.decoder_res_blocks}")
        if any(not 0 <= lvl < len(self.channel_multiplier) for lvl in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} out of range")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)


# Presets: keyword overrides of the VQConfig defaults.
PRESETS: dict[str, dict] = {
    "shapes-f8": {},
    # Chameleon-like: 512 px -> 32x32 codes, 8192 codes (Chameleon: ch 128, mult 1,1,2,2,4 ->
    # f16; 256-dim Euclidean codes). Here cosine+EMA 8-dim codes, as LlamaGen.
    "f16-8192": dict(resolution=512, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
                     latent_channels=256, embed_dim=8, norm_groups=32, codebook_size=8192),
    # LlamaGen VQ-16: 256 px -> 16x16, 16384 x 8-dim cosine codes.
    "f16-16384": dict(resolution=256, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
                      latent_channels=256, embed_dim=8, norm_groups=32, codebook_size=16384),
}


def preset_config(name: str = "shapes-f8", **overrides) -> VQConfig:
    """A preset's VQConfig with keyword overrides (unknown keys raise ConfigError)."""
    if name not in PRESETS:
        raise UsageError(f"unknown VQ preset '{name}' (known: {', '.join(PRESETS)})")
    return from_dict(VQConfig, {**PRESETS[name], **overrides}, where=f"preset {name}")


# ----------------------------------------------------------------------------- layers


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel. Unlike GroupNorm it has no spatial statistics,
    so a model trained on small crops sees the same normalisation on full images."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):  # (B, C, H, W)
        u = x.mean(1, keepdim=True)
        var = (x - u).pow(2).mean(1, keepdim=True)
        return (x - u) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


def _norm(channels: int, spec: tuple[str, int]) -> nn.Module:
    """spec = (config.norm, config.norm_groups)."""
    kind, groups = spec
    if kind == "channel":
        return ChannelNorm(channels)
    g = math.gcd(channels, groups)
    return nn.GroupNorm(num_groups=g, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a 1x1 shortcut when the width changes (taming layout)."""

    def __init__(self, cin: int, cout: int, groups: tuple[str, int], dropout: float):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (only used at low resolution)."""

    def __init__(self, channels: int, groups: tuple[str, int]):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0,1,0,1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_multiplier, (cfg.norm, cfg.norm_groups)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m, g, cfg.dropout))
                cin = ch * m
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(cin, g))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, g, cfg.dropout)
        self.mid.attn_1 = AttnBlock(cin, g) if cfg.mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, g, cfg.dropout)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, Z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_multiplier, (cfg.norm, cfg.norm_groups)
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, g, cfg.dropout)
        self.mid.attn_1 = AttnBlock(cin, g) if cfg.mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, g, cfg.dropout)
        # taming stores `up` in resolution order (up[0] = full res) but runs it reversed.
        ups = [None] * len(mult)
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            n_blocks = cfg.num_res_blocks + 1 if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks
            for _ in range(n_blocks):
                level.block.append(ResnetBlock(cin, ch * mult[i], g, cfg.dropout))
                cin = ch * mult[i]
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(cin, g))
            if i != 0:
                level.upsample = Upsample(cin)
            ups[i] = level
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):  # (B, Z, h, w) -> (B, 3, h*f, w*f)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- quantizer


class Quantizer(nn.Module):
    """One interface over the three library quantizers, on (B, D, h, w) feature maps.

    forward -> (z_q (B, D, h, w) with straight-through gradients, codes (B, h, w) long,
    aux loss scalar); `embed(codes) -> z_q` is the exact inverse used by `decode`.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

        self.kind = cfg.quantizer
        d = cfg.embed_dim
        if cfg.quantizer == "vq":
            self.impl = VectorQuantize(
                dim=d,
                codebook_size=cfg.codebook_size,
                codebook_dim=d,  # no extra projection: quant_conv already maps to embed_dim
                heads=1,
                separate_codebook_per_head=False,
                use_cosine_sim=cfg.use_cosine_sim,
                decay=cfg.ema_decay,
                ema_update=True,
                learnable_codebook=False,
                commitment_weight=cfg.commitment_weight,
                commitment_use_cross_entropy_loss=False,
                rotation_trick=False,  # plain straight-through estimator, as LlamaGen/taming
                straight_through=False,
                directional_reparam=False,
                threshold_ema_dead_code=cfg.threshold_ema_dead_code,
                kmeans_init=cfg.kmeans_init,
                kmeans_iters=10,
                orthogonal_reg_weight=0.0,
                codebook_diversity_loss_weight=0.0,
                stochastic_sample_codes=False,
                sample_codebook_temp=1.0,
                affine_param=False,
                sync_codebook=None,  # auto: all-reduce EMA statistics when torch.distributed is up
                channel_last=True,
                accept_image_fmap=False,
            )
        elif cfg.quantizer == "fsq":
            self.impl = FSQ(
                levels=list(cfg.fsq_levels),
                dim=d,
                num_codebooks=1,
                keep_num_codebooks_dim=False,
                channel_first=False,
                projection_has_bias=True,
                return_indices=True,
                force_quantization_f32=True,
                preserve_symmetry=False,
                noise_dropout=0.0,
            )
        else:
            self.impl = LFQ(
                dim=d,
                codebook_size=cfg.codebook_size,
                entropy_loss_weight=cfg.lfq_entropy_weight,
                commitment_loss_weight=cfg.commitment_weight,
                diversity_gamma=cfg.lfq_diversity_gamma,
                num_codebooks=1,
                keep_num_codebooks_dim=False,
                codebook_scale=1.0,
                frac_per_sample_entropy=1.0,
                channel_first=False,
                spherical=False,
                force_quantization_f32=True,
            )

    def forward(self, z):  # (B, D, h, w)
        # Always fp32, also under bf16 autocast: nearest-code search in bf16 picks different
        # codes than fp32 encode (the library only disables CUDA autocast), and EMA statistics
        # need the precision.
        with torch.autocast(z.device.type, enabled=False):
            return self._forward(z.float())

    def _forward(self, z):  # (B, D, h, w) fp32
        B, D, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(B, h * w, D)  # (B, N, D)
        if self.kind == "vq":
            zq, codes, aux = self.impl(x)
        elif self.kind == "fsq":
            zq, codes = self.impl(x)
            aux = zq.new_zeros(())
        else:
            zq, codes, aux = self.impl(x)
        zq = zq.reshape(B, h, w, D).permute(0, 3, 1, 2)
        return zq, codes.reshape(B, h, w).long(), aux.reshape(()) if aux.numel() == 1 else aux.mean()

    @torch.no_grad()
    def refit_codebook(self, z: torch.Tensor, iters: int = 10, chunk: int = 8192) -> dict[str, float]:
        """k-means (Lloyd) refinement of the `vq` codebook on latents z (N, D), started from it.

        The EMA codebook with dead-code re-seeding ends training as a set of recently re-seeded
        batch vectors, not cluster centres; a few Lloyd steps on training latents halve the
        quantization error (docs/tokenizers.md). Empty clusters take the worst-fitted latents.
        Returns the mean squared quantization error before and after.
        """
        if self.kind != "vq":
            raise UsageError(f"codebook refit needs quantizer 'vq', not '{self.kind}'")
        cb = self.impl._codebook
        cosine = bool(cb.use_cosine_sim)
        x = z.detach().float().reshape(-1, z.shape[-1])  # (N, D)
        if cosine:
            x = F.normalize(x, dim=-1)
        E = cb.embed.data[0].float().clone()  # (K, D)
        K = E.shape[0]

        def assign(E):  # -> code (N,), squared distance (N,)
            idx, err = [], []
            e2 = E.pow(2).sum(-1)  # (K,)
            for xs in x.split(chunk):
                d = xs.pow(2).sum(-1, keepdim=True) - 2 * xs @ E.T + e2  # (n, K)
                m, i = d.min(-1)
                idx.append(i)
                err.append(m.clamp(min=0))
            return torch.cat(idx), torch.cat(err)

        idx, err = assign(E)
        before = float(err.mean())
        for _ in range(iters):
            counts = torch.bincount(idx, minlength=K)  # (K,)
            sums = torch.zeros_like(E).index_add_(0, idx, x)
            new = sums / counts.clamp(min=1)[:, None].float()
            if cosine:
                new = F.normalize(new, dim=-1)
            dead = counts == 0
            if dead.any():  # re-seed empty clusters with the worst-fitted latents
                new[dead] = x[err.argsort(descending=True)[: int(dead.sum())]]
            E = new
            idx, err = assign(E)
        cb.embed.data[0] = E.to(cb.embed.dtype)
        cb.embed_avg.data[0] = (E * cb.cluster_size.data[0, :, None]).to(cb.embed_avg.dtype)  # keep EMA consistent
        return {"qerr_before": before, "qerr_after": float(err.mean())}

    @torch.no_grad()
    def codes(self, z):  # (B, D, h, w) -> codes (B, h, w) long, the codes forward() picks in eval mode
        """Nearest codes only. Why: in eval mode the library's forward also builds a (N, K) float
        one-hot and gathers z_q, ~25 % of `encode` on the shapes VQ (K = 2048, D = 8); here the same
        similarity op (einsum over l2-normalised latents) and argmax, so the codes are the same."""
        cb = getattr(self.impl, "_codebook", None)
        if self.kind != "vq" or self.training or not getattr(cb, "use_cosine_sim", False):
            return self.forward(z)[1]
        with torch.autocast(z.device.type, enabled=False):
            B, D, h, w = z.shape
            x = cb.transform_input(z.float().permute(0, 2, 3, 1).reshape(1, B * h * w, D))  # (1, N, D)
            dist = torch.einsum("h n d, h c d -> h n c", x, cb.embed.detach().float())  # (1, N, K)
            return dist.argmax(-1).reshape(B, h, w)

    def embed(self, codes):  # (B, h, w) long -> (B, D, h, w)
        B, h, w = codes.shape
        flat = codes.reshape(B, h * w)
        if self.kind == "vq":
            zq = self.impl.get_output_from_indices(flat)
        else:
            zq = self.impl.indices_to_codes(flat)
        return zq.reshape(B, h, w, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- model


class VQModel(nn.Module):
    """Image <-> discrete codes. Images are (B, 3, H, W) in [-1, 1], H and W multiples of f."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = Quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.downsample, self.config.in_channels
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise UsageError(f"VQ encode expects images of shape (B, {c}, H, W), got {shape}")
        _, C, H, W = images.shape
        if C != c:
            raise UsageError(f"VQ encode expects {c} channels, got {C} (images of shape {tuple(images.shape)})")
        if H < f or W < f:
            raise UsageError(f"image {H}x{W} is smaller than the VQ downsampling factor {f}")
        if H % f or W % f:
            raise UsageError(f"image size {H}x{W} is not divisible by the VQ downsampling factor {f}")

    def latents(self, images):
        """images (B,3,H,W) -> pre-quantization latents (B,D,h,w)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, zq):
        """(Quantized) latents (B,D,h,w) -> images (B,3,H,W), unclamped and differentiable."""
        return self.decoder(self.post_quant_conv(zq))

    def quantize_images(self, images):
        """images (B,3,H,W) -> (z_q (B,D,h,w), codes (B,h,w), aux loss)."""
        return self.quantize(self.latents(images))

    def forward(self, images):
        """Training pass: (reconstruction (B,3,H,W), codes (B,h,w), quantizer aux loss)."""
        zq, codes, aux = self.quantize_images(images)
        return self.decode_latents(zq), codes, aux

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) long. Deterministic in eval mode."""
        dtype = next(self.parameters()).dtype
        return self.quantize.codes(self.latents(images.to(dtype)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, h*f, w*f), clamped to [-1, 1]."""
        if not torch.is_tensor(codes) or codes.dim() != 3:
            raise UsageError(f"VQ decode expects codes of shape (B, h, w), got {getattr(codes, 'shape', codes)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise UsageError(f"VQ code out of range [0, {self.codebook_size}): {int(codes.min())}..{int(codes.max())}")
        zq = self.quantize.embed(codes).to(next(self.parameters()).dtype)
        return self.decode_latents(zq).clamp(-1, 1)

    # --------------------------------------------------------------- persistence

    def save_pretrained(self, out_dir) -> None:
        """config.json (model_type mmkit_vq) + model.safetensors (all weights and EMA buffers)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": MODEL_TYPE, **to_dict(self.config)}
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "model_type": MODEL_TYPE})

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu") -> "VQModel":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise UsageError(f"not a VQ model directory (needs config.json + model.safetensors): {path}")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{cfg_file}: invalid JSON") from None
        if raw.pop("model_type", None) != MODEL_TYPE:
            raise UsageError(f"{cfg_file}: model_type is not {MODEL_TYPE!r}")
        try:
            config = from_dict(VQConfig, raw, where=str(cfg_file))
        except ConfigError as e:
            raise UsageError(str(e)) from None
        model = cls(config)
        state = load_file(str(weights), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MmkitError(f"{weights}: weights do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_model(path, **kwargs) -> VQModel:
    """Entry point for `mmkit.load_model` (model_type `mmkit_vq`)."""
    return VQModel.from_pretrained(path, **kwargs)


def replace_config(cfg: VQConfig, **changes) -> VQConfig:
    return dataclasses.replace(cfg, **changes)
