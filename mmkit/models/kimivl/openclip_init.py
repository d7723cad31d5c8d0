"""Initialise MoonViT from an open_clip vision tower (e.g. a SigLIP ViT) instead of from scratch.

Supported: open_clip towers with a timm trunk (`model.visual.trunk`, a timm
VisionTransformer without class token, final per-token LayerNorm: the SigLIP models).
open_clip's native `VisionTransformer` always prepends a class token that every patch
attends to; MoonViT has none, so such towers are refused (a copy could not be exact).

Copied: patch embedding (conv -> MoonViT's conv; a bias-free conv gets a zero bias), the
position grid (N rows -> (gh, gw, D), resampled per image like Kimi-VL's own table), every
block (norm1/qkv/proj/norm2/fc1/fc2 -> norm0/wqkv/wo/norm1/fc0/fc1; timm's fused qkv is
already head-major q|k|v like `wqkv`), the final norm. The activation (tanh or erf GELU) and
LayerNorm eps are taken from the source. With RoPE off and images at the source resolution
the features equal the source's `forward_features`; turning RoPE on (Kimi-VL) then adds the
2-D rotation on top, which is the usual way such towers are adapted.
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.errors import MmkitError
from mmkit.models.kimivl.config import MoonViTConfig
from mmkit.models.kimivl.vision import MoonViT


def _trunk(clip_model) -> nn.Module:
    visual = getattr(clip_model, "visual", clip_model)
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise MmkitError("open_clip tower is the native VisionTransformer (with a class token every patch "
                         "attends to); MoonViT has none, so only timm-trunk towers (SigLIP-style, "
                         "class_token=False) can be copied exactly")
    if getattr(trunk, "cls_token", None) is not None or getattr(trunk, "num_prefix_tokens", 0):
        raise MmkitError("timm ViT with class/register tokens: MoonViT has no prefix tokens")
    if not isinstance(getattr(trunk, "norm", None), nn.LayerNorm):
        raise MmkitError("timm ViT without a final per-token LayerNorm (fc_norm after pooling) is not supported")
    for name in ("norm_pre",):
        if not isinstance(getattr(trunk, name, nn.Identity()), nn.Identity):
            raise MmkitError(f"timm ViT with a {name} LayerNorm is not supported")
    blk = trunk.blocks[0]
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(blk, name, nn.Identity()), nn.Identity):
            raise MmkitError("timm ViT with LayerScale is not supported")
    if not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity):
        raise MmkitError("timm ViT with qk-norm is not supported")
    return trunk


def moonvit_config_from_open_clip(clip_model, **overrides) -> MoonViTConfig:
    """MoonViTConfig matching the open_clip tower's shapes (RoPE on unless overridden)."""
    trunk = _trunk(clip_model)
    blk = trunk.blocks[0]
    ps = trunk.patch_embed.proj.kernel_size
    if ps[0] != ps[1]:
        raise MmkitError(f"non-square patches {ps} are not supported")
    gh, gw = trunk.patch_embed.grid_size
    act = blk.mlp.act
    approximate = getattr(act, "approximate", None)
    if not isinstance(act, nn.GELU):
        raise MmkitError(f"unsupported MLP activation {type(act).__name__} (GELU only)")
    kw = dict(patch_size=ps[0], hidden_size=trunk.embed_dim, num_hidden_layers=len(trunk.blocks),
              num_attention_heads=blk.attn.num_heads, intermediate_size=blk.mlp.fc1.out_features,
              pos_emb_height=gh, pos_emb_width=gw, layer_norm_eps=blk.norm1.eps,
              hidden_act="gelu_pytorch_tanh" if approximate == "tanh" else "gelu")
    kw.update(overrides)
    return MoonViTConfig(**kw)


@torch.no_grad()
def copy_open_clip_into_moonvit(vit: MoonViT, clip_model) -> MoonViT:
    """Copy the open_clip tower's weights into `vit` (shapes must match its config)."""
    trunk = _trunk(clip_model)
    pe = vit.patch_embed
    pe.proj.weight.copy_(trunk.patch_embed.proj.weight)
    if trunk.patch_embed.proj.bias is not None:
        pe.proj.bias.copy_(trunk.patch_embed.proj.bias)
    else:
        pe.proj.bias.zero_()
    gh, gw = trunk.patch_embed.grid_size
    pos = trunk.pos_embed  # (1, gh*gw, D)
    if pos is None or pos.shape[1] != gh * gw:
        raise MmkitError("timm ViT position table must have one row per patch")
    pe.pos_emb.weight.copy_(pos[0].view(gh, gw, -1))
    for src, dst in zip(trunk.blocks, vit.blocks, strict=True):
        pairs = [(src.norm1, dst.norm0), (src.attn.qkv, dst.attn.wqkv), (src.attn.proj, dst.attn.wo),
                 (src.norm2, dst.norm1), (src.mlp.fc1, dst.mlp.fc0), (src.mlp.fc2, dst.mlp.fc1)]
        for s, d in pairs:
            d.weight.copy_(s.weight)
            if s.bias is not None:
                d.bias.copy_(s.bias)
            else:
                d.bias.zero_()
    vit.final_layernorm.weight.copy_(trunk.norm.weight)
    vit.final_layernorm.bias.copy_(trunk.norm.bias)
    return vit


def moonvit_from_open_clip(name: str, pretrained: str | None = None, **overrides) -> tuple[MoonViT, MoonViTConfig]:
    """`open_clip.create_model(name, pretrained=<local file or None>)` -> a MoonViT with its weights."""
    import open_clip

    clip_model = open_clip.create_model(name, pretrained=pretrained)
    cfg = moonvit_config_from_open_clip(clip_model, **overrides)
    return copy_open_clip_into_moonvit(MoonViT(cfg), clip_model), cfg


def init_kimivl_vision_from_open_clip(model, clip_model) -> None:
    """Copy into a whole `MmkitKimiVLForConditionalGeneration` whose vision config matches."""
    copy_open_clip_into_moonvit(model.vision_tower, clip_model)
