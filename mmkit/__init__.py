"""mmkit: a toolkit for unified multimodal models.

Heavy submodules load lazily so `mmkit --help` and the data tools start fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "generate"]


def load_model(path, **kwargs):
    """Load any mmkit model family (or a foreign transformers checkpoint) from a directory."""
    from mmkit.models import load_model as _load

    return _load(path, **kwargs)


def generate(model, input_ids, **kwargs):
    """Fast generation with a preallocated KV cache; see `mmkit.generation.generate`."""
    from mmkit.generation import generate as _generate

    return _generate(model, input_ids, **kwargs)
