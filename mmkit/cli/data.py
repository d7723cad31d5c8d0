"""`mmkit data ...`: synthesise, inspect and import shards in the mmkit sample schema."""

from __future__ import annotations

from mmkit.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data: synth, inspect, import")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    s = sub.add_parser("synth", help="write shapes-world shards (train + eval) and eval exports")
    s.add_argument("--out", required=True, help="output directory (gets train/ and eval/)")
    s.add_argument("--n", type=int, required=True, help="train samples per kind")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-n", type=int, default=None, help="eval samples per kind (default n/10, <= 1000)")
    s.add_argument("--kinds", default="interleaved,caption,vqa", help="comma-separated subset of interleaved,caption,vqa")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--workers", type=int, default=None, help="processes (default: min(4, CPUs))")
    s.set_defaults(func=_synth)

    i = sub.add_parser("inspect", help="validate shards against the schema")
    i.add_argument("shards", nargs="+", help="tar files or directories of tars")
    i.add_argument("--json", action="store_true", help='print {"samples", "ok", "skipped"} as one JSON object')
    i.set_defaults(func=_inspect)

    imp = sub.add_parser("import", help="convert external datasets into mmkit shards")
    isub = imp.add_subparsers(dest="import_format", metavar="FORMAT")
    imp.set_defaults(func=lambda args: (imp.print_help(), 2)[1])
    a = isub.add_parser("img2dataset", help="img2dataset tars (.jpg/.txt/.json)")
    a.add_argument("inputs", nargs="+", help="img2dataset tar files or directories")
    _common_import(a)
    a.set_defaults(func=_import)
    v = isub.add_parser("vqav2", help="VQAv2 questions + annotations JSON with an image folder")
    v.add_argument("--questions", required=True)
    v.add_argument("--annotations", required=True)
    v.add_argument("--images", required=True, help="image folder (COCO_<split>_<id:012d>.jpg or <id>.jpg ...)")
    _common_import(v)
    v.set_defaults(func=_import)
    c = isub.add_parser("coco", help="COCO captions JSON with an image folder")
    c.add_argument("--captions", required=True)
    c.add_argument("--images", required=True)
    _common_import(c)
    c.set_defaults(func=_import)
    o = isub.add_parser("obelics", help="OBELICS-style documents (parquet or JSONL; image bytes or local paths)")
    o.add_argument("inputs", nargs="+", help=".parquet / .jsonl files")
    o.add_argument("--image-root", default=None, help="base folder for relative image paths")
    _common_import(o)
    o.set_defaults(func=_import)
    # tokenize-images (owned by the VQ part: mmkit/vq/tokenize_shards.py)
    ti = sub.add_parser("tokenize-images", help="add VQ image codes (image_codes) to shards")
    ti.add_argument("--model", required=True, help="VQ tokenizer directory (e.g. runs/quickstart/vq/final)")
    ti.add_argument("shards", nargs="+", help="tar files or directories of tars")
    ti.add_argument("--out", required=True, help="output directory (same shard names + sizes.json)")
    ti.add_argument("--batch-size", type=int, default=64)
    ti.add_argument("--square", type=int, default=None, metavar="S",
                    help="resize every image to S x S px first (a multiple of the VQ factor): one code grid for all")
    ti.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    ti.set_defaults(func=_tokenize_images)


def _common_import(p) -> None:
    p.add_argument("--out", required=True, help="output directory for shards + sizes.json")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print the import summary as JSON")


def _synth(args) -> int:
    import os

    from mmkit.data.synth import KINDS, synth

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UsageError(f"--kinds: unknown kind {bad[0] if bad else '(empty)'!r}; choose from {', '.join(KINDS)}")
    if args.n < 1 or (args.eval_n is not None and args.eval_n < 1):
        raise UsageError("--n and --eval-n must be >= 1")
    if args.shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    res = synth(args.out, args.n, args.seed, args.eval_n, kinds, args.shard_size, max(1, workers), progress=True)
    for split, sizes in res.items():
        print(f"{split}: {sum(sizes.values())} samples in {len(sizes)} shards -> {args.out}/{split}")
    return 0


def _inspect(args) -> int:
    from mmkit.cli._util import print_json
    from mmkit.data.reader import inspect_shards

    stats = inspect_shards(args.shards, progress=not args.json)
    if args.json:
        print_json(stats)
    else:
        print(f"samples: {stats['samples']}  ok: {stats['ok']}")
        for reason, n in sorted(stats["skipped"].items()):
            print(f"  skipped {reason}: {n}")
    return 0


def _import(args) -> int:
    from mmkit.cli._util import print_json
    from mmkit.data import importers

    if args.shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    fmt = args.import_format
    show = not args.json
    if fmt == "img2dataset":
        res = importers.import_img2dataset(args.inputs, args.out, shard_size=args.shard_size, progress=show)
    elif fmt == "vqav2":
        res = importers.import_vqav2(args.questions, args.annotations, args.images, args.out,
                                     shard_size=args.shard_size, progress=show)
    elif fmt == "coco":
        res = importers.import_coco(args.captions, args.images, args.out, shard_size=args.shard_size, progress=show)
    else:
        res = importers.import_obelics(args.inputs, args.out, image_root=args.image_root, shard_size=args.shard_size,
                                       progress=show)
    if args.json:
        print_json(res)
    else:
        print(f"imported {res['written']} samples into {res['shards']} shards in {args.out}"
              + (f"; skipped {res['skipped']}" if res["skipped"] else ""))
    return 0


def _tokenize_images(args) -> int:
    from pathlib import Path

    from mmkit.cli._util import print_json
    from mmkit.vq.tokenize_shards import run

    if not Path(args.model).is_dir():
        raise UsageError(f"--model: no such directory: {args.model}")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    stats = run(args.model, args.shards, args.out, batch_size=args.batch_size, progress=not args.json,
                square=args.square)
    if args.json:
        print_json(stats)
    else:
        print(f"tokenized {stats['images']} images in {stats['samples']} samples "
              f"({stats['shards']} shards) -> {stats['out']}")
    return 0
