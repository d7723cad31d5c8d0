"""Run a model on an eval task and score it: one interface over both model families.

A task YAML (`eval/<task>.yaml`, schema `TaskConfig`) names the task kind (vqa, caption,
t2i), where its data lives and how to score it. The model is driven only through
`mmkit.generation.load_pipeline(model_dir)`:

- vqa:     `pipeline.answer(images, questions)`; each answer then goes through
           `mmkit.data.templates.postprocess_answer` (first line, cut at a following
           "Question:"/"Answer:"/"Caption:", trailing period dropped) before scoring;
- caption: `pipeline.caption(images)` (stripped, first line);
- t2i:     `pipeline.generate_images(prompts, cfg_scale, seed)` with seed = task seed +
           the global index of the batch's first prompt (mmkit pipelines seed image i of a
           call with seed + i, so prompt k always gets seed + k: the images do not depend
           on batch size or number of processes).

Prompt templates live in `mmkit/data/templates.py` and are applied inside the pipeline,
exactly as in training. Items are processed in batches (`batch_size`) with a tqdm bar.

Across processes (`torchrun`, RANK/WORLD_SIZE set): each rank runs a contiguous block,
all predictions are gathered to rank 0, which scores once. Scoring once matters: CIDEr's
IDF and the VQA averages are over the whole set, so per-rank scores must never be
averaged. Rank 0 writes `results.json` (evaluator version, model, task, N, seed, metrics),
`results.md` (a markdown table) and `predictions.json` (reusable with `vqa-score` /
`caption-score`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmkit.errors import MmkitError, UsageError

EVALUATOR_VERSION = "mmkit-eval 1 (VQA: GT-Vision-Lab vqaEval.py HEAD a013f00; captions: pycocoevalcap 1.2)"


@dataclass
class TaskConfig:
    """One eval task. Paths are relative to the current directory (or absolute)."""

    name: str
    task: Literal["vqa", "caption", "t2i"]
    # "shards": the quickstart held-out split (eval_dir with shards + JSONs);
    # "files": user-supplied JSONs + an image directory
    source: Literal["shards", "files"] = "files"
    eval_dir: str | None = None
    questions: str | None = None  # VQAv2 questions / GQA questions / TextVQA json
    annotations: str | None = None  # VQAv2 annotations (GQA / TextVQA: the same file)
    references: str | None = None  # COCO captions format
    prompts: str | None = None  # t2i prompts JSON
    image_dir: str | None = None
    # file name of an image from its id, Python format syntax, e.g. "COCO_val2014_{image_id:012d}.jpg"
    image_pattern: str = "{image_id}.jpg"
    metric: Literal["official", "lenient", "exact"] = "official"  # VQA scoring mode
    batch_size: int = 16
    # answer/caption length cap, passed to the pipeline when its methods take it
    # (None: the pipeline's default)
    max_new_tokens: int | None = None
    seed: int = 0
    cfg_scale: float = 3.0
    # t2i: how image codes are chosen: None = the pipeline's own sampling (T 1, top-k 2048 for the
    # Chameleon family), 0 = greedy (argmax code; with CFG), > 0 = sampling at that temperature
    image_temperature: float | None = None
    limit: int | None = None
    meteor: bool = True
    spice: bool = False
    # t2i: also CLIPScore (Hessel) with a local open_clip checkpoint, e.g. ViT-B-32 + a file
    clip_model: str | None = None
    clip_checkpoint: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("limit must be positive")
        if self.image_temperature is not None and self.image_temperature < 0:
            raise ValueError("image_temperature must be >= 0 (0 = greedy)")


def load_task(path, overrides: list[str] | None = None) -> TaskConfig:
    from mmkit.config import load_config

    return load_config(TaskConfig, path, overrides)


# ----------------------------------------------------------------------------- data


def _need(cfg: TaskConfig, field: str) -> Path:
    value = getattr(cfg, field)
    if value is None and cfg.eval_dir is not None:
        default = {"questions": "vqa_questions.json", "annotations": "vqa_annotations.json",
                   "references": "captions.json", "prompts": "t2i_prompts.json"}.get(field)
        value = str(Path(cfg.eval_dir) / default) if default else None
    if value is None:
        raise UsageError(f"task {cfg.name}: '{field}' is not set")
    p = Path(value)
    if not p.exists():
        raise UsageError(f"task {cfg.name}: {field} not found: {p}")
    return p


def _shard_docs(eval_dir: Path, kind: str) -> dict:
    """id -> first decoded image of every held-out document of `kind` (vqa: question_id)."""
    from mmkit.data import build_stream

    key = "question_id" if kind == "vqa" else "image_id"
    out = {}
    stream = build_stream(str(eval_dir), batch_size=1, collate_fn=list, seed=0, infinite=False, shuffle_buffer=0)
    for batch in stream:
        for doc in batch:
            if doc["kind"] == kind and key in doc["meta"]:
                out[doc["meta"][key]] = next(im for im in doc["images"] if im is not None)
    return out


class _Images:
    """Lazy image access: shards (held-out split) or files (image_dir + pattern/file_name)."""

    def __init__(self, cfg: TaskConfig, kind: str):
        self.cfg, self.kind, self._cache = cfg, kind, None

    def get(self, key, file_name: str | None = None):
        from PIL import Image

        if self.cfg.source == "shards":
            if self._cache is None:
                self._cache = _shard_docs(Path(self.cfg.eval_dir), self.kind)
            if key not in self._cache:
                raise MmkitError(f"task {self.cfg.name}: no {self.kind} image for id {key!r} in {self.cfg.eval_dir}")
            return self._cache[key]
        if self.cfg.image_dir is None:
            raise UsageError(f"task {self.cfg.name}: 'image_dir' is not set")
        name = file_name or self.cfg.image_pattern.format(image_id=key)
        path = Path(self.cfg.image_dir) / name
        if not path.is_file():
            raise MmkitError(f"task {self.cfg.name}: image not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")


def vqa_items(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """([{id, question, image_key}], annotation records) in file order."""
    from mmkit.eval import vqa

    qpath = _need(cfg, "questions")
    data = vqa._read_json(qpath, "questions")
    if isinstance(data, dict) and isinstance(data.get("questions"), list):  # VQAv2
        items = [{"id": q["question_id"], "question": q["question"], "image_key": q["image_id"]}
                 for q in data["questions"]]
    elif isinstance(data, dict) and isinstance(data.get("data"), list):  # TextVQA
        items = [{"id": q["question_id"], "question": q["question"], "image_key": q["image_id"]} for q in data["data"]]
    elif isinstance(data, dict) and all(isinstance(v, dict) and "question" in v for v in data.values()):  # GQA
        items = [{"id": k, "question": v["question"], "image_key": v["imageId"]} for k, v in data.items()]
    else:
        raise UsageError(f"{qpath}: not VQAv2 questions, TextVQA or GQA format")
    if cfg.source == "shards":  # held-out shards are keyed by question id
        for it in items:
            it["image_key"] = it["id"]
    records = vqa.load_annotations(_need(cfg, "annotations"))
    return items, records


def caption_items(cfg: TaskConfig) -> tuple[list[dict], dict]:
    from mmkit.eval import caption

    rpath = _need(cfg, "references")
    data = caption.read_json(rpath, "references")
    refs = caption.references_from_coco(data, str(rpath))
    files = {im["id"]: im.get("file_name") for im in data.get("images") or []}
    items = [{"id": k, "image_key": k, "file_name": files.get(k)} for k in refs]
    return items, refs


# ----------------------------------------------------------------------------- distributed


def _dist():
    """(rank, world, torch.distributed or None); joins a torchrun group if one is set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def gather_predictions(local: dict, dist=None) -> dict | None:
    """Merge {index: prediction} from every rank on rank 0 (others get None)."""
    if dist is None:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


