"""The one sampling core for every mmkit family (fast path; no transformers `generate`).

Written against the fast-generation contract (docs/design.md): the model preallocates a
static KV cache (`make_cache`) and takes `position_ids`, `attention_mask`, `cache`,
`cache_position` in forward. Why hand-written: transformers' generate spends most of a
small model's decode step in Python (processor lists, dynamic cache, mask rebuilding).
Here everything that does not change per token is built once before the loop:

- the KV cache and the (B, T_max) attention mask (left padding = 0);
- the token constraints as a small table of additive bias rows (text / text-without-boi /
  image-code / forced token); one `index_select` + `add_` per step applies the image-span
  state machine to every row at once;
- per-request random numbers: each row draws its uniforms for all steps from its own seed
  up front, and tokens are sampled by inverse CDF, so a row's samples do not depend on
  which other rows share its batch (batched == unbatched, seeds reproducible).

Image spans (Chameleon family): after begin-of-image (boi) only image codes are allowed,
plus forced size tokens right after boi and an end-of-row token after every row where the
model uses them (Lumina-mGPT / Emu3 layout); after exactly h x w codes end-of-image (eoi)
is forced; boi is refused when the remaining budget cannot hold a whole span.
Classifier-free guidance batches the conditional and unconditional streams in one forward
(rows [0, B) and [B, 2B)); both streams are fed the conditional stream's token.

Decode steps are bound by reading the weights (and, for long images, the KV cache), so the
loop avoids reading what it does not need: on CPU every nn.Linear runs on a oneDNN-packed
weight (packing.py), one-token steps use the model's `decode_step` where it has one (fewer
kernel launches, same numbers), and the output layer multiplies by the lm_head rows that can
be chosen only (image codes inside a span, nothing at a forced token, the non-code rows in
text mode).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mmkit.errors import UsageError
from mmkit.generation.packing import cached_linear_fn, packed_linears

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How one kind of token (text or image code) is chosen. Greedy unless do_sample."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL / transformers semantics)

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise UsageError(f"temperature must be > 0 (got {self.temperature}); use do_sample=False for greedy")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


# Defaults for image spans: sample with temperature 1 and a large top-k (Lumina-mGPT 2000,
# Emu3 2048; see docs/generation.md).
IMAGE_SAMPLING = SamplingParams(do_sample=True, temperature=1.0, top_k=2048)


@dataclass(frozen=True)
class ImageLayout:
    """Token layout of one generated image span: boi [h-token w-token] (w codes [eor]) * h eoi."""

    h: int
    w: int
    boi: int
    eoi: int
    code_offset: int
    num_codes: int
    eor: int | None = None  # end-of-row token after each row (None = fixed-size model)
    size_offset: int | None = None  # size token of n = size_offset + n, right after boi
    # what the size tokens say, when not the code grid (h, w): source_size_tokens models
    size_tokens: tuple[int, int] | None = None
    # codes written in block x block blocks (mmkit.text.image_vocab.to_block_order): a token
    # row is then one row of blocks (w * block codes), h / block rows
    block: int = 1

    def __post_init__(self):
        from mmkit.text.image_vocab import check_block

        check_block(self.h, self.w, self.block)

    def template(self) -> list[int]:
        """Tokens after boi, -1 standing for 'any image code'; the last one is eoi."""
        sh, sw = self.size_tokens or (self.h, self.w)
        t = [] if self.size_offset is None else [self.size_offset + sh, self.size_offset + sw]
        row = [-1] * (self.w * self.block) + ([] if self.eor is None else [self.eor])
        return t + row * (self.h // self.block) + [self.eoi]

    @property
    def span_len(self) -> int:
        """Tokens after boi up to and including eoi."""
        return len(self.template())

    def codes_from_span(self, tokens: Sequence[int]) -> torch.Tensor:
        """The tokens after boi (at least up to the last code) -> codes (h, w) long."""
        tmpl = self.template()
        toks = list(tokens)[: len(tmpl) - 1]
        if len(toks) < len(tmpl) - 1:
            raise ValueError(f"image span truncated: {len(toks)} of {len(tmpl) - 1} tokens")
        codes = [t - self.code_offset for t, k in zip(toks, tmpl) if k == -1]
        out = torch.tensor(codes, dtype=torch.long)
        if ((out < 0) | (out >= self.num_codes)).any():
            raise ValueError("image span contains a token that is not an image code")
        if self.block > 1:
            from mmkit.text.image_vocab import from_block_order

            return from_block_order(out, self.h, self.w, self.block)
        return out.view(self.h, self.w)


def image_layout_from_config(config, h: int | None = None, w: int | None = None,
                             size_tokens: tuple[int, int] | None = None) -> ImageLayout | None:
    """The model config's image layout (Chameleon family), or None for text-only families.
    `size_tokens` (source_size_tokens models): the source size the size tokens ask for, in
    VQ-factor units (default: a square source of the code grid's size)."""
    boi, eoi = getattr(config, "boi_token_id", None), getattr(config, "eoi_token_id", None)
    offset, n = getattr(config, "image_token_offset", None), getattr(config, "num_image_tokens", None)
    if boi is None or eoi is None or offset is None or not n:
        return None
    h = h or getattr(config, "image_grid_h", None) or 32
    w = w or getattr(config, "image_grid_w", None) or h
    size_offset = getattr(config, "size_token_offset", None)
    max_grid = getattr(config, "max_grid_size", 0) or 0
    if size_offset is not None and max_grid and max(h, w) > max_grid:
        raise UsageError(f"image grid {h}x{w} exceeds the model's max_grid_size {max_grid}")
    if size_tokens is not None:
        if not getattr(config, "source_size_tokens", False):
            raise UsageError("size_tokens is for models with source_size_tokens (their size tokens name the source size)")
        sh, sw = (int(v) for v in size_tokens)
        if min(sh, sw) < 1 or (max_grid and max(sh, sw) > max_grid):
            raise UsageError(f"source size {sh}x{sw} (VQ-factor units) outside 1..{max_grid}")
        size_tokens = (sh, sw)
    return ImageLayout(h=h, w=w, boi=boi, eoi=eoi, code_offset=offset, num_codes=n,
                       eor=getattr(config, "eor_token_id", None), size_offset=size_offset, size_tokens=size_tokens,
                       block=int(getattr(config, "image_block", 1) or 1))  # ImageLayout checks the grid


def image_code_mask(config, vocab_size: int, device=None) -> torch.Tensor | None:
    """Bool (V,) of image-code ids (what transformers masks for Chameleon), or None."""
    offset, n = getattr(config, "image_token_offset", None), getattr(config, "num_image_tokens", None)
    if offset is None or not n:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[offset:offset + n] = True
    return mask


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask) (B, T), left padded (0 = padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def _uniforms(seeds: list[int | None], n: int, device) -> torch.Tensor:
    """(B, n) uniforms in [0, 1): row i from its own generator (seed None = global RNG)."""
    rows = []
    for s in seeds:
        g = None
        if s is not None:
            g = torch.Generator().manual_seed(int(s))
        rows.append(torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=torch.float32) if rows else torch.empty(0, n)


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on a (B, V) seen-mask instead of ids."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample_tokens(logits: torch.Tensor, p: SamplingParams, u: torch.Tensor | None,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) fp32 logits (constraints already applied) -> (B,) token ids."""
    if p.repetition_penalty != 1.0 and seen is not None:
        logits = _apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if not p.do_sample:
        return logits.argmax(-1)
    if p.temperature != 1.0:
        logits = logits / p.temperature
    V = logits.shape[-1]
    if p.top_k or p.top_p < 1.0:
        k = min(p.top_k or V, V)
        # top-p needs the sorted order; plain top-k does not (inverse CDF works on any fixed
        # order) and the unsorted selection is about 2x cheaper
        vals, idx = logits.topk(k, dim=-1, sorted=p.top_p < 1.0)
        probs = vals.softmax(-1)
        if p.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= p.top_p, 0.0)
    else:
        idx, probs = None, logits.softmax(-1)
    cdf = probs.cumsum(-1)  # (B, K)
    # scaling u by the total keeps rounding from ever selecting a zero-probability tail
    j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[-1] - 1)
    return j.squeeze(1) if idx is None else idx.gather(1, j).squeeze(1)


