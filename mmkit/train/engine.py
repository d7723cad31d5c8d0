"""The one training engine: a task (model + batches + loss) driven through accelerate.

accelerate owns devices, process groups, DDP/FSDP wrapping and bf16 autocast; this loop
owns what accelerate leaves to the user: accumulation without needless all-reduces,
clipping, skip-on-non-finite, schedules, atomic pickle-free checkpoints with exact resume,
metrics and SIGTERM handling. One code path for 1 CPU process and N GPU nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from mmkit.config import to_dict
from mmkit.errors import MmkitError, UsageError
from mmkit.train import checkpoint as ckpt_io
from mmkit.train.config import Recipe, TrainConfig
from mmkit.train.optim import build_optimizer, build_scheduler
from mmkit.train.task import get_task


@dataclass
class RunResult:
    step: int  # last completed optimizer step
    status: str  # "done" | "stopped" (--stop-after) | "sigterm"
    losses: dict[int, float] = field(default_factory=dict)  # every step this run took
    bad_steps: int = 0
    checkpoint: str | None = None
    is_main: bool = True  # this process is the main one (prints, writes metrics)


# --------------------------------------------------------------------------- helpers
def warm_compile(recipe: Recipe) -> int:
    """Compile the recipe's regions (`train.compile: regional`) on the task's example batch, one
    forward + backward, and return the number of blocks; nothing is trained or written but inductor's
    on-disk caches.

    Why: a later `mmkit train` of the same architecture then loads the compiled block (~6 s)
    instead of compiling it (~30 s on 2 cores); the quickstart runs this beside the VQ, after
    the Kimi-VL lane, before the Chameleon needs it. The task's `compile_example()` builds a model
    of the recipe's architecture without data, tokenizers or other runs' outputs.
    """
    cfg = recipe.train
    if cfg.compile != "regional":
        raise UsageError(f"--compile-only compiles train.compile: regional recipes (this one: {cfg.compile})")
    task = get_task(recipe.task)(recipe.model, recipe.data, seed=cfg.seed, out_dir=".")
    if not callable(getattr(task, "compile_example", None)):
        raise UsageError(f"--compile-only: task {recipe.task!r} has no compile_example() to build its model from")
    torch.manual_seed(cfg.seed)
    model, batch = task.compile_example()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the device a run here would train on
    model.to(dev).train()
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    if dev == "cpu" and not _have_cxx():
        raise UsageError("--compile-only: inductor needs a C++ compiler on CPU and none was found")
    n = compile_repeated_blocks(model)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        loss, _ = task.loss(model, batch)
    loss.backward()
    return n


def enable_activation_checkpointing(model: nn.Module, task: Any) -> str:
    """Recompute activations in backward. Preference: the task's own hook, then transformers'
    `gradient_checkpointing_enable`, then a generic wrap of every block of the outermost
    nn.ModuleLists (forward patched per instance, so state_dict keys do not change)."""
    if hasattr(task, "enable_activation_checkpointing"):
        task.enable_activation_checkpointing(model)
        return "task"
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_enable"):
        # transformers 5 renamed it activation_checkpointing_enable (the old name warns); a
        # model that overrides the old name keeps it as its entry point.
        inherited = type(model).gradient_checkpointing_enable.__qualname__.startswith("PreTrainedModel.")
        try:
            if inherited and hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return "transformers"
        except TypeError as e:  # a model's hook written for another transformers version
            fallback = f"; transformers hook failed: {e}"
    else:
        fallback = ""
    from torch.utils.checkpoint import checkpoint

    lists, wrapped = [], 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(p + ".") for p in lists):
            lists.append(name)
            for block in m:
                orig = block.forward

                def fwd(*args, _orig=orig, **kwargs):
                    return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

                block.forward = fwd
                wrapped += 1
    if not wrapped:
        raise UsageError("train.activation_checkpointing: the model has no nn.ModuleList of blocks to "
                         "checkpoint and the task defines no enable_activation_checkpointing(model)")
    return f"generic ({wrapped} blocks{fallback})"


def _have_cxx() -> bool:
    """Whether inductor finds a C++ compiler (its CPU kernels are C++)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler()) is not None
    except Exception:  # no compiler found (inductor raises), or an inductor without that helper
        return False


