"""Evaluators (issue 8): caption metrics vs pycocoevalcap side by side; VQA metric variants.

Captions: mmkit's `score_captions` (read-only-safe PTB tokenizer + pycocoevalcap scorers)
against pycocoevalcap called directly (its PTBTokenizer, Bleu, Meteor, Rouge, Cider) on the
same shapes-world set, in one run: max |difference| per metric and the time ratio.
VQA: the same predictions scored official / lenient (always normalise) / exact, to show
how far the toolkit variants drift, and the scorer's throughput.

    .venv/bin/python benchmarks/eval_scorers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def caption_set(n: int, seed: int = 0):
    from mmkit.data import shapes as S

    rng = random.Random(f"bench-cap:{seed}")
    refs, preds = {}, {}
    for i in range(n):
        scene = S.random_scene(rng)
        refs[i] = S.captions(scene)
        other = S.random_scene(rng) if rng.random() < 0.3 else scene  # 30% describe another scene
        preds[i] = S.caption(other, rng.randrange(S.N_CAPTION_STYLES))
    return refs, preds


def reference_caption_scores(refs, preds, meteor: bool):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    if meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return {k: float(v) for k, v in out.items()}


def vqa_set(n: int, seed: int = 0):
    """Shapes VQA questions (10 answers with surface variants) and a noisy 'model'."""
    from mmkit.data import shapes as S

    rng = random.Random(f"bench-vqa:{seed}")
    records, preds = [], {}
    for i in range(n):
        q = S.make_vqa(S.random_scene(rng), rng)
        answers = q["answers"]
        if rng.random() < 0.3:  # a unanimous question (as many real VQAv2 ones are)
            answers = [q["answer"]] * 10
        records.append({"question_id": i, "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)],
                        "answer": q["answer"], "question_type": q["question_type"], "answer_type": q["answer_type"]})
        r = rng.random()
        if r < 0.5:
            preds[i] = q["answer"]
        elif r < 0.8:  # right answer, different surface form
            preds[i] = rng.choice([q["answer"].capitalize(), q["answer"] + ".", "the " + q["answer"]])
        else:
            preds[i] = rng.choice(["yes", "no", "red", "2", "circle"])
    return records, preds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from mmkit.eval import caption, vqa

    n_cap = 100 if args.quick else 500
    meteor = not args.quick
    refs, preds = caption_set(n_cap)
    t = time.perf_counter()
    ref = reference_caption_scores(refs, preds, meteor)
    t_ref = time.perf_counter() - t
    caption._METEOR = None  # fair: start our own JVM too
    t = time.perf_counter()
    ours = caption.score_captions(preds, refs, meteor=meteor)
    t_ours = time.perf_counter() - t
    diff = max(abs(ours[k] - ref[k]) for k in ref)

    n_vqa = 5000 if args.quick else 50000
    records, vpreds = vqa_set(n_vqa)
    scores = {}
    for mode in ("official", "lenient", "exact"):
        t = time.perf_counter()
        scores[mode] = vqa.score_vqa(vpreds, records, mode=mode)["overall"]
        scores[mode + "_s"] = time.perf_counter() - t

    rows = [
        "| measure | mmkit | reference | ratio |",
        "|---|---|---|---|",
        f"| caption metrics, {n_cap} images (s, {'with' if meteor else 'no'} METEOR) | {t_ours:.2f} | "
        f"{t_ref:.2f} (pycocoevalcap direct) | {t_ours / t_ref:.2f} |",
        f"| caption metrics max abs difference | {diff:.1e} | 0 | - |",
        f"| CIDEr | {ours['CIDEr']:.4f} | {ref['CIDEr']:.4f} | - |",
        f"| VQA official accuracy, {n_vqa} q | {scores['official']:.2f} | - | - |",
        f"| VQA lenient (always normalise) | {scores['lenient']:.2f} | - | +{scores['lenient'] - scores['official']:.2f} pts |",
        f"| VQA exact match | {scores['exact']:.2f} | - | - |",
        f"| VQA official scoring throughput (questions/s) | {n_vqa / scores['official_s']:.0f} | - | - |",
    ]
    table = "\n".join(rows)
    print(table)
    out = {"quick": args.quick, "n_captions": n_cap, "meteor": meteor, "caption_seconds_mmkit": t_ours,
           "caption_seconds_reference": t_ref, "caption_max_abs_diff": diff, "caption_mmkit": ours,
           "caption_reference": ref, "n_vqa": n_vqa, "vqa": scores, "table": table,
           "command": "python benchmarks/eval_scorers.py" + (" --quick" if args.quick else "")}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "eval_scorers.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
