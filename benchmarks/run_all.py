"""Run every benchmark and write docs/PERFORMANCE.md (one command for the whole report).

Each `benchmarks/<name>.py` measures mmkit and its reference side by side in one run,
prints a markdown table and writes `benchmarks/results/<name>.json`. This script runs
them one after another (never in parallel: they share the cores), then assembles their
tables, the machine description and the commands into docs/PERFORMANCE.md.

    python benchmarks/run_all.py            # full benchmark configs
    python benchmarks/run_all.py --quick    # smaller configs (minutes)
    python benchmarks/run_all.py --only chameleon_train generation
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ORDER = [
    "data_pipeline", "train_engine", "muon", "vq_compare", "chameleon_train", "moe_train", "moe_scaling",
    "kimivl_model", "scaling", "generation", "eval_scorers",
]
# Default extra flags: the VQ quantizer comparison trains three tokenizers (~10 min) and the
# generation benchmark's full token counts take > 15 min on 2 cores (same bench model either
# way); `--full` runs both in full.
NOT_BENCHMARKS = {"run_all", "plotting"}  # modules here that are not benchmarks
EXTRA_ARGS = {"vq_compare": ["--skip-train"], "generation": ["--quick"]}
TITLES = {
    "data_pipeline": "Data pipeline (issue 2)",
    "train_engine": "Training engine overhead (issue 4)",
    "muon": "Muon optimizer step: BatchedMuon vs torch.optim.Muon (issues 4, 9)",
    "vq_compare": "VQ tokenizers (issue 3)",
    "chameleon_train": "Chameleon-style training step vs transformers (issue 5)",
    "moe_train": "MoE decoder training step vs transformers DeepseekV3 (issue 6)",
    "moe_scaling": "MoE step time vs number of experts (issue 6)",
    "kimivl_model": "Kimi-VL-style whole model vs transformers Kimi-K2.5 (issue 6)",
    "scaling": "Scaling with sequence length and image size (issues 5, 6)",
    "generation": "Generation vs transformers generate (issue 7)",
    "eval_scorers": "Evaluators vs pycocoevalcap / official VQA rules (issue 8)",
}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", nargs="*", help="run only these benchmarks (names without .py)")
    ap.add_argument("--no-run", action="store_true", help="only rebuild the report from saved outputs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")
    ap.add_argument("--full", action="store_true", help="also the long parts (VQ quantizer training comparison)")
    args = ap.parse_args()

    names = [n for n in ORDER if (BENCH / f"{n}.py").exists()]
    names += sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ORDER and p.stem not in NOT_BENCHMARKS)
    if args.only:
        names = [n for n in names if n in args.only]
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    for name in names:
        if args.no_run:
            continue
        cmd = [sys.executable, str(BENCH / f"{name}.py")] + (["--quick"] if args.quick else [])
        cmd += [] if args.full else EXTRA_ARGS.get(name, [])
        print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            text, rc = proc.stdout, proc.returncode
            if rc != 0:
                text += "\n" + "\n".join(proc.stderr.strip().splitlines()[-5:])
        except subprocess.TimeoutExpired:
            text, rc = f"timed out after {args.timeout} s", 124
        record = {"name": name, "command": "python " + " ".join(c if not c.startswith(str(ROOT)) else
                                                                  str(Path(c).relative_to(ROOT)) for c in cmd[1:]),
                  "returncode": rc, "seconds": round(time.time() - t0, 1), "stdout": text,
                  "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
        (out_dir / f"{name}.stdout.json").write_text(json.dumps(record, indent=1))
        print(f"[run_all] {name}: rc={rc} in {record['seconds']} s", flush=True)

    lines = ["# mmkit performance", "",
             "Every figure is measured side by side with its reference (transformers or the plain "
             "library) in the same run, on the same weights; ratios are mmkit / reference "
             "(higher is better for throughput). Regenerate everything with:", "",
             "```bash", ".venv/bin/python benchmarks/run_all.py          # add --quick for small configs",
             "```", ""]
    for name in ORDER + sorted(set(p.stem.replace(".stdout", "") for p in out_dir.glob("*.stdout.json")) - set(ORDER)):
        f = out_dir / f"{name}.stdout.json"
        if not f.exists():
            continue
        rec = json.loads(f.read_text())
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"Command: `{rec['command']}` ({rec['date']}; {rec['machine']}; {rec['seconds']} s)", ""]
        if rec["returncode"] != 0:
            lines += [f"**Failed (exit {rec['returncode']})**:", "", "```", rec["stdout"][-2000:], "```", ""]
        else:
            lines += [rec["stdout"].strip(), ""]
    extra = ROOT / "docs" / "PERFORMANCE.notes.md"
    if extra.exists():
        lines += [extra.read_text().strip(), ""]
    (ROOT / "docs" / "PERFORMANCE.md").write_text("\n".join(lines) + "\n")
    print("[run_all] wrote docs/PERFORMANCE.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
