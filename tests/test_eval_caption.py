"""caption-score equals pycocoevalcap's own tokenizer + scorers on a small set (one METEOR JVM each)."""

import json
import os
import shutil

import pytest

from mmkit.errors import MmkitError

REFS = {
    11: ["A red circle to the left of a blue square.", "Two shapes: a red circle and a blue square.",
         "a RED circle, left of a square", "red ball and blue box"],
    7: ["Three green triangles.", "three small green triangles on white", "Green triangles, three of them!"],
    42: ["A yellow star above a purple circle.", "a star (yellow) over a circle", "The yellow star is on top."],
    5: ["An empty white canvas.", "nothing but white", "a blank image"],
}
PREDS = {11: "a red circle left of a blue square", 7: "two green triangles.", 42: "A yellow star over a circle!",
         5: "a white image"}


def _reference_scores():
    """pycocoevalcap called directly, as COCOEvalCap.evaluate() does minus SPICE."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    from mmkit.eval.caption import get_meteor

    meteor = get_meteor()  # a pycocoevalcap Meteor; the JVM our CLI call started (saves ~7 s)
    assert isinstance(meteor, Meteor)
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return gts, out


def test_caption_score_equals_pycocoevalcap(tmp_path, capsys):
    from mmkit.cli import main

    coco = {"images": [{"id": k} for k in REFS],
            "annotations": [{"image_id": k, "id": i * 10 + j, "caption": c}
                            for i, (k, v) in enumerate(REFS.items()) for j, c in enumerate(v)]}
    (tmp_path / "refs.json").write_text(json.dumps(coco))
    (tmp_path / "preds.json").write_text(json.dumps([{"image_id": k, "caption": c} for k, c in PREDS.items()]))
    assert main(["eval", "caption-score", "--predictions", str(tmp_path / "preds.json"),
                 "--references", str(tmp_path / "refs.json"), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    gts, ref = _reference_scores()
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    for k, v in ref.items():
        assert ours[k] == pytest.approx(float(v), rel=1e-12, abs=1e-12), k
    assert 0 < ours["CIDEr"] < 10 and 0 < ours["Bleu_1"] <= 1

    # our tokenizer gives the same tokens and never writes beside the jar
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    from mmkit.eval.caption import ptb_tokenize

    jar_dir = os.path.dirname(os.path.abspath(ptb.__file__))
    before = sorted(os.listdir(jar_dir))
    assert ptb_tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()}) == gts
    assert sorted(os.listdir(jar_dir)) == before


def test_caption_errors(tmp_path, capsys, monkeypatch):
    from mmkit.cli import main
    from mmkit.eval import caption

    refs = {1: ["a cat"], 2: ["a dog"]}
    with pytest.raises(MmkitError, match="1 of 2 reference images have no prediction"):
        caption.score_captions({1: "a cat"}, refs)
    with pytest.raises(MmkitError, match="1 predicted image ids are not in the references"):
        caption.score_captions({1: "a cat", 2: "a dog", 3: "x"}, refs)
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    (tmp_path / "r.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}]}))
    assert main(["eval", "caption-score", "--predictions", str(tmp_path / "p.json"),
                 "--references", str(tmp_path / "r.json")]) == 2
    assert "more than one caption" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}]))
    assert main(["eval", "caption-score", "--predictions", str(tmp_path / "p.json"),
                 "--references", str(tmp_path / "r.json"), "--no-meteor"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Java not found" in err and len(err.splitlines()) == 1


def test_read_only_site_packages(tmp_path):
    """With pycocoevalcap's directory mounted read-only, its PTBTokenizer fails and ours works."""
    import subprocess
    import sys

    from pycocoevalcap.tokenizer import ptbtokenizer

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs a private mount namespace (unshare -m) to make site-packages read-only")
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)))  # a namespace package
    code = ("from mmkit.eval.caption import ptb_tokenize, score_captions\n"
            "from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer\n"
            "caps = {1: [{'caption': 'A red circle, left.'}]}\n"
            "try:\n    PTBTokenizer().tokenize(caps); print('theirs ok')\n"
            "except OSError as e:\n    print('theirs', e.errno)\n"
            "print(ptb_tokenize(caps))\n"
            "print(score_captions({1: 'a red circle'}, {1: ['a red circle']}, meteor=False)['ROUGE_L'])\n")
    script = tmp_path / "ro.py"
    script.write_text(code)
    cmd = f"mount --bind {pkg} {pkg} && mount -o remount,bind,ro {pkg} && {sys.executable} {script}"
    out = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, cwd=tmp_path)
    if "mount:" in out.stderr:
        pytest.skip(f"cannot remount read-only here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["theirs 30", "{1: ['a red circle left']}", "1.0"]  # 30 = EROFS
