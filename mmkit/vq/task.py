"""Task "vq": trains the VQ image tokenizer through the shared engine.

Recipe sections (both strict):
  model: VQConfig fields, optionally `preset:` (shapes-f8 | f16-8192 | f16-16384) whose
         values the other keys override, and `loss:` (VQLossConfig).
  data:  VQDataConfig (shard sources, crop size).
Batches are fixed-size random crops of every image in the shards (images of any size;
smaller ones are edge-padded), so variable image sizes need no bucketing; the conv net is
translation-equivariant, so crop-trained weights encode full images.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mmkit.config import from_dict
from mmkit.errors import UsageError
from mmkit.train.task import register_task
from mmkit.vq.losses import VQLossConfig, VQTrainer, reconstruction_loss
from mmkit.vq.model import PRESETS, VQConfig, VQModel
from mmkit.vq.tokenize_shards import check_square, vq_pixels


@dataclass
class VQDataConfig:
    sources: Any = None  # a directory, list of shards or {dir_or_pattern: weight}; `--data` fills it
    crop: int = 32  # training crop (multiple of the downsampling factor)
    flip: bool = True  # random horizontal flips
    shuffle_buffer: int = 1000
    max_images_per_sample: int = 4  # interleaved docs hold several images; cap per doc
    crop_tries: int = 4  # keep the busiest of this many candidate crops (1 = uniform random crop)
    # every image resized to square x square px first (as `tokenize-images --square`), for a
    # tokenizer of square models; crop == square trains on whole images
    square: int | None = None
    # with square None: this share of images is resized whole to crop x crop px instead of cropped
    # (the view `tokenize-images --square crop` gives a square Chameleon model: objects smaller than
    # in native-size crops)
    square_prob: float = 0.0


def parse_model_section(model_cfg: dict, where: str = "model") -> tuple[VQConfig, VQLossConfig]:
    model_cfg = dict(model_cfg or {})
    preset = model_cfg.pop("preset", "shapes-f8")
    if preset not in PRESETS:
        raise UsageError(f"{where}: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    loss = from_dict(VQLossConfig, model_cfg.pop("loss", {}), where=f"{where}: key 'loss'")
    vq = from_dict(VQConfig, {**PRESETS[preset], **model_cfg}, where=where)
    return vq, loss


def image_to_tensor(img) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class CropImages:
    """map_fn: doc -> (k, 3, crop, crop) crops of its images, or None if it has none.

    Crop offsets come from a hash of (seed, key, image index, epoch): deterministic, so a
    resumed stream sees exactly the crops it would have seen. The epoch is read from
    `doc["__epoch__"]` when the reader supplies it (absent = 0); without it every epoch
    repeats the same crop of an image, which costs ~0.8 dB PSNR at 8 epochs (docs/tokenizers.md).
    Module-level and picklable.

    Of `tries` candidate crops the one with the most pixel variance is kept: flat background
    crops teach nothing after the first steps, edges are where reconstruction error lives.
    """

    def __init__(self, crop: int, flip: bool, seed: int, max_images: int, tries: int = 1, square: int | None = None,
                 square_prob: float = 0.0):
        self.crop, self.flip, self.seed, self.max_images, self.tries = crop, flip, seed, max_images, max(1, tries)
        self.square, self.square_prob = square, square_prob

    def _draw(self, doc, i: int, salt: str, tag: str) -> int:
        """A 64-bit draw fixed by (seed, sample key, image index, salt, epoch tag)."""
        h = hashlib.blake2b(f"{self.seed}/{doc.get('__key__')}/{i}/{salt}{tag}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little")

    def __call__(self, doc):
        out = []
        epoch = int(doc.get("__epoch__") or 0)
        tag = f"/e{epoch}" if epoch else ""  # epoch 0 keeps the historical crops
        for i, img in enumerate(x for x in doc.get("images", []) if x is not None):
            if i >= self.max_images:
                break
            c = self.crop
            if self.square_prob:
                r = self._draw(doc, i, "sq", tag)
                if r / 2**64 < self.square_prob:
                    x = vq_pixels(img, c)  # (3, c, c): the whole image, squashed
                    out.append(x.flip(-1) if self.flip and r & 1 else x)
                    continue
            x = vq_pixels(img, self.square)  # (3, H, W)
            _, H, W = x.shape
            if H < c or W < c:
                x = torch.nn.functional.pad(x[None], (0, max(0, c - W), 0, max(0, c - H)), mode="replicate")[0]
                _, H, W = x.shape
            best, best_var = None, -1.0
            for t in range(self.tries):
                r = self._draw(doc, i, str(t), tag)
                top, left = r % (H - c + 1), (r >> 20) % (W - c + 1)
                cand = x[:, top:top + c, left:left + c]
                var = float(cand.var()) if self.tries > 1 else 0.0
                if var > best_var:
                    best, best_var = (cand.flip(-1) if self.flip and (r >> 40) & 1 else cand), var
            out.append(best)
        return torch.stack(out) if out else None


def collate_crops(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"images": torch.cat(items)}  # (N, 3, c, c)


# Called with the VQ model right after `save_final`'s codebook refit, before the decoder
# fine-tune: from then on every code is final (the fine-tune trains the decoder only), so a
# caller can start encoding images while the decoder trains (the quickstart's codes stage).
AFTER_REFIT: list[Callable[[VQModel], None]] = []


@register_task("vq")
class VQTask:
    """The VQ tokenizer as the engine sees it (see mmkit.train.task.Task)."""

    def __init__(self, model_cfg: dict, data_cfg: dict, *, seed: int = 0, out_dir: str = "."):
        self.vq_cfg, self.loss_cfg = parse_model_section(model_cfg)
        self.data_cfg = from_dict(VQDataConfig, data_cfg, where="data")
        if self.data_cfg.crop % self.vq_cfg.downsample or self.data_cfg.crop < self.vq_cfg.downsample:
            raise UsageError(f"data.crop {self.data_cfg.crop} must be a positive multiple of the "
                             f"downsampling factor {self.vq_cfg.downsample}")
        if self.data_cfg.square is not None:
            check_square(self.data_cfg.square, self.vq_cfg.downsample, "data.square")
            if self.data_cfg.crop > self.data_cfg.square:
                raise UsageError(f"data.crop {self.data_cfg.crop} exceeds data.square {self.data_cfg.square}")
        if not 0.0 <= self.data_cfg.square_prob <= 1.0:
            raise UsageError(f"data.square_prob {self.data_cfg.square_prob} must lie in [0, 1]")
        if self.data_cfg.square_prob and self.data_cfg.square is not None:
            raise UsageError("data.square_prob needs data.square null (with data.square every image is square already)")
        if self.loss_cfg.codebook_refit_batches and self.vq_cfg.quantizer != "vq":
            raise UsageError(f"model.loss.codebook_refit_batches: the codebook refit needs quantizer 'vq', not "
                             f"'{self.vq_cfg.quantizer}' (set it to 0)")
        self.seed, self.out_dir = seed, out_dir

    def build_model(self) -> nn.Module:
        return VQTrainer(VQModel(self.vq_cfg), self.loss_cfg)

    def batches(self, *, rank: int = 0, world_size: int = 1, batch_size: int, num_workers: int = 0):
        from mmkit.data import build_stream

        d = self.data_cfg
        if d.sources is None:
            raise UsageError("vq task: no training data (set data.sources or pass --data DIR)")
        return build_stream(
            d.sources, batch_size=batch_size, collate_fn=collate_crops,
            map_fn=CropImages(d.crop, d.flip, self.seed, d.max_images_per_sample, d.crop_tries, d.square, d.square_prob),
            seed=self.seed,
            rank=rank, world_size=world_size, num_workers=num_workers, decode_images=True,
            shuffle_buffer=d.shuffle_buffer, infinite=True,
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]):
        images = batch["images"]
        device = next(model.parameters()).device
        loss, codes, metrics = model(images.to(device))
        metrics["tokens"] = float(codes.numel())
        return loss, metrics

    def on_optimizer_step(self, model: nn.Module) -> None:
        getattr(model, "module", model).step += 1

    @torch.no_grad()
    def sample(self, model: nn.Module, step: int, out_dir: str) -> None:
        """Save originals (top) and reconstructions (bottom) of a fixed batch as a PNG grid."""
        vq = getattr(model, "module", model).vq
        try:
            batch = next(iter(self.batches(batch_size=8)))
        except Exception:  # sampling must never kill a training run
            return
        was_training = vq.training
        vq.eval()
        x = batch["images"][:8].to(next(vq.parameters()).device)
        y = vq.decode(vq.encode(x))
        vq.train(was_training)
        save_grid(torch.cat([x, y]), Path(out_dir) / f"vq_step{step:07d}.png", nrow=len(x))

    def save_final(self, model: nn.Module, out_dir: str) -> None:
        vq = getattr(model, "module", model).vq
        if self.loss_cfg.codebook_refit_batches:
            self.refit_codebook(vq)
        for fn in AFTER_REFIT:
            fn(vq)
        if self.loss_cfg.decoder_finetune_steps:
            self.finetune_decoder(vq)
        vq.save_pretrained(out_dir)

    def finetune_decoder(self, vq: VQModel) -> dict[str, float]:
        """Train decoder + post_quant_conv on full training images whose codes stay fixed.

        Why: the main loop sees crops (cheap) but the tokenizer decodes whole images, whose
        statistics (GroupNorm, borders) differ, and the refit just moved the codebook. A short
        decoder-only pass on full images with frozen codes fixes both (+0.9 dB in 400 steps,
        docs/tokenizers.md); the encoder and codebook, i.e. every code, are unchanged.
        """
        from mmkit.vq.evaluate import iter_shard_images  # (evaluate imports this module)

        cfg = self.loss_cfg
        device = next(vq.parameters()).device
        vq.eval()
        images = list(iter_shard_images(self.data_cfg.sources, limit=cfg.decoder_finetune_images,
                                        square=self.data_cfg.square))
        if not images:
            return {}
        buckets: dict[tuple, list[int]] = {}
        for i, x in enumerate(images):
            buckets.setdefault(tuple(x.shape), []).append(i)
        codes: list[torch.Tensor] = [None] * len(images)  # (1, h, w) each: the fixed codes of the targets
        for idx in buckets.values():  # one encode per size, in chunks (not one call per image)
            for s in range(0, len(idx), 64):
                chunk = idx[s:s + 64]
                for i, c in zip(chunk, vq.encode(torch.stack([images[i] for i in chunk]).to(device))):
                    codes[i] = c[None]
        frozen = {n: p.requires_grad for n, p in vq.named_parameters()}
        params = []
        for n, p in vq.named_parameters():
            p.requires_grad_(n.startswith(("decoder.", "post_quant_conv.")))
            if p.requires_grad:
                params.append(p)
        opt = torch.optim.AdamW(params, lr=cfg.decoder_finetune_lr, betas=(0.9, 0.95), weight_decay=0.0)
        rng = random.Random(f"{self.seed}-decoder-finetune")
        sizes = sorted(buckets)
        vq.train()
        losses = []
        for step in range(cfg.decoder_finetune_steps):
            for g in opt.param_groups:  # cosine to 0
                g["lr"] = cfg.decoder_finetune_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_finetune_steps))
            idx = buckets[rng.choice(sizes)]
            idx = rng.sample(idx, min(cfg.decoder_finetune_batch, len(idx)))
            x = torch.stack([images[i] for i in idx]).to(device)  # (b, 3, H, W)
            c = torch.cat([codes[i] for i in idx])  # (b, h, w)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.decoder_finetune_bf16):
                y = vq.decode_latents(vq.quantize.embed(c))
            loss = reconstruction_loss(y.float() - x, cfg.recon)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        k = max(1, len(losses) // 10)  # batches differ in size and content: compare averages
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        for n, p in vq.named_parameters():
            p.requires_grad_(frozen[n])
        vq.eval()
        print(f"mmkit train: decoder fine-tune on {len(images)} full images, {cfg.decoder_finetune_steps} steps: "
              f"mean loss of the first / last 10% {first:.4f} -> {last:.4f}", file=sys.stderr, flush=True)
        return {"first_loss": first, "last_loss": last}

    @torch.no_grad()
    def refit_codebook(self, vq: VQModel, batch_size: int = 16) -> dict[str, float]:
        """k-means refit of the codebook on the latents of `codebook_refit_batches` training batches."""
        was_training = vq.training
        vq.eval()
        device = next(vq.parameters()).device
        latents = []
        stream = iter(self.batches(batch_size=batch_size))
        for _ in range(self.loss_cfg.codebook_refit_batches):
            z = vq.latents(next(stream)["images"].to(device))  # (B, D, h, w)
            latents.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())
        stats = vq.quantize.refit_codebook(torch.cat(latents), iters=self.loss_cfg.codebook_refit_iters)
        vq.train(was_training)
        print(f"mmkit train: codebook refit on {sum(len(t) for t in latents)} latents: quantization error "
              f"{stats['qerr_before']:.5f} -> {stats['qerr_after']:.5f}", file=sys.stderr, flush=True)
        return stats


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from PIL import Image

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()  # (N, 3, H, W)
    N, C, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.zeros(C, rows * H, nrow * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
