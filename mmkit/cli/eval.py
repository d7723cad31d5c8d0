"""`mmkit eval ...`: score prediction files (VQA, captions) and run models on eval tasks."""

from __future__ import annotations

from mmkit.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate: VQA / caption scoring, model runs")
    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: _no_sub(p))

    s = sub.add_parser("vqa-score", help="official VQAv2 accuracy of a predictions file")
    s.add_argument("--predictions", required=True, help='JSON list of {"question_id", "answer"}')
    s.add_argument("--annotations", required=True, help="VQAv2 annotations JSON (TextVQA / GQA formats too)")
    s.add_argument("--questions", help="VQAv2 questions JSON (ids checked against the annotations)")
    s.add_argument("--mode", default="official", choices=["official", "lenient", "exact"],
                   help="official (default, = GT-Vision-Lab vqaEval.py HEAD); lenient: always normalise "
                        "(NOT comparable with official numbers); exact: GQA-style string equality")
    s.add_argument("--allow-missing", action="store_true", help="score only the predicted questions")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_vqa_score)

    c = sub.add_parser("caption-score", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap)")
    c.add_argument("--predictions", required=True, help='JSON list of {"image_id", "caption"}')
    c.add_argument("--references", required=True, help="COCO captions format JSON")
    c.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a ~7 s JVM start)")
    c.add_argument("--spice", action="store_true", help="also SPICE (needs CoreNLP jars, 8 GB heap)")
    c.add_argument("--allow-missing", action="store_true", help="score only the captioned images")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_caption_score)

    r = sub.add_parser("run", help="run a model on an eval task and score it")
    r.add_argument("--model", required=True, help="saved model directory")
    r.add_argument("--task", required=True, help="task YAML, e.g. eval/shapes-vqa.yaml")
    r.add_argument("--out", help="output directory (default: <model>/eval/<task name>)")
    r.add_argument("--limit", type=int, help="evaluate only the first N examples")
    r.add_argument("--batch-size", type=int, help="override the task's batch size")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task key (repeatable), e.g. --set max_new_tokens=8")
    r.add_argument("--json", action="store_true", help="print the results JSON")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("geneval", help="generate images into GenEval's layout (score with GenEval elsewhere)")
    g.add_argument("--model", required=True, help="saved Chameleon-family model directory")
    g.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl")
    g.add_argument("--out", required=True, help="output directory (<out>/<%%05d>/samples/<%%04d>.png)")
    g.add_argument("--n-samples", type=int, default=4, help="images per prompt (GenEval: 4)")
    g.add_argument("--cfg-scale", type=float, default=3.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, help="only the first N prompts")
    g.set_defaults(func=cmd_geneval)


def _no_sub(p):
    p.print_help()
    return 2


def cmd_vqa_score(args) -> int:
    from mmkit.cli._util import print_json
    from mmkit.eval import vqa

    records = vqa.load_annotations(args.annotations)
    if args.questions:
        vqa.check_questions(args.questions, records)
    preds = vqa.load_predictions(args.predictions)
    result = vqa.score_vqa(preds, records, mode=args.mode, allow_missing=args.allow_missing)
    if args.json:
        print_json({k: result[k] for k in ("overall", "perAnswerType", "perQuestionType", "mode", "n")})
    else:
        print(vqa.format_report(result))
    return 0


def cmd_caption_score(args) -> int:
    from mmkit.cli._util import print_json
    from mmkit.eval import caption

    refs = caption.references_from_coco(caption.read_json(args.references, "references"), args.references)
    preds = caption.predictions_from_json(caption.read_json(args.predictions, "predictions"), args.predictions)
    scores = caption.score_captions(preds, refs, meteor=not args.no_meteor, spice=args.spice,
                                    allow_missing=args.allow_missing)
    if args.json:
        print_json(scores)
    else:
        print(caption.format_report(scores))
    return 0


def cmd_run(args) -> int:
    from mmkit.cli._util import print_json
    from mmkit.eval import runner

    if args.limit is not None and args.limit <= 0:
        raise UsageError("--limit must be a positive integer")
    result = runner.run_task(args.model, args.task, out_dir=args.out, limit=args.limit,
                             batch_size=args.batch_size, overrides=args.overrides)
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    if args.json:
        print_json(result)
    else:
        print(runner.markdown_table(result), end="")
        print(f"results: {result['out_dir']}/results.json")
    return 0


def cmd_geneval(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from mmkit.eval import t2i

    if args.n_samples <= 0 or (args.limit is not None and args.limit <= 0):
        raise UsageError("--n-samples and --limit must be positive")
    meta = t2i.read_geneval_metadata(args.metadata)[: args.limit]
    if not Path(args.model).is_dir():
        raise UsageError(f"model directory not found: {args.model}")
    from mmkit.generation import load_pipeline

    pipe = load_pipeline(args.model)
    images = []
    for i, m in enumerate(tqdm(meta, desc="geneval", unit="prompt")):
        images.append(pipe.generate_images([m["prompt"]] * args.n_samples, cfg_scale=args.cfg_scale,
                                           seed=args.seed + i))
    t2i.write_geneval(args.out, meta, images)
    print(f"wrote {len(meta)} prompts x {args.n_samples} images to {args.out}")
    return 0
