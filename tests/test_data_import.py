"""Importers into the schema, on small files made here; read back with the reader."""

import io
import json
import tarfile

from PIL import Image

from mmkit.cli import main as cli_main
from mmkit.data import build_stream


def _jpg(color, size=(20, 12)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="JPEG")
    return b.getvalue()


def _png(color, size=(16, 16)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def _read(out):
    return {d["__key__"]: d for b in build_stream(out, batch_size=4, infinite=False, shuffle_buffer=0) for d in b}


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_import_img2dataset(tmp_path, capsys):
    src = tmp_path / "i2d"
    src.mkdir()
    _tar(src / "00000.tar", [
        ("000000000.jpg", _jpg("red")), ("000000000.txt", b"a red thing"),
        ("000000000.json", json.dumps({"url": "http://x/0.jpg", "width": 20, "height": 12}).encode()),
        ("000000001.jpg", _jpg("blue")), ("000000001.txt", b"a blue thing"), ("000000001.json", b"{}"),
        ("000000002.txt", b"caption without image"),
    ])
    out = tmp_path / "out"
    assert cli_main(["data", "import", "img2dataset", str(src), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == {"written": 2, "shards": 1, "skipped": {"missing_image": 1}}
    docs = _read(out)
    d = docs["i2d000000000"]
    assert d["kind"] == "caption" and d["texts"] == [None, "a red thing"]
    assert d["images"][0].size == (20, 12) and d["meta"]["source"]["url"] == "http://x/0.jpg"
    assert json.loads((out / "sizes.json").read_text()) == {"caption-000000.tar": 2}


def test_import_vqav2(tmp_path):
    img = tmp_path / "val2014"
    img.mkdir()
    (img / "COCO_val2014_000000000042.jpg").write_bytes(_jpg("green"))
    qs = {"questions": [{"image_id": 42, "question": "What color?", "question_id": 420},
                        {"image_id": 42, "question": "How many?", "question_id": 421},
                        {"image_id": 7, "question": "Missing image?", "question_id": 70}]}
    ans = lambda qid, a: {"question_id": qid, "image_id": 42, "question_type": "what", "answer_type": "other",
                          "multiple_choice_answer": a, "answers": [{"answer": a, "answer_id": i + 1} for i in range(10)]}
    an = {"annotations": [ans(420, "green"), ans(421, "2"), ans(70, "yes")]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(an))
    out = tmp_path / "out"
    from mmkit.data.importers import import_vqav2

    res = import_vqav2(tmp_path / "q.json", tmp_path / "a.json", img, out)
    assert res == {"written": 2, "shards": 1, "skipped": {"missing_image": 1}}
    docs = _read(out)
    d = docs["vqa421"]
    assert d["kind"] == "vqa" and d["texts"] == [None, "How many?"] and d["meta"]["answer"] == "2"
    assert d["meta"]["answers"] == ["2"] * 10 and d["meta"]["image_id"] == 42 and d["meta"]["question_id"] == 421


def test_import_coco(tmp_path, capsys):
    img = tmp_path / "imgs"
    img.mkdir()
    (img / "000000000001.jpg").write_bytes(_jpg("red"))
    (img / "000000000002.jpg").write_bytes(b"not an image")
    cj = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
          "annotations": [{"id": 10, "image_id": 1, "caption": "red square "}, {"id": 11, "image_id": 1, "caption": "a red box"},
                          {"id": 12, "image_id": 2, "caption": "broken"}]}
    (tmp_path / "c.json").write_text(json.dumps(cj))
    out = tmp_path / "out"
    assert cli_main(["data", "import", "coco", "--captions", str(tmp_path / "c.json"), "--images", str(img),
                     "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == {"written": 1, "shards": 1, "skipped": {"corrupt_image": 1}}
    d = _read(out)["coco1"]
    assert d["texts"] == [None, "red square"] and d["meta"]["captions"] == ["red square", "a red box"]
    # a missing file named on the command line is a one-line usage error
    assert cli_main(["data", "import", "coco", "--captions", str(tmp_path / "nope.json"), "--images", str(img),
                     "--out", str(out)]) == 2


def test_import_obelics_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"texts": ["Intro", None, "After the image"], "images": [None, _png("red"), None], "metadata": '{"url": "u1"}'},
        {"texts": [None, "caption"], "images": [_jpg("blue"), None], "metadata": None},
        {"texts": ["both", None], "images": [_png("red"), None], "metadata": None},  # not one non-null per slot
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png("green"))
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.write(json.dumps({"texts": [None, "local file"], "images": ["pics/a.png", None]}) + "\n")
        f.write(json.dumps({"texts": [None, "remote"], "images": ["https://example.com/x.jpg", None]}) + "\n")
        f.write("{not json\n")
    from mmkit.data.importers import import_obelics

    out = tmp_path / "out"
    res = import_obelics([tmp_path / "docs.parquet", tmp_path / "docs.jsonl"], out)
    assert res == {"written": 3, "shards": 1, "skipped": {"invalid_schema": 2, "remote_image": 1}}
    docs = _read(out)
    d0 = docs["obelics000000000"]
    assert d0["kind"] == "interleaved" and d0["texts"] == ["Intro", None, "After the image"]
    assert d0["images"][1].getpixel((0, 0)) == (255, 0, 0) and d0["meta"]["metadata"] == {"url": "u1"}
    assert docs["obelics000000002"]["images"][0].getpixel((3, 3)) == (0, 128, 0)
