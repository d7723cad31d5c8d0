"""Kimi-VL-style family: MoonViT (native resolution) + 2x2-merge projector + MoE decoder (MLA).

Public names load lazily (importing the package costs nothing):
- `MmkitKimiVLConfig`, `MoonViTConfig` (config.py), `MmkitKimiVLForConditionalGeneration`
  (model.py), `MoonViT` (vision.py), `PatchMergerProjector` (projector.py)
- `KimiVLProcessor`, `KimiVLImageProcessor` (processor.py)
- `load_model` (load.py: mmkit_kimivl, transformers kimi_k25, Kimi-VL kimi_vl, deepseek_v3)
- `moonvit_from_open_clip`, `copy_open_clip_into_moonvit` (openclip_init.py)
- the decoder: `MoEDecoderConfig`, `MoEDecoder`, `MoECausalLM` (decoder.py)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MmkitKimiVLConfig": "config", "MoonViTConfig": "config",
    "MmkitKimiVLForConditionalGeneration": "model", "greedy_generate": "model",
    "MoonViT": "vision", "PatchMergerProjector": "projector",
    "KimiVLProcessor": "processor", "KimiVLImageProcessor": "processor", "ImageProcessorConfig": "processor",
    "load_model": "load", "moonvit_from_open_clip": "openclip_init",
    "copy_open_clip_into_moonvit": "openclip_init",
    "MoEDecoderConfig": "decoder", "MoEDecoder": "decoder", "MoECausalLM": "decoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
