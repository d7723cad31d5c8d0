"""High-level generation for saved model directories: answer, caption, text-to-image, interleaved.

`load_pipeline(model_dir)` reads `config.json`'s model_type and returns the family's
pipeline. Prompts come from `mmkit.data.templates` (the same strings training used), and
every call goes through the one sampling core (`mmkit.generation.sampler.generate`).

Chameleon family: images enter as VQ codes (`DIR/vq/`), laid out exactly as the sampler
lays out generated images (boi [size tokens] rows of codes [eor] eoi). Kimi-VL family:
images enter through the family's processor (ViT patches; features in the prefill only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mmkit.data.templates import caption_prompt, postprocess_answer, t2i_prompt
from mmkit.errors import MmkitError, UsageError
from mmkit.generation.sampler import (
    IMAGE_SAMPLING,
    SamplingParams,
    generate,
    image_layout_from_config,
    left_pad,
)

CHAMELEON_TYPES = ("mmkit_chameleon", "chameleon")
KIMIVL_TYPES = ("mmkit_kimivl", "kimi_k25", "kimi_vl")
# Text settings for free-form (interleaved) generation: Meta Chameleon's defaults.
STORY_SAMPLING = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)


def _open_image(img):
    from PIL import Image

    if img is None:
        raise UsageError("missing image")
    if isinstance(img, (str, Path)):
        if not Path(img).is_file():
            raise UsageError(f"no such image file: {img}")
        with Image.open(img) as f:
            return f.convert("RGB")
    # RGB images pass through uncopied: answer() opens each image and _pixels opens it again
    return img if img.mode == "RGB" else img.convert("RGB")


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _TextMixin:
    """Shared text-side helpers (tokenizer, stopping, decoding, batching)."""

    tokenizer = None
    model = None
    batch_size = 16
    max_new_tokens = 32
    progress = False

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: torch.Tensor) -> str:
        eos = self.model.config.eos_token_id
        row = ids.tolist()
        if eos in row:
            row = row[:row.index(eos)]
        return self.tokenizer.decode(row, skip_special_tokens=True)


class ChameleonPipeline(_TextMixin):
    """Chameleon-family pipeline: model + text tokenizer + VQ tokenizer."""

    family = "chameleon"

    def __init__(self, model, tokenizer, vq, *, batch_size: int = 16, max_new_tokens: int = 32,
                 text_sampling: SamplingParams | None = None, image_sampling: SamplingParams | None = None,
                 progress: bool = False):
        self.model, self.tokenizer, self.vq = model.eval(), tokenizer, vq
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        self.text_sampling = text_sampling or SamplingParams()
        self.image_sampling = image_sampling or IMAGE_SAMPLING
        cfg = model.config
        self.layout = image_layout_from_config(cfg)
        if self.layout is None:
            raise MmkitError("model config has no image vocabulary (boi/eoi/image_token_offset)")
        from mmkit.models.chameleon.processor import ChameleonProcessor

        self.processor = ChameleonProcessor.from_config(tokenizer, cfg)  # training's token layout
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        # inside answers and captions nothing image-related may appear
        self._no_image = [t for t in (cfg.boi_token_id, cfg.eoi_token_id, getattr(cfg, "eor_token_id", None),
                                      getattr(cfg, "image_token_id", None)) if t is not None]

    @property
    def device(self):
        return next(self.model.parameters()).device

    # -- images <-> tokens ------------------------------------------------------------
    def _native_size(self, w: int, h: int) -> tuple[int, int]:
        """Multi-resolution models read an image at its own size, rounded to the VQ grid (capped)."""
        f = int(getattr(self.vq.config, "downsample", 8))
        cap = (getattr(self.model.config, "max_grid_size", 0) or 10 ** 6) * f
        s = min(1.0, cap / max(w, h))
        return max(f, round(w * s / f) * f), max(f, round(h * s / f) * f)

    def _pixels(self, images) -> torch.Tensor:
        """PIL images -> (B, 3, R, R) in [-1, 1]: short side resized, centre crop (Chameleon).

        Square models (`config.image_size` S): every image resized to S x S (no crop).

        Multi-resolution models (size tokens in the layout): (B, 3, H, W) at the images'
        own size (as `mmkit data tokenize-images` stored the training codes), no crop.
        """
        from mmkit.vq.tokenize_shards import vq_pixels

        res = int(getattr(self.vq.config, "resolution", 64))
        square = getattr(self.model.config, "image_size", None)
        out = []
        for img in images:
            img = _open_image(img)
            if not square:  # (square models: vq_pixels resizes as `mmkit data tokenize-images --square` did)
                img = self._fit_resolution(img, res)
            out.append(vq_pixels(img, square))
        vq_p = next(self.vq.parameters())
        return torch.stack(out).to(device=vq_p.device, dtype=vq_p.dtype)

    def _fit_resolution(self, img, res: int):
        """Multi-resolution models: the nearest native size; others: short side to `res`, centre crop."""
        from PIL import Image

        w, h = img.size
        if self.layout.size_offset is not None:
            size = self._native_size(w, h)
            return img if size == (w, h) else img.resize(size, Image.LANCZOS)
        if (w, h) == (res, res):  # the training resolution: pixels exactly as in training
            return img
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.LANCZOS)
        w, h = img.size
        left, top = (w - res) // 2, (h - res) // 2
        return img.crop((left, top, left + res, top + res))

    def image_tokens(self, codes: torch.Tensor, source_size: tuple[int, int] | None = None) -> list[int]:
        """codes (h, w) -> boi [size tokens] rows of code ids [eor] eoi: the training processor's layout
        (`source_size`: (w, h) px of the image the codes came from, for source_size_tokens models)."""
        return self.processor.image_ids(codes, source_size)

    def encode_images(self, images) -> torch.Tensor | list[torch.Tensor]:
        """PIL images -> VQ codes (B, h, w); multi-resolution models: a list of (h_i, w_i)."""
        if self.layout.size_offset is not None and not getattr(self.model.config, "image_size", None):
            return [self.vq.encode(self._pixels([im]))[0] for im in images]
        return self.vq.encode(self._pixels(images))

    def decode_codes(self, codes: torch.Tensor) -> list:
        """codes (B, h, w) -> PIL images."""
        from PIL import Image

        x = self.vq.decode(codes.to(next(self.vq.parameters()).device))  # (B, 3, H, W) in [-1, 1]
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    # -- understanding ------------------------------------------------------------------
    def _run_text(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[str]:
        out: list[str] = []
        p = self.text_sampling
        for idx in _chunks(len(prompts), self.batch_size):
            ids, mask = left_pad([prompts[i] for i in idx], self.pad, self.device)
            new = generate(self.model, ids, max_new_tokens or self.max_new_tokens, attention_mask=mask,
                           do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                           repetition_penalty=p.repetition_penalty, seed=list(idx), suppress_tokens=self._no_image,
                           progress=self.progress)
            out += [self._decode(r) for r in new.cpu()]
        return out

    def _image_prompt(self, image, text: str) -> list[int]:
        image = _open_image(image)
        codes = self.encode_images([image])[0]
        return [self.model.config.bos_token_id] + self.image_tokens(codes, image.size) + self._text_ids(text)

    def generate_text(self, prompt: str, images: Sequence = (), max_new_tokens: int | None = None) -> str:
        """Free text after [images...] + prompt."""
        ids = [self.model.config.bos_token_id]
        if images:
            images = [_open_image(im) for im in images]
            for c, im in zip(self.encode_images(images), images):
                ids += self.image_tokens(c, im.size)
        return self._run_text([ids + self._text_ids(prompt)], max_new_tokens)[0]

    def answer(self, images, questions) -> list[str]:
        if len(images) != len(questions):
            raise UsageError(f"{len(images)} images but {len(questions)} questions")
        images = [_open_image(im) for im in images]
        codes = self.encode_images(images)
        prompts = [self.processor.vqa_prompt_ids(c, q, im.size)  # training's layout
                   for c, q, im in zip(codes, questions, images)]
        return [postprocess_answer(a) for a in self._run_text(prompts)]

    def caption(self, images) -> list[str]:
        prompts = [self._image_prompt(im, caption_prompt()) for im in images]
        return [postprocess_answer(c) for c in self._run_text(prompts)]

    # -- generation ---------------------------------------------------------------------
    def t2i_ids(self, caption: str | None) -> list[int]:
        """bos + the training template + boi (condition dropout used t2i_prompt(None))."""
        return [self.model.config.bos_token_id] + self._text_ids(t2i_prompt(caption)) + [self.layout.boi]

    def generate_image_codes(self, prompts: Sequence[str], cfg_scale: float = 3.0, seed: int = 0, n: int = 1,
                             size: tuple[int, int] | None = None) -> torch.Tensor:
        """-> codes (len(prompts) * n, h, w), prompt-major; image i uses seed + i.
        `size` (h, w): the code grid; for source_size_tokens models the source size asked for
        in VQ-factor units (the grid stays the model's square; default a square source)."""
        if n < 1:
            raise UsageError(f"n must be >= 1 (got {n})")
        layout = self._gen_layout(size)
        rows = [self.t2i_ids(p) for p in prompts for _ in range(n)]
        uncond = torch.tensor([self.t2i_ids(None)], device=self.device)
        out = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) * layout.span_len, unit="tok", desc="image tokens")
        for idx in _chunks(len(rows), self.batch_size):
            ids, mask = left_pad([rows[i] for i in idx], self.pad, self.device)
            kw = dict(cfg_scale=cfg_scale, uncond_input_ids=uncond) if cfg_scale != 1.0 else {}
            new = generate(self.model, ids, layout.span_len, attention_mask=mask, mode="image",
                           image_sampling=self.image_sampling, image_size=(layout.h, layout.w),
                           image_size_tokens=layout.size_tokens,
                           seed=[seed + i for i in idx], progress=bar if bar is not None else False, **kw)
            out += [layout.codes_from_span(r) for r in new.cpu().tolist()]
        if bar is not None:
            bar.close()
        return torch.stack(out)

    def _gen_layout(self, size: tuple[int, int] | None):
        if getattr(self.model.config, "source_size_tokens", False):
            return image_layout_from_config(self.model.config, size_tokens=size)
        return image_layout_from_config(self.model.config, *(size or (None, None)))

    def generate_images(self, prompts: Sequence[str], cfg_scale: float = 3.0, seed: int = 0, n: int = 1,
                        size: tuple[int, int] | None = None) -> list:
        """Text-to-image: `n` PIL images per prompt, prompt-major. Source_size_tokens models
        draw a square image at the model's size and resize it to the asked source aspect."""
        if isinstance(prompts, str):
            prompts = [prompts]
        images = self.decode_codes(self.generate_image_codes(prompts, cfg_scale, seed, n, size))
        layout = self._gen_layout(size)
        if layout.size_tokens is not None:
            from PIL import Image

            f = self.model.config.image_size // layout.h
            wh = (layout.size_tokens[1] * f, layout.size_tokens[0] * f)
            images = [im if im.size == wh else im.resize(wh, Image.LANCZOS) for im in images]
        return images

    def interleaved(self, prompt: str, max_new_tokens: int | None = None, seed: int = 0,
                    text_sampling: SamplingParams | None = None):
        """Anole-style text and images in one output -> (document in the shard schema, PIL images)."""
        from mmkit.generation.interleaved import split_document

        budget = max_new_tokens or 4 * (self.layout.span_len + 1) + 64
        p = text_sampling or STORY_SAMPLING
        ids = torch.tensor([[self.model.config.bos_token_id] + self._text_ids(prompt)], device=self.device)
        new = generate(self.model, ids, budget, mode="interleaved", do_sample=p.do_sample, temperature=p.temperature,
                       top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                       image_sampling=self.image_sampling, seed=[seed], progress=self.progress)
        return split_document(self, prompt, new[0].cpu().tolist())


