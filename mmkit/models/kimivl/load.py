"""Load Kimi-VL-family checkpoints of every layout into `MmkitKimiVLForConditionalGeneration`.

Layouts (dispatched on config.json's `model_type` by `mmkit.load_model`):
- `mmkit_kimivl`: our own `save_pretrained` directory.
- `kimi_k25`: transformers' `Kimi_K25ForConditionalGeneration` saved in its native layout
  (`save_pretrained(..., save_original_format=False)`); separate q/k/v in rotate-half order.
- `kimi_vl`: the Kimi-VL checkpoint layout (moonshotai/Kimi-VL-A3B-*): `vision_tower.encoder.
  blocks.N.wqkv` fused and interleaved, `multi_modal_projector.*`, `language_model.model.*`
  with per-expert weights (config has `vision_config`, `text_config` without model_type).
- `deepseek_v3`: a text-only DeepSeek-V3 / Moonlight directory -> the decoder engineer's
  `load_deepseek_v3` (returns their `MoECausalLM`).

The mappings are explicit tables (regex -> replacement), tested both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mmkit.errors import MmkitError, UsageError

# --- key tables: vision tower + projector -------------------------------------------------
# transformers kimi_k25 native key -> mmkit key (q/k/v are fused separately, see fuse_qkv)
K25_TO_MMKIT = [
    (r"^model\.vision_tower\.patch_embed\.proj\.", "vision_tower.patch_embed.proj."),
    (r"^model\.vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.blocks.\1.norm0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.blocks.\1.norm1."),
    (r"^model\.vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.blocks.\1.attn.wo."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.blocks.\1.mlp.fc0."),
    (r"^model\.vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.blocks.\1.mlp.fc1."),
    (r"^model\.vision_tower\.final_layernorm\.", "vision_tower.final_layernorm."),
    (r"^model\.mm_projector\.pre_norm\.", "multi_modal_projector.pre_norm."),
    (r"^model\.mm_projector\.in_proj\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.out_proj\.", "multi_modal_projector.linear_2."),
]
K25_QKV = r"^model\.vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$"
K25_TEXT_PREFIX = "model.language_model."  # -> DeepseekV3ForCausalLM "model." (+ top-level lm_head)

# Kimi-VL checkpoint key -> mmkit key (wqkv keeps its interleaved layout: no permutation)
KIMIVL_TO_MMKIT = [
    (r"^vision_tower\.patch_embed\.proj\.", "vision_tower.patch_embed.proj."),
    (r"^vision_tower\.patch_embed\.pos_emb\.weight$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.(norm0|norm1)\.", r"vision_tower.blocks.\1.\2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.(wqkv|wo)\.", r"vision_tower.blocks.\1.attn.\2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.(fc0|fc1)\.", r"vision_tower.blocks.\1.mlp.\2."),
    (r"^vision_tower\.encoder\.final_layernorm\.", "vision_tower.final_layernorm."),
    (r"^multi_modal_projector\.(pre_norm|linear_1|linear_2)\.", r"multi_modal_projector.\1."),
]
KIMIVL_TEXT_PREFIX = "language_model."  # language_model.{model.*, lm_head.weight} = DeepseekV3 keys
MMKIT_TO_KIMIVL = [
    (r"^vision_tower\.patch_embed\.", "vision_tower.patch_embed."),
    (r"^vision_tower\.blocks\.(\d+)\.(norm0|norm1)\.", r"vision_tower.encoder.blocks.\1.\2."),
    (r"^vision_tower\.blocks\.(\d+)\.attn\.(wqkv|wo)\.", r"vision_tower.encoder.blocks.\1.\2."),
    (r"^vision_tower\.blocks\.(\d+)\.mlp\.(fc0|fc1)\.", r"vision_tower.encoder.blocks.\1.mlp.\2."),
    (r"^vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"^multi_modal_projector\.", "multi_modal_projector."),
]


def rename(key: str, table) -> str | None:
    for pat, rep in table:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return None


def interleaved_to_rotate_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, dims (2i, 2i+1) -> (i, i + hd/2): transformers' PermuteForRope on q/k rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotate_half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_rotate_half`."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _text_to_mmkit(text_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepseekV3ForCausalLM-named text weights (`model.*`, `lm_head.weight`; merged or per-expert)
    -> our `language_model.*` (MoEDecoder) + `lm_head.weight`, via the decoder's converter."""
    from mmkit.models.kimivl.load_deepseek import convert_deepseek_v3_state_dict

    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("rotary_emb.inv_freq")}
    conv = convert_deepseek_v3_state_dict(text_sd)
    out = {}
    for k, v in conv.items():
        if k == "lm_head.weight":
            out[k] = v
        elif k.startswith("model."):
            out["language_model." + k[len("model."):]] = v
        else:
            out["language_model." + k] = v
    return out


