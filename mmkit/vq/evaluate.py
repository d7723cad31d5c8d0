"""Held-out evaluation of a VQ tokenizer: PSNR, SSIM, codebook usage, perplexity.

Images are evaluated at their native size (batched by size); a side that is not a
multiple of the downsampling factor is centre-cropped down to one.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mmkit.errors import UsageError
from mmkit.vq.metrics import code_histogram, psnr, ssim, to_unit, usage_and_perplexity
from mmkit.vq.model import VQModel


def iter_shard_images(sources, limit: int | None = None, square: int | None = None):
    """(3, H, W) tensors in [-1, 1] of every image in the shards, in shard order (each resized
    to square x square px first when `square` is given, as tokenize-images --square)."""
    from mmkit.data import build_stream
    from mmkit.vq.tokenize_shards import vq_pixels

    n = 0
    stream = build_stream(sources, batch_size=16, collate_fn=list, decode_images=True, shuffle_buffer=0,
                          infinite=False)
    for batch in stream:
        for doc in batch:
            for img in doc.get("images") or []:
                if img is None:
                    continue
                yield vq_pixels(img, square)
                n += 1
                if limit is not None and n >= limit:
                    return


def fit_to_factor(x: torch.Tensor, f: int) -> torch.Tensor:
    """Centre-crop (C, H, W) so H and W are multiples of f."""
    _, H, W = x.shape
    if H < f or W < f:
        raise UsageError(f"image {H}x{W} is smaller than the VQ downsampling factor {f}")
    h, w = H - H % f, W - W % f
    t, l = (H - h) // 2, (W - w) // 2
    return x[:, t:t + h, l:l + w]


@torch.no_grad()
def evaluate_images(model: VQModel, images, batch_size: int = 32, progress: bool = False) -> dict:
    """Metrics over an iterable of (3, H, W) images in [-1, 1]."""
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    hist = torch.zeros(model.codebook_size, dtype=torch.long)
    psnrs, ssims = [], []
    buckets: dict[tuple, list] = defaultdict(list)

    def flush(key):
        x = torch.stack(buckets.pop(key)).to(device)
        codes = model.encode(x)
        y = model.decode(codes)
        a, b = to_unit(y), to_unit(x)
        psnrs.extend(psnr(a, b).clamp(max=100).tolist())  # identical images: cap inf at 100 dB
        ssims.extend(ssim(a, b).tolist())
        hist.add_(code_histogram(codes, model.codebook_size))

    bar = tqdm(images, desc="eval-vq", unit="img", disable=not progress)
    for img in bar:
        img = fit_to_factor(img, model.downsample)
        key = tuple(img.shape)
        buckets[key].append(img)
        if len(buckets[key]) >= batch_size:
            flush(key)
    for key in list(buckets):
        flush(key)
    if not psnrs:
        raise UsageError("no images to evaluate")
    usage, ppl = usage_and_perplexity(hist)
    return {
        "psnr": round(sum(psnrs) / len(psnrs), 3),
        "ssim": round(sum(ssims) / len(ssims), 4),
        "codebook_usage": round(usage, 2),
        "perplexity": round(ppl, 2),
        "images": len(psnrs),
        "codebook_size": model.codebook_size,
    }


def evaluate(model_dir, sources, batch_size: int = 32, limit: int | None = None, progress: bool = False,
             square: int | None = None) -> dict:
    """`square`: measure on images resized to square x square px (a square model's view)."""
    model = VQModel.from_pretrained(model_dir)
    if square is not None:
        from mmkit.vq.tokenize_shards import check_square

        check_square(square, model.downsample)
    return evaluate_images(model, iter_shard_images(sources, limit, square), batch_size=batch_size,
                           progress=progress)
