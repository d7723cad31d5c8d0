"""Shared test setup: one torch thread per process, seeded RNG, shared shapes-world data.

Tests use tiny models, for which one thread is faster than two and immune to OpenMP
spin-waits when the cores are busy (2 xdist workers run on the 2 cores).
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A small shapes-world dataset (mmkit data synth): DIR with train/ and eval/ shards,
    sizes.json, and the eval exports (vqa_questions.json, vqa_annotations.json,
    captions.json, t2i_prompts.json). 64 train / 32 eval samples per kind, seed 0."""
    from mmkit.data.synth import synth

    out = tmp_path_factory.mktemp("shapes_data")
    synth(out, n=64, seed=0, eval_n=32, shard_size=32, workers=1)
    return out


# a VQ small enough for shard-tool tests (16 codes, f8)
TINY_VQ = dict(base_channels=8, channel_multiplier=[1, 2, 2, 2], latent_channels=8, embed_dim=4, codebook_size=16,
               norm_groups=4, mid_attn=False)


@pytest.fixture(scope="session")
def tiny_vq_dir(tmp_path_factory):
    """A randomly initialised TINY_VQ saved with save_pretrained (seed 0)."""
    from mmkit.vq.model import VQModel, preset_config

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vq") / "vq"
    VQModel(preset_config(**TINY_VQ)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """6 train / 4 eval documents per kind (interleaved, caption, VQA), 1000 per shard, seed 0."""
    from mmkit.data.synth import synth

    out = tmp_path_factory.mktemp("shapes")
    synth(str(out), 6, 0, 4, ["interleaved", "caption", "vqa"], 1000, 1, progress=False)
    return out


class _Biased(torch.nn.Module):
    """Wraps a generation-contract model and adds a fixed bias to its logits (to make boi /
    eos likely or impossible in sampler tests)."""

    def __init__(self, model, bias: dict[int, float]):
        super().__init__()
        self.inner, self.config = model, model.config
        self.bias = torch.zeros(model.config.vocab_size)
        for t, b in bias.items():
            self.bias[t] = b

    def make_cache(self, *a, **k):
        return self.inner.make_cache(*a, **k)

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids, **kw)
        out.logits = out.logits + self.bias
        return out


@pytest.fixture
def biased():
    """`biased(model, {token_id: logit_bias})` -> the wrapped model."""
    return _Biased
