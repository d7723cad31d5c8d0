"""Training engine overhead (issue 4): `mmkit.train.engine.train` vs a bare PyTorch loop.

Same toy byte-level transformer, same batches, same AdamW (fused, same decay groups),
clipping and LR schedule: the bare loop is what one would write by hand without
checkpoints, logging, accelerate or the skip-on-NaN logic. Runs alternate (engine, bare,
engine, bare, ...) in one process so machine load hits both alike; the table reports the
median steady-state step time (first `warm` steps dropped) and the ratio.

    .venv/bin/python benchmarks/train_engine.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_run(model_cfg: dict, train_cfg: dict, steps: int, warm: int, stop: int | None = None) -> tuple[float, float]:
    """(median wall step time from the engine's own metrics, process CPU seconds of the run)."""
    from mmkit.config import from_dict
    from mmkit.train.config import Recipe
    from mmkit.train.engine import train

    recipe = from_dict(Recipe, {"task": "toy", "model": model_cfg, "data": {},
                                "train": {**train_cfg, "max_steps": steps, "log_every": warm, "save_every": 0,
                                          "trackers": []}})
    with tempfile.TemporaryDirectory() as tmp:
        c0 = time.process_time()
        train(recipe, tmp, progress=False, stop_after=stop)
        cpu = time.process_time() - c0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()][1:]
    wall = statistics.median(r["step_time_s"] for r in rows) if rows else float("nan")
    return wall, cpu


def engine_step_times(model_cfg: dict, train_cfg: dict, steps: int, warm: int) -> tuple[float, float]:
    """(median wall s/step, CPU s/step): CPU = run(steps) - run(warm) over steps - warm, so setup,
    the final checkpoint and warm-up cancel; CPU time is what machine load does not inflate."""
    wall, cpu_full = engine_run(model_cfg, train_cfg, steps, warm)
    _, cpu_warm = engine_run(model_cfg, train_cfg, steps, warm, stop=warm)
    return wall, (cpu_full - cpu_warm) / (steps - warm)


def bare_step_times(model_cfg: dict, train_cfg: dict, steps: int, warm: int) -> tuple[float, float]:
    import torch

    from mmkit.config import from_dict
    from mmkit.train.config import TrainConfig
    from mmkit.train.optim import build_optimizer, build_scheduler
    from mmkit.train.toy import ToyTask

    cfg = from_dict(TrainConfig, {**train_cfg, "max_steps": steps})
    torch.manual_seed(cfg.seed)
    task = ToyTask(model_cfg, {}, seed=cfg.seed)
    model = task.build_model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    batches = iter(task.batches(batch_size=cfg.batch_size))
    times, tokens = [], 0
    for step in range(steps):
        if step == warm:
            c0 = time.process_time()
        t0 = time.perf_counter()
        batch = next(batches)
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()
        times.append(time.perf_counter() - t0)
        tokens = batch["labels"].numel()
    cpu = (time.process_time() - c0) / (steps - warm)
    window = [sum(times[i:i + warm]) / warm for i in range(warm, steps - warm + 1, warm)]
    return statistics.median(window), cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared machine)")
    args = ap.parse_args()
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    import torch

    torch.set_num_threads(args.threads)
    configs = {
        "small (d128 L4 T128 B16)": ({"dim": 128, "n_layers": 4, "n_heads": 4, "seq_len": 128}, {"batch_size": 16}),
        "tiny (d64 L2 T64 B16)": ({"dim": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64}, {"batch_size": 16}),
    }
    steps, warm, repeats = (40, 10, 2) if args.quick else (60, 10, 3)
    base_train = {"lr": 1e-3, "warmup": 10, "clip": 1.0}
    results = []
    # Pay one-off imports (accelerate, matplotlib for loss.png, safetensors) before measuring.
    first = next(iter(configs.values()))
    engine_run(first[0], {**base_train, **first[1]}, 4, 2)
    for name, (mcfg, tcfg) in configs.items():
        tcfg = {**base_train, **tcfg}
        eng, bare = [], []
        for _ in range(repeats):
            eng.append(engine_step_times(mcfg, tcfg, steps, warm))
            bare.append(bare_step_times(mcfg, tcfg, steps, warm))
        e_t = statistics.median(t for t, _ in eng)
        b_t = statistics.median(t for t, _ in bare)
        e_c = statistics.median(c for _, c in eng)
        b_c = statistics.median(c for _, c in bare)
        tokens = tcfg["batch_size"] * mcfg["seq_len"]
        results.append({"config": name, "engine_step_ms": 1e3 * e_t, "bare_step_ms": 1e3 * b_t,
                        "engine_tokens_per_s": tokens / e_t, "bare_tokens_per_s": tokens / b_t,
                        "overhead_ratio": e_t / b_t, "engine_cpu_ms": 1e3 * e_c, "bare_cpu_ms": 1e3 * b_c,
                        "cpu_overhead_ratio": e_c / b_c})
    print(f"Toy LM, fp32, CPU, {args.threads} torch thread(s), {steps} steps x {repeats} alternating repeats. "
          f"Wall: median of {warm}-step windows after the first; CPU: process CPU time per steady-state step "
          "(insensitive to other jobs on the machine). Ratios = engine / bare (1.00 = no overhead).\n")
    print("| config | engine ms/step | bare ms/step | engine tok/s | bare tok/s | wall ratio "
          "| engine CPU ms/step | bare CPU ms/step | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['config']} | {r['engine_step_ms']:.1f} | {r['bare_step_ms']:.1f} | "
              f"{r['engine_tokens_per_s']:.0f} | {r['bare_tokens_per_s']:.0f} | {r['overhead_ratio']:.2f} | "
              f"{r['engine_cpu_ms']:.1f} | {r['bare_cpu_ms']:.1f} | {r['cpu_overhead_ratio']:.2f} |")
    out = {"name": "train_engine", "quick": args.quick, "threads": args.threads, "steps": steps,
           "repeats": repeats, "results": results}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "train_engine.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
