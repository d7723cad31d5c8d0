"""The task interface: what a model family plugs into the one training engine.

The engine (accelerate: devices, DDP/FSDP, mixed precision, accumulation, clipping,
schedules, checkpoints, logging) knows nothing about images or tokens. A task knows its
model and its batches. A recipe YAML names the task (`task: vq | chameleon | kimivl`);
the engine looks it up with `get_task(name)` and hands it the recipe's `model:` and
`data:` sections as plain dicts, which the task parses into its own strict dataclasses.

A task module registers itself with `@register_task("name")`; `get_task` imports
`TASK_MODULES[name]` lazily, so registering a family costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from mmkit.errors import UsageError

# name -> module that defines and registers it (imported on first use)
TASK_MODULES = {
    "vq": "mmkit.vq.task",
    "chameleon": "mmkit.models.chameleon.task",
    "kimivl": "mmkit.models.kimivl.task",
    "toy": "mmkit.train.toy",
}
_REGISTRY: dict[str, type] = {}


@runtime_checkable
class Task(Protocol):
    """One model family's training recipe, as the engine sees it."""

    def __init__(self, model_cfg: dict, data_cfg: dict, *, seed: int, out_dir: str) -> None:
        """Parse the recipe's `model:` / `data:` sections strictly (ConfigError on unknown keys)."""

    def build_model(self) -> nn.Module:
        """A fresh model (pure PyTorch / PreTrainedModel), on CPU, in fp32."""

    def batches(self, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> "BatchStream":
        """An endless, resumable stream of batches for this rank (see BatchStream)."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and metrics; metrics must include 'tokens' (count this rank processed)."""

    def on_optimizer_step(self, model: nn.Module) -> None:
        """Hook after each optimizer step (e.g. MoE balancing-bias update). May do nothing."""

    def sample(self, model: nn.Module, step: int, out_dir: str) -> None:
        """Write samples (PNG grids, markdown) for humans every K steps. May do nothing."""

    def save_final(self, model: nn.Module, out_dir: str) -> None:
        """Save `save_pretrained`-format weights (+ configs, tokenizers) into out_dir."""


class BatchStream(Protocol):
    """Iterator of batches with an exact-resume state (epoch, position, RNG)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def register_task(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def get_task(name: str) -> type:
    if name not in _REGISTRY:
        if name not in TASK_MODULES:
            raise UsageError(f"unknown task '{name}' (known: {', '.join(sorted(TASK_MODULES))})")
        module = TASK_MODULES[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise UsageError(f"task '{name}' is not available: its module {module} does not exist yet") from None
            raise UsageError(f"task '{name}' cannot be imported: {e}") from None
    if name not in _REGISTRY:
        raise UsageError(f"task module {TASK_MODULES[name]} did not register task '{name}'")
    return _REGISTRY[name]
