"""Task "kimivl": train the Kimi-VL-style model on mmkit shards (VQA, captions, interleaved).

Every document becomes one sequence in which images are input only:
- vqa:         <s> [image] "Question: q Answer:" | " answer" </s>, then `data.extra_questions`
               more turns "Question: q Answer:" | " a" </s> generated from the image's scene graph
               (`model.prompt_order: question_first`: <s> "Question: q" [image] "Answer:" | ...; with
               `data.repeat_image` every extra turn has the image again, laid out the same way)
- caption:     <s> [image] "Caption:"            | " caption" </s>
- interleaved: <s> text [image] text [image] ... </s>, loss on every text token after the
               first image (and the final </s>)
where [image] = <boi> <image> x (h*w/4) <eoi> and `|` marks where the loss starts
(prompts from mmkit.data.templates, shared with inference). Images, prompts and
placeholders never carry loss. The MoE decoder's expert counts are logged and its
balancing bias is stepped after every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmkit.config import from_dict
from mmkit.errors import UsageError
from mmkit.train.task import register_task

IGNORE = -100


@dataclass
class KimiVLModelSection:
    """The recipe's `model:` section."""

    text_tokenizer: str = "runs/quickstart/text_tokenizer"
    vision: dict = field(default_factory=dict)  # MoonViTConfig fields
    text: dict = field(default_factory=dict)  # MoEDecoderConfig fields; vocab_size defaults to the tokenizer's
    init_from: str | None = None  # a model directory (any layout mmkit.load_model reads) to fine-tune
    open_clip: dict | None = None  # {"name": ..., "pretrained": <local file or null>}: vision init
    max_patches: int = 16384  # processor: cap on patches per image (downscale above)
    max_patches_per_side: int = 512
    pad_mode: Literal["pad", "resize", "square"] = "pad"
    square_side: int = 0  # pad_mode square: every image resized to this side in pixels (0: padded long side)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_token: str = "<image>"  # media token names in the text tokenizer (Kimi: <|media_pad|> ...)
    boi_token: str = "<boi>"
    eoi_token: str = "<eoi>"
    max_len: int = 1024  # documents longer than this (after image expansion) are cut or skipped
    freeze_vision: bool = False
    # processor prompt layout (saved with the model, used by inference): "image_first" or
    # "question_first" (the question before the image: the image positions can attend to it)
    prompt_order: Literal["image_first", "question_first"] = "image_first"
    # std of the decoder's attention q / kv projections at init (None: the model's 0.02). From
    # scratch, a larger value makes the answer-to-image attention selective sooner (looking an
    # object up by position or attribute); ignored with init_from.
    attention_init_std: float | None = None
    # std of MoonViT's learned position table at init (None: 0.02). From scratch, a table on the
    # scale of the patch features makes an object's token say where it is from the first step
    # ("where is the X?"); ignored with init_from.
    pos_emb_init_std: float | None = None
    # "sincos": the position table starts as a smooth 2-D sin-cos grid (std pos_emb_init_std,
    # else 0.02) instead of noise, as a pretrained SigLIP table is smooth: neighbouring cells get
    # similar, linearly decodable codes. Ignored with init_from.
    pos_emb_init: Literal["normal", "sincos"] = "normal"


@dataclass
class KimiVLDataSection:
    """The recipe's `data:` section."""

    sources: Any = "runs/quickstart/data/train"  # dir, list of shards or {pattern: weight}
    kinds: list[str] = field(default_factory=lambda: ["vqa", "caption", "interleaved"])
    # mixing weights per kind when `sources` is one shard directory ({kind}-NNNNNN.tar files);
    # empty = every shard equally
    weights: dict[str, float] = field(default_factory=dict)
    shuffle_buffer: int = 1000
    # shapes world: extra question turns per VQA document, asked about its image from the doc's
    # scene graph (`scenes`) with the data set's generator (mmkit.data.shapes.more_vqa);
    # fresh questions each epoch (hashed from seed, key and the reader's __epoch__). 0 = only the doc's own question.
    extra_questions: int = 0
    # every extra question turn carries the image again in the processor's VQA layout (with
    # question_first: each question gets its own question-conditioned image positions; the ViT
    # runs once per turn)
    repeat_image: bool = False
    # re-weighting of the extra questions' types ({"relation": 0.3, "exist": 0.25}; the other
    # types keep mmkit.data.shapes.QWEIGHTS): a curriculum for the types the model learns last
    question_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        bad = [k for k in list(self.kinds) + list(self.weights) if k not in ("vqa", "caption", "interleaved")]
        if bad:
            raise ValueError(f"data.kinds: unknown kind {bad[0]!r} (vqa, caption, interleaved)")
        if self.extra_questions < 0:
            raise ValueError(f"data.extra_questions must be >= 0, got {self.extra_questions}")
        if self.question_weights:
            from mmkit.data.shapes import question_weights

            question_weights(self.question_weights, "data.question_weights")


