"""The Chameleon training stream with and without `data.memo_docs`, after its first epoch.

Why: the quickstart's Chameleon sees its 24000 documents ~3 times; with memo_docs later epochs
reuse each document's token sequences instead of decoding and tokenizing it again. Both streams
are advanced `--skip` batches (past the first epoch of the caption and VQA shards, 8000 each at
the recipe's kind weights), then timed in alternating blocks in one process; the batches are the
same in both (tests/test_chameleon_train.py::test_memo_docs_stream_equals_the_plain_stream).

  .venv/bin/python benchmarks/chameleon_stream.py --run runs/quickstart
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chameleon_step_phases import quickstart_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a quickstart directory (data/train_codes, text_tokenizer, vq/final)")
    ap.add_argument("--recipe", default="training/chameleon-shapes.yaml")
    ap.add_argument("--skip", type=int, default=1500, help="batches before timing (past the first epoch)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--block", type=int, default=150, help="batches per timed block")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)

    def stream(memo: bool):
        r, task = quickstart_task(args.run, args.recipe, [f"data.memo_docs={str(memo).lower()}"])
        return iter(task.batches(batch_size=r.train.batch_size))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    streams = {"plain": stream(False), "memo_docs": stream(True)}
    for it in streams.values():
        for _ in range(args.skip):
            next(it)
    ms: dict[str, list[float]] = {k: [] for k in streams}
    for _ in range(args.blocks):
        for name, it in streams.items():
            t = time.perf_counter()
            for _ in range(args.block):
                next(it)
            ms[name].append((time.perf_counter() - t) / args.block * 1000)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"after {args.skip} batches, 1 thread, median of {args.blocks} x {args.block}: "
          + ", ".join(f"{k} {v:.2f} ms a batch" for k, v in med.items())
          + f" ({med['plain'] / med['memo_docs']:.2f}x); peak RSS of both streams +{rss:.0f} MB")


if __name__ == "__main__":
    main()
