"""Interleaved documents -> one token sequence over the unified vocabulary (early fusion).

Text goes through the text tokenizer (ids [0, V_text)); each image becomes
`boi [<h> <w>] (w codes [eor]) * h eoi` with code c at id `image_token_offset + c` (size
and end-of-row tokens only for multi-resolution models, Lumina-mGPT / Emu3 manner); with
`image_block` b > 1 a token row is a row of b x b code blocks, each block's codes consecutive. The
layout is the sampler's `ImageLayout`, so what the model reads in training is exactly what
it writes at inference. Images come as VQ codes (the `image_codes` field added by
`mmkit data tokenize-images`) or as PIL images encoded with a VQ model.

Training formats use `mmkit.data.templates` (same strings as inference):
  vqa:         bos image "Question: q Answer:" " a" eos         (loss on " a" eos)
               (question_first: bos "Question: q" image "Question: q Answer:" " a" eos)
               [+ more "Question: .. Answer:" " a" eos turns about the same image, optional]
  caption:     bos image "Caption:" " c" eos                    (loss on " c" eos)
  t2i:         bos "Draw: c" image eos                          (loss on the image span + eos)
  interleaved: bos text/image ... eos                           (loss on everything)
Each token carries a modality (text / image) so the loss can be text-only, image-only or
weighted per modality.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmkit.data import templates
from mmkit.data.shapes import more_vqa
from mmkit.errors import UsageError
from mmkit.text.tokenizer import TextIds

TEXT, IMAGE = 0, 1  # modality of a target token (image = codes and the boi/eoi/row/size tokens)


@dataclass
class Encoded:
    """One training sequence: ids, which tokens are supervised, their modality."""

    input_ids: list[int]
    supervised: list[bool]
    modality: list[int]
    task: str = "interleaved"  # vqa | caption | t2i | interleaved: per-task loss weights
    bidi: list[bool] | None = None  # tokens of an input image span read bidirectionally (image_bidi)

    def __len__(self) -> int:
        return len(self.input_ids)


def _stored_codes(doc: dict, i: int) -> dict | None:
    """The `image_codes` entry of image i of a reader doc ({"h", "w", "codes", ...}), or None."""
    stored = (doc.get("meta") or {}).get("image_codes") or doc.get("image_codes")
    return stored[i] if stored and i < len(stored) else None


def _doc_image(doc: dict, i: int):
    """Image i of a reader doc (PIL, encoded bytes when not decoded, or None)."""
    images = doc.get("images") or []
    return images[i] if i < len(images) else None


class ChameleonProcessor:
    """Token layout of the Chameleon family; built from a model config and a text tokenizer."""

    def __init__(self, tokenizer, *, bos_token_id: int, eos_token_id: int, boi_token_id: int, eoi_token_id: int,
                 image_token_offset: int, num_image_tokens: int, eor_token_id: int | None = None,
                 size_token_offset: int | None = None, max_grid_size: int = 0, vq=None,
                 question_first: bool = False, image_size: int | None = None, image_grid: int | None = None,
                 source_size_tokens: bool = False, image_block: int = 1, image_bidi: bool = False):
        self.tokenizer, self.vq, self.question_first = tokenizer, vq, question_first
        self.text_ids = TextIds(tokenizer)  # text -> ids, memoised (the stream's texts repeat)
        self.block = image_block  # codes written in block x block blocks (to_block_order)
        self.image_bidi = image_bidi  # VQA / caption input images: bidirectional spans
        # square models: images resized to image_size px, codes must be image_grid x image_grid
        self.image_size, self.image_grid = image_size, image_grid
        # size tokens name the source image's size (VQ-factor units) instead of the code grid
        self.source_size_tokens = source_size_tokens
        if source_size_tokens and (image_size is None or not image_grid or size_token_offset is None):
            raise UsageError("source_size_tokens needs image_size, image_grid and size tokens")
        self.bos, self.eos, self.boi, self.eoi = bos_token_id, eos_token_id, boi_token_id, eoi_token_id
        self.offset, self.n_codes = image_token_offset, num_image_tokens
        self.eor, self.size_offset, self.max_grid = eor_token_id, size_token_offset, max_grid_size
        if (self.size_offset is None) != (self.eor is None):
            raise UsageError("multi-resolution layout needs both eor_token_id and size_token_offset")

    @classmethod
    def from_config(cls, tokenizer, config, vq=None) -> "ChameleonProcessor":
        return cls(tokenizer, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   boi_token_id=config.boi_token_id, eoi_token_id=config.eoi_token_id,
                   image_token_offset=config.image_token_offset, num_image_tokens=config.num_image_tokens,
                   eor_token_id=config.eor_token_id, size_token_offset=config.size_token_offset,
                   max_grid_size=config.max_grid_size, vq=vq,
                   question_first=bool(getattr(config, "vqa_question_first", False)),
                   image_size=getattr(config, "image_size", None),
                   image_grid=config.image_grid_h if getattr(config, "image_size", None) else None,
                   source_size_tokens=bool(getattr(config, "source_size_tokens", False)),
                   image_block=int(getattr(config, "image_block", 1) or 1),
                   image_bidi=bool(getattr(config, "image_bidi", False)))

    # -- pieces -------------------------------------------------------------------------
    def image_ids(self, codes, source_size: tuple[int, int] | None = None) -> list[int]:
        """codes (h, w) -> boi [size_h size_w] (row [eor]) * h eoi. `source_size` (w, h) px of
        the image before the square resize: what the size tokens say in source_size_tokens
        models (None there: a square source)."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        h, w = codes.shape
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codes):
            raise UsageError(f"image code out of range [0, {self.n_codes})")
        ids = [self.boi]
        if self.size_offset is not None:
            if self.max_grid and max(h, w) > self.max_grid:
                raise UsageError(f"image grid {h}x{w} exceeds max_grid_size {self.max_grid}")
            sh, sw = self.source_grid(source_size) if self.source_size_tokens else (h, w)
            ids += [self.size_offset + sh, self.size_offset + sw]
        from mmkit.text.image_vocab import to_block_order

        rows = (to_block_order(codes, self.block) + self.offset).tolist()  # (h / b, w * b)
        for row in rows:
            ids += row + ([self.eor] if self.eor is not None else [])
        return ids + [self.eoi]

    def source_grid(self, source_size: tuple[int, int] | None) -> tuple[int, int]:
        """(w, h) px of a source image -> its size tokens (h, w) in VQ-factor units, each in
        1..max_grid_size (aspect kept when capped); None -> the square code grid."""
        if source_size is None:
            return self.image_grid, self.image_grid
        f = self.image_size / self.image_grid
        w, h = source_size
        s = min(1.0, self.max_grid * f / max(w, h)) if self.max_grid else 1.0
        return max(1, round(h * s / f)), max(1, round(w * s / f))

    def source_size_of(self, doc: dict, i: int) -> tuple[int, int] | None:
        """(w, h) px of image i before any resize: stored by tokenize-images (`src_w`, `src_h`),
        else read from the image (PIL or encoded bytes: header only); None for other models."""
        if not self.source_size_tokens:
            return None
        c = _stored_codes(doc, i)
        if c and "src_w" in c:
            return int(c["src_w"]), int(c["src_h"])
        img = _doc_image(doc, i)
        if isinstance(img, (bytes, bytearray)):
            import io

            from PIL import Image

            with Image.open(io.BytesIO(img)) as im:
                return im.size
        if img is None:
            raise UsageError(f"{doc.get('__key__', 'doc')}: image {i} has no source size (re-run tokenize-images)")
        return img.size

    def doc_image_ids(self, doc: dict, i: int) -> list[int]:
        """Image i of a reader doc -> its token span (codes and, if the model says so, source size)."""
        return self.image_ids(self.codes_of(doc, i), self.source_size_of(doc, i))

    def vqa_prefix(self, question: str) -> list[int]:
        """bos [+ "Question: q" when question_first]: what precedes the image of a VQA prompt."""
        return [self.bos] + (self.text_ids(templates.vqa_question(question)) if self.question_first else [])

    def vqa_prompt_ids(self, codes, question: str, source_size: tuple[int, int] | None = None) -> list[int]:
        """The inference prompt of a VQA question (the training layout up to the answer)."""
        return (self.vqa_prefix(question) + self.image_ids(codes, source_size)
                + self.text_ids(templates.vqa_prompt(question)))

    def codes_of(self, doc: dict, i: int):
        """Codes (h, w) of image i of a reader doc: stored `image_codes`, else the VQ encoder."""
        c = _stored_codes(doc, i)
        if c is not None:
            if self.image_grid and (c["h"], c["w"]) != (self.image_grid, self.image_grid):
                raise UsageError(f"{doc.get('__key__', 'doc')}: stored codes are {c['h']}x{c['w']} but the model "
                                 f"reads {self.image_size} px squares ({self.image_grid}x{self.image_grid} codes): "
                                 f"tokenize the shards with `mmkit data tokenize-images --square {self.image_size}`")
            return torch.tensor(c["codes"], dtype=torch.long).view(c["h"], c["w"])
        img = _doc_image(doc, i)
        if self.vq is None or img is None or isinstance(img, (bytes, bytearray)):
            raise UsageError(f"{doc.get('__key__', 'doc')}: image {i} has no image_codes and no VQ model to encode it "
                             "(run `mmkit data tokenize-images` or give model.vq)")
        from mmkit.vq.tokenize_shards import vq_pixels

        with torch.no_grad():
            x = vq_pixels(img, self.image_size)[None].to(next(self.vq.parameters()).device)
            return self.vq.encode(x)[0].cpu()

    # -- documents ----------------------------------------------------------------------
    def _seq(self, parts: list[tuple[list[int], bool, int]], task: str) -> Encoded:
        """parts (tokens, supervised, modality); with image_bidi the unsupervised image spans of
        VQA and caption samples (inputs, never written) are marked bidirectional."""
        ids, sup, mod, bidi = [], [], [], []
        reads = self.image_bidi and task in ("vqa", "caption")  # images here are inputs, never written
        for toks, supervised, modality in parts:
            ids += toks
            sup += [supervised] * len(toks)
            mod += [modality] * len(toks)
            bidi += [reads and modality == IMAGE and not supervised] * len(toks)
        return Encoded(ids, sup, mod, task, bidi if self.image_bidi else None)

    def encode_interleaved(self, doc: dict) -> Encoded:
        parts = [([self.bos], False, TEXT)]
        for i, (text, image) in enumerate(zip(doc["texts"], doc["images"])):
            if image is not None:
                parts.append((self.doc_image_ids(doc, i), True, IMAGE))
            elif text:
                parts.append((self.text_ids(text), True, TEXT))
        parts.append(([self.eos], True, TEXT))
        return self._seq(parts, "interleaved")

    def _image_index(self, doc: dict) -> int:
        for i, image in enumerate(doc["images"]):
            if image is not None:
                return i
        raise UsageError(f"{doc.get('__key__', 'doc')}: {doc.get('kind')} sample without an image")

    def encode_vqa(self, doc: dict, supervise_prompt: bool = False, extra_questions: int = 0,
                   rng: random.Random | None = None, question_weights: dict[str, float] | None = None) -> Encoded:
        """The doc's question first (the inference layout); `extra_questions` more turns
        asked about the stored scene graph (shapes world) reuse the same image tokens;
        `question_weights` re-weights their question types (mmkit.data.shapes.more_vqa)."""
        meta = doc.get("meta") or {}
        i = self._image_index(doc)
        img = self.doc_image_ids(doc, i)
        parts = [(self.vqa_prefix(meta["question"]), False, TEXT), (img, supervise_prompt, IMAGE)]
        extra = more_vqa(meta, extra_questions, rng or random.Random(0), image_index=i, weights=question_weights)
        for qa in [meta] + extra:
            parts.append((self.text_ids(templates.vqa_prompt(qa["question"])), supervise_prompt, TEXT))
            parts.append((self.text_ids(templates.vqa_target(qa["answer"])) + [self.eos], True, TEXT))
        return self._seq(parts, "vqa")

    def _caption_text(self, doc: dict, override: str | None = None) -> str:
        if override:
            return override
        texts = [t for t in doc["texts"] if t]
        if not texts:
            raise UsageError(f"{doc.get('__key__', 'doc')}: caption sample without text")
        return texts[0]

    def encode_caption(self, doc: dict, supervise_prompt: bool = False, text: str | None = None) -> Encoded:
        img = self.doc_image_ids(doc, self._image_index(doc))
        prompt = self.text_ids(templates.caption_prompt())
        target = self.text_ids(templates.caption_target(self._caption_text(doc, text))) + [self.eos]
        return self._seq([([self.bos], False, TEXT), (img, supervise_prompt, IMAGE), (prompt, supervise_prompt, TEXT),
                          (target, True, TEXT)], "caption")

    def encode_t2i(self, doc: dict, drop_condition: bool = False, supervise_prompt: bool = False,
                   text: str | None = None) -> Encoded:
        """Text-to-image; `drop_condition` replaces the caption by the unconditional prompt (CFG)."""
        caption = None if drop_condition else self._caption_text(doc, text)
        prompt = self.text_ids(templates.t2i_prompt(caption))
        img = self.doc_image_ids(doc, self._image_index(doc))
        return self._seq([([self.bos], False, TEXT), (prompt, supervise_prompt, TEXT), (img, True, IMAGE),
                          ([self.eos], True, TEXT)], "t2i")

    def encode(self, doc: dict, *, caption_tasks=("caption", "t2i"), cond_dropout: float = 0.0,
               supervise_prompts: bool = False, vqa_extra_questions: int = 0,
               rng: random.Random | None = None, caption_texts: tuple[str, str] | None = None,
               vqa_question_weights: dict[str, float] | None = None) -> list[Encoded]:
        """A reader doc -> its training sequences (a caption doc gives one per caption task);
        `caption_texts` = (caption target, t2i prompt) replaces the doc's caption."""
        cap_text, t2i_text = caption_texts or (None, None)
        kind = doc.get("kind")
        if kind == "interleaved":
            return [self.encode_interleaved(doc)]
        if kind == "vqa":
            return [self.encode_vqa(doc, supervise_prompts, vqa_extra_questions, rng, vqa_question_weights)]
        if kind == "caption":
            out = []
            if "caption" in caption_tasks:
                out.append(self.encode_caption(doc, supervise_prompts, text=cap_text))
            if "t2i" in caption_tasks:
                drop = cond_dropout > 0 and (rng or random).random() < cond_dropout
                out.append(self.encode_t2i(doc, drop_condition=drop, supervise_prompt=supervise_prompts, text=t2i_text))
            return out
        raise UsageError(f"{doc.get('__key__', 'doc')}: unknown sample kind {kind!r}")


def token_weights(seqs: list[Encoded], loss_on: str = "all", text_weight: float = 1.0,
                  image_weight: float = 1.0, task_weights: dict[str, float] | None = None) -> list[list[float]]:
    """Per-token loss weights (0 = not a target) for `loss_on` in all | text | image.

    `task_weights` multiplies the weights of a sequence by its task's factor (missing = 1):
    a VQA answer is ~2 target tokens against ~60 of a generated image, so without it the
    image spans own almost all of the gradient.
    """
    if loss_on not in ("all", "text", "image"):
        raise UsageError(f"loss_on must be all, text or image (got {loss_on!r})")
    w_mod = {TEXT: 0.0 if loss_on == "image" else text_weight, IMAGE: 0.0 if loss_on == "text" else image_weight}
    tw = task_weights or {}
    return [[tw.get(e.task, 1.0) * w_mod[m] if s else 0.0 for s, m in zip(e.supervised, e.modality)] for e in seqs]
