"""VQA accuracy exactly as the official VQAv2 evaluator computes it, plus labelled variants.

Reference: GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at HEAD
(a013f00). Written from its rules, not copied; every quirk below is deliberate because a
number is only comparable if it is computed the same way:

- Each GT answer and the prediction: `\\n`/`\\t` -> space, then `strip()`.
- Normalisation (punctuation, then digits/articles/contractions) is applied to the GT
  answers *and* the prediction only when the (stripped) GT answers are not all equal.
  With unanimous GT the match is exact and case-sensitive ("Yes" != "yes").
- Punctuation: for each of 21 characters, in order, the character is deleted if it is
  followed or preceded by a space in the *original* text, or if the original text has a
  comma between two digits ("1,000"); otherwise it becomes a space. `' : . $ % # & *`
  are not in the list.
- Periods: the official pattern `(?!<=\\d)(\\.)(?!\\d)` has a typo (a lookahead for the
  literal "<=" instead of a lookbehind), so it deletes every "." not followed by a digit
  ("2." -> "2", "1.5" stays). `re.UNICODE` is passed where `count` goes, so at most 32
  periods are deleted. `\\d` is ASCII-only (the evaluator was written for Python 2).
- Digits/articles: lower-case, split on whitespace, number words none/zero..ten -> digits,
  drop a/an/the, then the 120-entry contraction table (with its oddities, e.g.
  "somebody'd" -> "somebodyd"; capitalised keys such as "Im" can never match).
- Leave-one-out: for each GT answer dict, count matching answers among the *other* dicts,
  where "other" means dict inequality (answer_id normally makes every dict distinct; two
  identical dicts leave out each other). Accuracy = mean of min(1, matches/3).
- Reporting: round(100 * mean, 2) per question, per type and overall, with Python 2's
  rounding (ties away from zero on the exact binary value).
- Predictions must cover exactly the annotated question ids (official `loadRes` asserts).

Modes: "official" (above), "lenient" (always normalise GT and prediction, as
OpenFlamingo, VLMEvalKit and recent lmms-eval do: numbers are NOT comparable with the
official ones), "exact" (GQA-style: one gold answer, stripped exact string equality, as
GQA's official eval.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from mmkit.errors import MmkitError, UsageError

MODES = ("official", "lenient", "exact")

# Official order matters: replacements accumulate over the list.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The official contraction table (data, kept verbatim in content: exactness depends on it).
CONTRACTIONS = dict(pair.split("=", 1) for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't
couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't
hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd
hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't
whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
assert len(CONTRACTIONS) == 120

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)  # the official typo, kept on purpose
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)", re.ASCII)
_MAX_PERIODS = 32  # official passes re.UNICODE (== 32) as `count`


def normalize_punctuation(text: str) -> str:
    """The official `processPunctuation` rules (decisions read from the original text)."""
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def normalize_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lower, number words, articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation (punctuation, then digits/articles/contractions)."""
    return normalize_digits_articles(normalize_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _as_answer_dicts(answers) -> list[dict]:
    """Accept official answer dicts or plain strings (TextVQA style; ids make them distinct)."""
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, dict):
            if not isinstance(a.get("answer"), str):
                raise MmkitError(f"answer entry without a string 'answer': {a!r}")
            out.append(dict(a))
        elif isinstance(a, str):
            out.append({"answer": a, "answer_id": i + 1})
        else:
            raise MmkitError(f"bad answer entry {a!r}")
    return out


def vqa_accuracy(prediction: str, answers, mode: str = "official") -> float:
    """Accuracy in [0, 1] of one prediction against its (usually 10) GT answers."""
    if mode == "exact":
        gold = answers if isinstance(answers, str) else _majority(answers)
        return float(_clean(prediction) == _clean(gold))
    if mode not in MODES:
        raise UsageError(f"unknown VQA mode {mode!r} (choose from {', '.join(MODES)})")
    gts = _as_answer_dicts(answers)
    if not gts:
        raise MmkitError("a question has no GT answers")
    for g in gts:
        g["answer"] = _clean(g["answer"])
    pred = _clean(prediction)
    if mode == "lenient" or len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = normalize_answer(g["answer"])
        pred = normalize_answer(pred)
    accs = []
    for g in gts:
        # dict inequality, as official: identical dicts leave each other out
        matches = sum(1 for o in gts if o != g and o["answer"] == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def _majority(answers) -> str:
    texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
    return Counter(texts).most_common(1)[0][0]


def round_official(x: float, ndigits: int = 2) -> float:
    """Python 2's round(): exact binary value, ties away from zero (Python 3 rounds ties to even)."""
    q = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(q, rounding=ROUND_HALF_UP))


# ----------------------------------------------------------------------------- files


def _read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid JSON ({e})") from None


def load_annotations(path) -> list[dict]:
    """VQAv2 annotations, TextVQA json or GQA questions dict -> list of VQAv2-style records.

    Each record: question_id, answers (list of dicts), answer (gold for exact mode),
    question_type, answer_type.
    """
    data = _read_json(path, "annotations")
    return annotations_from_json(data, str(path))


