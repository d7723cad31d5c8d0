"""Scaling curves, mmkit vs transformers in one run: training-step throughput against sequence
length (Chameleon family) and fwd+bwd time against image size (Kimi-VL family).

Curves rather than single points: a fixed-size benchmark can hide an implementation that wins
at 1k tokens but loses at 4k (attention) or at large images (vision packing). Same weights,
alternating steps, medians. Writes benchmarks/results/scaling.json, docs/scaling_seq.png and
docs/scaling_image.png, and prints markdown tables that link the plots.

    .venv/bin/python benchmarks/scaling.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import chameleon_train  # noqa: E402  (same bench model and step as the Chameleon benchmark)
from plotting import line_plot  # noqa: E402
import kimivl_model  # noqa: E402  (same pair builder as the whole-model benchmark)

TOKENS_PER_STEP = 4096  # batch = TOKENS_PER_STEP / seq: the same work per step at every length


def _alternate(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine noise hits all alike."""
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def seq_curve(seqs: list[int], cfg: dict, iters: int) -> list[dict]:
    hf, ours = chameleon_train.build_pair(cfg, "cpu")
    rows = []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, cfg["vocab_size"], (TOKENS_PER_STEP // seq, seq), generator=g)
        med = _alternate({"transformers": chameleon_train.make_step(hf, ids, "cpu"),
                          "mmkit": chameleon_train.make_step(ours, ids, "cpu")}, iters)
        rows.append({"seq": seq, "batch": TOKENS_PER_STEP // seq,
                     "tok_s": {k: TOKENS_PER_STEP / v for k, v in med.items()},
                     "speedup": med["transformers"] / med["mmkit"]})
    return rows


def image_curve(sides: list[int], cfg: dict, iters: int) -> list[dict]:
    rows = []
    for side in sides:
        c = dict(cfg, grids=[(side, side)])
        hf, ours, image_token = kimivl_model.build(c)
        batch = kimivl_model.inputs(c, image_token)
        med = _alternate({"transformers": lambda: kimivl_model.step(hf, *batch),
                          "mmkit": lambda: kimivl_model.step(ours, *batch)}, iters)
        rows.append({"side_patches": side, "patches": side * side, "fwd_bwd_s": med,
                     "speedup": med["transformers"] / med["mmkit"]})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer points")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    a = ap.parse_args(argv)
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    if a.threads:
        torch.set_num_threads(a.threads)
    iters = a.iters or (2 if a.quick else 3)
    cham_cfg = chameleon_train.QUICK if a.quick else dict(chameleon_train.BENCH, num_hidden_layers=4)
    seqs = [256, 1024, 4096] if a.quick else [256, 512, 1024, 2048, 4096]
    vis_cfg = dict(kimivl_model.QUICK if a.quick else dict(kimivl_model.FULL, vision_layers=4))
    sides = [8, 16, 32] if a.quick else [8, 16, 24, 32, 48]

    seq_rows = seq_curve(seqs, cham_cfg, iters)
    img_rows = image_curve(sides, vis_cfg, iters)

    print(f"\n### Chameleon training step vs sequence length (cpu, bf16 autocast, {TOKENS_PER_STEP} tokens per step, "
          f"hidden {cham_cfg['hidden_size']}, {cham_cfg['num_hidden_layers']} layers, vocab {cham_cfg['vocab_size']}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| seq | batch | transformers tok/s | mmkit tok/s | speedup |")
    print("|---:|---:|---:|---:|---:|")
    for r in seq_rows:
        print(f"| {r['seq']} | {r['batch']} | {r['tok_s']['transformers']:.0f} | {r['tok_s']['mmkit']:.0f} | "
              f"{r['speedup']:.2f}x |")
    print("\n![training tokens/s vs sequence length](scaling_seq.png)")
    print(f"\n### Kimi-VL-style model fwd+bwd vs image size (one image, {vis_cfg['vision_layers']}-layer "
          f"{vis_cfg['vision_dim']}-wide ViT, cpu, bf16 autocast)\n")
    print("| grid (patches) | transformers (s) | mmkit (s) | speedup |")
    print("|---|---:|---:|---:|")
    for r in img_rows:
        s = r["side_patches"]
        print(f"| {s}x{s} ({r['patches']}) | {r['fwd_bwd_s']['transformers']:.3f} | {r['fwd_bwd_s']['mmkit']:.3f} | "
              f"{r['speedup']:.2f}x |")
    print("\n![fwd+bwd time vs image size](scaling_image.png)")

    docs = ROOT / "docs"
    line_plot(docs / "scaling_seq.png", seqs, {k: [r["tok_s"][k] for r in seq_rows] for k in ("transformers", "mmkit")},
          "sequence length (tokens)", "training tokens/s", "Chameleon step vs sequence length (cpu, bf16)")
    line_plot(docs / "scaling_image.png", [r["patches"] for r in img_rows],
          {k: [r["fwd_bwd_s"][k] for r in img_rows] for k in ("transformers", "mmkit")},
          "patches in the image", "fwd+bwd (s)", "Kimi-VL fwd+bwd vs image size (cpu, bf16)")
    res = {"name": "scaling", "quick": a.quick, "threads": torch.get_num_threads(), "seq": seq_rows,
           "image": img_rows, "torch": torch.__version__}
    out = ROOT / "benchmarks" / "results" / "scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
