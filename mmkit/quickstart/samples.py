"""The quickstart's generation stage: pictures a person looks at, and the timed CFG image."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw


def labelled_grid(images: list[Image.Image], labels: list[str], cols: int = 4, cell: int = 128) -> Image.Image:
    """Images (any size, upscaled nearest to `cell`) with up to three lines of text under each."""
    rows = max(1, (len(images) + cols - 1) // cols)
    text_h = 42
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        im = img.convert("RGB")
        scale = cell / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
        grid.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        words, lines, cur = label.split(), [], ""
        for w in words:  # wrap at ~22 characters per line
            if len(cur) + len(w) + 1 > 22 and cur:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        for j, line in enumerate(lines[:3]):
            draw.text((x + 3, y + cell + 2 + 13 * j), line, fill="black")
    return grid


def eval_examples(eval_dir: Path, kind: str, n: int) -> list[dict]:
    """First n held-out documents of one kind, images decoded (seeded order)."""
    from mmkit.data import build_stream

    stream = build_stream(str(eval_dir), batch_size=1, collate_fn=list, seed=0, infinite=False, shuffle_buffer=0)
    out = []
    for batch in stream:
        for doc in batch:
            if doc["kind"] == kind:
                out.append(doc)
        if len(out) >= n:
            break
    return out[:n]


def generate_samples(qs) -> dict:
    from mmkit.generation import load_pipeline

    samples = qs.out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    n = qs.plan.n_t2i_images
    files = {}

    # 1) text -> image with CFG (Chameleon family); the first image alone is timed.
    cham = load_pipeline(qs.final("chameleon"))
    prompts = [p["prompt"] for p in json.loads((qs.data / "eval" / "t2i_prompts.json").read_text())][:n]
    t0 = time.perf_counter()
    first = cham.generate_images(prompts[:1], cfg_scale=3.0, seed=0)
    image_seconds = time.perf_counter() - t0
    rest = cham.generate_images(prompts[1:], cfg_scale=3.0, seed=1) if len(prompts) > 1 else []
    labelled_grid(first + rest, prompts).save(samples / "text_to_image.png")
    files["text_to_image"] = "samples/text_to_image.png"

    # 2) image -> caption and image -> answer, both families, on held-out images.
    caps = eval_examples(qs.data / "eval", "caption", n)
    vqas = eval_examples(qs.data / "eval", "vqa", n)
    cap_imgs = [next(im for im in d["images"] if im is not None) for d in caps]
    vqa_imgs = [next(im for im in d["images"] if im is not None) for d in vqas]
    questions = [d["meta"]["question"] for d in vqas]
    for fam, pipe in (("chameleon", cham), ("kimivl", load_pipeline(qs.final("kimivl")))):
        captions = pipe.caption(cap_imgs)
        answers = pipe.answer(vqa_imgs, questions)
        labels = [f"{c}" for c in captions] + [f"Q: {q} A: {a}" for q, a in zip(questions, answers)]
        labelled_grid(cap_imgs + vqa_imgs, labels).save(samples / f"{fam}_captions_and_answers.png")
        files[f"{fam}_understanding"] = f"samples/{fam}_captions_and_answers.png"

    # 3) one interleaved document (Chameleon family), through the CLI a user would run.
    from mmkit.quickstart import _cli

    inter = samples / "interleaved"
    _cli(["generate", "interleaved", "--model", qs.final("chameleon"),
          "--prompt", "A scene with a red circle. Now add a blue square.", "--out", inter, "--seed", 0],
         capture=True)
    pngs = sorted(inter.glob("*.png"))
    if pngs:
        files["interleaved"] = str(Path("samples") / "interleaved" / pngs[0].name)
    return {"generation": {"image_seconds": round(image_seconds, 3)}, "files": files}
