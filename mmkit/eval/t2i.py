"""Text-to-image scoring: shapes-world attribute accuracy, CLIPScore, GenEval output layout.

Shapes-world attribute accuracy. Each generated image is read back into objects with
`mmkit.data.shapes.parse_image`; the prompt's objects come from the prompt entry (its
scene or object list) or `parse_caption(prompt)`. Asked and found objects are paired by
the assignment that agrees on the most attributes (<= 3 objects: all permutations), then

- color / shape / size / position: percent of asked objects whose paired object has the
  asked value (an asked object with no partner is wrong on every attribute; size and
  position are only counted where the prompt states them; position = grid cell);
- count: percent of images with exactly as many objects as asked;
- attribute_accuracy (= overall): mean of color, shape, count and position;
- all_correct: percent of images right on every asked attribute and the count (strict,
  GenEval-like).

CLIPScore follows Hessel et al. 2021: mean of 2.5 * max(cos(image, "A photo depicts " + text), 0)
(range 0..2.5, not rescaled). (torchmetrics' CLIPScore is a different number:
max(100 * cos, 0), ViT-L/14, no prefix.) The checkpoint is a local file: open_clip's
`pretrained="openai"` downloads. OpenAI's checkpoints were trained with QuickGELU; a
local file loaded into a non-`-quickgelu` config silently gives wrong embeddings, so
`force_quick_gelu=True` is the default here.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from mmkit.errors import MmkitError, UsageError

ATTRIBUTES = ("color", "shape", "count", "position")


def prompt_objects(entry: dict | str) -> list[dict]:
    """What a t2i prompt asks for: [{shape, color, size|None, x|None, y|None}]."""
    from mmkit.data import shapes

    if isinstance(entry, str):
        return shapes.parse_caption(entry)
    if entry.get("objects") is not None:
        return [{k: o.get(k) for k in ("shape", "color", "size", "x", "y")} for o in entry["objects"]]
    if entry.get("scene") is not None:
        return shapes.scene_objects(shapes.Scene.from_dict(entry["scene"]))
    if not isinstance(entry.get("prompt"), str):
        raise UsageError(f"t2i prompt entry needs 'prompt' (or 'objects'/'scene'): {entry!r}")
    return shapes.parse_caption(entry["prompt"])


def _agree(a: dict, f: dict) -> dict:
    """Per-attribute agreement of asked object `a` with found object `f` (None: not asked)."""
    return {
        "color": a["color"] == f["color"],
        "shape": a["shape"] == f["shape"],
        "size": None if a.get("size") is None else a["size"] == f["size"],
        "position": None if a.get("x") is None else (a["x"], a["y"]) == (f["x"], f["y"]),
    }


def score_image(asked: list[dict], found: list[dict]) -> dict:
    """Attribute checks for one image: {"objects": [per asked object agreement], "count": bool}."""
    best, best_key = None, None
    n = len(asked)
    # every way to give each asked object a distinct found object (or none, if too few)
    slots = list(range(len(found))) + [None] * max(0, n - len(found))
    for perm in set(itertools.permutations(slots, n)):
        checks = []
        for a, j in zip(asked, perm):
            if j is None:
                checks.append({"color": False, "shape": False, "size": None if a.get("size") is None else False,
                               "position": None if a.get("x") is None else False})
            else:
                checks.append(_agree(a, found[j]))
        key = sum(bool(v) for c in checks for v in c.values())
        if best_key is None or key > best_key:
            best, best_key = checks, key
    return {"objects": best or [], "count": len(found) == n}


def attribute_accuracy(asked_per_image: list[list[dict]], found_per_image: list[list[dict]]) -> dict:
    """Aggregate `score_image` over a set: percentages per attribute, overall, all_correct."""
    if len(asked_per_image) != len(found_per_image):
        raise MmkitError("t2i: one list of found objects per prompt is needed")
    if not asked_per_image:
        raise MmkitError("t2i: nothing to score")
    tot = {k: [0, 0] for k in ("color", "shape", "size", "position")}
    count_ok = all_ok = 0
    for asked, found in zip(asked_per_image, found_per_image):
        s = score_image(asked, found)
        count_ok += s["count"]
        ok = s["count"]
        for c in s["objects"]:
            for k, v in c.items():
                if v is not None:
                    tot[k][0] += int(v)
                    tot[k][1] += 1
                    ok = ok and v
        all_ok += bool(ok)
    n = len(asked_per_image)
    out = {k: (100.0 * c / t if t else None) for k, (c, t) in tot.items()}
    out["count"] = 100.0 * count_ok / n
    present = [out[k] for k in ATTRIBUTES if out[k] is not None]
    out["attribute_accuracy"] = sum(present) / len(present)
    out["overall"] = out["attribute_accuracy"]
    out["all_correct"] = 100.0 * all_ok / n
    out["n"] = n
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def score_shapes_t2i(images, entries) -> dict:
    """Generated images (PIL) vs their prompt entries -> `attribute_accuracy` dict."""
    from mmkit.data.shapes import parse_image

    return attribute_accuracy([prompt_objects(e) for e in entries], [parse_image(im) for im in images])


def load_prompts(path) -> list[dict]:
    """t2i_prompts.json: a list of {"prompt", optional "objects"/"scene"/"id"} (or strings)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"t2i prompts file not found: {path}")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a list of prompts")
    return [{"prompt": e} if isinstance(e, str) else e for e in data]


