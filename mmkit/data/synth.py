"""`mmkit data synth`: shapes-world shards (train + held-out eval) and eval exports.

Each sample is generated from its own RNG, `random.Random(f"{seed}:{split}:{kind}:{i}")`,
so any shard can be produced independently (in parallel) and the bytes depend only on
(seed, split, kind, index, shard size). The eval split uses a different stream ("eval")
and is exported as VQAv2 questions/annotations, COCO captions and text-to-image prompts.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from mmkit.data import shapes as S
from mmkit.data.writer import encode_json, sample_members, update_sizes, write_shard

KINDS = ("interleaved", "caption", "vqa")
# image_id ranges per kind, so ids are unique within a split
ID_BASE = {"caption": 0, "vqa": 10_000_000, "interleaved": 20_000_000}


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_doc(kind: str, i: int, seed: int, split: str, with_images: bool = True) -> tuple[dict, list[bytes | None]]:
    """Sample number i of (kind, split): (schema JSON, image bytes aligned with 'images';
    None instead of bytes when with_images=False)."""
    rng = random.Random(f"{seed}:{split}:{kind}:{i}")
    image_id = ID_BASE[kind] + i
    if kind == "caption":
        scene = S.random_scene(rng)
        caps = S.captions(scene)
        cap = caps[rng.randrange(len(caps))]
        doc = {"kind": "caption", "texts": [None, cap], "images": ["img0.png", None],
               "image_id": image_id, "captions": caps, "scenes": [scene.to_dict(), None]}
        return doc, [png_bytes(S.render(scene)) if with_images else None, None]
    if kind == "vqa":
        scene = S.random_scene(rng)
        q = S.make_vqa(scene, rng)
        doc = {"kind": "vqa", "texts": [None, q["question"]], "images": ["img0.png", None],
               "image_id": image_id, "question_id": image_id * 10, **q,
               "scenes": [scene.to_dict(), None]}
        return doc, [png_bytes(S.render(scene)) if with_images else None, None]
    if kind == "interleaved":
        texts, scenes = S.interleaved_doc(rng)
        images, img_bytes, scene_list, k = [], [], [], 0
        for t in texts:
            if t is None:
                images.append(f"img{k}.png")
                img_bytes.append(png_bytes(S.render(scenes[k])) if with_images else None)
                scene_list.append(scenes[k].to_dict())
                k += 1
            else:
                images.append(None)
                img_bytes.append(None)
                scene_list.append(None)
        doc = {"kind": "interleaved", "texts": texts, "images": images, "scenes": scene_list}
        return doc, img_bytes
    raise ValueError(f"unknown kind {kind!r}")


def sample_key(kind: str, i: int) -> str:
    return f"{kind}{i:08d}"


@dataclass
class ShardJob:
    out: str
    kind: str
    shard: int
    start: int
    stop: int
    seed: int
    split: str


def _write_job(job: ShardJob) -> tuple[str, int]:
    name = f"{job.kind}-{job.shard:06d}.tar"

    def samples():
        for i in range(job.start, job.stop):
            doc, imgs = make_doc(job.kind, i, job.seed, job.split)
            yield sample_key(job.kind, i), sample_members(doc, imgs)

    return name, write_shard(Path(job.out) / name, samples())


def write_split(out: Path, split: str, n: int, seed: int, kinds, shard_size: int, workers: int = 1,
                progress: bool = False) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [ShardJob(str(out), kind, s, start, min(start + shard_size, n), seed, split)
            for kind in kinds for s, start in enumerate(range(0, n, shard_size))]
    sizes: dict[str, int] = {}
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            it = pool.imap(_write_job, jobs)
            for name, count in _progress(it, len(jobs), f"synth {split}", progress):
                sizes[name] = count
    else:
        for name, count in _progress(map(_write_job, jobs), len(jobs), f"synth {split}", progress):
            sizes[name] = count
    update_sizes(out, sizes)
    return sizes


def _progress(it, total, desc, show):
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="shard")


def export_eval(out: Path, n: int, seed: int, kinds) -> None:
    """VQAv2 questions/annotations, COCO captions and t2i prompts for the eval split."""
    if "vqa" in kinds:
        questions, annotations = [], []
        for i in range(n):
            doc, _ = make_doc("vqa", i, seed, "eval", with_images=False)
            questions.append({"image_id": doc["image_id"], "question": doc["question"],
                              "question_id": doc["question_id"]})
            annotations.append({
                "question_id": doc["question_id"], "image_id": doc["image_id"],
                "question_type": doc["question_type"], "answer_type": doc["answer_type"],
                "multiple_choice_answer": doc["answer"],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(doc["answers"])],
            })
        info = {"description": "mmkit shapes world, eval split", "seed": seed}
        _dump(out / "vqa_questions.json", {"info": info, "task_type": "Open-Ended", "data_type": "shapes",
                                            "data_subtype": "eval", "license": {}, "questions": questions})
        _dump(out / "vqa_annotations.json", {"info": info, "data_type": "shapes", "data_subtype": "eval",
                                              "license": {}, "annotations": annotations})
    if "caption" in kinds:
        images, anns, prompts = [], [], []
        for i in range(n):
            doc, _ = make_doc("caption", i, seed, "eval", with_images=False)
            scene = S.Scene.from_dict(doc["scenes"][0])
            iid = doc["image_id"]
            images.append({"id": iid, "file_name": f"{sample_key('caption', i)}.img0.png",
                           "width": scene.width, "height": scene.height})
            for j, c in enumerate(doc["captions"]):
                anns.append({"id": iid * 10 + j, "image_id": iid, "caption": c})
            prompts.append({"id": iid, "prompt": S.caption(scene, 0), "width": scene.width,
                            "height": scene.height, "objects": S.scene_objects(scene),
                            "scene": doc["scenes"][0]})
        _dump(out / "captions.json", {"info": {"description": "mmkit shapes world, eval split", "seed": seed},
                                      "licenses": [], "type": "captions", "images": images, "annotations": anns})
        _dump(out / "t2i_prompts.json", prompts)


def _dump(path: Path, obj) -> None:
    path.write_bytes(encode_json(obj) + b"\n")


def synth(out, n: int, seed: int = 0, eval_n: int | None = None, kinds=KINDS, shard_size: int = 1000,
          workers: int = 1, progress: bool = False) -> dict:
    """Write DIR/train and DIR/eval; returns {"train": sizes, "eval": sizes}."""
    out = Path(out)
    eval_n = eval_n if eval_n is not None else max(1, min(1000, n // 10))
    res = {"train": write_split(out / "train", "train", n, seed, kinds, shard_size, workers, progress),
           "eval": write_split(out / "eval", "eval", eval_n, seed, kinds, shard_size, workers, progress)}
    export_eval(out / "eval", eval_n, seed, kinds)
    return res


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