def annotations_from_json(data, where: str = "annotations") -> list[dict]:
    records = []
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # VQAv2
        for a in data["annotations"]:
            answers = a.get("answers") or []
            gold = a.get("multiple_choice_answer") or a.get("answer") or (_majority(answers) if answers else "")
            records.append({"question_id": a["question_id"], "answers": answers, "answer": gold,
                            "question_type": a.get("question_type", "all"),
                            "answer_type": a.get("answer_type", "all")})
    elif isinstance(data, dict) and isinstance(data.get("data"), list):  # TextVQA
        for a in data["data"]:
            answers = a.get("answers") or []
            records.append({"question_id": a["question_id"], "answers": answers,
                            "answer": _majority(answers) if answers else "",
                            "question_type": "all", "answer_type": "all"})
    elif isinstance(data, dict) and data and all(isinstance(v, dict) and "answer" in v for v in data.values()):
        for qid, a in data.items():  # GQA questions file: {qid: {"answer", "types": {...}}}
            types = a.get("types") or {}
            records.append({"question_id": qid, "answers": [a["answer"]], "answer": a["answer"],
                            "question_type": types.get("detailed", "all"),
                            "answer_type": types.get("structural", "all")})
    else:
        raise UsageError(f"{where}: not VQAv2 annotations ({{'annotations': [...]}}), TextVQA or GQA format")
    if not records:
        raise UsageError(f"{where}: no annotations")
    return records


def predictions_from_json(data, where: str = "predictions") -> dict:
    """List of {question_id|questionId, answer|prediction} -> {question_id: answer} (last wins, as official)."""
    if not isinstance(data, list):
        raise UsageError(f"{where}: results must be a list of objects")
    preds = {}
    for p in data:
        if not isinstance(p, dict):
            raise UsageError(f"{where}: results must be a list of objects")
        qid = p.get("question_id", p.get("questionId"))
        ans = p.get("answer", p.get("prediction"))
        if qid is None or not isinstance(ans, str):
            raise UsageError(f"{where}: each result needs question_id and a string answer, got {p!r}")
        preds[qid] = ans
    return preds


def load_predictions(path) -> dict:
    return predictions_from_json(_read_json(path, "predictions"), str(path))


def check_questions(questions_path, records: list[dict]) -> None:
    """With a questions file (official needs one), its ids must equal the annotated ids."""
    data = _read_json(questions_path, "questions")
    qs = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(qs, list):
        raise UsageError(f"{questions_path}: not VQAv2 questions ({{'questions': [...]}})")
    q_ids = {q["question_id"] for q in qs}
    a_ids = {r["question_id"] for r in records}
    if q_ids != a_ids:
        raise UsageError(f"{questions_path}: {len(q_ids ^ a_ids)} question ids differ from the annotations")


# ----------------------------------------------------------------------------- scoring


def score_vqa(predictions: dict, records: list[dict], mode: str = "official",
              allow_missing: bool = False) -> dict:
    """Score {question_id: answer} against annotation records (see `load_annotations`).

    Returns {"overall", "perAnswerType", "perQuestionType", "perQuestion", "mode", "n"}
    with percentages rounded as official. Ids must match exactly unless `allow_missing`
    (then only the annotated questions that have a prediction are scored).
    """
    if mode not in MODES:
        raise UsageError(f"unknown VQA mode {mode!r} (choose from {', '.join(MODES)})")
    # JSON keys may be strings (GQA) or ints (VQAv2): compare as given, fall back to str.
    preds = dict(predictions)
    ann_ids = [r["question_id"] for r in records]
    if not set(ann_ids) & set(preds) and preds:
        preds = {str(k): v for k, v in preds.items()}
        ann_ids = [str(i) for i in ann_ids]
        records = [dict(r, question_id=str(r["question_id"])) for r in records]
    missing = [i for i in ann_ids if i not in preds]
    extra = set(preds) - set(ann_ids)
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(ann_ids)} annotated questions have no prediction (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} predicted question ids are not annotated")
        raise MmkitError("; ".join(parts) + " (as the official evaluator, all ids must match; --allow-missing scores the rest)")
    scored = [r for r in records if r["question_id"] in preds]
    if not scored:
        raise MmkitError("no annotated question has a prediction")
    if mode != "exact":
        few = [r["question_id"] for r in scored if len(r["answers"]) < 2]
        if few:  # leave-one-out over one answer is always 0: a GQA-style set
            raise MmkitError(f"{len(few)} questions have fewer than 2 GT answers (e.g. {few[0]!r}); "
                             "VQA accuracy needs the 10 human answers: use --mode exact for single-answer sets")
    per_q, by_qtype, by_atype, accs = {}, {}, {}, []
    for r in scored:
        gold = r["answer"] if mode == "exact" else r["answers"]
        acc = vqa_accuracy(preds[r["question_id"]], gold, mode)
        accs.append(acc)
        per_q[r["question_id"]] = round_official(100 * acc)
        by_qtype.setdefault(r["question_type"], []).append(acc)
        by_atype.setdefault(r["answer_type"], []).append(acc)

    def pct(xs):
        return round_official(100 * float(sum(xs)) / len(xs))

    return {
        "overall": pct(accs),
        "perAnswerType": {k: pct(v) for k, v in by_atype.items()},
        "perQuestionType": {k: pct(v) for k, v in by_qtype.items()},
        "perQuestion": per_q,
        "mode": mode,
        "n": len(scored),
        "missing": len(missing),
    }


def format_report(result: dict) -> str:
    """The official script's printout (overall, per question type, per answer type)."""
    lines = [f"Overall Accuracy is: {result['overall']:.02f}  ({result['mode']} mode, {result['n']} questions)", "",
             "Per Question Type Accuracy is the following:"]
    lines += [f"{k} : {v:.02f}" for k, v in result["perQuestionType"].items()]
    lines += ["", "Per Answer Type Accuracy is the following:"]
    lines += [f"{k} : {v:.02f}" for k, v in result["perAnswerType"].items()]
    if result.get("missing"):
        lines += ["", f"note: {result['missing']} annotated questions had no prediction and were not scored"]
    return "\n".join(lines)


def majority_answer(records: list[dict]) -> str:
    """The most common gold answer (ties: first seen); used for the majority baseline."""
    return Counter(r["answer"] for r in records).most_common(1)[0][0]
