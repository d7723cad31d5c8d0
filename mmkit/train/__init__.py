"""The training engine (accelerate) and the task interface the model families implement.

- `mmkit.train.task`: `Task` / `BatchStream` protocols, `register_task`, `get_task`.
- `mmkit.train.engine.train(recipe, out_dir, resume=..., stop_after=...)`: the loop.
- `mmkit.train.config`: `Recipe` and `TrainConfig` (strict dataclasses).
- `mmkit.train.checkpoint`: atomic safetensors/JSON checkpoints.
- `mmkit.train.toy`: task "toy", the engine's own test and benchmark model.

Submodules import torch/accelerate; this package file imports nothing, so `mmkit --help` stays fast.
"""
