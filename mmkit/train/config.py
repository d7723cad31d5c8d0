"""The recipe schema: `task`, `model`, `data`, `train` (the engine's own section).

`model:` and `data:` are plain dicts here; the task named by `task:` parses them with its
own strict dataclasses, so the engine never needs to know a family's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """Everything the engine decides (optimizer, schedule, precision, checkpoints, logging).

    `batch_size` is per process and per micro-step: the global batch per optimizer step is
    `batch_size * grad_accum * world_size`.
    """

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; also the schedule's length
    lr: float = 3e-4
    weight_decay: float = 0.1  # on >=2-D weights only (never norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    adamw: Literal["auto", "fused", "foreach", "for"] = "auto"
    # muon: torch's Muon on hidden matrices (update RMS matched to AdamW's, same lr / decay), AdamW on
    # embeddings, the output head, norms and biases (Moonlight); not with FSDP
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = 0.95
    warmup: int = 100  # linear warmup steps
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr: float = 0.1  # floor of cosine/wsd decay, as a ratio of `lr`
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent in the final decay
    clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # bool too: YAML 1.1 reads a bare `no` as false
    mixed_precision: Literal["no", "bf16"] | bool = "no"
    activation_checkpointing: bool = False
    # torch.compile (inductor): "full" compiles the whole model through accelerate; "regional" compiles each
    # block of the model's repeated-block lists in place (one graph for all blocks, the loss and any
    # data-dependent attention stay eager; ~30 s cold on 2 cores, cached after); bool too: true = full
    compile: Literal["no", "full", "regional"] | bool = "no"
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 500  # 0: only at the end (and on SIGTERM / abort)
    keep_last: int = 3
    sample_every: int = 0  # 0: never
    max_bad_steps: int = 5  # this many non-finite losses in a row abort the run
    seed: int = 0
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self):
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        elif self.mixed_precision is True:
            raise ValueError("train.mixed_precision: say which, 'bf16' (or 'no')")
        if isinstance(self.compile, bool):
            self.compile = "full" if self.compile else "no"
        positive = ["batch_size", "grad_accum", "max_steps", "log_every", "keep_last", "max_bad_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["warmup", "save_every", "sample_every", "num_workers"]:
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"train.min_lr is a ratio of lr in [0, 1], got {self.min_lr}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"train.decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.clip < 0:
            raise ValueError(f"train.clip must be >= 0, got {self.clip}")
        for t in self.trackers:
            if t not in ("tensorboard",):
                raise ValueError(f"train.trackers: unsupported tracker {t!r} (supported: tensorboard)")


@dataclass
class Recipe:
    """One training recipe YAML."""

    task: str
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
