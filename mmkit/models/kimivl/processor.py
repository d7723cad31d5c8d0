"""Images + text -> model inputs for the Kimi-VL family.

Image side (transformers' Kimi-K2.5 `navit_resize` policy): scale down (never up) so the
image fits `max_patches` patches and `max_patches_per_side` per side, then make each side a
multiple of patch x merge (= 28) by zero-padding bottom/right (`pad_mode="pad"`, Kimi-VL's
`pad_input`) or by a bicubic resize (`"resize"`), or resize to a square of the padded long side
(`"square"`: every image gets the same token grid; for data laid out on a fixed grid such as the
shapes world's 3x3 cells, whose objects then fall into one token each); normalise; patchify to `pixel_values`
(N, 3, p, p) in raster order per image and `image_grid_thw` rows (1, h, w).

Text side: each image becomes `<boi>` + `<image>` x (h*w / merge^2) + `<eoi>` (one
placeholder per merged token; the model scatters the projected features there).
`vqa_segments` / `caption_segments` lay out the prompts (training and inference both use them):
`prompt_order="image_first"` is `[image] Question: q Answer:`; `"question_first"` is
`Question: q [image] Answer:`, so that in the causal decoder the image positions can attend to
the question (conditional encoding: each image token can work out whether it is the object
asked about). The order is saved with the processor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from mmkit.data import templates as T
from mmkit.errors import UsageError
from mmkit.text.tokenizer import TextIds

PROCESSOR_FILE = "kimivl_processor.json"
PROMPT_ORDERS = ("image_first", "question_first")


@dataclass
class ImageProcessorConfig:
    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_patches_per_side: int = 512
    pad_mode: Literal["pad", "resize", "square"] = "pad"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # pad_mode "square" only: side in pixels every image is resized to (up or down; a multiple of
    # patch x merge). 0: the padded long side of navit_resize (never scales up)
    square_side: int = 0

    def __post_init__(self):
        if self.square_side and (self.pad_mode != "square" or self.square_side % (self.patch_size * self.merge_size)):
            raise UsageError(f"square_side={self.square_side} needs pad_mode 'square' and a multiple of "
                             f"patch x merge = {self.patch_size * self.merge_size}")


def navit_resize(height: int, width: int, patch: int, merge: int, max_patches: int, max_side: int):
    """(resized_h, resized_w), (padded_h, padded_w): transformers' Kimi-K2.5 policy."""
    nh, nw = max(1.0, height // patch), max(1.0, width // patch)
    scale = min(1.0, math.sqrt(max_patches / (nh * nw)), max_side * patch / height, max_side * patch / width)
    new_h = min(max(1, int(height * scale)), max_side * patch)
    new_w = min(max(1, int(width * scale)), max_side * patch)
    f = patch * merge
    return (new_h, new_w), (-(-new_h // f) * f, -(-new_w // f) * f)


class KimiVLImageProcessor:
    def __init__(self, config: ImageProcessorConfig | None = None, **kw):
        self.config = config or ImageProcessorConfig(**kw)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) in pixels of the array an image of this size becomes."""
        c = self.config
        _, (ph, pw) = navit_resize(height, width, c.patch_size, c.merge_size, c.max_patches, c.max_patches_per_side)
        if c.pad_mode == "square":
            ph = pw = c.square_side or max(ph, pw)
        return ph, pw

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) an image of this size becomes."""
        ph, pw = self.padded_size(height, width)
        return ph // self.config.patch_size, pw // self.config.patch_size

    def to_array(self, image: Image.Image) -> np.ndarray:
        """PIL -> resized/padded float32 (3, H, W) in [0, 1]."""
        c = self.config
        image = image.convert("RGB")
        w, h = image.size
        (rh, rw), _ = navit_resize(h, w, c.patch_size, c.merge_size, c.max_patches, c.max_patches_per_side)
        ph, pw = self.padded_size(h, w)
        if c.pad_mode in ("resize", "square"):
            if (ph, pw) != (h, w):
                image = image.resize((pw, ph), Image.BICUBIC)
            arr = np.asarray(image, dtype=np.float32) / 255.0
        else:
            if (rh, rw) != (h, w):
                image = image.resize((rw, rh), Image.BICUBIC)
            arr = np.zeros((ph, pw, 3), dtype=np.float32)  # zero pad bottom/right, before normalising
            arr[:rh, :rw] = np.asarray(image, dtype=np.float32) / 255.0
        return arr.transpose(2, 0, 1)

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        c = self.config
        p = c.patch_size
        mean = np.asarray(c.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(c.image_std, dtype=np.float32)[:, None, None]
        patches, grids = [], []
        for image in images:
            arr = (self.to_array(image) - mean) / std  # (3, H, W)
            gh, gw = arr.shape[1] // p, arr.shape[2] // p
            # (3, gh, p, gw, p) -> (gh, gw, 3, p, p): raster order of patches
            patches.append(arr.reshape(3, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p))
            grids.append([1, gh, gw])
        if not patches:
            return {"pixel_values": torch.zeros(0, 3, p, p), "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
        return {"pixel_values": torch.from_numpy(np.concatenate(patches)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


class KimiVLProcessor:
    """Tokenizer + image processor; `encode` turns an interleaved list into ids and pixels."""

    def __init__(self, tokenizer, image_processor: KimiVLImageProcessor | None = None,
                 image_token: str = "<image>", boi_token: str = "<boi>", eoi_token: str = "<eoi>",
                 prompt_order: str = "image_first"):
        if prompt_order not in PROMPT_ORDERS:
            raise UsageError(f"prompt_order must be one of {', '.join(PROMPT_ORDERS)}, got {prompt_order!r}")
        self.tokenizer = tokenizer
        self.text_ids = TextIds(tokenizer)  # text -> ids, memoised (the stream's texts repeat)
        self.image_processor = image_processor or KimiVLImageProcessor()
        self.prompt_order = prompt_order
        ids = []
        for tok in (image_token, boi_token, eoi_token):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise UsageError(f"tokenizer has no special token {tok!r}")
            ids.append(int(i))
        self.image_token_id, self.boi_token_id, self.eoi_token_id = ids

    @property
    def merge_area(self) -> int:
        return self.image_processor.config.merge_size ** 2

    def num_image_tokens(self, grid_hw: tuple[int, int]) -> int:
        return grid_hw[0] * grid_hw[1] // self.merge_area

    def image_token_ids(self, grid_hw: tuple[int, int]) -> list[int]:
        return [self.boi_token_id] + [self.image_token_id] * self.num_image_tokens(grid_hw) + [self.eoi_token_id]

    def vqa_segments(self, image, question: str) -> list:
        """The segments `encode` takes for one VQA prompt; the answer follows as " {answer}"."""
        if self.prompt_order == "question_first":  # "Question: q" [image] "Answer:"
            return [T.vqa_question(question), image, T.VQA_ANSWER_CUE]
        return [image, T.vqa_prompt(question)]

    def caption_segments(self, image) -> list:
        """The segments for a caption prompt (image first in both orders: nothing to condition on)."""
        return [image, T.caption_prompt()]

    def encode(self, segments: Sequence[str | Image.Image], add_bos: bool = True) -> dict:
        """Interleaved [text | image, ...] -> {"input_ids": list[int], "pixel_values", "image_grid_thw",
        "spans": [(start, end, kind)]} where kind is "text" or "image" (end exclusive)."""
        images = [s for s in segments if not isinstance(s, str)]
        pix = self.image_processor(images)
        ids: list[int] = [self.tokenizer.bos_token_id] if add_bos else []
        spans, k = [], 0
        for seg in segments:
            start = len(ids)
            if isinstance(seg, str):
                ids += self.text_ids(seg)
                spans.append((start, len(ids), "text"))
            else:
                _, h, w = pix["image_grid_thw"][k].tolist()
                ids += self.image_token_ids((h, w))
                spans.append((start, len(ids), "image"))
                k += 1
        return {"input_ids": ids, "pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"],
                "spans": spans}

    def __call__(self, text: str | list[str], images: Sequence[Image.Image] | None = None, add_bos: bool = True):
        """Texts with literal `<image>` markers (one per image, in order) -> padded batch tensors.

        Each marker expands to `<boi>` + placeholders + `<eoi>`; left padding (for generation).
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        marker = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        n_markers = sum(t.count(marker) for t in texts)
        if n_markers != len(images):
            raise UsageError(f"{n_markers} {marker} markers in the text but {len(images)} images")
        rows, k = [], 0
        for t in texts:
            segs: list = []
            parts = t.split(marker)
            for i, part in enumerate(parts):
                if part:
                    segs.append(part)
                if i < len(parts) - 1:
                    segs.append(images[k])
                    k += 1
            rows.append(segs)
        encoded = [self.encode(r, add_bos=add_bos) for r in rows]
        return collate_left_padded(encoded, self.tokenizer.pad_token_id)

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        data = asdict(self.image_processor.config) | {"prompt_order": self.prompt_order}
        (path / PROCESSOR_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def from_pretrained(cls, path) -> "KimiVLProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        cfg, order = ImageProcessorConfig(), "image_first"
        if (path / PROCESSOR_FILE).is_file():
            data = json.loads((path / PROCESSOR_FILE).read_text())
            order = data.pop("prompt_order", order)  # files written before prompt orders existed: image first
            data["image_mean"], data["image_std"] = tuple(data["image_mean"]), tuple(data["image_std"])
            cfg = ImageProcessorConfig(**data)
        return cls(AutoTokenizer.from_pretrained(str(path)), KimiVLImageProcessor(cfg), prompt_order=order)


def collate_left_padded(encoded: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad `input_ids`; concatenate pixels in row order (the order the placeholders appear)."""
    T = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, T - n:] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, T - n:] = 1
    pv = [e["pixel_values"] for e in encoded if len(e["pixel_values"])]
    grids = [e["image_grid_thw"] for e in encoded if len(e["image_grid_thw"])]
    out = {"input_ids": ids, "attention_mask": mask}
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.cat(grids)
    return out
