"""Reader throughput: mmkit.data.build_stream vs a plain webdataset pipeline, same shards.

Shapes-world shards (all three kinds) are synthesised into a temporary directory; each
reader decodes JSON + PNG images to PIL RGB in its DataLoader workers and batches 32
samples; a run is one full pass (all samples). mmkit and webdataset alternate per worker
count in one process, so machine noise hits both alike; the best of `--repeats` is kept.
The webdataset reference is the common `WebDataset(...).shuffle(1000).decode("pil")
.batched(32)` + `WebLoader` (its shard split is per worker, so with 2 workers it is not
doing mmkit's exactly-once/equal-batches schedule; it is the speed to beat). Prints a
markdown table, writes benchmarks/results/data_pipeline.json.

    .venv/bin/python benchmarks/data_pipeline.py [--quick] [--n N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def run_mmkit(shards_dir: Path, workers: int, batch: int) -> tuple[int, float]:
    from mmkit.data import build_stream

    t = time.perf_counter()
    s = build_stream(shards_dir, batch_size=batch, num_workers=workers, infinite=False, shuffle_buffer=1000, seed=0)
    n = sum(len(b) for b in s)
    return n, time.perf_counter() - t


def _wds_collate(x):
    return x


def run_wds(shards: list[str], workers: int, batch: int) -> tuple[int, float]:
    import webdataset as wds

    t = time.perf_counter()
    ds = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, empty_check=False)
          .shuffle(1000).decode("pil").batched(batch, collation_fn=_wds_collate))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    n = sum(len(b) for b in loader)
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, 1 repeat")
    ap.add_argument("--n", type=int, default=None, help="samples per kind (default 1500; quick 300)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    n = args.n or (300 if args.quick else 1500)
    repeats = args.repeats or (1 if args.quick else 3)

    import torch.utils.data  # noqa: F401  (import cost out of the timings)
    import webdataset  # noqa: F401

    from mmkit.data.synth import write_split

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "train"
        write_split(d, "train", n, 0, ("interleaved", "caption", "vqa"), shard_size=250, workers=2)
        shards = sorted(str(p) for p in d.glob("*.tar"))
        total_bytes = sum(Path(s).stat().st_size for s in shards)
        rows = []
        for workers in (0, 1, 2):
            best = {"mmkit": None, "webdataset": None}
            for _ in range(repeats):
                for name, fn, src in (("mmkit", run_mmkit, d), ("webdataset", run_wds, shards)):
                    cnt, dt = fn(src, workers, args.batch)
                    assert cnt == 3 * n, (name, cnt)
                    if best[name] is None or dt < best[name]:
                        best[name] = dt
            m, w = best["mmkit"], best["webdataset"]
            rows.append({"workers": workers, "samples": 3 * n,
                         "mmkit_samples_per_s": round(3 * n / m, 1), "mmkit_mb_per_s": round(total_bytes / m / 1e6, 2),
                         "webdataset_samples_per_s": round(3 * n / w, 1),
                         "webdataset_mb_per_s": round(total_bytes / w / 1e6, 2),
                         "ratio_mmkit_over_webdataset": round(w / m, 2)})
    print(f"\nReader throughput, shapes world ({3 * n} samples, {total_bytes / 1e6:.1f} MB, batch {args.batch}, "
          f"decode json + PNG -> PIL, best of {repeats})\n")
    print("| workers | mmkit samples/s | mmkit MB/s | webdataset samples/s | webdataset MB/s | mmkit / webdataset |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['mmkit_samples_per_s']} | {r['mmkit_mb_per_s']} | {r['webdataset_samples_per_s']} "
              f"| {r['webdataset_mb_per_s']} | {r['ratio_mmkit_over_webdataset']}x |")
    out = Path(__file__).resolve().parent / "results" / "data_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "data_pipeline", "command": "python benchmarks/data_pipeline.py" + (" --quick" if args.quick else ""),
        "samples": 3 * n, "bytes": total_bytes, "batch_size": args.batch, "repeats": repeats,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
