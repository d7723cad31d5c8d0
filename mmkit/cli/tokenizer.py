"""`mmkit tokenizer ...`: train the text tokenizer, evaluate / inspect VQ image tokenizers."""

from __future__ import annotations

from mmkit.cli._util import existing_path, print_json
from mmkit.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="text and image tokenizers")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND")

    t = sub.add_parser("train-text", help="train a byte-level BPE on shard texts (AutoTokenizer directory)")
    t.add_argument("--data", type=existing_path, nargs="+", required=True, help="shard directory or .tar files")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=768)
    t.add_argument("--json", action="store_true", help="print stats as one JSON object")
    t.set_defaults(func=_train_text)

    e = sub.add_parser("eval-vq", help="PSNR, SSIM, codebook usage and perplexity of a VQ tokenizer on shards")
    e.add_argument("--model", type=existing_path, required=True, help="VQ model directory (save_pretrained)")
    e.add_argument("--data", type=existing_path, nargs="+", required=True, help="shard directory or .tar files")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    e.add_argument("--square", type=int, default=None,
                   help="resize every image to SQUARE x SQUARE px first (a square model's view, as tokenize-images)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval_vq)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _sources(paths):
    paths = [str(x) for x in paths]
    return paths[0] if len(paths) == 1 else paths


def _train_text(args) -> int:
    from mmkit.text.tokenizer import train_text_tokenizer

    if args.vocab_size < 1:
        raise UsageError(f"--vocab-size must be positive, got {args.vocab_size}")
    stats = train_text_tokenizer(_sources(args.data), args.out, vocab_size=args.vocab_size)
    if args.json:
        print_json(stats)
    else:
        print(f"trained BPE on {stats['texts']} texts: vocab {stats['vocab_size']}, "
              f"{stats['chars_per_token']} chars/token -> {stats['out']}")
    return 0


def _eval_vq(args) -> int:
    from mmkit.vq.evaluate import evaluate

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit must be positive")
    res = evaluate(args.model, _sources(args.data), batch_size=args.batch_size, limit=args.limit,
                   progress=not args.json, square=args.square)
    if args.json:
        print_json(res)
    else:
        print(f"PSNR {res['psnr']:.2f} dB  SSIM {res['ssim']:.4f}  codebook usage {res['codebook_usage']:.1f}% "
              f"of {res['codebook_size']}  perplexity {res['perplexity']:.1f}  ({res['images']} images)")
    return 0
