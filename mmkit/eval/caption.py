"""COCO caption metrics through pycocoevalcap's own scorers, offline and read-only safe.

pycocoevalcap's all-in-one `COCOEvalCap.evaluate()` builds `Spice()` first, which
downloads Stanford CoreNLP: offline it fails. So each scorer is called on its own, the
same way `evaluate()` calls it (PTB-tokenise gts and res, then
`scorer.compute_score(gts, res)` over the reference image ids in file order), which gives
the same numbers. BLEU (closest ref length), METEOR 1.5, ROUGE-L (beta 1.2) and CIDEr-D
(sigma 6, x10) are theirs; SPICE is opt-in.

The PTB tokenizer is the one piece not called through pycocoevalcap: its wrapper writes
the sentences to a temp file *inside the installed package* (fails when site-packages is
read-only, e.g. a system or container install) and runs Java there. `ptb_tokenize` runs
the very same jar with the same arguments on a temp file in the system temp dir and
applies the same punctuation filter, so the tokens are identical.

CIDEr's IDF comes from the evaluated set: score all predictions at once, never average
per-shard scores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mmkit.errors import MmkitError, UsageError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
_JAVA_HINT = "install a Java runtime (e.g. `apt-get install default-jre-headless`)"


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MmkitError(f"Java not found on PATH: caption metrics (PTB tokenizer, METEOR) need it; {_JAVA_HINT}")
    return java


def ptb_tokenize(captions_for_image: dict) -> dict:
    """{id: [{"caption": str}, ...]} -> {id: [tokenized str, ...]}, as pycocoevalcap's PTBTokenizer."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    java = require_java()
    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    ids = [k for k, v in captions_for_image.items() for _ in range(len(v))]
    sentences = "\n".join(c["caption"].replace("\n", " ") for v in captions_for_image.values() for c in v)
    fd, tmp = tempfile.mkstemp(prefix="mmkit_ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sentences.encode())
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.remove(tmp)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MmkitError(f"PTB tokenizer failed: {msg[-1] if msg else proc.returncode}")
    lines = proc.stdout.decode().split("\n")
    out: dict = {}
    for k, line in zip(ids, lines):
        out.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


def score_tokenized(gts: dict, res: dict, meteor: bool = True, spice: bool = False) -> dict:
    """Run the scorers on PTB-tokenised {id: [str]} dicts (same keys, one hypothesis each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if meteor:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        out["SPICE"] = _spice(gts, res)
    return out


_METEOR = None


def get_meteor():
    """pycocoevalcap's Meteor, one JVM per process (its ~7 s start is paid once; it exits with us)."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    require_java()
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()  # jar and paraphrase data are only read
    return _METEOR


def _meteor(gts: dict, res: dict) -> float:
    global _METEOR
    scorer = get_meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (ValueError, OSError) as e:
        if scorer.lock.locked():  # compute_score died holding it; Meteor.__del__ would block
            scorer.lock.release()
        _METEOR = None
        raise MmkitError(f"METEOR failed (its JVM needs -Xmx2G): {type(e).__name__}: {e}") from None


def _spice(gts: dict, res: dict) -> float:
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001 - any failure becomes one line
        raise MmkitError(
            "SPICE failed: it needs Stanford CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib (downloaded on first "
            "use), a writable package dir (tmp/, cache/) and -Xmx8G; "
            f"drop --spice offline ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def score_captions(predictions: dict, references: dict, meteor: bool = True, spice: bool = False,
                   allow_missing: bool = False) -> dict:
    """{image_id: caption} vs {image_id: [ref, ...]} -> metric dict (pycocoevalcap's values).

    Image order is that of `references` (COCOEvalCap uses the reference file's order).
    Every reference image needs exactly one prediction unless `allow_missing`.
    """
    extra = [k for k in predictions if k not in references]
    if extra:
        raise MmkitError(f"{len(extra)} predicted image ids are not in the references (e.g. {extra[0]!r})")
    missing = [k for k in references if k not in predictions]
    if missing and not allow_missing:
        raise MmkitError(f"{len(missing)} of {len(references)} reference images have no prediction "
                         f"(e.g. {missing[0]!r}); --allow-missing scores the rest")
    ids = [k for k in references if k in predictions]
    if not ids:
        raise MmkitError("no reference image has a prediction")
    gts = ptb_tokenize({k: [{"caption": r} for r in references[k]] for k in ids})
    res = ptb_tokenize({k: [{"caption": predictions[k]}] for k in ids})
    return score_tokenized(gts, res, meteor=meteor, spice=spice)


# ----------------------------------------------------------------------------- files


def references_from_coco(data, where: str = "references") -> dict:
    """COCO captions JSON ({"images": [...], "annotations": [{image_id, caption}]}) -> {id: [refs]}."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UsageError(f"{where}: not COCO captions format ({{'images': [...], 'annotations': [...]}})")
    refs: dict = {}
    for img in data.get("images") or []:  # COCO's getImgIds() order
        refs[img["id"]] = []
    for a in data["annotations"]:
        if "image_id" not in a or not isinstance(a.get("caption"), str):
            raise UsageError(f"{where}: each annotation needs image_id and caption, got {a!r}")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise UsageError(f"{where}: {len(empty)} images have no reference caption (e.g. {empty[0]!r})")
    return refs


def predictions_from_json(data, where: str = "predictions") -> dict:
    """[{image_id, caption}] -> {image_id: caption}; duplicates are an error (COCO asserts one)."""
    if not isinstance(data, list):
        raise UsageError(f"{where}: must be a list of {{image_id, caption}} objects")
    preds = {}
    for p in data:
        if not isinstance(p, dict) or "image_id" not in p or not isinstance(p.get("caption"), str):
            raise UsageError(f"{where}: each entry needs image_id and a string caption, got {p!r}")
        if p["image_id"] in preds:
            raise UsageError(f"{where}: image_id {p['image_id']!r} has more than one caption")
        preds[p["image_id"]] = p["caption"]
    return preds


def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid JSON ({e})") from None


def format_report(scores: dict) -> str:
    return "\n".join(f"{k}: {v:.3f}" for k, v in scores.items())
