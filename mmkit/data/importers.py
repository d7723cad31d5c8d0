"""Importers: external datasets -> shards in the mmkit sample schema (docs/data.md).

Image bytes are copied as they are (no re-encoding); only their header is read, to name the
member with the right extension and to drop files that are not images. Nothing is
downloaded: remote URLs are skipped and counted.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

from mmkit.data.writer import ShardWriter, sample_members
from mmkit.errors import UsageError

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def image_ext(data: bytes) -> str | None:
    """'jpg' / 'png' / ... from the bytes' header; None if not a readable image header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _FORMAT_EXT.get(im.format)
    except Exception:
        return None


class _Out:
    """ShardWriter + counters shared by the importers."""

    def __init__(self, out, prefix: str, shard_size: int, progress: bool = False):
        from tqdm import tqdm

        self.writer = ShardWriter(out, prefix, maxcount=shard_size)
        self.skipped: Counter = Counter()
        self.written = 0
        self.bar = tqdm(desc=f"import {prefix}", unit="sample", disable=not progress)

    def add(self, key: str, doc: dict, images: list[bytes | None]) -> None:
        self.writer.write(key, sample_members(doc, images))
        self.written += 1
        self.bar.update()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.bar.update()

    def close(self) -> dict:
        self.bar.close()
        sizes = self.writer.close()
        return {"written": self.written, "shards": len(sizes), "skipped": dict(sorted(self.skipped.items()))}


def _must_exist(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {path}")
    return p


def _read_json(path, what: str):
    p = _must_exist(path, what)
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise UsageError(f"{what} {path}: invalid JSON ({e})") from None


def _image_doc(kind: str, text: str, data: bytes, **fields) -> tuple[dict, list] | None:
    ext = image_ext(data)
    if ext is None:
        return None
    doc = {"kind": kind, "texts": [None, text], "images": [f"img0.{ext}", None], **fields}
    return doc, [data, None]


# ----------------------------------------------------------------------------- img2dataset


def import_img2dataset(inputs, out, shard_size: int = 1000, progress: bool = False) -> dict:
    """img2dataset tars: `<key>.jpg` + `<key>.txt` (caption) + `<key>.json` (url, size, ...)."""
    from mmkit.data.reader import expand_shards, iter_shard_raw

    shards = [s for s in expand_shards([str(_must_exist(i, "input")) for i in inputs])]
    if not shards:
        raise UsageError("no .tar files in " + " ".join(map(str, inputs)))
    o = _Out(out, "caption", shard_size, progress)
    for shard in shards:
        for raw in iter_shard_raw(shard):
            if "__fault__" in raw:
                o.skip(raw["__fault__"])
                continue
            m = raw["members"]
            img = next((m[e] for e in ("jpg", "jpeg", "png", "webp") if e in m), None)
            if img is None or "txt" not in m:
                o.skip("missing_image" if img is None else "missing_caption")
                continue
            try:
                caption = m["txt"].decode("utf-8").strip()
                meta = json.loads(m["json"]) if "json" in m else {}
            except (UnicodeDecodeError, ValueError):
                o.skip("invalid_json")
                continue
            source = {k: meta[k] for k in ("url", "width", "height", "original_width", "original_height", "sha256")
                      if k in meta}
            key = re.sub(r"[^A-Za-z0-9_-]", "_", raw["__key__"].rsplit("/", 1)[-1])
            made = _image_doc("caption", caption, img, image_id=key, source=source)
            if made is None:
                o.skip("corrupt_image")
                continue
            o.add(f"i2d{key}", *made)
    return o.close()


# ----------------------------------------------------------------------------- folders of images


def _index_images(folder) -> dict[int, Path]:
    """image id -> file: COCO names (`COCO_val2014_000000000042.jpg`, `000000000042.jpg`)
    and plain `42.png` all end in the id's digits."""
    folder = _must_exist(folder, "image folder")
    idx = {}
    for p in sorted(folder.rglob("*")):
        m = re.search(r"(\d+)$", p.stem)
        if p.is_file() and m:
            idx.setdefault(int(m.group(1)), p)
    return idx


def import_vqav2(questions, annotations, images, out, shard_size: int = 1000, progress: bool = False) -> dict:
    """VQAv2 (`questions` + `annotations` JSON) with an image folder -> kind "vqa" samples."""
    qs = _read_json(questions, "questions file")
    an = _read_json(annotations, "annotations file")
    try:
        qlist, alist = qs["questions"], an["annotations"]
    except (KeyError, TypeError):
        raise UsageError("VQAv2 files need a 'questions' and an 'annotations' list") from None
    by_qid = {a["question_id"]: a for a in alist}
    files = _index_images(images)
    o = _Out(out, "vqa", shard_size, progress)
    cache: dict[int, bytes] = {}
    for q in qlist:
        a = by_qid.get(q.get("question_id"))
        path = files.get(q.get("image_id"))
        if a is None:
            o.skip("missing_annotation")
            continue
        if path is None:
            o.skip("missing_image")
            continue
        data = cache.get(q["image_id"]) or path.read_bytes()
        cache = {q["image_id"]: data}  # consecutive questions usually share the image
        answers = [x["answer"] for x in a.get("answers", [])]
        made = _image_doc("vqa", q["question"], data, question=q["question"], answers=answers,
                          answer=a.get("multiple_choice_answer", answers[0] if answers else ""),
                          question_id=q["question_id"], image_id=q["image_id"],
                          question_type=a.get("question_type", ""), answer_type=a.get("answer_type", ""))
        if made is None:
            o.skip("corrupt_image")
            continue
        o.add(f"vqa{q['question_id']}", *made)
    return o.close()


def import_coco(captions, images, out, shard_size: int = 1000, progress: bool = False) -> dict:
    """COCO captions JSON with an image folder -> one kind "caption" sample per image
    (first caption as the text, all references in "captions")."""
    cj = _read_json(captions, "captions file")
    try:
        imgs, anns = cj["images"], cj["annotations"]
    except (KeyError, TypeError):
        raise UsageError("COCO captions file needs 'images' and 'annotations'") from None
    refs: dict[int, list[str]] = {}
    for a in anns:
        refs.setdefault(a["image_id"], []).append(a["caption"].strip())
    folder = _must_exist(images, "image folder")
    files = _index_images(folder)
    o = _Out(out, "caption", shard_size, progress)
    for im in imgs:
        iid = im["id"]
        if iid not in refs:
            o.skip("missing_caption")
            continue
        path = folder / im.get("file_name", "")
        path = path if im.get("file_name") and path.is_file() else files.get(iid)
        if path is None:
            o.skip("missing_image")
            continue
        made = _image_doc("caption", refs[iid][0], path.read_bytes(), image_id=iid, captions=refs[iid])
        if made is None:
            o.skip("corrupt_image")
            continue
        o.add(f"coco{iid}", *made)
    return o.close()


# ----------------------------------------------------------------------------- OBELICS


def _rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=256):
            yield from batch.to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        yield None
    else:
        raise UsageError(f"{path}: expected .parquet or .jsonl")


