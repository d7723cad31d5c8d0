"""VQ image tokenizer: `VQModel` (encode/decode), presets, the "vq" training task.

Loaded lazily so `import mmkit.vq` stays light; see docs/tokenizers.md.
"""

__all__ = ["VQModel", "VQConfig", "preset_config", "PRESETS", "load_model"]


def __getattr__(name):
    if name in __all__:
        from mmkit.vq import model

        return getattr(model, name)
    raise AttributeError(f"module 'mmkit.vq' has no attribute {name!r}")