def compile_repeated_blocks(model: nn.Module) -> int:
    """torch.compile (inductor) each block of the model's repeated-block lists in place -> how many.

    Why regional: a small model on CPU spends most of a step launching elementwise kernels
    (norms, RoPE, SwiGLU, casts: the quickstart's Chameleon ran ~7400 ops a step), and
    inductor fuses them; the blocks share one graph (parameters are graph inputs), so the cold
    compile is one block's (~30 s on 2 cores, then cached on disk), and the loss and the
    data-dependent blocked attention (`torch.compiler.disable`) stay eager. In place
    (`Module.compile`), unlike accelerate's `compile_regions`, which copies the model, compiles
    every other child too and drops optional (None) submodules: state_dict keys do not change.
    Dynamic shapes: packed batches change their row count from step to step.
    """
    import logging

    # inductor imports cpp_extension, which warns on every CPU-only machine that it found no CUDA runtime
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(type(b) is type(m[0]) for b in m)]
    inner = {id(b) for m in lists for b in m.modules() if b is not m}  # lists inside a block: the block covers them
    n = 0
    for m in lists:
        if id(m) in inner:
            continue
        for block in m:
            block.compile(dynamic=True)
            n += 1
    return n


def _fresh_single_process_state() -> None:
    """Allow several in-process runs (tests, benchmarks): accelerate's state is a singleton."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _rng_snapshot():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _rng_restore(snap) -> None:
    py, npy, cpu, cuda = snap
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def write_loss_curve(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


class _SigTerm:
    """Turns SIGTERM into a flag checked (and agreed on by all ranks) once per step."""

    def __init__(self):
        self.flag = False
        self.prev = None

    def __enter__(self):
        try:
            self.prev = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.prev = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)


# --------------------------------------------------------------------------- the run
def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Train `recipe` into `out_dir` (checkpoints/, metrics.jsonl, tensorboard/, final/).

    `stop_after`: stop (with a checkpoint) once this step is reached, without changing the
    schedule, which always spans `train.max_steps` (chunked jobs; the resume tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, send_to_device, set_seed
    from tqdm.auto import tqdm

    cfg: TrainConfig = recipe.train
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    task = get_task(recipe.task)(recipe.model, recipe.data, seed=cfg.seed, out_dir=str(out))
    missing = [m for m in ("build_model", "batches", "loss", "save_final") if not callable(getattr(task, m, None))]
    if missing:
        raise MmkitError(f"task '{recipe.task}' ({type(task).__name__}) lacks {', '.join(missing)} "
                         "(see mmkit.train.task.Task)")
    on_optimizer_step = getattr(task, "on_optimizer_step", None) or (lambda model: None)
    if not resume and ckpt_io.latest(ckpt_root) is not None:
        raise UsageError(f"{out} already holds checkpoints ({ckpt_io.latest(ckpt_root).name}): pass --resume "
                         "to continue that run, or choose a new --out")

    _fresh_single_process_state()
    # Launched as N processes (torchrun / `accelerate launch --multi_gpu`) on a machine
    # without CUDA: accelerate would fall back to N independent 1-process runs; ask it for
    # MULTI_CPU (gloo) instead. (`accelerate launch --cpu` spawns 1 process without mpirun.)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = launched and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=list(cfg.trackers) or None,
        project_dir=str(out),
        dynamo_backend="inductor" if cfg.compile == "full" else "no",
    )
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    def info(msg: str) -> None:  # status lines: stderr (stdout carries the CLI's result line)
        if is_main:
            print(msg, file=sys.stderr, flush=True)

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    info(f"mmkit train: task {recipe.task}, {world} process(es), {accelerator.distributed_type.value}, "
                      f"device {accelerator.device.type}, mixed precision {cfg.mixed_precision}")

    resume_from = None
    if resume:
        resume_from = ckpt_io.latest(ckpt_root)
        if resume_from is None:
            info(f"mmkit train: --resume: no complete checkpoint in {ckpt_root}; starting fresh")
    state = ckpt_io.load(resume_from, rank) if resume_from else None
    if state and state["meta"].get("world_size") != world:
        raise MmkitError(f"{resume_from} was written by {state['meta'].get('world_size')} processes, "
                         f"this run has {world}: resume with the same number of processes")

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))

    # Same seed on every rank: identical initial weights (DDP broadcasts them anyway).
    set_seed(cfg.seed)
    model = task.build_model()
    if cfg.activation_checkpointing:
        how = enable_activation_checkpointing(model, task)
        info(f"mmkit train: activation checkpointing: {how}")
    if state:
        model.load_state_dict(state["model"])  # full weights before sharding/wrapping
    if cfg.compile == "regional":
        if fsdp:
            raise UsageError("train.compile: regional is not supported under FSDP here; use full or no")
        if accelerator.device.type == "cpu" and not _have_cxx():
            info("mmkit train: compile: regional needs a C++ compiler on CPU (inductor) and none was found: "
                 "running eager")
        else:
            info(f"mmkit train: compile: regional ({compile_repeated_blocks(model)} blocks, inductor)")
    if fsdp and cfg.optimizer == "muon":
        raise UsageError("train.optimizer: muon does not run under FSDP here (its update needs whole "
                         "matrices); use adamw, or DDP")
    if fsdp and cfg.adamw == "auto":
        cfg = dataclasses.replace(cfg, adamw="foreach")  # fused AdamW on DTensor shards: not everywhere
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Our own LambdaLR on the raw optimizer: accelerate's scheduler wrapper would step it
    # once per process.
    scheduler = build_scheduler(optimizer.optimizer, cfg)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # the task's own module

    start_step = 0
    if state:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["meta"]["step"])

    stream = task.batches(rank=rank, world_size=world, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    if state:
        stream.load_state_dict(state["stream"])
        ckpt_io.set_rng_state(*state["rng"])  # last: nothing above may consume randomness after it
    batches = iter(stream)

    metrics_file = out / "metrics.jsonl"
    if is_main:
        # Drop records past the checkpoint (a killed run logged steps it never saved).
        kept = []
        if start_step and metrics_file.is_file():
            kept = [line for line in metrics_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    if cfg.trackers:
        accelerator.init_trackers("tensorboard")

    def save(step: int, reason: str) -> Path:
        # Keys as in build_model()'s state dict, with or without torch.compile.
        model_state = {k.replace("_orig_mod.", ""): v for k, v in (accelerator.get_state_dict(model) or {}).items()}
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.optimizer.state_dict()
        path = ckpt_io.save(
            ckpt_root, step, rank=rank, is_main=is_main, barrier=accelerator.wait_for_everyone,
            model_state=model_state, optimizer_state=optim_state, scheduler_state=scheduler.state_dict(),
            stream_state=stream.state_dict(), keep_last=cfg.keep_last,
            meta={"world_size": world, "reason": reason, "task": recipe.task, "time": time.time()},
        )
        return path

    def sample(step: int) -> None:
        if fsdp or not callable(getattr(task, "sample", None)):  # FSDP: a rank-0-only forward would hang
            return
        if is_main:
            snap = _rng_snapshot()  # sampling must not change the training trajectory
            raw_model.eval()
            (out / "samples").mkdir(exist_ok=True)
            with torch.no_grad(), accelerator.autocast():
                task.sample(raw_model, step, str(out / "samples"))
            raw_model.train()
            _rng_restore(snap)
        accelerator.wait_for_everyone()

    result = RunResult(step=start_step, status="done", is_main=is_main)
    end_step = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and is_main),
               desc="train", dynamic_ncols=True)
    model.train()
    step, bad_in_row, last_saved = start_step, 0, start_step if state else -1
    window = {"loss": 0.0, "n": 0, "tokens": 0.0, "t0": time.perf_counter(), "task": {}, "steps": 0}
    with _SigTerm() as sigterm:
        while step < end_step:
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = 0.0
            task_metrics: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                try:
                    batch = send_to_device(next(batches), accelerator.device, non_blocking=True)
                except StopIteration:
                    raise MmkitError(f"task '{recipe.task}': its batch stream ended; streams must be endless") from None
                # Only the last micro-batch all-reduces gradients.
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss, metrics = task.loss(model, batch)
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    if k == "tokens":
                        tokens += float(v)
                    else:
                        task_metrics[k] = task_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
            max_norm = cfg.clip if cfg.clip > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            # One small all-reduce: the mean loss, the tokens and the SIGTERM flag, so every
            # rank takes the same skip / stop decision.
            stats = torch.stack([
                loss_sum / cfg.grad_accum,
                torch.tensor(tokens, device=accelerator.device),
                torch.tensor(float(sigterm.flag), device=accelerator.device),
            ])
            stats = accelerator.reduce(stats, "sum").tolist()
            step_loss, step_tokens, stop_signal = stats[0] / world, stats[1], stats[2] > 0
            gnorm = float(grad_norm) if grad_norm is not None else float("nan")
            finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(gnorm))
            if finite:
                optimizer.step()
                on_optimizer_step(raw_model)
                bad_in_row = 0
            else:
                result.bad_steps += 1
                bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            result.step = step
            result.losses[step] = step_loss
            bar.update(1)

            if finite:
                window["loss"] += step_loss
                window["n"] += 1
            window["tokens"] += step_tokens
            for k, v in task_metrics.items():
                window["task"][k] = window["task"].get(k, 0.0) + v
            window["steps"] += 1
            if step % cfg.log_every == 0 or step == end_step:
                dt = time.perf_counter() - window["t0"]
                rec = {
                    "step": step,
                    "loss": window["loss"] / window["n"] if window["n"] else float("nan"),
                    "lr": lr,
                    "tokens_per_s": window["tokens"] / dt if dt > 0 else 0.0,
                    "step_time_s": dt / window["steps"],
                    "grad_norm": gnorm,
                    "bad_steps": result.bad_steps,
                    **{k: v / window["steps"] for k, v in window["task"].items()},
                }
                if is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if cfg.trackers:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
                window = {"loss": 0.0, "n": 0, "tokens": 0.0, "t0": time.perf_counter(), "task": {}, "steps": 0}

            if bad_in_row >= cfg.max_bad_steps:
                path = save(step, "abort")
                bar.close()
                accelerator.end_training()
                raise MmkitError(
                    f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={cfg.max_bad_steps}) at step "
                    f"{step}; checkpoint (weights from before them) saved to {path}; lower train.lr or check "
                    "the data, then --resume"
                )
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample(step)
            if stop_signal:
                result.status = "sigterm"
                break
            if cfg.save_every and step % cfg.save_every == 0:
                result.checkpoint = str(save(step, "periodic"))
                last_saved = step
    bar.close()

    if result.status == "done" and step < cfg.max_steps:
        result.status = "stopped"
    if last_saved != step:
        result.checkpoint = str(save(step, result.status if result.status != "done" else "end"))
    if result.status == "sigterm":
        info(f"mmkit train: SIGTERM: stopped at step {step}; checkpoint {result.checkpoint}; continue with --resume")
    if result.status == "done":
        if fsdp:  # gather the full weights into a fresh CPU model on the main process
            full = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(model).items()}
            if is_main:
                final_model = task.build_model()
                final_model.load_state_dict(full)
                task.save_final(final_model, str(out / "final"))
        elif is_main:
            task.save_final(raw_model, str(out / "final"))
    if is_main and metrics_file.is_file():
        write_loss_curve(metrics_file, out / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
