"""`mmkit train`: run a training recipe (also under `accelerate launch -m mmkit train`)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a recipe (VQ tokenizer, Chameleon, Kimi-VL, toy) with the accelerate engine",
        description="Train the recipe in --config into --out. Extra key=value arguments override "
        "recipe keys (e.g. train.lr=1e-3 model.dim=128). Launch with `accelerate launch "
        "[--config_file training/accelerate/X.yaml] -m mmkit train ...` for DDP/FSDP.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (task, model, data, train)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final weights)")
    p.add_argument("--data", help="training shards: sets the recipe's data.sources")
    p.add_argument("--max-steps", type=int, help="train.max_steps (the schedule's length)")
    p.add_argument("--save-every", type=int, help="train.save_every")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop with a checkpoint at this step without changing the schedule (chunked jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=run)


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
    print(f"mmkit train: {result.status} at step {result.step}{loss}; run directory {args.out}")
    return 0