def _run_batches(items: list[dict], fn, batch_size: int, desc: str, rank: int, world: int) -> dict:
    """fn(batch_items, start) -> outputs, over this rank's contiguous block of items;
    `start` is the global index of the batch's first item. Returns {global index: output}."""
    from tqdm import tqdm

    per = -(-len(items) // world)  # ceil: rank r gets items [r*per, (r+1)*per)
    lo, hi = min(len(items), rank * per), min(len(items), (rank + 1) * per)
    out = {}
    starts = list(range(lo, hi, batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", disable=rank != 0 or not starts):
        idx = list(range(start, min(hi, start + batch_size)))
        res = fn([items[i] for i in idx], start)
        if len(res) != len(idx):
            raise MmkitError(f"{desc}: the pipeline returned {len(res)} outputs for {len(idx)} inputs")
        out.update(zip(idx, res))
    return out


# ----------------------------------------------------------------------------- tasks


def _call(pipeline, name: str, *args, max_new_tokens: int | None = None):
    """pipeline.<name>(*args) with the task's max_new_tokens: as a keyword if the method takes
    one, else through the pipeline's `max_new_tokens` attribute (mmkit pipelines), restored after."""
    import inspect

    method = getattr(pipeline, name)
    if max_new_tokens is None:
        return method(*args)
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        params = {}
    if "max_new_tokens" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return method(*args, max_new_tokens=max_new_tokens)
    if hasattr(pipeline, "max_new_tokens"):
        old = pipeline.max_new_tokens
        pipeline.max_new_tokens = max_new_tokens
        try:
            return method(*args)
        finally:
            pipeline.max_new_tokens = old
    return method(*args)


def _first_line(text: str) -> str:
    text = text.strip()
    return text.split("\n")[0].strip() if text else text


def run_vqa(pipeline, cfg: TaskConfig, limit: int | None = None, rank=0, world=1, dist=None) -> dict | None:
    from mmkit.data.templates import postprocess_answer
    from mmkit.eval import vqa

    items, records = vqa_items(cfg)
    items = items[:limit] if limit else items
    images = _Images(cfg, "vqa")

    def fn(batch, _):
        return _call(pipeline, "answer", [images.get(it["image_key"]) for it in batch],
                     [it["question"] for it in batch], max_new_tokens=cfg.max_new_tokens)

    local = _run_batches(items, fn, cfg.batch_size, f"{cfg.name}", rank, world)
    merged = gather_predictions(local, dist)
    if merged is None:
        return None
    preds = {items[i]["id"]: postprocess_answer(merged[i]) for i in sorted(merged)}
    result = vqa.score_vqa(preds, records, mode=cfg.metric, allow_missing=limit is not None)
    metrics = {k: result[k] for k in ("overall", "perAnswerType", "perQuestionType")}
    return {"metrics": metrics, "n": result["n"],
            "predictions": [{"question_id": q, "answer": a} for q, a in preds.items()]}


def run_caption(pipeline, cfg: TaskConfig, limit: int | None = None, rank=0, world=1, dist=None) -> dict | None:
    from mmkit.eval import caption

    items, refs = caption_items(cfg)
    items = items[:limit] if limit else items
    images = _Images(cfg, "caption")

    def fn(batch, _):
        return _call(pipeline, "caption", [images.get(it["image_key"], it.get("file_name")) for it in batch],
                     max_new_tokens=cfg.max_new_tokens)

    local = _run_batches(items, fn, cfg.batch_size, f"{cfg.name}", rank, world)
    merged = gather_predictions(local, dist)
    if merged is None:
        return None
    preds = {items[i]["id"]: _first_line(merged[i]) for i in sorted(merged)}
    metrics = caption.score_captions(preds, refs, meteor=cfg.meteor, spice=cfg.spice, allow_missing=limit is not None)
    return {"metrics": metrics, "n": len(preds),
            "predictions": [{"image_id": k, "caption": c} for k, c in preds.items()]}


@contextlib.contextmanager
def _image_sampling(pipeline, temperature: float | None):
    """The task's image-code sampling on the pipeline for the duration of a run (None: its own)."""
    if temperature is None:
        yield
        return
    from mmkit.generation import SamplingParams

    if not hasattr(pipeline, "image_sampling"):
        raise UsageError(f"image_temperature: {type(pipeline).__name__} has no image sampling to set")
    keep = pipeline.image_sampling
    pipeline.image_sampling = (SamplingParams(do_sample=False) if temperature == 0 else
                               SamplingParams(do_sample=True, temperature=temperature, top_k=keep.top_k,
                                              top_p=keep.top_p))
    try:
        yield
    finally:
        pipeline.image_sampling = keep


def run_t2i(pipeline, cfg: TaskConfig, limit: int | None = None, rank=0, world=1, dist=None,
            out_dir: Path | None = None) -> dict | None:
    from mmkit.eval import t2i

    entries = t2i.load_prompts(_need(cfg, "prompts"))
    entries = entries[:limit] if limit else entries
    if out_dir is not None:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def fn(batch, start):
        # mmkit pipelines seed image i of a call with seed + i: seed + start gives prompt k
        # the seed `seed + k` whatever the batch size and number of processes
        imgs = pipeline.generate_images([e["prompt"] for e in batch], cfg_scale=cfg.cfg_scale, seed=cfg.seed + start)
        from mmkit.data.shapes import parse_image

        return [(parse_image(im), im) for im in imgs]

    with _image_sampling(pipeline, cfg.image_temperature):
        local = _run_batches(entries, fn, cfg.batch_size, f"{cfg.name}", rank, world)
    if out_dir is not None:  # every rank saves its own images
        for i, (_, im) in local.items():
            im.save(out_dir / "images" / f"{i:05d}.png")
    clip = {}
    if cfg.clip_checkpoint:  # per-image values are independent: compute per rank, gather
        model, preprocess, tok = t2i.load_clip(cfg.clip_model or "ViT-B-32", cfg.clip_checkpoint)
        idx = sorted(local)
        per = t2i.clip_score([local[i][1] for i in idx], [entries[i]["prompt"] for i in idx],
                             model, preprocess, tok)["per_image"]
        clip = dict(zip(idx, per))
    merged = gather_predictions({i: (found, clip.get(i)) for i, (found, _) in local.items()}, dist)
    if merged is None:
        return None
    order = sorted(merged)
    metrics = t2i.attribute_accuracy([t2i.prompt_objects(entries[i]) for i in order], [merged[i][0] for i in order])
    if cfg.clip_checkpoint:
        metrics["clip_score"] = round(sum(merged[i][1] for i in order) / len(order), 4)  # Hessel, 0..2.5
    merged = {i: v[0] for i, v in merged.items()}
    return {"metrics": metrics, "n": len(order),
            "predictions": [{"prompt": entries[i]["prompt"], "found": merged[i]} for i in order]}


RUNNERS = {"vqa": run_vqa, "caption": run_caption, "t2i": run_t2i}


def markdown_table(result: dict) -> str:
    """The results as a markdown table (flat metrics; nested breakdowns one row each)."""
    rows = ["| task | model | N | metric | value |", "|---|---|---|---|---|"]
    for k, v in result["metrics"].items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                rows.append(f"| {result['task']} | {result['model']} | {result['n']} | {k}/{kk} | {_fmt(vv)} |")
        elif k != "n":
            rows.append(f"| {result['task']} | {result['model']} | {result['n']} | {k} | {_fmt(v)} |")
    return "\n".join(rows) + "\n"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.2f}" if isinstance(v, float) else str(v))


def run_task(model_dir, task_path, out_dir=None, limit: int | None = None, batch_size: int | None = None,
             overrides: list[str] | None = None, pipeline=None) -> dict | None:
    """`mmkit eval run`: load the pipeline and task, run, score once on rank 0, write results.

    `pipeline` may be passed in (tests, the quickstart) instead of loading `model_dir`.
    Returns the results dict on rank 0, None on other ranks.
    """
    cfg = load_task(task_path, overrides)
    if batch_size is not None:
        if batch_size <= 0:
            raise UsageError("--batch-size must be positive")
        cfg.batch_size = batch_size
    limit = limit if limit is not None else cfg.limit
    model_dir = Path(model_dir)
    if pipeline is None:
        if not model_dir.is_dir():
            raise UsageError(f"model directory not found: {model_dir}")
        from mmkit.generation import load_pipeline

        pipeline = load_pipeline(model_dir)
    out = Path(out_dir) if out_dir else model_dir / "eval" / cfg.name
    rank, world, dist = _dist()
    t0 = time.perf_counter()
    kwargs = {"out_dir": out} if cfg.task == "t2i" else {}
    res = RUNNERS[cfg.task](pipeline, cfg, limit=limit, rank=rank, world=world, dist=dist, **kwargs)
    if res is None:
        return None
    from mmkit import __version__

    result = {"evaluator_version": f"mmkit {__version__}; {EVALUATOR_VERSION}", "model": str(model_dir),
              "task": cfg.name, "task_file": str(task_path), "kind": cfg.task, "n": res["n"], "seed": cfg.seed,
              "limit": limit, "world_size": world, "seconds": round(time.perf_counter() - t0, 2),
              "out_dir": str(out), "metrics": res["metrics"]}
    if cfg.task == "vqa":
        result["vqa_mode"] = cfg.metric
    if cfg.task == "t2i":
        result.update(cfg_scale=cfg.cfg_scale, image_temperature=cfg.image_temperature)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(result))
    (out / "predictions.json").write_text(json.dumps(res["predictions"], indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- quickstart API


def _shapes_cfg(task: str, eval_dir, **kw) -> TaskConfig:
    return TaskConfig(name=f"shapes-{task}", task=task, source="shards", eval_dir=str(eval_dir), **kw)


def evaluate_vqa(pipeline, eval_dir, limit: int | None = None, mode: str = "official", batch_size: int = 16) -> dict:
    """shapes-VQA on the held-out split: {"overall", "perAnswerType", "perQuestionType", "n"}."""
    res = run_vqa(pipeline, _shapes_cfg("vqa", eval_dir, metric=mode, batch_size=batch_size), limit=limit)
    return {**res["metrics"], "n": res["n"]}


def evaluate_caption(pipeline, eval_dir, limit: int | None = None, meteor: bool = True, batch_size: int = 16) -> dict:
    """shapes-caption: {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "n"}."""
    res = run_caption(pipeline, _shapes_cfg("caption", eval_dir, meteor=meteor, batch_size=batch_size), limit=limit)
    return {**res["metrics"], "n": res["n"]}


def evaluate_t2i(pipeline, eval_dir, cfg_scale: float = 3.0, seed: int = 0, limit: int | None = None,
                 batch_size: int = 16, image_temperature: float | None = None) -> dict:
    """shapes-t2i attribute accuracy: {"color", "shape", "count", "position", "attribute_accuracy", ...};
    `image_temperature` as the task key (None: the pipeline's sampling, 0: greedy)."""
    cfg = _shapes_cfg("t2i", eval_dir, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                      image_temperature=image_temperature)
    return run_t2i(pipeline, cfg, limit=limit)["metrics"]


def majority_baseline(eval_dir) -> float:
    """Official VQA accuracy (percent) of always answering the most common gold answer."""
    from mmkit.eval import vqa

    records = vqa.load_annotations(Path(eval_dir) / "vqa_annotations.json")
    answer = vqa.majority_answer(records)
    return vqa.score_vqa({r["question_id"]: answer for r in records}, records)["overall"]