class KimiVLPipeline(_TextMixin):
    """Kimi-VL-family pipeline: understanding only (answer, caption, free text)."""

    family = "kimivl"

    def __init__(self, model, processor, *, batch_size: int = 16, max_new_tokens: int = 32,
                 text_sampling: SamplingParams | None = None, progress: bool = False):
        self.model, self.processor, self.tokenizer = model.eval(), processor, processor.tokenizer
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        self.text_sampling = text_sampling or SamplingParams()
        cfg = model.config
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        self._no_image = [t for t in (getattr(cfg, "image_token_id", None), getattr(cfg, "boi_token_id", None),
                                      getattr(cfg, "eoi_token_id", None)) if t is not None]

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _run(self, rows: list[list], max_new_tokens: int | None = None) -> list[str]:
        from mmkit.models.kimivl.processor import collate_left_padded

        out: list[str] = []
        p = self.text_sampling
        dtype = next(self.model.parameters()).dtype
        for idx in _chunks(len(rows), self.batch_size):
            enc = collate_left_padded([self.processor.encode(rows[i]) for i in idx], self.pad)
            extra = {}
            if "pixel_values" in enc:
                extra = dict(pixel_values=enc["pixel_values"].to(self.device, dtype),
                             image_grid_thw=enc["image_grid_thw"].to(self.device))
            new = generate(self.model, enc["input_ids"].to(self.device), max_new_tokens or self.max_new_tokens,
                           attention_mask=enc["attention_mask"].to(self.device), do_sample=p.do_sample,
                           temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                           repetition_penalty=p.repetition_penalty, seed=list(idx), suppress_tokens=self._no_image,
                           prefill_kwargs=extra, progress=self.progress)
            out += [self._decode(r) for r in new.cpu()]
        return out

    def generate_text(self, prompt: str, images: Sequence = (), max_new_tokens: int | None = None) -> str:
        return self._run([[_open_image(im) for im in images] + [prompt]], max_new_tokens)[0]

    def answer(self, images, questions) -> list[str]:
        if len(images) != len(questions):
            raise UsageError(f"{len(images)} images but {len(questions)} questions")
        # the processor knows the layout the model was trained with (image or question first)
        rows = [self.processor.vqa_segments(_open_image(im), q) for im, q in zip(images, questions)]
        return [postprocess_answer(a) for a in self._run(rows)]

    def caption(self, images) -> list[str]:
        return [postprocess_answer(c) for c in self._run([self.processor.caption_segments(_open_image(im))
                                                          for im in images])]

    def generate_images(self, *a, **k):
        raise UsageError("the Kimi-VL family reads images but does not generate them (use a Chameleon-family model)")

    def interleaved(self, *a, **k):
        raise UsageError("interleaved image generation needs a Chameleon-family model")


