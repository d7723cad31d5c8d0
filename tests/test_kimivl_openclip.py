"""MoonViT initialised from an open_clip tower (tiny random SigLIP-style timm ViT, no download)."""

import json
from functools import partial

import pytest
import torch
from torch import nn

NAME = "mmkit-test-tiny-siglip"


def _register(tmp_path):
    import open_clip
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def mmkit_test_tiny_siglip_vit(pretrained=False, **kwargs):
        args = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=3.0,
                    class_token=False, global_pool="map", act_layer=partial(nn.GELU, approximate="tanh"))
        args.update({k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool")})
        model = VisionTransformer(**args)
        model.default_cfg = {"input_size": (3, 56, 56), "mean": (0.5,) * 3, "std": (0.5,) * 3}
        return model

    import timm

    if "mmkit_test_tiny_siglip_vit" not in timm.list_models("mmkit_test_*"):
        register_model(mmkit_test_tiny_siglip_vit)
    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "mmkit_test_tiny_siglip_vit", "timm_model_pretrained": False,
                          "timm_pool": "", "timm_proj": "linear", "image_size": 56},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{NAME}.json")


def test_open_clip_init_features_equal(tmp_path):
    import open_clip

    from mmkit.models.kimivl.openclip_init import moonvit_from_open_clip

    _register(tmp_path)
    torch.manual_seed(0)
    clip = open_clip.create_model(NAME, pretrained=None).eval()
    with torch.no_grad():  # non-trivial biases / norms / position table
        for p in clip.visual.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.manual_seed(0)
    vit, cfg = moonvit_from_open_clip(NAME, pretrained=None, use_rope=False)
    # same random init sequence -> re-copy from *our* perturbed instance
    from mmkit.models.kimivl.openclip_init import copy_open_clip_into_moonvit

    copy_open_clip_into_moonvit(vit, clip)
    vit.eval()
    assert (cfg.patch_size, cfg.pos_emb_height, cfg.hidden_act) == (14, 4, "gelu_pytorch_tanh")
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = clip.visual.trunk.forward_features(images)  # (2, 16, 64) after the final norm
        # patchify in raster order: (B, 3, 4, 14, 4, 14) -> (B*16, 3, 14, 14)
        pv = images.view(2, 3, 4, 14, 4, 14).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 14, 14)
        out = vit(pv, torch.tensor([[1, 4, 4], [1, 4, 4]]))
    assert (out.view(2, 16, -1) - ref).abs().max().item() < 1e-5
    with torch.no_grad():  # RoPE on (Kimi-VL) changes the features: the switch is real
        roped = vit(pv, torch.tensor([[1, 4, 4], [1, 4, 4]]), use_rope=True)
    assert (roped.view(2, 16, -1) - ref).abs().max().item() > 1e-3


def test_open_clip_native_tower_refused():
    from mmkit.errors import MmkitError
    from mmkit.models.kimivl.openclip_init import moonvit_config_from_open_clip

    class Native(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Module()  # open_clip's own VisionTransformer has no `.trunk`

    with pytest.raises(MmkitError, match="class token"):
        moonvit_config_from_open_clip(Native())
