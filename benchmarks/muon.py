"""Muon optimizer step: mmkit's BatchedMuon vs torch.optim.Muon on a Chameleon's hidden matrices.

`BatchedMuon` is torch's Muon with the Newton-Schulz iterations of same-shape matrices run as
one batch of `bmm`s (mmkit/train/optim.py). Both optimizers get the same parameters (the
matrices `train.optimizer: muon` hands to Muon: `muon_params` of an mmkit Chameleon) and the
same gradients; their steps alternate in one process so machine load hits both alike. The
table reports the median step time, the ratio, and whether the two ended bit-equal.

    .venv/bin/python benchmarks/muon.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# the quickstart's Chameleon (training/chameleon-shapes.yaml) and chameleon_train.py's bench model
CONFIGS = {
    "quickstart (4 x 128)": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4),
    "bench (8 x 512)": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
}


def hidden_matrices(cfg: dict) -> list[torch.Tensor]:
    from mmkit.models.chameleon.config import MmkitChameleonConfig
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM
    from mmkit.train.optim import muon_params, param_groups

    model = MmkitChameleonForCausalLM(MmkitChameleonConfig(vocab_size=1024, num_image_tokens=512, **cfg))
    return [p.detach() for p in muon_params(model, param_groups(model, 0.1)[0]["params"])]


def compare(mats: list[torch.Tensor], reps: int, steps: int) -> dict:
    from mmkit.train.optim import BatchedMuon

    kw = dict(lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    params = {name: [torch.nn.Parameter(m.clone()) for m in mats] for name in ("torch", "mmkit")}
    opts = {"torch": torch.optim.Muon(params["torch"], **kw), "mmkit": BatchedMuon(params["mmkit"], **kw)}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps):
        grads = [torch.randn(m.shape, generator=g) for m in mats]
        for name, opt in opts.items():
            for p, gr in zip(params[name], grads):
                p.grad = gr
            opt.step()  # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    equal = all(torch.equal(a, b) for a, b in zip(params["torch"], params["mmkit"]))
    return {"matrices": len(mats), "shapes": len({tuple(m.shape) for m in mats}),
            "torch_ms": statistics.median(times["torch"]), "mmkit_ms": statistics.median(times["mmkit"]),
            "bit_equal": equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, steps = (3, 5) if args.quick else (7, 10)
    rows = {}
    for name, cfg in CONFIGS.items():
        rows[name] = compare(hidden_matrices(cfg), reps, steps)
    print(f"{torch.get_num_threads()} threads; median of {reps} x {steps} steps; same gradients; "
          f"ratio = torch / mmkit (higher is better)\n")
    print("| model | matrices (shapes) | torch.optim.Muon ms/step | mmkit BatchedMuon ms/step | ratio | bit-equal |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['matrices']} ({r['shapes']}) | {r['torch_ms']:.1f} | {r['mmkit_ms']:.1f} | "
              f"{r['torch_ms'] / r['mmkit_ms']:.2f}x | {'yes' if r['bit_equal'] else 'NO'} |")
    out = Path(__file__).resolve().parent / "results" / "muon.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
