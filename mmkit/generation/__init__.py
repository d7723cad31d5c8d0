"""Fast text, image and interleaved generation for every mmkit family.

`generate` is the one sampling core (sampler.py); `load_pipeline(model_dir)` gives the
high-level calls (`answer`, `caption`, `generate_images`, `interleaved`) used by the CLI,
the evaluation runner and the quickstart.
"""

from mmkit.generation.sampler import (
    IMAGE_SAMPLING,
    ImageLayout,
    SamplingParams,
    generate,
    image_layout_from_config,
    left_pad,
)


def load_pipeline(model_dir, **kwargs):
    """A generation pipeline for the model saved in `model_dir` (any mmkit family)."""
    from mmkit.generation.pipelines import load_pipeline as _load

    return _load(model_dir, **kwargs)


__all__ = ["IMAGE_SAMPLING", "ImageLayout", "SamplingParams", "generate", "image_layout_from_config",
           "left_pad", "load_pipeline"]
