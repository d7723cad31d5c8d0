"""`mmkit generate text|image|interleaved`: generation from a saved model directory."""

from __future__ import annotations

from pathlib import Path

from mmkit.errors import UsageError


def _common(p):
    p.add_argument("--model", required=True, help="model directory (mmkit or transformers checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16")


def _sampling(p, greedy_default: bool):
    p.add_argument("--do-sample", action="store_true", default=not greedy_default, help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text, images or interleaved documents")
    sub = g.add_subparsers(dest="generate_command", metavar="MODE", parser_class=type(g))

    t = sub.add_parser("text", help="text from a prompt (and optional images)")
    _common(t)
    _sampling(t, greedy_default=True)
    t.add_argument("--image", action="append", default=[], help="input image (repeatable); placed before the prompt")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.set_defaults(func=cmd_text)

    i = sub.add_parser("image", help="text-to-image (Chameleon family)")
    _common(i)
    i.add_argument("--out", required=True, help="output PNG; with --n > 1: OUT, OUT-1.png, ...")
    i.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    i.add_argument("--n", type=int, default=1, help="images to draw")
    i.add_argument("--temperature", type=float, default=1.0)
    i.add_argument("--top-k", type=int, default=2048)
    i.add_argument("--top-p", type=float, default=1.0)
    i.add_argument("--batch-size", type=int, default=8)
    i.set_defaults(func=cmd_image)

    d = sub.add_parser("interleaved", help="text and images alternating (Chameleon family)")
    _common(d)
    _sampling(d, greedy_default=False)
    d.add_argument("--out", required=True, help="output directory (sample.json + PNGs + grid + md/html)")
    d.add_argument("--max-new-tokens", type=int, default=None)
    d.set_defaults(func=cmd_interleaved)
    g.set_defaults(func=lambda args: (g.print_help(), 2)[1])


def _pipeline(args, **kw):
    import torch

    from mmkit.generation import load_pipeline

    if not Path(args.model).is_dir():
        raise UsageError(f"no such model directory: {args.model}")
    return load_pipeline(args.model, device=args.device, dtype=torch.bfloat16 if args.bf16 else None,
                         progress=True, **kw)


def _params(args, base):
    from mmkit.generation.sampler import SamplingParams

    kw = dict(do_sample=args.do_sample)
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        v = getattr(args, name, None)
        kw[name] = getattr(base, name) if v is None else v
    return SamplingParams(**kw)


def cmd_text(args) -> int:
    from mmkit.generation.sampler import SamplingParams

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    for path in args.image:
        if not Path(path).is_file():
            raise UsageError(f"no such image file: {path}")
    params = _params(args, SamplingParams())
    pipe = _pipeline(args, text_sampling=params)
    if params.do_sample:
        import torch

        torch.manual_seed(args.seed)
    print(pipe.generate_text(args.prompt, images=args.image, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_image(args) -> int:
    from mmkit.generation.sampler import SamplingParams

    if args.n < 1:
        raise UsageError("--n must be >= 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file: {args.out}")
    params = SamplingParams(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    pipe = _pipeline(args, image_sampling=params, batch_size=args.batch_size)
    images = pipe.generate_images([args.prompt], cfg_scale=args.cfg, seed=args.seed, n=args.n)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        path = out if k == 0 else out.with_name(f"{out.stem}-{k}.png")
        im.save(path)
        print(path)
    return 0


def cmd_interleaved(args) -> int:
    from mmkit.generation.interleaved import write_document
    from mmkit.generation.pipelines import STORY_SAMPLING

    params = _params(args, STORY_SAMPLING)
    pipe = _pipeline(args)
    doc, images = pipe.interleaved(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   text_sampling=params)
    paths = write_document(doc, images, args.out)
    print(paths["md"])
    return 0
