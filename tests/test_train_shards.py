"""The toy task on real mmkit shards via `--data`: the loss falls, and resume through the
data layer's BatchStream state (mmkit.data.build_stream) is exact."""

from __future__ import annotations

import pytest
import torch

from mmkit.cli import main
from mmkit.cli.train import load_recipe
from mmkit.train.engine import train

RECIPE = """
task: toy
model: {dim: 32, n_layers: 2, n_heads: 2, seq_len: 48}
data: {sources: /not/used/when/--data/is/given}
train: {batch_size: 4, max_steps: 24, lr: 3.0e-3, warmup: 2, log_every: 1, save_every: 12, trackers: []}
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    assert main(["data", "synth", "--out", str(root), "--n", "12", "--shard-size", "6", "--workers", "1"]) == 0
    return root / "train"


def test_toy_trains_on_shards_and_resumes_exactly(shards, tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(RECIPE)
    recipe = load_recipe(str(cfg), [], data=str(shards))
    assert recipe.data["sources"] == str(shards)  # --data fills the task's data.sources
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(recipe, tmp_path / "full", progress=False)
        part = train(recipe, tmp_path / "part", stop_after=12, progress=False)
        rest = train(recipe, tmp_path / "part", resume=True, progress=False)
    finally:
        torch.set_num_threads(n)
    assert full.losses[24] < full.losses[1] - 1.0, full.losses
    assert [part.losses[s] for s in range(1, 13)] == [full.losses[s] for s in range(1, 13)]
    assert [rest.losses[s] for s in range(13, 25)] == [full.losses[s] for s in range(13, 25)]