def convert_kimi_k25_state_dict(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """transformers kimi_k25 native state dict -> mmkit state dict (strict: unknown keys raise)."""
    out, text, qkv = {}, {}, {}
    for k, v in sd.items():
        if k.startswith(K25_TEXT_PREFIX):
            text["model." + k[len(K25_TEXT_PREFIX):]] = v
        elif k == "lm_head.weight":
            text[k] = v
        elif m := re.match(K25_QKV, k):
            qkv[(int(m.group(1)), m.group(3), m.group(2))] = v
        elif k.endswith("time_position_embeddings"):
            continue  # non-persistent sinusoid; row 0 (stills) is zero
        else:
            new = rename(k, K25_TO_MMKIT)
            if new is None:
                raise MmkitError(f"unexpected kimi_k25 weight {k!r}")
            out[new] = v
    for layer, kind in sorted({(l, t) for l, t, _ in qkv}):
        q, k_, v = (qkv[(layer, kind, c)] for c in "qkv")
        # rotate-half q/k back to Kimi-VL's interleaved complex pairs, then fuse head-major
        q, k_ = rotate_half_to_interleaved(q, num_heads), rotate_half_to_interleaved(k_, num_heads)
        out[f"vision_tower.blocks.{layer}.attn.wqkv.{kind}"] = torch.cat([q, k_, v], 0)
    out.update(_text_to_mmkit(text))
    return out


def convert_kimivl_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kimi-VL checkpoint state dict -> mmkit state dict (strict: unknown keys raise)."""
    out, text = {}, {}
    for k, v in sd.items():
        if k.startswith(KIMIVL_TEXT_PREFIX):
            text[k[len(KIMIVL_TEXT_PREFIX):]] = v
            continue
        new = rename(k, KIMIVL_TO_MMKIT)
        if new is None:
            raise MmkitError(f"unexpected Kimi-VL weight {k!r}")
        out[new] = v
    out.update(_text_to_mmkit(text))
    return out


# --- configs ----------------------------------------------------------------------------------
VISION_FROM_KIMIVL = {  # Kimi-VL / K2.5 vision config key -> MoonViTConfig key
    "patch_size": "patch_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "init_pos_emb_height": "pos_emb_height", "init_pos_emb_width": "pos_emb_width",
    "pos_emb_height": "pos_emb_height", "pos_emb_width": "pos_emb_width", "merge_kernel_size": "merge_kernel_size",
}


def _vision_config(vc: dict) -> dict:
    out = {VISION_FROM_KIMIVL[k]: v for k, v in vc.items() if k in VISION_FROM_KIMIVL}
    rope = vc.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = float(rope["rope_theta"])
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise MmkitError(f"unsupported vision activation {act!r} (MoonViT uses tanh GELU)")
    return out


def _text_config(tc: dict) -> dict:
    """DeepseekV3Config dict (a Kimi `text_config`) -> MoEDecoderConfig dict."""
    from mmkit.models.kimivl.decoder import MoEDecoderConfig

    return MoEDecoderConfig.from_hf(tc).to_dict()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path}: no *.safetensors weights (pickled checkpoints are not loaded)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _finish(model, sd: dict[str, torch.Tensor], where: str, dtype=None):
    own = model.state_dict()
    missing = sorted(set(own) - set(sd) - _ignorable(model))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise MmkitError(f"{where}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise MmkitError(f"{where}: shape mismatch for {k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if dtype is not None:
        model.to(dtype)
        _keep_fp32(model)
    return model.eval()


def _ignorable(model) -> set[str]:
    """Buffers a checkpoint need not carry (running counters)."""
    return {k for k in model.state_dict() if k.endswith("tokens_per_expert")}


def _keep_fp32(model) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.data = buf.data.float()


def kimivl_config_from(cfg: dict, model_type: str, **overrides):
    from mmkit.models.kimivl.config import MmkitKimiVLConfig

    vc = _vision_config(cfg.get("vision_config") or {})
    tc = _text_config(cfg.get("text_config") or {})
    if model_type == "kimi_k25":
        vc.setdefault("hidden_size", cfg.get("projection_hidden_size", 1152))
        image_token_id = cfg.get("image_token_id", 163605)
        boi, eoi = cfg.get("vision_start_token_id"), cfg.get("vision_end_token_id")
    else:
        image_token_id = cfg.get("media_placeholder_token_id", 163605)
        boi, eoi = None, None
    text = cfg.get("text_config") or {}
    kw = dict(vision_config=vc, text_config=tc, image_token_id=image_token_id, boi_token_id=boi,
              eoi_token_id=eoi, bos_token_id=text.get("bos_token_id"), eos_token_id=text.get("eos_token_id"),
              pad_token_id=text.get("pad_token_id"), ignore_index=cfg.get("ignore_index", -100))
    if model_type == "kimi_k25":
        kw["projector_layer_norm_eps"] = cfg.get("projection_layer_norm_eps", 1e-5)
    kw.update(overrides)
    return MmkitKimiVLConfig(**kw)


def load_model(path, dtype: torch.dtype | None = None, **kwargs):
    """Any supported directory -> model in eval mode (see module docstring)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type == "deepseek_v3":
        from mmkit.models.kimivl.load_deepseek import load_deepseek_v3

        return load_deepseek_v3(path, **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration

    if model_type == "mmkit_kimivl":
        return MmkitKimiVLForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs).eval()
    if model_type not in ("kimi_k25", "kimi_vl"):
        raise UsageError(f"{path}: not a Kimi-VL-family model_type: {model_type!r}")
    config = kimivl_config_from(cfg, model_type, **kwargs)
    model = MmkitKimiVLForConditionalGeneration(config)
    sd = _read_safetensors(path)
    if model_type == "kimi_k25":
        sd = convert_kimi_k25_state_dict(sd, config.vision_config.num_attention_heads)
    else:
        sd = convert_kimivl_state_dict(sd)
    return _finish(model, sd, str(path), dtype)


def k25_to_kimivl_state_dict(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """transformers kimi_k25 native state dict -> Kimi-VL checkpoint layout (fused interleaved
    `wqkv`, `multi_modal_projector.*`, `language_model.model.*` with per-expert weights).

    The inverse direction of what transformers' `conversion_mapping["kimi_k25"]` does on load;
    used to write Kimi-VL-layout checkpoints from a model whose outputs are known.
    """
    out, qkv = {}, {}
    for k, v in sd.items():
        v = v.detach().clone()
        if k.endswith("time_position_embeddings"):
            continue
        if k.startswith(K25_TEXT_PREFIX):
            rest = k[len(K25_TEXT_PREFIX):]
            if m := re.match(r"^(layers\.\d+\.mlp\.experts)\.gate_up_proj$", rest):
                inter = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"language_model.model.{m.group(1)}.{e}.gate_proj.weight"] = v[e, :inter].clone()
                    out[f"language_model.model.{m.group(1)}.{e}.up_proj.weight"] = v[e, inter:].clone()
            elif m := re.match(r"^(layers\.\d+\.mlp\.experts)\.down_proj$", rest):
                for e in range(v.shape[0]):
                    out[f"language_model.model.{m.group(1)}.{e}.down_proj.weight"] = v[e].clone()
            else:
                out["language_model.model." + rest] = v
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
        elif m := re.match(K25_QKV, k):
            qkv[(int(m.group(1)), m.group(3), m.group(2))] = v
        else:
            new = rename(k, K25_TO_MMKIT)
            if new is None:
                raise MmkitError(f"unexpected kimi_k25 weight {k!r}")
            out[rename(new, MMKIT_TO_KIMIVL)] = v
    for layer, kind in sorted({(l, t) for l, t, _ in qkv}):
        q, k_, v = (qkv[(layer, kind, c)] for c in "qkv")
        q, k_ = rotate_half_to_interleaved(q, num_heads), rotate_half_to_interleaved(k_, num_heads)
        out[f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}"] = torch.cat([q, k_, v], 0)
    return out