class _Constraints:
    """Per-row token constraints as an additive bias table, indexed by each row's state.

    Classes: 0 text, 1 text with boi refused, 2 image code, 3.. one forced token each.
    `span_pos` (B,) is -1 outside an image span, else the number of tokens after boi so far.
    """

    TEXT, TEXT_NO_BOI, CODE = 0, 1, 2

    def __init__(self, layout: ImageLayout, vocab_size: int, device, extra_suppress: list[int]):
        tmpl = layout.template()
        forced = sorted({t for t in tmpl if t != -1})
        V = vocab_size
        table = torch.zeros(3 + len(forced), V)
        codes = slice(layout.code_offset, layout.code_offset + layout.num_codes)
        # outside a span: no image codes, no span-internal tokens
        table[self.TEXT, codes] = NEG_INF
        for t in forced + extra_suppress:
            table[self.TEXT, t] = NEG_INF
        table[self.TEXT_NO_BOI] = table[self.TEXT]
        table[self.TEXT_NO_BOI, layout.boi] = NEG_INF
        table[self.CODE] = NEG_INF
        table[self.CODE, codes] = 0.0
        for i, t in enumerate(forced):
            table[3 + i] = NEG_INF
            table[3 + i, t] = 0.0
        cls = [self.CODE if t == -1 else 3 + forced.index(t) for t in tmpl]
        self.forced = forced  # class 3 + i forces token forced[i]
        self.table = table.to(device)
        self.template_cls = torch.tensor(cls, dtype=torch.long, device=device)
        self.span_len = len(tmpl)
        self.boi = layout.boi

    def apply(self, logits: torch.Tensor, span_pos: torch.Tensor, text_cls: int) -> torch.Tensor:
        return logits.add_(self.table.index_select(0, self.classes(span_pos, text_cls)))

    def classes(self, span_pos: torch.Tensor, text_cls: int) -> torch.Tensor:
        """(B,) constraint class of each row's next token."""
        return torch.where(span_pos >= 0, self.template_cls[span_pos.clamp(min=0)], text_cls)

    def advance(self, span_pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        opened = torch.where(tok == self.boi, 0, -1)
        nxt = torch.where(span_pos >= 0, span_pos + 1, opened)
        return nxt.masked_fill_(nxt >= self.span_len, -1)


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    mode: str = "text",
    image_sampling: SamplingParams | dict | None = None,
    image_size: tuple[int, int] | None = None,
    image_size_tokens: tuple[int, int] | None = None,
    cfg_scale: float = 1.0,
    uncond_input_ids: torch.Tensor | None = None,
    uncond_attention_mask: torch.Tensor | None = None,
    suppress_tokens: Sequence[int] | None = None,
    prefill_kwargs: dict[str, Any] | None = None,
    cache_dtype: torch.dtype | None = None,
    progress: bool | Any = False,
    compile: bool = False,
    prompt_lookup: int = 0,
    stats: dict | None = None,
    pack_weights: bool | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` per row; returns the new ids (B, <= max_new_tokens).

    input_ids (B, T), left padded with `attention_mask` (B, T) (0 = padding) for batches
    of unequal prompts. Rows stop at eos (kept in the output, like transformers) or any of
    `stop_token_ids`; finished rows are filled with pad; the loop ends when all rows stop.

    mode:
      "text"        image-code ids are never emitted (transformers' Chameleon behaviour;
                    greedy equals transformers' greedy on the same weights);
      "interleaved" text, and image spans under the span state machine (see module doc);
      "image"       the prompt ends with boi; one image span, then stop at eoi.
    image_size / image_size_tokens: code grid (h, w) of generated images; what their size tokens
      say, for models with source_size_tokens (default: a square source).
    image_sampling: SamplingParams for tokens inside image spans (default: IMAGE_SAMPLING
      for "image", the text settings for "interleaved" unless given).
    cfg_scale != 1 (mode "image"): classifier-free guidance against `uncond_input_ids`
      (B, T_u) (+ mask), batched with the conditional rows: l = c + (s - 1) (c - u).
    seed: one int (row i uses seed + i) or one per row; None = torch's global RNG.
    prefill_kwargs: extra forward kwargs for the prompt pass only (e.g. pixel_values).
    progress: True or a tqdm instance to show a progress bar.
    compile: run the decode steps through `torch.compile(model, dynamic=True)` (compiled once
      per model and kept; removes most per-layer Python overhead, worth it for long runs).
    prompt_lookup: k > 0 enables prompt-lookup decoding (batch-1 greedy text): up to k draft
      tokens copied from the latest earlier occurrence of the last n-gram are verified in one
      forward; output equals plain greedy (up to float rounding of a k+1-token forward).
    stats: if a dict, filled with {"forwards": decode forwards run, "tokens": tokens made}.
    pack_weights: run every nn.Linear on a oneDNN-packed weight copy (CPU; see packing.py).
      None = on for CPU models unless `compile` (bf16: same numbers as F.linear up to rare
      last-bit differences; fp32: ~1e-6).
    """
    cfg = model.config
    if input_ids.dim() != 2:
        raise UsageError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if mode not in ("text", "interleaved", "image"):
        raise UsageError(f"mode must be text, interleaved or image (got {mode!r})")
    device = input_ids.device
    B, T = input_ids.shape
    text_params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    layout = None
    if mode != "text":
        layout = image_layout_from_config(cfg, *(image_size or (None, None)), size_tokens=image_size_tokens)
        if layout is None:
            raise UsageError(f"mode {mode!r} needs a model with image tokens (boi/eoi/image codes in its config)")
    if image_sampling is None:
        img_params = IMAGE_SAMPLING if mode == "image" else text_params
    elif isinstance(image_sampling, dict):
        img_params = SamplingParams(**image_sampling)
    else:
        img_params = image_sampling
    use_cfg = uncond_input_ids is not None  # scale 1 still runs both streams (tested == no CFG)
    if (use_cfg or cfg_scale != 1.0) and (mode != "image" or uncond_input_ids is None):
        raise UsageError("classifier-free guidance needs mode='image' and uncond_input_ids")

    eos = _as_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    stops = eos + _as_list(stop_token_ids)
    if mode == "image":
        stops.append(layout.eoi)
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    pad = (eos[0] if eos else 0) if pad is None else pad

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if mode == "image":  # the image span opens at the end of the prompt
        ends = input_ids[:, -1] == layout.boi
        if not bool(ends.any()):
            input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], layout.boi)], 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
            B, T = input_ids.shape
        elif not bool(ends.all()):
            raise UsageError("mode='image': every prompt must end with begin-of-image, or none (it is appended)")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    budget = max_new_tokens
    if max_pos:  # never run positions past the model's context
        budget = min(budget, max_pos - int(attention_mask.sum(-1).max()))
    out = torch.full((B, max(budget, 0)), pad, dtype=torch.long, device=device)
    if budget <= 0:
        return out

    # -- batch rows: [cond (B); uncond (B)] with CFG ---------------------------------
    ids, mask = input_ids, attention_mask
    if use_cfg:
        u_ids = uncond_input_ids.to(device)
        u_mask = torch.ones_like(u_ids) if uncond_attention_mask is None else uncond_attention_mask.to(device).long()
        if u_ids.shape[0] == 1 and B > 1:
            u_ids, u_mask = u_ids.expand(B, -1), u_mask.expand(B, -1)
        Tm = max(T, u_ids.shape[1])
        ids = torch.full((2 * B, Tm), pad, dtype=torch.long, device=device)
        mask = torch.zeros((2 * B, Tm), dtype=torch.long, device=device)
        ids[:B, Tm - T:], mask[:B, Tm - T:] = input_ids, attention_mask
        ids[B:, Tm - u_ids.shape[1]:], mask[B:, Tm - u_ids.shape[1]:] = u_ids, u_mask
    if prompt_lookup and (B != 1 or use_cfg or mode != "text" or do_sample or repetition_penalty != 1.0):
        raise UsageError("prompt_lookup works for batch-1 greedy text generation without repetition penalty")
    R, T0 = ids.shape
    max_len = T0 + budget + max(prompt_lookup, 0)
    dtype = cache_dtype or next(model.parameters()).dtype
    cache = model.make_cache(R, max_len, dtype, device)
    full_mask = torch.ones((R, max_len), dtype=torch.long, device=device)
    full_mask[:, :T0] = mask
    padded = not bool(mask.all())
    if hasattr(cache, "attention_mask"):
        cache.attention_mask = full_mask if padded else None
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)  # (R, T0)
    next_pos = mask.sum(-1, keepdim=True)  # (R, 1) position of the first new token
    fwd = _forward_params(model)
    step_model = _compiled(model) if compile else model
    pack = (not compile) if pack_weights is None else bool(pack_weights)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd else {}

    # -- constraints, penalties, randomness (all built once) --------------------------
    V = None
    constraints = None
    text_mask = None
    suppress = _as_list(suppress_tokens)
    cutoff = budget  # steps at which boi is still allowed: step < cutoff
    span_pos = None
    if layout is not None:
        cutoff = budget - (1 + layout.span_len) + 1
    rep = text_params.repetition_penalty != 1.0 or img_params.repetition_penalty != 1.0
    need_u = text_params.do_sample or (layout is not None and img_params.do_sample)
    if need_u:
        seeds = [None] * B if seed is None else (
            [int(seed) + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed])
        if len(seeds) != B:
            raise UsageError(f"got {len(seeds)} seeds for {B} prompts")
        uni = _uniforms(seeds, budget, device)  # (B, budget)

    with packed_linears(model, pack):
        # -- prefill -----------------------------------------------------------------------
        logits = model(ids, position_ids=pos, attention_mask=full_mask[:, :T0] if padded else None,
                       cache=cache, cache_position=0, **extra, **(prefill_kwargs or {})).logits[:, -1]
        V = logits.shape[-1]
        if layout is not None:
            constraints = _Constraints(layout, V, device, suppress)
            last = ids[:B, -1]
            span_pos = torch.where(last == layout.boi, 0, -1)
        else:
            text_mask = image_code_mask(cfg, V, device) if mode == "text" else None
            if suppress:
                text_mask = torch.zeros(V, dtype=torch.bool, device=device) if text_mask is None else text_mask
                text_mask[suppress] = True
        seen = None
        if rep:
            seen = torch.zeros((B, V), dtype=torch.long, device=device)
            seen.scatter_add_(1, input_ids, attention_mask)
            seen = seen > 0
        if prompt_lookup:
            return _lookup_greedy(model, ids, logits, cache, budget, prompt_lookup, text_mask, stops, pad, stats)
        same_params = img_params == text_params or layout is None or mode == "image"
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop_t = torch.tensor(stops or [-1], dtype=torch.long, device=device)
        bar = _progress(progress, budget)

        # one-token steps through the model's lean `decode_step` where it has one (eval, no autocast)
        decode = None if compile or model.training or torch.is_autocast_enabled(device.type) else \
            getattr(model, "decode_step", None)
        # lm_head rows actually needed: image spans need only the code rows at a code step and no
        # logits at a forced step; text mode never emits the masked ids (image codes), so it
        # multiplies by the other rows only. Needs hidden states from the model.
        code_head = text_head = text_rows = None
        if not compile and (decode is not None or "return_logits" in fwd):
            if constraints is not None:
                code_head = _rows_head(model, slice(layout.code_offset, layout.code_offset + layout.num_codes), pack)
            elif text_mask is not None:
                text_rows = (~text_mask).nonzero().squeeze(1)  # (V_text,) allowed ids, ascending
                text_head = _rows_head(model, text_rows, pack)
        some_head = code_head is not None or text_head is not None
        # what `logits` holds: "full" (B, V), "codes" (B, num_codes), "text" (B, V_text: the
        # ids text_rows), or a forced token id (no logits)
        kind = "full"
        n = 0
        for step in range(budget):
            u_step = uni[:, step] if need_u else None
            if isinstance(kind, int):  # every row's token is forced: no logits were computed
                tok = torch.full((B,), kind, dtype=torch.long, device=device)
            else:
                lg = logits.float()
                if use_cfg:  # guidance on raw logits; scale 1 leaves c untouched bit for bit
                    c, u = lg[:B], lg[B:]
                    lg = c + (cfg_scale - 1.0) * (c - u)
                if kind == "codes":  # every row at an image code: lg covers the codes only
                    lo = layout.code_offset
                    seen_codes = None if seen is None else seen[:, lo:lo + lg.shape[1]]
                    tok = sample_tokens(lg, img_params, u_step, seen_codes) + lo
                elif kind == "text":  # lg covers the allowed ids only
                    seen_text = None if seen is None else seen.index_select(1, text_rows)
                    tok = text_rows[sample_tokens(lg, text_params, u_step, seen_text)]
                else:
                    if constraints is not None:
                        text_cls = constraints.TEXT if step < cutoff else constraints.TEXT_NO_BOI
                        lg = constraints.apply(lg, span_pos, text_cls)
                    elif text_mask is not None:
                        lg = lg.masked_fill_(text_mask, NEG_INF)
                    if same_params:
                        tok = sample_tokens(lg, img_params if mode == "image" else text_params, u_step, seen)
                    else:
                        t_txt = sample_tokens(lg, text_params, u_step, seen)
                        t_img = sample_tokens(lg, img_params, u_step, seen)
                        tok = torch.where(span_pos >= 0, t_img, t_txt)
            out[:, step] = tok.masked_fill(done, pad)
            n = step + 1
            done |= (tok.unsqueeze(1) == stop_t).any(1)
            if bar is not None:
                bar.update(1)
            if n == budget or bool(done.all()):
                break
            if constraints is not None:
                span_pos = constraints.advance(span_pos, tok)
            if seen is not None:
                seen.scatter_(1, tok.unsqueeze(1), True)
            inp = (tok.repeat(2) if use_cfg else tok).unsqueeze(1)  # (R, 1)
            S = T0 + step + 1
            if code_head is not None:
                kind = _next_kind(constraints, span_pos, step + 1 < cutoff)
            elif text_head is not None:
                kind = "text"
            step_mask = full_mask[:, :S] if padded else None
            if decode is not None:
                res = decode(inp, next_pos, cache, T0 + step, attention_mask=step_mask, return_logits=kind == "full")
                h = res  # (R, V) logits or (R, D) hidden states
            else:
                res = step_model(inp, position_ids=next_pos, attention_mask=step_mask, cache=cache,
                                 cache_position=T0 + step, **extra,
                                 **({"return_logits": kind == "full"} if some_head else {}))
                h = res.logits[:, -1] if kind == "full" else res.hidden_states[:, -1]
            if kind == "full":
                logits = h
            elif kind == "codes":
                logits = code_head(h)  # (R, num_codes)
            elif kind == "text":
                logits = text_head(h)  # (R, V_text)
            next_pos = next_pos + 1
        if bar is not None and bar is not progress:
            bar.close()
        if stats is not None:
            stats.update(forwards=max(n - 1, 0), tokens=n)
        return out[:, :n]


def _rows_head(model, rows: slice | torch.Tensor, pack: bool):
    """h (R, D) -> logits of some rows of lm_head only (R, N): a slice or an index tensor; None
    if the model's output layer is not a plain nn.Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    if isinstance(rows, slice):
        bias = None if head.bias is None else head.bias[rows]
        return cached_linear_fn(model, f"rows:{rows.start}:{rows.stop}", head.weight[rows], bias, enabled=pack)
    return cached_linear_fn(model, "rows:text", head.weight, head.bias, enabled=pack, rows=rows)


def _next_kind(constraints: _Constraints, span_pos: torch.Tensor, boi_allowed: bool):
    """What the next forward must return: "codes" when every row's next token is an image code,
    the token id when every row's next token is the same forced one, else "full"."""
    cls = constraints.classes(span_pos, constraints.TEXT if boi_allowed else constraints.TEXT_NO_BOI).tolist()
    c0 = cls[0]
    if any(c != c0 for c in cls):
        return "full"
    if c0 == constraints.CODE:
        return "codes"
    return constraints.forced[c0 - 3] if c0 >= 3 else "full"


def _draft(seq: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n-gram (n = 3, 2, 1)."""
    L = len(seq)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = seq[L - n:]
        for start in range(L - n - 1, -1, -1):  # latest match first
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def _lookup_greedy(model, ids, logits, cache, budget, k, text_mask, stops, pad, stats):
    """Prompt-lookup decoding (batch 1, greedy): verify copied drafts k at a time.

    Why: a CPU decode step is bound by reading the weights, so a forward over 1 + k tokens
    costs about one token's time; every accepted draft token is a forward saved. The cache
    keeps entries of rejected drafts past the accepted prefix, but the next forward writes
    over them before anything reads them (attention only sees [0, cache_position + T_new)).
    """
    device = ids.device
    seq = ids[0].tolist()
    stop_set = set(stops)

    def pick(lg):  # (T, V) -> greedy ids with the text mask
        lg = lg.float()
        if text_mask is not None:
            lg = lg.masked_fill(text_mask, NEG_INF)
        return lg.argmax(-1).tolist()

    out = [pick(logits)[0]]
    pos = ids.shape[1]  # cache position (and RoPE position: no padding at batch 1) of out[-1]
    forwards = 0
    while len(out) < budget and out[-1] not in stop_set:
        draft = _draft(seq + out, min(k, budget - len(out) - 1))
        inp = torch.tensor([[out[-1]] + draft], device=device)
        T_new = inp.shape[1]
        lg = model(inp, position_ids=torch.arange(pos, pos + T_new, device=device)[None], attention_mask=None,
                   cache=cache, cache_position=pos).logits[0]  # (T_new, V)
        forwards += 1
        preds = pick(lg)
        n_acc = 0
        while n_acc < len(draft) and draft[n_acc] == preds[n_acc]:
            n_acc += 1
        pos += n_acc + 1
        for t in preds[:n_acc + 1]:
            out.append(t)
            if t in stop_set or len(out) == budget:
                break
    if stats is not None:
        stats.update(forwards=forwards, tokens=len(out))
    return torch.tensor([out], dtype=torch.long, device=device)


def _compiled(model):
    """torch.compile'd forward of `model`, built once and cached on the model object.

    dynamic=True: the cache prefix grows by one each step; without it every length would
    recompile. (CUDA graphs would need a fixed-length attention over the whole cache.)
    """
    fn = getattr(model, "_mmkit_compiled_forward", None)
    if fn is None:
        fn = torch.compile(model, dynamic=True)
        object.__setattr__(model, "_mmkit_compiled_forward", fn)
    return fn


def _progress(progress, total):
    if progress is False or progress is None:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="tok", leave=False)
    return progress

