"""Interleaved (Anole-style) output -> a document in the shard schema, and its rendering.

The document is what a shard sample holds (docs/design.md): aligned `texts` / `images`
lists with exactly one non-null entry per position, image entries naming the member
suffix (`img0.png`), plus `image_codes` ({h, w, codes}) for every generated image.
`write_document` writes it as the sample's members (`<key>.json`, `<key>.img0.png`, ...)
plus a PNG grid, markdown and HTML for people.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def split_document(pipeline, prompt: str, tokens: list[int]):
    """Generated ids (after the prompt) -> (document dict, list of PIL images)."""
    layout = pipeline.layout
    cfg = pipeline.model.config
    stop = {cfg.eos_token_id, cfg.pad_token_id}
    texts: list[str | None] = []
    images: list[str | None] = []
    codes_meta: list[dict | None] = []
    all_codes = []
    buf: list[int] = [*pipeline._text_ids(prompt)]

    def flush():
        text = pipeline.tokenizer.decode(buf, skip_special_tokens=True)
        if text.strip():
            texts.append(text)
            images.append(None)
            codes_meta.append(None)
        buf.clear()

    i = 0
    n_span = layout.span_len
    while i < len(tokens):
        t = tokens[i]
        if t in stop:
            break
        if t == layout.boi:
            span = tokens[i + 1:i + 1 + n_span]
            if len(span) < n_span:  # truncated span (cannot happen: the sampler refuses boi without room)
                break
            flush()
            codes = layout.codes_from_span(span)
            k = len(all_codes)
            all_codes.append(codes)
            texts.append(None)
            images.append(f"img{k}.png")
            codes_meta.append({"h": layout.h, "w": layout.w, "codes": codes.flatten().tolist()})
            i += 1 + n_span
            continue
        buf.append(t)
        i += 1
    flush()
    pil = []
    if all_codes:
        import torch

        pil = pipeline.decode_codes(torch.stack(all_codes))
    doc = {"kind": "interleaved", "texts": texts, "images": images, "image_codes": codes_meta, "prompt": prompt}
    return doc, pil


def image_grid(images, cols: int | None = None, pad: int = 2):
    """PIL images -> one PIL grid image (white padding)."""
    from PIL import Image

    if not images:
        return Image.new("RGB", (1, 1), "white")
    cols = cols or min(len(images), 4)
    rows = -(-len(images) // cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def write_document(doc: dict, images, out_dir, key: str = "sample") -> dict[str, Path]:
    """Write the sample members + grid.png + <key>.md + <key>.html into out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{key}.json", "grid": out / "grid.png", "md": out / f"{key}.md",
             "html": out / f"{key}.html"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    names = [n for n in doc["images"] if n is not None]
    for name, im in zip(names, images):
        im.save(out / f"{key}.{name}")
    image_grid(list(images)).save(paths["grid"])
    md, body = [], []
    for text, name in zip(doc["texts"], doc["images"]):
        if text is not None:
            md.append(text.strip())
            body.append(f"<p>{html.escape(text.strip())}</p>")
        else:
            md.append(f"![{name}]({key}.{name})")
            body.append(f'<img src="{key}.{name}" alt="{name}" style="image-rendering: pixelated; width: 256px">')
    paths["md"].write_text("\n\n".join(md) + "\n")
    paths["html"].write_text("<!doctype html>\n<meta charset=\"utf-8\">\n<body>\n" + "\n".join(body) + "\n</body>\n")
    return paths