def load_pipeline(model_dir, device=None, dtype=None, **kwargs):
    """A pipeline for the model saved in `model_dir` (Chameleon or Kimi-VL family)."""
    import mmkit
    from mmkit.models import read_model_config

    path = Path(model_dir)
    model_type = read_model_config(path).get("model_type")
    device = _default_device(device)
    if model_type in CHAMELEON_TYPES:
        from transformers import AutoTokenizer

        from mmkit.vq.model import VQModel

        model = mmkit.load_model(path).to(device=device, dtype=dtype or torch.float32)
        if not (path / "vq" / "config.json").is_file():
            raise UsageError(f"{path}: no VQ tokenizer in {path / 'vq'} (needed to read and draw images)")
        vq = VQModel.from_pretrained(path / "vq", device=device)
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means no usable tokenizer files
            raise UsageError(f"{path}: no loadable text tokenizer ({type(e).__name__})") from None
        return ChameleonPipeline(model, tok, vq, **kwargs)
    if model_type in KIMIVL_TYPES:
        from mmkit.models.kimivl.processor import KimiVLProcessor

        model = mmkit.load_model(path).to(device=device, dtype=dtype or torch.float32)
        return KimiVLPipeline(model, KimiVLProcessor.from_pretrained(path), **kwargs)
    raise UsageError(f"{path}: model_type {model_type!r} has no generation pipeline "
                     f"(known: {', '.join(CHAMELEON_TYPES + KIMIVL_TYPES)})")
