"""`mmkit quickstart [--out DIR] [--scale S] [--smoke]`: the main job, end to end."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run everything on the embedded shapes world and write a report",
                       description="Synthesise data, train both tokenizers and both model families, generate, "
                                   "benchmark, and write DIR/report.md, report.html and results.json.")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply data and training budget (more time, better models)")
    p.add_argument("--smoke", action="store_true", help="tiny wiring run (<= 2 min): checks every stage and file, not quality")
    p.add_argument("--procs", type=int, default=None,
                   help="processes to share the CPU between (default: 2 on a CPU-only machine with >= 2 cores: "
                        "Kimi-VL beside the VQ, then a data-parallel Chameleon; 1: every stage in-process)")
    p.add_argument("--stages", nargs="*", metavar="STAGE", help="run only these stages (others are reused)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from mmkit.quickstart import STAGES, run_quickstart
    from mmkit.errors import UsageError

    if args.stages:
        bad = [s for s in args.stages if s not in STAGES]
        if bad:
            raise UsageError(f"unknown stage '{bad[0]}' (stages: {', '.join(STAGES)})")
    run_quickstart(args.out, scale=args.scale, smoke=args.smoke, only=args.stages, procs=args.procs)
    res_file = __import__("pathlib").Path(args.out) / "results.json"
    if not res_file.exists():  # --stages without the report stage
        print(f"[quickstart] stages done under {args.out} (no report yet: run the 'report' stage)")
        return 0
    res = json.loads(res_file.read_text())
    print(f"[quickstart] report: {args.out}/report.html  results: {args.out}/results.json  "
          f"(pipeline time {res.get('wall_time_s')} s)")
    return 0
