"""`mmkit quickstart --smoke`: every stage runs through the public entry points and every file lands."""

import json

import pytest

from mmkit.cli import main

REQUIRED = ["wall_time_s", "stages", "vq.psnr", "vq.codebook_usage", "vqa.chameleon.overall",
            "vqa.kimivl.overall", "vqa.majority_baseline", "caption.chameleon.CIDEr", "caption.kimivl.CIDEr",
            "t2i.chameleon.attribute_accuracy", "generation.image_seconds"]


def _get(d, dotted):
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"results.json lacks {dotted}"
        d = d[part]
    return d


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path):
    out = tmp_path / "qs"
    assert main(["quickstart", "--smoke", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in REQUIRED:
        value = _get(res, key)
        assert value is not None, key
    assert set(res["stages"]) >= {"data", "text_tok", "vq", "codes", "chameleon", "kimivl", "generate", "evaluate"}
    for f in ["report.md", "report.html", "samples/text_to_image.png", "vq/final/config.json",
              "chameleon/final/config.json", "kimivl/final/config.json"]:
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    assert "<img" in html and "shapes-VQA" in html
    # a re-run reuses every finished stage and rewrites only the report
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert main(["quickstart", "--smoke", "--out", str(out)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"report.json"}


def test_quickstart_bad_flag_is_usage_error(capsys):
    assert main(["quickstart", "--scale", "0"]) == 2
    assert "scale" in capsys.readouterr().err
