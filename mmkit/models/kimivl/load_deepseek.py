"""Load / save DeepSeek-V3-format causal LMs (transformers `DeepseekV3ForCausalLM`, Moonlight).

`load_deepseek_v3(path)` reads `config.json` + safetensors (single file or sharded with
`model.safetensors.index.json`; per-expert or fused expert keys) into `MoECausalLM`.
`save_deepseek_v3(model, path)` writes the same format back (per-expert keys, as
transformers' `save_pretrained` does by default), so transformers can load it too.
Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmkit.errors import MmkitError, UsageError
from mmkit.models.kimivl.decoder import (MoECausalLM, MoEDecoderConfig, convert_deepseek_v3_state_dict,
                                         to_deepseek_v3_state_dict)


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path}: no *.safetensors weights found")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def load_deepseek_v3(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     experts_impl: str = "auto", **_ignored) -> MoECausalLM:
    """Directory saved by transformers' DeepseekV3ForCausalLM -> MoECausalLM (eval mode)."""
    from mmkit.models import read_model_config

    path = Path(path)
    hf = read_model_config(path)
    hf = hf.get("text_config", hf) if hf.get("model_type") != "deepseek_v3" else hf
    cfg = MoEDecoderConfig.from_hf(hf)
    cfg.experts_impl = experts_impl
    sd = convert_deepseek_v3_state_dict(read_safetensors_dir(path), cfg.num_hidden_layers)
    model = MoECausalLM(cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MmkitError(f"{path}: checkpoint does not match the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device=device, dtype=dtype).eval()


def save_deepseek_v3(model: MoECausalLM, path, per_expert: bool = True) -> None:
    """Write config.json + model.safetensors in transformers' DeepseekV3ForCausalLM format."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    sd = to_deepseek_v3_state_dict(sd, per_expert=per_expert)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