# ----------------------------------------------------------------------------- CLIPScore


def load_clip(model_name: str, checkpoint: str | Path, force_quick_gelu: bool = True, device="cpu"):
    """open_clip model + preprocess + tokenizer from a local checkpoint file (no download)."""
    import open_clip

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"CLIP checkpoint not found: {checkpoint} (a local file; open_clip 'openai' downloads)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(checkpoint), force_quick_gelu=force_quick_gelu, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def clip_score(images, texts: list[str], model, preprocess, tokenizer, prefix: str = "A photo depicts ",
               batch_size: int = 32) -> dict:
    """Hessel CLIPScore: mean over pairs of 2.5 * max(cos, 0); also per-pair values."""
    import torch

    if len(images) != len(texts):
        raise MmkitError("clip_score: one text per image is needed")
    device = next(model.parameters()).device
    per = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            px = torch.stack([preprocess(im.convert("RGB")) for im in images[i:i + batch_size]]).to(device)
            tok = tokenizer([prefix + t for t in texts[i:i + batch_size]]).to(device)
            img = torch.nn.functional.normalize(model.encode_image(px).float(), dim=-1)  # (B, D)
            txt = torch.nn.functional.normalize(model.encode_text(tok).float(), dim=-1)  # (B, D)
            cos = (img * txt).sum(-1)  # (B,)
            per += (2.5 * cos.clamp(min=0)).tolist()
    return {"clip_score": sum(per) / max(1, len(per)), "per_image": per,
            "definition": "Hessel 2021: 2.5 * max(cos, 0), prefix 'A photo depicts '"}


# ----------------------------------------------------------------------------- GenEval layout


def write_geneval(outdir, metadata: list[dict], images: list[list]) -> Path:
    """GenEval's input layout: <outdir>/<%05d>/metadata.jsonl + samples/<%04d>.png per prompt.

    `metadata[i]` is the prompt's line from GenEval's evaluation_metadata.jsonl (at least
    "prompt"); `images[i]` its samples (GenEval uses 4). Score with djghosh13/geneval's
    `evaluate_images.py <outdir>` in its own environment.
    """
    if len(metadata) != len(images):
        raise MmkitError("write_geneval: one list of images per prompt is needed")
    outdir = Path(outdir)
    for i, (meta, imgs) in enumerate(zip(metadata, images)):
        d = outdir / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for j, im in enumerate(imgs):
            im.save(d / "samples" / f"{j:04d}.png")
    return outdir


def read_geneval_metadata(path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl -> list of dicts (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"GenEval metadata not found: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
