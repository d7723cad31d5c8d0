"""Load the encoder + quantizer of a transformers `ChameleonVQVAE` into a `VQModel`.

HF's Chameleon VQ-VAE is encoder-only (conversion drops Meta's decoder), so the result
encodes images to exactly the checkpoint's codes; its decoder is freshly initialised and
must be trained (or loaded from Meta's weights) before `decode` means anything. The
module names are the same taming layout as ours, so weights load by name; the Euclidean
codebook (no l2 norm, no EMA in the original) goes into vector-quantize-pytorch's
Euclidean codebook buffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmkit.errors import UsageError
from mmkit.vq.model import VQConfig, VQModel


def config_from_chameleon(vq_config) -> VQConfig:
    """A transformers ChameleonVQVAEConfig (object or dict) -> VQConfig."""
    get = (lambda k, d=None: vq_config.get(k, d)) if isinstance(vq_config, dict) else (
        lambda k, d=None: getattr(vq_config, k, d))
    if get("double_latent", False):
        raise UsageError("ChameleonVQVAE with double_latent=True is not supported (quant_conv expects latent_channels)")
    mult = list(get("channel_multiplier", [1, 1, 2, 2, 4]))
    res = int(get("resolution", 512))
    attn_res = set(get("attn_resolutions") or [])
    vanilla = get("attn_type", "vanilla") == "vanilla"
    return VQConfig(
        in_channels=int(get("in_channels", 3)),
        resolution=res,
        base_channels=int(get("base_channels", 128)),
        channel_multiplier=mult,
        num_res_blocks=int(get("num_res_blocks", 2)),
        attn_levels=[i for i in range(len(mult)) if vanilla and res // 2**i in attn_res],
        mid_attn=vanilla,
        latent_channels=int(get("latent_channels", 256)),
        embed_dim=int(get("embed_dim", 256)),
        norm_groups=32,
        dropout=float(get("dropout", 0.0)),
        quantizer="vq",
        codebook_size=int(get("num_embeddings", 8192)),
        use_cosine_sim=False,  # Chameleon: plain Euclidean nearest neighbour
        commitment_weight=0.25,
        threshold_ema_dead_code=0.0,
    )


def from_chameleon_state_dict(state: dict[str, torch.Tensor], vq_config) -> VQModel:
    """Build a VQModel from ChameleonVQVAE weights (keys `encoder.*`, `quant_conv.*`,
    `post_quant_conv.*`, `quantize.embedding.weight`; an optional `model.vqmodel.` prefix)."""
    cfg = config_from_chameleon(vq_config)
    model = VQModel(cfg)
    prefix = "model.vqmodel."
    state = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith("model.") or k.startswith(prefix)}
    codebook = state.pop("quantize.embedding.weight", None)
    if codebook is None:
        raise UsageError("not a ChameleonVQVAE state dict (no quantize.embedding.weight)")
    ours = {k: v for k, v in state.items() if k.split(".")[0] in ("encoder", "quant_conv", "post_quant_conv")}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if k.split(".")[0] in ("encoder", "quant_conv", "post_quant_conv")]
    if missing or unexpected:
        raise UsageError(f"ChameleonVQVAE weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    cb = model.quantize.impl._codebook
    with torch.no_grad():
        cb.embed.copy_(codebook[None].to(cb.embed.dtype))  # (1, K, D)
        cb.embed_avg.copy_(cb.embed)
        cb.cluster_size.fill_(1.0)
        cb.initted.fill_(True)
    return model.eval()


def from_chameleon_vqvae(hf_model) -> VQModel:
    """From an in-memory transformers `ChameleonVQVAE`."""
    return from_chameleon_state_dict(hf_model.state_dict(), hf_model.config)


def load_chameleon_vq(path) -> VQModel:
    """From a transformers Chameleon checkpoint directory (config.json + *.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    vq_cfg = cfg.get("vq_config", cfg)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith("model.vqmodel.") or k.split(".")[0] in ("encoder", "quant_conv", "post_quant_conv", "quantize"):
                    state[k] = sf.get_tensor(k)
    if not state:
        raise UsageError(f"{path}: no ChameleonVQVAE weights found")
    return from_chameleon_state_dict(state, vq_cfg)
