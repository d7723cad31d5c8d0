"""Ceiling of shapes-t2i attribute accuracy through a VQ tokenizer.

Each t2i prompt of an eval split carries its scene; the scene is rendered, resized to the
square a Chameleon model reads (`--square`), VQ encoded + decoded and parsed back, as a
perfect text-to-image model's output would be. Two renderings:
  own:    the scene at its own size, squashed to the square (what training images look like);
  square: the same objects in a square scene (what a model told to draw a square scene draws).
A model cannot score above these, so they say what the metric leaves room for.

  .venv/bin/python benchmarks/t2i_ceiling.py --vq runs/quickstart/vq/final --eval runs/quickstart/data/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def ceiling(vq_dir: str, eval_dir: str, square: int = 48) -> dict:
    from PIL import Image

    from mmkit.data import shapes
    from mmkit.eval import t2i
    from mmkit.vq.model import VQModel
    from mmkit.vq.tokenize_shards import vq_pixels

    vq = VQModel.from_pretrained(vq_dir).eval()
    entries = json.loads((Path(eval_dir) / "t2i_prompts.json").read_text())
    out = {}
    for mode in ("own", "square"):
        asked, found = [], []
        for e in entries:
            scene = shapes.Scene.from_dict(e["scene"])
            if mode == "square":
                scene.width = scene.height = square
            with torch.no_grad():
                y = vq.decode(vq.encode(vq_pixels(shapes.render(scene), square)[None]))[0]  # (3, S, S)
            arr = ((y.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            asked.append(t2i.prompt_objects(e))
            found.append(shapes.parse_image(Image.fromarray(arr)))
        r = t2i.attribute_accuracy(asked, found)
        out[mode] = {k: r[k] for k in ("attribute_accuracy", "color", "shape", "size", "position", "count", "n")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vq", required=True, help="mmkit VQ directory")
    ap.add_argument("--eval", required=True, help="eval split with t2i_prompts.json (scenes included)")
    ap.add_argument("--square", type=int, default=48, help="side the model reads (model.image_size)")
    args = ap.parse_args()
    print(json.dumps(ceiling(args.vq, args.eval, args.square), indent=1))


if __name__ == "__main__":
    main()
