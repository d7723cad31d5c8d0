"""Model families and the one loader for all of them.

`load_model(path)` reads `config.json`'s `model_type` and dispatches to the family that
claims it. Each family's `load.py` registers loaders in LOADERS (model_type -> callable);
foreign model types (transformers' `chameleon`, `kimi_k25`, `deepseek_v3`, Kimi-VL's
`kimi_vl`) map to the family that converts them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from mmkit.errors import UsageError

# model_type in config.json -> "module:function" that loads a directory of that type
LOADERS = {
    "mmkit_chameleon": "mmkit.models.chameleon.load:load_model",
    "chameleon": "mmkit.models.chameleon.load:load_model",
    "mmkit_kimivl": "mmkit.models.kimivl.load:load_model",
    "kimi_k25": "mmkit.models.kimivl.load:load_model",
    "kimi_vl": "mmkit.models.kimivl.load:load_model",
    "deepseek_v3": "mmkit.models.kimivl.load:load_model",
    "mmkit_vq": "mmkit.vq.model:load_model",
}


def read_model_config(path) -> dict:
    """`path/config.json` as a dict; a missing file or bad JSON is a one-line UsageError."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"not a model directory (no config.json): {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{cfg_file}: invalid JSON") from None


def load_model(path, **kwargs):
    """Load the model saved in directory `path`, whatever family or foreign format."""
    path = Path(path)
    model_type = read_model_config(path).get("model_type")
    if model_type not in LOADERS:
        raise UsageError(f"{path}: unsupported model_type {model_type!r} (known: {', '.join(sorted(LOADERS))})")
    module, func = LOADERS[model_type].split(":")
    return getattr(importlib.import_module(module), func)(path, **kwargs)
