"""MoE decoder step time vs number of routed experts (fixed top-k and expert width).

Goal (issue 6): training step time grows <= 1.3x from 8 to 64 routed experts. All expert
counts are built up front and their steps interleaved round-robin in one run, so machine
noise hits them alike. A step = forward + loss + backward (CPU, bf16 autocast); the AdamW
update, whose cost is proportional to the parameter count by construction, is timed
separately and reported beside it. Prints a markdown table, writes
benchmarks/results/moe_scaling.json and docs/moe_scaling.png.

    .venv/bin/python benchmarks/moe_scaling.py [--quick] [--experts 8 16 32 64] [--hf]

`--hf` also times transformers' DeepseekV3ForCausalLM at each expert count (same weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_train import BENCH, build_pair  # noqa: E402
from plotting import line_plot  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed rounds first: the allocator's heap reaches its steady state (as in a long run)")
    p.add_argument("--hf", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_scaling.json"))
    p.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "moe_scaling.png"))
    a = p.parse_args(argv)
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    torch.manual_seed(0)
    base = dict(BENCH, num_hidden_layers=4)
    batch, seq = (2, 512) if a.quick else (4, 1024)
    if a.quick:
        base.update(vocab_size=4096, num_hidden_layers=2)
    steps = a.steps or 6
    dev = a.device
    ids = torch.randint(0, base["vocab_size"], (batch, seq), device=dev)
    models = {}
    for e in a.experts:
        hf, ours, hf_impl = build_pair(dict(base, n_routed_experts=e), dev)
        models[("mmkit", e)] = ours
        if a.hf:
            models[("hf", e)] = hf
        else:
            del hf

    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(key, model):
        opt = opts[key]
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        if key[0] == "mmkit":
            model.update_balancing_bias()
        if dev == "cuda":
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    times = {k: [] for k in models}
    opt_times = {k: [] for k in models}
    for _ in range(a.warmup):
        for k, m in models.items():
            step(k, m)
    for _ in range(steps):
        for k, m in models.items():
            fb, ot = step(k, m)
            times[k].append(fb)
            opt_times[k].append(ot)
    med = {k: statistics.median(v) for k, v in times.items()}
    opt_med = {k: statistics.median(v) for k, v in opt_times.items()}
    e0, e1 = a.experts[0], a.experts[-1]
    rows = []
    for (impl, e), t in med.items():
        rows.append({"impl": impl, "experts": e, "fwd_bwd_s": t, "adamw_s": opt_med[(impl, e)],
                     "growth": t / med[(impl, e0)]})
    growth_of_medians = med[("mmkit", e1)] / med[("mmkit", e0)]
    # headline: median over rounds of t(E_last)/t(E_first) taken in the same round (similar machine load)
    round_ratios = [b / a_ for a_, b in zip(times[("mmkit", e0)], times[("mmkit", e1)])]
    growth = statistics.median(round_ratios)
    print(f"\nMoE step vs routed experts ({dev}, bf16 autocast, batch {batch}x{seq}, {base['num_hidden_layers']} layers, "
          f"top-{base['num_experts_per_tok']}, expert width {base['moe_intermediate_size']})\n")
    print("| implementation | routed experts | fwd+bwd (s) | growth vs first | AdamW update (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "mmkit MoECausalLM" if r["impl"] == "mmkit" else "transformers DeepseekV3ForCausalLM"
        print(f"| {name} | {r['experts']} | {r['fwd_bwd_s']:.3f} | {r['growth']:.2f}x | {r['adamw_s']:.3f} |")
    print(f"\nmmkit growth {e0} -> {e1} experts: {growth:.2f}x (median of per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in round_ratios)}; ratio of medians {growth_of_medians:.2f}x; goal <= 1.3x)")
    res = {"name": "moe_scaling", "device": dev, "quick": a.quick, "batch": batch, "seq": seq, "config": base,
           "steps": steps, "rows": rows, "growth_mmkit": growth, "growth_of_medians": growth_of_medians,
           "round_ratios": round_ratios, "goal": 1.3,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    impls = sorted({r["impl"] for r in rows})
    series = {i: [r["fwd_bwd_s"] for r in rows if r["impl"] == i] for i in impls}
    xs = [r["experts"] for r in rows if r["impl"] == impls[0]]
    if line_plot(Path(a.plot), xs, series, "routed experts (top-4, width 256)", "fwd+bwd step (s)",
                 f"MoE step time vs experts ({dev}, bf16)"):
        print(f"\n![MoE step time vs routed experts]({Path(a.plot).name})")
    return res


if __name__ == "__main__":
    main()