def _resolve_image(entry, base: Path) -> tuple[bytes | None, str | None]:
    """An OBELICS image slot: bytes, {"bytes": ..., "path": ...} (HF Image), or a local path."""
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return bytes(entry["bytes"]), None
        entry = entry.get("path") or entry.get("src") or entry.get("url")
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry), None
    if isinstance(entry, str):
        if re.match(r"^[a-z]+://", entry):
            return None, "remote_image"  # never downloaded
        p = Path(entry) if Path(entry).is_absolute() else base / entry
        if not p.is_file():
            return None, "missing_image"
        return p.read_bytes(), None
    return None, "invalid_schema"


def import_obelics(inputs, out, image_root=None, shard_size: int = 1000, progress: bool = False) -> dict:
    """OBELICS-style documents (aligned `texts`/`images`, optional `metadata` JSON string)
    from parquet or JSONL -> kind "interleaved" samples."""
    paths = [_must_exist(inp, "input") for inp in inputs]
    o = _Out(out, "interleaved", shard_size, progress)
    n = 0
    for path in paths:
        base = Path(image_root) if image_root else path.parent
        for row in _rows(path):
            texts = row.get("texts") if isinstance(row, dict) else None
            images = row.get("images") if isinstance(row, dict) else None
            if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images) or not texts \
                    or any((t is None) == (i is None) for t, i in zip(texts, images)):
                o.skip("invalid_schema")
                continue
            names, datas, reason = [], [], None
            for k, entry in enumerate(images):
                if entry is None:
                    names.append(None)
                    datas.append(None)
                    continue
                data, reason = _resolve_image(entry, base)
                ext = image_ext(data) if data is not None else None
                if data is not None and ext is None:
                    reason = "corrupt_image"
                if reason:
                    break
                names.append(f"img{len([x for x in names if x])}.{ext}")
                datas.append(data)
            if reason:
                o.skip(reason)
                continue
            doc = {"kind": "interleaved", "texts": texts, "images": names}
            meta = row.get("metadata")
            if isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except ValueError:
                    pass
            if meta is not None:
                doc["metadata"] = meta
            o.add(f"obelics{n:09d}", doc, datas)
            n += 1
    return o.close()
