"""Where a Chameleon training step goes, phase by phase: stream, forward + loss, backward,
gradient clipping, optimizer step (the engine's loop taken apart, with the recipe's optimizer).

Why: at equal time the recipe's batch of 16 beats 8, 12 and 24 (docs/chameleon.md, round 11),
so more VQA in the quickstart's budget needs cheaper steps, and the part of a step that does not
shrink with the batch is where to look. Run it at two batch sizes to see that part.

  .venv/bin/python benchmarks/chameleon_step_phases.py --run runs/quickstart --threads 2 --batch 16
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time

import torch

PHASES = ("stream", "forward+loss", "backward", "clip", "optimizer")


def quickstart_task(run: str, recipe: str, overrides: list[str] = ()):
    """-> (recipe, task): the Chameleon recipe pointed at a quickstart directory's training codes,
    text tokenizer and VQ (what the quickstart's Chameleon stage trains on)."""
    import mmkit.models.chameleon.task  # noqa: F401  (registers the task)
    from mmkit.cli.train import load_recipe
    from mmkit.train.task import get_task

    r = load_recipe(recipe, [f"model.text_tokenizer={run}/text_tokenizer", f"model.vq={run}/vq/final", *overrides],
                    data=f"{run}/data/train_codes")
    return r, get_task(r.task)(r.model, r.data, seed=0, out_dir=tempfile.gettempdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a quickstart directory (data/train_codes, text_tokenizer, vq/final)")
    ap.add_argument("--recipe", default="training/chameleon-shapes.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100, help="measured steps (after 30 warm-up steps)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the blocks as train.compile: regional does (the warm-up steps include the compile)")
    args = ap.parse_args()

    from mmkit.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    r, task = quickstart_task(args.run, args.recipe, [f"train.batch_size={args.batch}"])
    batches = iter(task.batches(batch_size=args.batch))
    model = task.build_model().train()
    opt = build_optimizer(model, r.train)
    if args.compile:
        from mmkit.train.engine import compile_repeated_blocks

        compile_repeated_blocks(model)
    ms: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(30 + args.steps):
        t = [time.perf_counter()]
        batch = next(batches)
        t.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.train.mixed_precision == "bf16"):
            loss, _ = task.loss(model, batch)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.train.clip or float("inf"))
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if i >= 30:
            for name, a, b in zip(PHASES, t, t[1:]):
                ms[name].append((b - a) * 1000)
    med = {name: statistics.median(ms[name]) for name in PHASES}
    print(f"batch {args.batch}, {args.threads} thread(s), {'regional compile' if args.compile else 'eager'}, median of {args.steps} steps: "
          + ", ".join(f"{k} {v:.1f}" for k, v in med.items()) + f" ms; sum {sum(med.values()):.1f} ms")


if __name__ == "__main__":
    main()
