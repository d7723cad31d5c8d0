"""Load Chameleon-family checkpoints: mmkit's own dirs and transformers' `chameleon` dirs.

transformers layout -> mmkit layout is a pure renaming plus two concatenations (q/k/v ->
`wqkv`, gate/up -> `w13`); the tables below are the whole mapping, tested both ways.
Weights are read with safetensors only (never unpickled). The checkpoint's VQGAN
(`model.vqmodel.*`) is not kept: mmkit models use an mmkit VQ tokenizer in `DIR/vq/`; its
config is remembered so `export_to_transformers` writes a loadable `chameleon` dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmkit.errors import MmkitError, UsageError
from mmkit.text.image_vocab import chameleon_code_from_name, chameleon_image_token_name

# mmkit per-layer suffix -> transformers per-layer suffixes, concatenated along dim 0 in this order
LAYER_KEYS: dict[str, list[str]] = {
    "attn.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.wo.weight": ["self_attn.o_proj.weight"],
    "attn.q_norm.weight": ["self_attn.q_norm.weight"],
    "attn.q_norm.bias": ["self_attn.q_norm.bias"],
    "attn.k_norm.weight": ["self_attn.k_norm.weight"],
    "attn.k_norm.bias": ["self_attn.k_norm.bias"],
    "mlp.w13.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.w2.weight": ["mlp.down_proj.weight"],
    "attn_norm.weight": ["input_layernorm.weight"],  # swin-norm: applied to the attn output
    "ffn_norm.weight": ["post_attention_layernorm.weight"],
}
# mmkit key -> transformers key, outside the layers
GLOBAL_KEYS: dict[str, str] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
IGNORED_PREFIXES = ("model.vqmodel.",)  # the VQGAN encoder: not part of the decoder

# Chameleon's special-token names (facebookresearch/chameleon vocab.py)
BOI_NAME, EOI_NAME, IMAGE_NAME, EOT_NAME = "<racm3:break>", "<eoss>", "<image>", "<reserved08706>"


# ---------------------------------------------------------------------------------------
# vocabulary map (IMGIMG names): the tokenizer layer's naming (mmkit.text.image_vocab)
image_code_name = chameleon_image_token_name  # code 123 -> 'IMGIMGBCDZ'
image_code_from_name = chameleon_code_from_name


def image_vocabulary(vocabulary_map: dict) -> tuple[int, int]:
    """-> (image_token_offset, num_image_tokens); mmkit needs id = offset + code (true for Chameleon)."""
    pairs = sorted((tid, image_code_from_name(name)) for name, tid in vocabulary_map.items() if name.startswith("IMGIMG"))
    if not pairs:
        raise MmkitError("vocabulary_map has no IMGIMG image tokens")
    offset = pairs[0][0] - pairs[0][1]
    if any(tid - code != offset for tid, code in pairs) or pairs[0][1] != 0 or pairs[-1][1] != len(pairs) - 1:
        raise MmkitError("image tokens are not one contiguous block id = offset + code; not supported")
    return offset, len(pairs)


def make_vocabulary_map(cfg) -> dict:
    """A transformers-style vocabulary_map for an mmkit config (image codes + special tokens)."""
    vm = {image_code_name(c): cfg.image_token_offset + c for c in range(cfg.num_image_tokens)}
    for name, tid in [(BOI_NAME, cfg.boi_token_id), (EOI_NAME, cfg.eoi_token_id), (IMAGE_NAME, cfg.image_token_id),
                      (EOT_NAME, cfg.eot_token_id), ("<s>", cfg.bos_token_id), ("</s>", cfg.eos_token_id),
                      ("<pad>", cfg.pad_token_id)]:
        if tid is not None:
            vm.setdefault(name, tid)
    return vm


# ---------------------------------------------------------------------------------------
# safetensors reading
def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint; refuses pickle files."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise MmkitError(f"{path}: only pickle weights (*.bin/*.pt); re-save as safetensors (mmkit never unpickles)")
        raise MmkitError(f"{path}: no model.safetensors")
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


# ---------------------------------------------------------------------------------------
# transformers `chameleon` -> mmkit
def config_from_transformers(hf: dict, **overrides):
    """transformers ChameleonConfig dict -> MmkitChameleonConfig."""
    from mmkit.models.chameleon.config import MmkitChameleonConfig

    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise MmkitError("Chameleon checkpoints with attention/MLP biases are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MmkitError(f"RoPE type {rope.get('rope_type')!r} not supported (only default)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    vm = hf.get("vocabulary_map")
    kw = dict(
        vocab_size=hf.get("vocab_size", 65536),
        hidden_size=hf.get("hidden_size", 4096),
        intermediate_size=hf.get("intermediate_size", 11008),
        num_hidden_layers=hf.get("num_hidden_layers", 32),
        num_attention_heads=hf.get("num_attention_heads", 32),
        num_key_value_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        qk_norm=True,
        swin_norm=bool(hf.get("swin_norm", False)),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
        pad_token_id=hf.get("pad_token_id"),
        vocabulary_map=vm,
        hf_vq_config=hf.get("vq_config"),
    )
    if vm:
        kw["image_token_offset"], kw["num_image_tokens"] = image_vocabulary(vm)
        kw["boi_token_id"], kw["eoi_token_id"] = vm.get(BOI_NAME), vm.get(EOI_NAME)
        kw["image_token_id"], kw["eot_token_id"] = vm.get(IMAGE_NAME), vm.get(EOT_NAME)
        kw["image_grid_h"] = kw["image_grid_w"] = 32  # 512 px / 16, the only Chameleon size
    kw.update(overrides)
    return MmkitChameleonConfig(**kw)


def _expand_qk_norm(t: torch.Tensor, n_heads: int, name: str) -> torch.Tensor:
    """[heads, hd] as is; [model_parallel_size, hd] (Lumina-mGPT) or [hd] -> repeat per head."""
    if t.dim() == 1:
        t = t[None]
    groups = t.shape[0]
    if groups == n_heads:
        return t
    if n_heads % groups:
        raise MmkitError(f"{name}: shape {list(t.shape)} does not divide {n_heads} heads")
    return t.repeat_interleave(n_heads // groups, dim=0)  # each shard owns a contiguous run of heads


def state_from_transformers(hf_state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """transformers state dict -> mmkit state dict (renames, fuses, expands q/k-norm)."""
    out, used = {}, set()
    for ours, theirs in GLOBAL_KEYS.items():
        if theirs in hf_state:
            out[ours] = hf_state[theirs]
            used.add(theirs)
    for i in range(cfg.num_hidden_layers):
        for ours, parts in LAYER_KEYS.items():
            names = [f"model.layers.{i}.{p}" for p in parts]
            missing = [n for n in names if n not in hf_state]
            if missing:
                raise MmkitError(f"checkpoint lacks {missing[0]}")
            tensors = [hf_state[n] for n in names]
            if "q_norm" in ours:
                tensors = [_expand_qk_norm(tensors[0], cfg.num_attention_heads, names[0])]
            elif "k_norm" in ours:
                tensors = [_expand_qk_norm(tensors[0], cfg.num_key_value_heads, names[0])]
            out[f"model.layers.{i}.{ours}"] = torch.cat(tensors, 0) if len(tensors) > 1 else tensors[0]
            used.update(names)
    if "lm_head.weight" not in out and cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    unknown = [k for k in hf_state if k not in used and not k.startswith(IGNORED_PREFIXES)]
    if unknown:
        raise MmkitError(f"unexpected checkpoint key {unknown[0]} ({len(unknown)} unmapped)")
    return out


def state_to_transformers(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """mmkit state dict -> transformers `ChameleonForConditionalGeneration` layout (splits fused)."""
    hd = cfg.head_dim
    split = {
        "attn.wqkv.weight": [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd],
        "mlp.w13.weight": [cfg.intermediate_size, cfg.intermediate_size],
    }
    out = {theirs: state[ours] for ours, theirs in GLOBAL_KEYS.items() if ours in state}
    for i in range(cfg.num_hidden_layers):
        for ours, parts in LAYER_KEYS.items():
            t = state[f"model.layers.{i}.{ours}"]
            pieces = t.split(split[ours], 0) if ours in split else [t]
            for p, piece in zip(parts, pieces):
                out[f"model.layers.{i}.{p}"] = piece.contiguous()
    return out


def transformers_config_dict(cfg) -> dict:
    """mmkit config -> transformers ChameleonConfig kwargs."""
    if not cfg.qk_norm:
        raise MmkitError("transformers' Chameleon always uses QK-norm; cannot export a model with qk_norm=false")
    if getattr(cfg, "image_pos_embed", False):
        raise MmkitError("transformers' Chameleon has no image row/column embeddings; cannot export a model with "
                         "image_pos_embed=true")
    if getattr(cfg, "image_bidi", False):
        raise MmkitError("transformers' Chameleon reads images causally; cannot export a model with image_bidi=true")
    if getattr(cfg, "image_block", 1) != 1:
        raise MmkitError("transformers' Chameleon reads image codes in raster order; cannot export a model with "
                         f"image_block={cfg.image_block}")
    vq = cfg.hf_vq_config or dict(  # a tiny VQGAN config (weights are not exported; see module doc)
        embed_dim=32, num_embeddings=cfg.num_image_tokens, latent_channels=32, resolution=64, base_channels=32,
        channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
    )
    vq = {k: v for k, v in vq.items() if k not in ("model_type", "transformers_version")}
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        swin_norm=cfg.swin_norm, model_parallel_size=1, attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, vocabulary_map=cfg.vocabulary_map or make_vocabulary_map(cfg), vq_config=vq,
    )


def from_transformers_dir(path: Path, dtype=None, **overrides):
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

    cfg = config_from_transformers(json.loads((path / "config.json").read_text()), **overrides)
    state = state_from_transformers(read_safetensors_dir(path), cfg)
    with torch.device("meta"):
        model = MmkitChameleonForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.float() if dtype is None else model.to(dtype)
    return model.eval()


def export_to_transformers(model, out_dir) -> Path:
    """Write `model` as a transformers `chameleon` directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf_cfg = {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
              **transformers_config_dict(cfg)}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in state_to_transformers(model.state_dict(), cfg).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------
def load_model(path, dtype=None, device=None, **overrides):
    """mmkit.load_model entry for model_type `mmkit_chameleon` and transformers' `chameleon`."""
    from mmkit.models import read_model_config

    path = Path(path)
    model_type = read_model_config(path).get("model_type")
    if model_type == "chameleon":
        model = from_transformers_dir(path, dtype=dtype, **overrides)
    elif model_type == "mmkit_chameleon":
        from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

        model = MmkitChameleonForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **overrides).eval()
    else:
        raise UsageError(f"{path}: model_type {model_type!r} is not a Chameleon checkpoint")
    return model.to(device) if device is not None else model