class ExampleBuilder:
    """map_fn (runs in DataLoader workers; picklable): reader doc -> token ids, labels, pixels."""

    def __init__(self, tokenizer_dir: str, proc_cfg: dict, max_len: int, kinds: list[str], tokens: dict | None = None,
                 extra_questions: int = 0, seed: int = 0, repeat_image: bool = False,
                 question_weights: dict[str, float] | None = None):
        self.tokenizer_dir, self.proc_cfg, self.max_len, self.kinds = tokenizer_dir, proc_cfg, max_len, kinds
        self.tokens = tokens or {}
        self.extra_questions, self.seed, self.repeat_image = extra_questions, seed, repeat_image
        self.question_weights = dict(question_weights or {})
        self._proc = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"} | {"_proc": None}

    @property
    def processor(self):
        if self._proc is None:
            self._proc = make_processor(self.tokenizer_dir, self.proc_cfg, self.tokens)
        return self._proc

    def __call__(self, doc: dict) -> dict | None:
        from mmkit.data import templates as T

        kind = doc.get("kind")
        if kind not in self.kinds:
            return None
        proc = self.processor
        texts, images, meta = doc["texts"], doc["images"], doc.get("meta", {})
        if kind in ("vqa", "caption"):
            image = next((im for im in images if im is not None), None)
            if image is None:
                return None
            if kind == "vqa":
                question = meta.get("question") or next(t for t in texts if t)
                segments, target = proc.vqa_segments(image, question), T.vqa_target(meta["answer"])
            else:
                caption = next((t for t in texts if t), None)
                if caption is None:
                    return None
                segments, target = proc.caption_segments(image), T.caption_target(caption)
            enc = proc.encode(segments)
            tgt = proc.text_ids(target) + [proc.tokenizer.eos_token_id]
            ids = enc["input_ids"] + tgt
            labels = [IGNORE] * len(enc["input_ids"]) + tgt
            if kind == "vqa" and self.extra_questions:
                ids, labels, enc = self._more_questions(doc, image, ids, labels, enc)
        else:
            segs = [im if im is not None else t for t, im in zip(texts, images) if (im is not None or t)]
            if not any(not isinstance(s, str) for s in segs):
                return None
            enc = proc.encode(segs)
            ids = enc["input_ids"] + [proc.tokenizer.eos_token_id]
            labels = [IGNORE] * len(ids)
            seen_image = False
            for start, end, what in enc["spans"]:
                if what == "image":
                    seen_image = True
                elif seen_image:
                    labels[start:end] = ids[start:end]
            labels[-1] = ids[-1]
        if len(ids) > self.max_len:
            last_image_end = max((e for s, e, w in enc["spans"] if w == "image"), default=0)
            if last_image_end > self.max_len - 1:
                return None  # cutting would split an image's placeholders
            ids, labels = ids[: self.max_len], labels[: self.max_len]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}


    def _more_questions(self, doc: dict, image, ids: list[int], labels: list[int], enc: dict):
        """Append `data.extra_questions` turns `Question: q Answer:` | ` a</s>` about the doc's
        image (mmkit.data.shapes.more_vqa; only answers carry loss); with `repeat_image` each turn
        is the processor's full VQA layout, image included. The questions are a pure function of
        (seed, key, epoch): fresh each epoch, identical after a resume. Returns ids, labels and
        `enc` (pixels extended, image spans of the first turn only: the cut check needs those)."""
        import random

        from mmkit.data import templates as T
        from mmkit.data.shapes import more_vqa

        index = next(i for i, im in enumerate(doc["images"]) if im is not None)
        rng = random.Random(f"{self.seed}:{doc.get('__key__')}:{doc.get('__epoch__', 0)}")
        proc = self.processor
        ids, labels = list(ids), list(labels)
        pixels, grids = [enc["pixel_values"]], [enc["image_grid_thw"]]
        for q in more_vqa(doc.get("meta", {}), self.extra_questions, rng, image_index=index,
                          weights=self.question_weights):
            if self.repeat_image:
                turn = proc.encode(proc.vqa_segments(image, q["question"]), add_bos=False)
                prompt = turn["input_ids"]
            else:
                turn, prompt = None, proc.text_ids(T.vqa_prompt(q["question"]))
            tgt = proc.text_ids(T.vqa_target(q["answer"])) + [proc.tokenizer.eos_token_id]
            if len(ids) + len(prompt) + len(tgt) > self.max_len:
                break
            ids += prompt + tgt
            labels += [IGNORE] * len(prompt) + tgt
            if turn is not None:
                pixels.append(turn["pixel_values"])
                grids.append(turn["image_grid_thw"])
        if len(pixels) > 1:
            enc = dict(enc, pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
        return ids, labels, enc


class Collate:
    """Right-pad ids (pad id) and labels (-100); concatenate images in document order."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.cat([it["pixel_values"] for it in items]),
                "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items])}


def make_processor(tokenizer_dir: str, proc_cfg: dict, tokens: dict | None = None):
    from transformers import AutoTokenizer

    from mmkit.models.kimivl.processor import ImageProcessorConfig, KimiVLImageProcessor, KimiVLProcessor

    if not Path(tokenizer_dir).is_dir():
        raise UsageError(f"model.text_tokenizer: no tokenizer directory at {tokenizer_dir}")
    cfg = dict(proc_cfg)
    cfg["image_mean"], cfg["image_std"] = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return KimiVLProcessor(AutoTokenizer.from_pretrained(tokenizer_dir), KimiVLImageProcessor(ImageProcessorConfig(**cfg)),
                           **(tokens or {}))


@torch.no_grad()
def _init_attention(model: nn.Module, std: float) -> None:
    """Re-draw the decoder's MLA query and key/value projections (weights only) with `std`."""
    names = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    for layer in model.language_model.layers:
        for name in names:
            lin = getattr(layer.self_attn, name, None)
            if lin is not None:
                lin.weight.normal_(0.0, std)


def sincos_grid(h: int, w: int, dim: int, std: float, temperature: float = 100.0) -> torch.Tensor:
    """(h, w, dim) 2-D sin-cos position codes (first half of the channels encode the row, second
    half the column; dim % 4 == 0), scaled to per-element std `std`."""
    if dim % 4:
        raise ValueError(f"sincos position table needs hidden_size % 4 == 0, got {dim}")
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def codes(n: int) -> torch.Tensor:  # (n, dim/2)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    rows, cols = codes(h), codes(w)
    grid = torch.cat([rows[:, None].expand(h, w, dim // 2), cols[None].expand(h, w, dim // 2)], dim=2)
    return (grid / grid.std() * std).float()


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


@register_task("kimivl")
class KimiVLTask:
    """See mmkit.train.task.Task."""

    def __init__(self, model_cfg: dict, data_cfg: dict, *, seed: int = 0, out_dir: str = "."):
        self.cfg = from_dict(KimiVLModelSection, model_cfg, where="model")
        self.data = from_dict(KimiVLDataSection, data_cfg, where="data")
        self.seed, self.out_dir = seed, out_dir
        patch = int(self.cfg.vision.get("patch_size", 14))
        merge = list(self.cfg.vision.get("merge_kernel_size", [2, 2]))[0]
        self.proc_cfg = dict(patch_size=patch, merge_size=merge, max_patches=self.cfg.max_patches,
                             max_patches_per_side=self.cfg.max_patches_per_side, pad_mode=self.cfg.pad_mode,
                             square_side=self.cfg.square_side,
                             image_mean=list(self.cfg.image_mean), image_std=list(self.cfg.image_std))
        self.tokens = dict(image_token=self.cfg.image_token, boi_token=self.cfg.boi_token, eoi_token=self.cfg.eoi_token,
                           prompt_order=self.cfg.prompt_order)
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:
            self._processor = make_processor(self.cfg.text_tokenizer, self.proc_cfg, self.tokens)
        return self._processor

    def model_config(self):
        from mmkit.models.kimivl.config import MmkitKimiVLConfig
        from mmkit.models.kimivl.decoder import MoEDecoderConfig

        proc = self.processor
        tok = proc.tokenizer
        text = dict(self.cfg.text)
        text.setdefault("vocab_size", len(tok))
        for name in ("bos", "eos", "pad"):
            text.setdefault(f"{name}_token_id", getattr(tok, f"{name}_token_id"))
        text = MoEDecoderConfig.from_dict(text, "model.text").to_dict()  # strict: unknown keys are errors
        return MmkitKimiVLConfig(vision_config=dict(self.cfg.vision), text_config=text,
                                 image_token_id=proc.image_token_id, boi_token_id=proc.boi_token_id,
                                 eoi_token_id=proc.eoi_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def build_model(self) -> nn.Module:
        from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration

        if self.cfg.init_from:
            from mmkit.models import load_model

            model = load_model(self.cfg.init_from)
            if not isinstance(model, MmkitKimiVLForConditionalGeneration):
                raise UsageError(f"model.init_from: {self.cfg.init_from} is not a Kimi-VL-family model")
            model.train()
        else:
            model = MmkitKimiVLForConditionalGeneration(self.model_config())
            if self.cfg.attention_init_std is not None:
                _init_attention(model, self.cfg.attention_init_std)
            pos = model.vision_tower.patch_embed.pos_emb.weight  # (H0, W0, D)
            with torch.no_grad():
                if self.cfg.pos_emb_init == "sincos":
                    pos.copy_(sincos_grid(*pos.shape, std=self.cfg.pos_emb_init_std or 0.02))
                elif self.cfg.pos_emb_init_std is not None:
                    pos.normal_(0.0, self.cfg.pos_emb_init_std)
        if self.cfg.open_clip:
            import open_clip

            from mmkit.models.kimivl.openclip_init import copy_open_clip_into_moonvit

            oc = dict(self.cfg.open_clip)
            clip = open_clip.create_model(oc["name"], pretrained=oc.get("pretrained"))
            copy_open_clip_into_moonvit(model.vision_tower, clip)
        if self.cfg.freeze_vision:
            model.vision_tower.requires_grad_(False)
        return model.float()

    def batches(self, *, rank: int = 0, world_size: int = 1, batch_size: int, num_workers: int = 0):
        from mmkit.data import build_stream

        builder = ExampleBuilder(self.cfg.text_tokenizer, self.proc_cfg, self.cfg.max_len, list(self.data.kinds),
                                 self.tokens, extra_questions=self.data.extra_questions, seed=self.seed + rank,
                                 repeat_image=self.data.repeat_image, question_weights=self.data.question_weights)
        return build_stream(self._sources(), batch_size=batch_size, collate_fn=Collate(self.processor.tokenizer.pad_token_id),
                            map_fn=builder, seed=self.seed, rank=rank, world_size=world_size, num_workers=num_workers,
                            decode_images=True, shuffle_buffer=self.data.shuffle_buffer, infinite=True)

    def _sources(self):
        """A shard directory restricted to some kinds -> just those kinds' shards (no decoding of
        samples that would be skipped)."""
        src = self.data.sources
        kinds = [k for k in ("vqa", "caption", "interleaved") if k in self.data.kinds]
        if not (isinstance(src, str) and Path(src).is_dir()):
            return src
        present = [k for k in kinds if any(Path(src).glob(f"{k}-*.tar"))]
        if self.data.weights and present:
            return {str(Path(src) / f"{k}-*.tar"): float(self.data.weights.get(k, 1.0)) for k in present}
        if len(kinds) < 3 and present:
            return sorted(str(p) for k in present for p in Path(src).glob(f"{k}-*.tar"))
        return src

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        labels = batch["labels"]
        metrics = {"tokens": int((labels[:, 1:] != IGNORE).sum()), "images": int(batch["image_grid_thw"].shape[0]),
                   "lm_loss": float(out.lm_loss.detach())}
        if out.aux_loss is not None:
            metrics["aux_loss"] = float(out.aux_loss.detach())
        metrics.update(_unwrap(model).expert_load())
        return out.loss, metrics

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        _unwrap(model).enable_activation_checkpointing()

    def on_optimizer_step(self, model: nn.Module) -> None:
        _unwrap(model).update_balancing_bias()

    @torch.no_grad()
    def sample(self, model: nn.Module, step: int, out_dir: str) -> None:
        """Greedy answers to a few fixed shapes-world questions, appended to samples.md."""
        import random

        from mmkit.data import shapes as S
        from mmkit.data import templates as T
        from mmkit.models.kimivl.model import greedy_generate

        model = _unwrap(model)
        was_training = model.training
        model.eval()
        lines = []
        for i in range(4):
            rng = random.Random(f"kimivl-sample:{i}")
            scene = S.random_scene(rng)
            q = S.make_vqa(scene, rng)
            enc = self.processor.encode(self.processor.vqa_segments(S.render(scene), q["question"]))
            ids = torch.tensor([enc["input_ids"]])
            new = greedy_generate(model, ids, enc["pixel_values"], enc["image_grid_thw"], max_new_tokens=8,
                                  eos_token_id=self.processor.tokenizer.eos_token_id)
            answer = T.postprocess_answer(self.processor.tokenizer.decode(new[0], skip_special_tokens=True))
            lines.append(f"  - {q['question']} -> `{answer}` (truth: {q['answer']})")
        model.train(was_training)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "samples.md", "a") as f:
            f.write(f"- step {step}\n" + "\n".join(lines) + "\n")

    def save_final(self, model: nn.Module, out_dir: str) -> None:
        model = _unwrap(model)
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)  # tokenizer files + kimivl_processor.json
