"""Shard-level tools: tokenize-images, eval-vq, train-text (through the CLI)."""

import io
import json
import tarfile

import pytest

from mmkit.cli import main
from mmkit.vq.model import VQModel


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


def test_tokenize_images_adds_codes_and_is_reproducible(tiny_shards, tiny_vq_dir, tmp_path, capsys):
    from PIL import Image

    from mmkit.vq.task import image_to_tensor

    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out",
                 str(tmp_path / "a"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["shards"] == 3 and stats["samples"] == 18 and stats["images"] > 18
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tiny_shards / "train"), "--out",
                 str(tmp_path / "b"), "--json"]) == 0
    model = VQModel.from_pretrained(tiny_vq_dir)
    src_sizes = json.loads((tiny_shards / "train" / "sizes.json").read_text())
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == src_sizes
    n_images = 0
    for name in src_sizes:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b  # byte-reproducible
        src, out = _members(tiny_shards / "train" / name), _members(tmp_path / "a" / name)
        assert src.keys() == out.keys()
        for member, data in out.items():
            if not member.endswith(".json"):
                assert data == src[member]  # images untouched
                continue
            doc, old = json.loads(data), json.loads(src[member])
            codes = doc.pop("image_codes")
            assert doc == old and len(codes) == len(doc["images"])
            key = member[: -len(".json")]
            for name_, c in zip(doc["images"], codes):
                assert (name_ is None) == (c is None)
                if name_ is None:
                    continue
                x = image_to_tensor(Image.open(io.BytesIO(src[f"{key}.{name_}"])))
                ref = model.encode(x[None])[0]
                assert (c["h"], c["w"]) == tuple(ref.shape) and c["codes"] == ref.reshape(-1).tolist()
                n_images += 1
    assert n_images == stats["images"]


def test_eval_vq_json(tiny_shards, tiny_vq_dir, capsys):
    assert main(["tokenizer", "eval-vq", "--model", str(tiny_vq_dir), "--data", str(tiny_shards / "eval"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"psnr", "ssim", "codebook_usage", "perplexity"} <= res.keys()
    from mmkit.vq.evaluate import evaluate_images, iter_shard_images

    images = list(iter_shard_images(str(tiny_shards / "eval")))
    assert res["images"] == len(images)
    ref = evaluate_images(VQModel.from_pretrained(tiny_vq_dir), images, batch_size=1)  # batching must not matter
    assert res["psnr"] == pytest.approx(ref["psnr"], abs=1e-3) and res["codebook_usage"] == ref["codebook_usage"]
    assert 0 < res["codebook_usage"] <= 100 and 1 <= res["perplexity"] <= 16


def test_cli_bad_input_is_one_line(tiny_vq_dir, tmp_path, capsys):
    assert main(["tokenizer", "eval-vq", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
    assert main(["tokenizer", "eval-vq", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2  # no config.json
    assert main(["data", "tokenize-images", "--model", str(tiny_vq_dir), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("mmkit: error:") for line in err)


def test_train_text_cli(tiny_shards, tmp_path, capsys):
    from transformers import AutoTokenizer

    assert main(["tokenizer", "train-text", "--data", str(tiny_shards / "train"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "400", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == stats["vocab_size"] <= 400 and stats["chars_per_token"] > 1.5
    text = "Question: What color is the circle? Answer: red<eot><boi><image><eoi>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids[-4:] == [6, 3, 5, 4]
