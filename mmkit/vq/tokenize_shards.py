"""`mmkit data tokenize-images`: add VQ codes to every image of a set of shards.

Each output shard has the same name, samples, member names and image bytes as its input;
only `<key>.json` gains `"image_codes": [{"h", "w", "codes", "src_w", "src_h"} | null, ...]` aligned with
`"images"`. With `square=S` every image is first resized to S x S (LANCZOS; `square_image`):
the code grid is then the same S/f x S/f for all images, and a fixed grid of the picture
(the shapes world's 3x3 cells) always maps to the same code block. Shards are read member by
member with `tarfile` (not through the decoding
reader) so that image bytes and member names pass through untouched, and are written with
the data layer's byte-reproducible writer: the same model and inputs give identical tars.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmkit.errors import UsageError


def expand_shards(shards) -> list[Path]:
    out: list[Path] = []
    for s in [shards] if isinstance(shards, (str, Path)) else shards:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
            if not found:
                raise UsageError(f"no .tar shards in {p}")
            out.extend(found)
        elif p.is_file() and p.suffix == ".tar":
            out.append(p)
        else:
            raise UsageError(f"not a shard or directory of shards: {s}")
    return out


def read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar in order: [(key, {suffix: bytes})]; key = name up to the first dot."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, suffix = base.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][suffix] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise UsageError(f"{path}: not a readable tar ({e})") from None
    return samples


def square_image(img, side: int):
    """PIL image -> RGB `side` x `side` (LANCZOS; unchanged if already that size). Used by
    tokenize-images and by the Chameleon pipeline, so inference reads images as training did."""
    from PIL import Image

    img = img.convert("RGB")
    return img if img.size == (side, side) else img.resize((side, side), Image.LANCZOS)


def check_square(square: int | None, factor: int, name: str = "--square") -> None:
    """A square side must be a positive multiple of the VQ factor (whole codes, no crop)."""
    if square is not None and (square < factor or square % factor):
        raise UsageError(f"{name} {square}: must be a positive multiple of the VQ downsampling factor {factor}")


def vq_pixels(img, square: int | None = None) -> torch.Tensor:
    """PIL image -> (3, H, W) in [-1, 1] as tokenize-images encodes it (resized to a `square`
    side first when given); the Chameleon processor and pipeline use it too."""
    from mmkit.vq.task import image_to_tensor

    return image_to_tensor(square_image(img, square) if square else img)


def _decode(data: bytes, square: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """-> (pixels, (w, h) of the stored image before any resize)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return vq_pixels(img, square), img.size


@torch.no_grad()
def run(model_dir, shards, out_dir, batch_size: int = 64, progress: bool = True, square: int | None = None) -> dict:
    """Tokenize all images of `shards` (files or directories) into `out_dir`; returns stats.
    `square`: resize every image to square x square first (None: each image at its own size)."""
    from tqdm import tqdm

    from mmkit.data.writer import update_sizes, write_shard
    from mmkit.vq.evaluate import fit_to_factor
    from mmkit.vq.model import VQModel

    model = VQModel.from_pretrained(model_dir).eval()
    f = model.downsample
    check_square(square, f)
    paths = expand_shards(shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise UsageError("input shards have duplicate file names; tokenize each directory separately")
    t0 = time.time()
    stats = {"shards": 0, "samples": 0, "images": 0, "skipped_images": 0}
    sizes: dict[str, int] = {}
    bar = tqdm(paths, desc="tokenize-images", unit="shard", disable=not progress)
    for path in bar:
        samples = read_samples(path)
        docs: list[dict] = []
        # (sample index, image position) of every image, grouped by size for batching
        groups: dict[tuple, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
        for si, (key, members) in enumerate(samples):
            if "json" not in members:
                raise UsageError(f"{path}: sample {key} has no .json member")
            doc = json.loads(members["json"])
            doc["image_codes"] = [None] * len(doc.get("images") or [])
            docs.append(doc)
            for pos, name in enumerate(doc.get("images") or []):
                if name is None:
                    continue
                if name not in members:
                    raise UsageError(f"{path}: sample {key} names a missing image member {name}")
                try:
                    x, src = _decode(members[name], square)
                    x = fit_to_factor(x, f)
                except (OSError, UsageError):  # undecodable or too small: leave codes null
                    stats["skipped_images"] += 1
                    continue
                groups[tuple(x.shape)].append((si, pos, x, src))
        for items in groups.values():
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                codes = model.encode(torch.stack([x for _, _, x, _ in chunk]))  # (b, h, w)
                for (si, pos, _, (sw, sh)), c in zip(chunk, codes):
                    h, w = c.shape
                    docs[si]["image_codes"][pos] = {"h": int(h), "w": int(w), "codes": c.reshape(-1).tolist(),
                                                    "src_w": int(sw), "src_h": int(sh)}
                stats["images"] += len(chunk)
        from mmkit.data.writer import encode_json

        new = [(key, {**members, "json": encode_json(doc)}) for (key, members), doc in zip(samples, docs)]
        sizes[path.name] = write_shard(out / path.name, new)
        stats["shards"] += 1
        stats["samples"] += len(new)
    update_sizes(out, sizes)
    stats["seconds"] = round(time.time() - t0, 2)
    stats["out"] = str(out)
    return stats
