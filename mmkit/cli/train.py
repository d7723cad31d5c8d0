"""`mmkit train`: run a training recipe (also under `accelerate launch -m mmkit train`)."""

from __future__ import annotations

import argparse


def _add_flags(p, *, top: bool) -> None:
    p.add_argument("--config", help="recipe YAML (task, model, data, train); required")
    p.add_argument("--out", help="run directory (checkpoints, metrics, final weights); required")
    p.add_argument("--data", help="training shards: sets the recipe's data.sources")
    p.add_argument("--max-steps", type=int, help="train.max_steps (the schedule's length)")
    p.add_argument("--save-every", type=int, help="train.save_every")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop with a checkpoint at this step without changing the schedule (chunked jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the recipe's blocks (train.compile: regional) on an example batch and exit: fills "
                        "inductor's on-disk cache, so a later run starts in seconds (no data or --out needed)")
    if top:
        # REMAINDER, not "*": argparse cannot interleave a "*" positional with flags
        # (`model.x=1 --max-steps 5 train.y=2`); run() sorts the tokens out itself.
        p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                       help="recipe overrides, e.g. train.lr=1e-3 model.dim=128 (flags may follow)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a recipe (VQ tokenizer, Chameleon, Kimi-VL, toy) with the accelerate engine",
        description="Train the recipe in --config into --out. Extra key=value arguments override "
        "recipe keys (e.g. train.lr=1e-3 model.dim=128). Launch with `accelerate launch "
        "[--config_file training/accelerate/X.yaml] -m mmkit train ...` for DDP/FSDP.",
    )
    _add_flags(p, top=True)
    p.set_defaults(func=run)


def _split_remainder(args) -> None:
    """key=value tokens -> args.overrides; flags that came after them -> parsed into args."""
    from mmkit.cli import ArgumentParser

    overrides, flags = [], []
    for tok in args.overrides:
        (overrides if "=" in tok and not tok.startswith("-") else flags).append(tok)
    if flags:
        later = ArgumentParser(prog="mmkit train", add_help=False)
        _add_flags(later, top=False)
        ns = later.parse_args(flags)
        for key, value in vars(ns).items():
            if value is not None and value is not False:
                setattr(args, key, value)
    args.overrides = overrides


def load_recipe(config: str, overrides: list[str], *, data: str | None = None, max_steps: int | None = None,
                save_every: int | None = None, seed: int | None = None):
    """Recipe YAML + key=value overrides + the flags -> a strict Recipe (ConfigError names the key)."""
    from mmkit.config import apply_overrides, from_dict, read_yaml
    from mmkit.errors import UsageError
    from mmkit.train.config import Recipe
    from mmkit.train.task import get_task

    raw = read_yaml(config)
    apply_overrides(raw, overrides)
    if not isinstance(raw.get("train", {}), dict) or not isinstance(raw.get("data", {}), dict):
        raise UsageError(f"{config}: 'train' and 'data' must be mappings")
    flags = {"max_steps": max_steps, "save_every": save_every, "seed": seed}
    for key, value in flags.items():
        if value is not None:
            raw.setdefault("train", {})[key] = value
    if data is not None:
        task_cls = get_task(raw.get("task", "")) if raw.get("task") else None
        data_key = getattr(task_cls, "data_key", "sources")
        raw.setdefault("data", {})[data_key] = data
    return from_dict(Recipe, raw, where=config)


def run(args) -> int:
    from pathlib import Path

    from mmkit.errors import UsageError

    _split_remainder(args)
    for flag in ("config",) if args.compile_only else ("config", "out"):
        if not getattr(args, flag):
            raise UsageError(f"mmkit train: --{flag} is required")
    if args.compile_only:
        return _compile_only(args)
    for name in ["max_steps", "save_every", "stop_after"]:
        v = getattr(args, name)
        if v is not None and v < (0 if name == "save_every" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'save_every' else '>= 1'}, got {v}")
    if args.data is not None and not Path(args.data).exists() and not any(c in args.data for c in "*?{"):
        raise UsageError(f"--data: no such file or directory: {args.data}")
    recipe = load_recipe(args.config, args.overrides, data=args.data, max_steps=args.max_steps,
                         save_every=args.save_every, seed=args.seed)
    from mmkit.train.task import get_task

    get_task(recipe.task)  # unknown task -> one line before any heavy setup
    from mmkit.train.engine import train

    result = train(recipe, args.out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    last = result.losses.get(result.step)
    loss = f", loss {last:.4f}" if last is not None else ""
    if result.is_main:
        print(f"mmkit train: {result.status} at step {result.step}{loss}; run directory {args.out}")
    return 0


def _compile_only(args) -> int:
    import time

    from mmkit.train.engine import warm_compile

    recipe = load_recipe(args.config, args.overrides, data=args.data)
    t0 = time.time()
    n = warm_compile(recipe)
    print(f"mmkit train: compiled {n} blocks of {args.config} in {time.time() - t0:.1f} s (inductor's cache)")
    return 0
