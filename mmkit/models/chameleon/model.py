"""Chameleon-style early-fusion decoder: one transformer over text tokens and VQ image codes.

Plain PyTorch inside a `PreTrainedModel` shell (save_pretrained / from_pretrained / Auto
classes / PEFT). Architecture as Chameleon (Meta `inference/transformer.py`, HF
`modeling_chameleon.py`): RMSNorm in fp32, SwiGLU, rotate-half RoPE, QK-norm (LayerNorm over
head_dim with per-head affine, before RoPE), optional swin-norm ordering, GQA, z-loss.

Differences from transformers' class, on purpose:
- logits cover image codes (HF sets them to -inf, which makes image generation and image
  training impossible);
- fused `wqkv` and `w13` projections (one matmul each instead of three / two);
- `doc_ids` document masking for packed sequences (positions restart per document);
- a static KV cache (`make_cache`) and an int `cache_position` for the fast sampler;
- cross-entropy and z-loss share one logsumexp, and labels are shifted instead of logits
  (no (B, T-1, V) copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from mmkit.models.chameleon.config import MmkitChameleonConfig
from mmkit.nn import CPU_GEMM_ROW_BLOCK, RMSNorm, StaticKVCache, SwiGLU, rope_cos_sin
from mmkit.nn.attention import attention
from mmkit.nn.loss import fused_cross_entropy

IGNORE_INDEX = -100


@dataclass
class ChameleonOutput(ModelOutput):
    loss: torch.Tensor | None = None  # ce + z_loss_coef * z
    logits: torch.Tensor | None = None  # (B, T, V)
    ce_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None  # mean logsumexp^2 (before the coefficient)
    hidden_states: torch.Tensor | None = None  # (B, T, D) after the final norm


class _HeadAffine(torch.autograd.Function):
    """y = x * w + b for x (B, T, H, hd), w/b (H, hd); same values as addcmul.

    Why: the gradient arrives as a transposed view (the attention's (B, H, T, hd) layout) and
    autograd's reductions for dw/db over such a strided tensor cost ~0.9 ms each at the bench
    shape; one contiguous copy and two contiguous row sums cost ~0.4 ms together.
    """

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.addcmul(b, x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        n = w.numel()
        gx = g * w if ctx.needs_input_grad[0] else None
        gw = (g * x).view(-1, n).sum(0).view_as(w) if ctx.needs_input_grad[1] else None
        gb = g.view(-1, n).sum(0).view_as(w) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


class HeadwiseLayerNorm(nn.Module):
    """QK-norm: statistics over head_dim only, then a separate affine per head.

    Weight/bias (H, hd): Chameleon was trained with one affine per model-parallel shard and
    no cross-shard reduction, so heads do not share gamma/beta (see load.py for the
    [model_parallel_size, hd] layout of Lumina-mGPT checkpoints).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps  # HF hard-codes 1e-5 regardless of rms_norm_eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, hd)
        if x.dtype in (torch.bfloat16, torch.float16):
            # Under autocast F.layer_norm would upcast to fp32 and the affine would run in fp32;
            # the kernel already accumulates statistics in fp32, so stay in the matmul dtype
            # (half the bytes, no casts). fp32 runs take the other branch (exact parity).
            with torch.autocast(x.device.type, enabled=False):
                x = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
                return _HeadAffine.apply(x, self.weight.to(x.dtype), self.bias.to(x.dtype))  # x contiguous
        x = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        return torch.addcmul(self.bias, x, self.weight)  # x * w + b in one pass


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: MmkitChameleonConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.wqkv = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = HeadwiseLayerNorm(self.n_heads, self.head_dim)
            self.k_norm = HeadwiseLayerNorm(self.n_kv_heads, self.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, is_causal, cache, cache_position):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q, k, v = q.view(B, T, H, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
        if self.q_norm is not None:
            # under autocast LayerNorm returns fp32; go back to the matmul dtype before RoPE so
            # the rotation and SDPA read half the bytes (fp32 runs are unchanged: parity)
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        cos, sin = cos.to(v.dtype), sin.to(v.dtype)
        q = torch.addcmul(q * cos, rotate_half(q), sin)
        k = torch.addcmul(k * cos, rotate_half(k), sin)
        act_dtype = v.dtype
        if cache is not None:  # the cache may be fp32 under bf16 weights (see make_cache)
            k, v = cache.update(self.layer_idx, k.to(cache.k.dtype), v.to(cache.v.dtype), cache_position)
            q = q.to(k.dtype)
        # training / full forward: mmkit's blocked attention on CPU half precision (~2x the
        # CPU flash kernel); cached decoding keeps SDPA
        sdpa = F.scaled_dot_product_attention if cache is not None else attention
        y = sdpa(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0, enable_gqa=H != Hkv,
        )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd).to(act_dtype))


    def decode(self, x, cos, sin, mask, cache, cache_position, qk_affine):
        """One new token per row (B, 1, D), eval, no autocast: the same arithmetic as forward
        with fewer kernel launches (q and k normed and rotated as one tensor).
        cos/sin (B, 1, hd); qk_affine = (weight, bias) of [q_norm; k_norm] (H + Hkv, hd) or None."""
        B = x.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, H + 2 * Hkv, hd)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]  # (B, H + Hkv, hd), (B, Hkv, hd)
        if qk_affine is not None:
            qk = torch.addcmul(qk_affine[1], F.layer_norm(qk, (hd,), None, None, self.q_norm.eps), qk_affine[0])
        qk = torch.addcmul(qk * cos, rotate_half(qk), sin)
        k, v = cache.update(self.layer_idx, qk[:, H:].unsqueeze(2), v.unsqueeze(2), cache_position)
        y = F.scaled_dot_product_attention(qk[:, :H].unsqueeze(2).to(k.dtype), k, v, attn_mask=mask,
                                           enable_gqa=H != Hkv)  # (B, H, 1, hd)
        return self.wo(y.view(B, 1, H * hd).to(x.dtype))


class Block(nn.Module):
    def __init__(self, cfg: MmkitChameleonConfig, layer_idx: int):
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.attn = Attention(cfg, layer_idx)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask, is_causal, cache, cache_position):  # (B, T, D)
        if self.swin_norm:  # norm the branch output, inside the residual (Chameleon-34B)
            h = x + self.dropout(self.attn_norm(self.attn(x, cos, sin, mask, is_causal, cache, cache_position)))
            return h + self.dropout(self.ffn_norm(self.mlp(h)))
        h = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, cache_position))
        return h + self.dropout(self.mlp(self.ffn_norm(h)))

    def decode(self, x, cos, sin, mask, cache, cache_position, qk_affine):  # (B, 1, D), eval only
        if self.swin_norm:
            h = x + self.attn_norm(self.attn.decode(x, cos, sin, mask, cache, cache_position, qk_affine))
            return h + self.ffn_norm(self.mlp(h))
        h = x + self.attn.decode(self.attn_norm(x), cos, sin, mask, cache, cache_position, qk_affine)
        return h + self.mlp(self.ffn_norm(h))


def image_grid_state(ids: torch.Tensor, cfg: MmkitChameleonConfig) -> torch.Tensor:
    """(B, T) ids -> (B, T, 2) (row, codes so far in the row) after each token of a multires
    image span: boi resets both, eor starts the next row, a code advances the column.
    A code token's own cell is (row, count - 1)."""
    B, T = ids.shape
    idx = torch.arange(T, device=ids.device).expand(B, T)
    is_boi, is_eor = ids == cfg.boi_token_id, ids == cfg.eor_token_id
    eor_c = is_eor.long().cumsum(1)
    code_c = cfg.is_image_token(ids).long().cumsum(1)
    last_boi = torch.where(is_boi, idx, -1).cummax(1).values
    last_sep = torch.where(is_boi | is_eor, idx, -1).cummax(1).values
    row = eor_c - torch.where(last_boi >= 0, eor_c.gather(1, last_boi.clamp(min=0)), 0)
    col = code_c - torch.where(last_sep >= 0, code_c.gather(1, last_sep.clamp(min=0)), 0)
    return torch.stack((row, col), -1)


def image_grid_step(prev: torch.Tensor, tok: torch.Tensor, cfg: MmkitChameleonConfig) -> torch.Tensor:
    """One token per row: state (R, 2) before, tok (R,) -> state after (as image_grid_state)."""
    row, col = prev.unbind(-1)
    is_boi, is_eor = tok == cfg.boi_token_id, tok == cfg.eor_token_id
    row = torch.where(is_boi, 0, row + is_eor.long())
    col = torch.where(is_boi | is_eor, 0, col + cfg.is_image_token(tok).long())
    return torch.stack((row, col), -1)


class ImageGridEmbedding(nn.Module):
    """mmkit option `image_pos_embed`: learned row + column vectors added to image-code tokens.

    Why: with 1-D positions over a raster, "left of" / "at the top" must be inferred from
    distances modulo the row length; a tiny model does not learn that in a short run.
    Zero-initialised, so training starts from the plain Chameleon model.
    """

    def __init__(self, cfg: MmkitChameleonConfig):
        super().__init__()
        self.cfg = cfg
        # with image_block b a token row is a row of b x b blocks (w * b codes): the column
        # table then names (block column, place inside the block) together
        b = getattr(cfg, "image_block", 1) or 1
        self.row = nn.Parameter(torch.zeros(cfg.max_grid_size, cfg.hidden_size))
        self.col = nn.Parameter(torch.zeros(cfg.max_grid_size * b, cfg.hidden_size))

    def forward(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """ids (B, T), state (B, T, 2) from image_grid_state -> (B, T, D), zero off codes."""
        r = state[..., 0].clamp(0, self.row.shape[0] - 1)
        c = (state[..., 1] - 1).clamp(0, self.col.shape[0] - 1)
        e = self.row[r] + self.col[c]  # (B, T, D)
        return e * self.cfg.is_image_token(ids).unsqueeze(-1).to(e.dtype)

    def for_chunk(self, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Embedding of a chunk (B, T) at [start, start + T); a KV cache keeps the per-position
        state (like k/v: a later chunk at an earlier position overwrites it)."""
        B, T = ids.shape
        if cache is not None and (getattr(cache, "_grid_state", None) is None or cache._grid_state.shape[0] != B):
            cache._grid_state = torch.zeros(B, cache.max_len, 2, dtype=torch.long, device=ids.device)  # (B, S, 2)
        if start == 0 or cache is None:
            state = image_grid_state(ids, self.cfg)  # (B, T, 2)
        else:
            prev, steps = cache._grid_state[:, start - 1], []
            for t in range(T):
                prev = image_grid_step(prev, ids[:, t], self.cfg)
                steps.append(prev)
            state = torch.stack(steps, 1)
        if cache is not None:
            cache._grid_state[:, start:start + T] = state
        return self(ids, state)


class Backbone(nn.Module):
    """Embeddings + blocks + final norm (the `model.` prefix, as in transformers)."""

    def __init__(self, cfg: MmkitChameleonConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.grid_embed = ImageGridEmbedding(cfg) if getattr(cfg, "image_pos_embed", False) else None
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def doc_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of a packed row -> position of each token inside its document."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


def image_span_ids(input_ids: torch.Tensor, cfg) -> torch.Tensor:
    """(B, T) ids -> (B, T) long: k > 0 on the tokens of the k-th complete image span of a row
    (boi .. eoi inclusive), 0 elsewhere (text, and a span still open at the end)."""
    is_boi, is_eoi = input_ids == cfg.boi_token_id, input_ids == cfg.eoi_token_id
    k = is_boi.long().cumsum(1)  # spans opened so far
    closed = is_eoi.long().cumsum(1) - is_eoi.long()  # spans closed before this token
    inside = k > closed  # between a boi and its eoi (inclusive)
    # a span is complete iff its eoi comes later in the row: count eois from the right
    eoi_total = is_eoi.long().sum(1, keepdim=True)
    complete = k <= eoi_total
    return torch.where(inside & complete, k, 0)


def build_attention_mask(T: int, start: int, attention_mask, doc_ids, device, bidi_ids=None):
    """-> (mask (B, 1, T, S) bool or None, is_causal) for queries [start, start+T) over keys [0, S).

    The common cases need no mask tensor: a fresh causal pass uses SDPA's `is_causal`, a
    one-token decode step attends to every cached key. `bidi_ids` (B, T) (fresh pass only):
    tokens sharing an id > 0 also see each other's later tokens (bidirectional image spans).
    """
    S = start + T
    if bidi_ids is not None and not bool((bidi_ids > 0).any()):
        bidi_ids = None
    if bidi_ids is not None and start:
        raise ValueError("bidi_ids need a fresh pass over the whole prompt (cache_position 0)")
    if doc_ids is not None and start == 0 and bool((doc_ids == doc_ids[:, :1]).all()):
        doc_ids = None  # one document per row: plain causal, no (B, T, T) mask to build or apply
    if doc_ids is None and bidi_ids is None and (attention_mask is None or bool(attention_mask[:, :S].all())):
        if start == 0:
            return None, T > 1
        if T == 1:
            return None, False
    q_pos = torch.arange(start, S, device=device)
    mask = q_pos[:, None] >= torch.arange(S, device=device)[None, :]  # (T, S) causal
    mask = mask[None, None]
    if bidi_ids is not None:  # (B, 1, T, T): a bidirectional block per image span
        mask = mask | ((bidi_ids[:, :, None] == bidi_ids[:, None, :]) & (bidi_ids[:, :, None] > 0))[:, None]
    if doc_ids is not None:  # block-causal: attention stays inside each document
        if start:
            raise ValueError("doc_ids cannot be combined with a KV cache")
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :S].bool()
        # a left-pad query row would have no key at all (NaN); let it see itself
        mask = mask | (q_pos[:, None] == torch.arange(S, device=device)[None, :])[None, None]
    return mask, False


class MmkitChameleonForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MmkitChameleonConfig
    config: MmkitChameleonConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MmkitChameleonConfig):
        super().__init__(config)
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    # -- transformers plumbing ------------------------------------------------------
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ImageGridEmbedding):
            nn.init.zeros_(module.row)
            nn.init.zeros_(module.col)
        elif isinstance(module, (RMSNorm, HeadwiseLayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None):
        self.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """transformers' `generate` (users' habit) recomputes the whole prefix each step;
        `mmkit.generate` is the fast path with the static cache."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # -- fast generation contract (docs/design.md) ----------------------------------
    def make_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        """Static cache; on CPU a bf16/fp16 request gets an fp32 cache: CPU SDPA of one query over
        a long prefix is ~2.7x faster in fp32 than in bf16 although it reads twice the bytes (8
        layers, 1000 keys, 2 rows: 5.3 vs 14.4 ms), and bf16 k/v are exact in fp32 (attention
        then runs in fp32)."""
        p = self.lm_head.weight
        cfg = self.config
        dev = torch.device(device or p.device)
        if dev.type == "cpu" and (dtype or p.dtype) in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        return StaticKVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                             dtype=dtype or p.dtype, device=device or p.device)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache,
                    cache_position: int, attention_mask: torch.Tensor | None = None,
                    return_logits: bool = True) -> torch.Tensor:
        """One token per row (R, 1) -> logits (R, V), or the final hidden states (R, D) if not
        return_logits. Same numbers as `forward(..., cache=, logits_to_keep=1)`, fewer kernel
        launches (decoding a small model on CPU is launch-bound); eval mode, autocast off."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)  # (R, 1, D)
        if self.model.grid_embed is not None:
            x = x + self.model.grid_embed.for_chunk(input_ids, cache, cache_position)
        dt = x.dtype
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (R, 1, hd/2) fp32
        cos = torch.cat((cos, cos), dim=-1).to(dt)  # (R, 1, hd): broadcasts over heads
        sin = torch.cat((sin, sin), dim=-1).to(dt)
        mask, _ = build_attention_mask(1, cache_position, attention_mask, None, x.device)
        affine = getattr(cache, "_qk_affine", None)
        if affine is None or affine[0] is not dt:  # [q_norm; k_norm] affine per layer, built once per cache
            affine = (dt, [None if b.attn.q_norm is None else
                           (torch.cat([b.attn.q_norm.weight, b.attn.k_norm.weight]).to(dt),
                            torch.cat([b.attn.q_norm.bias, b.attn.k_norm.bias]).to(dt)) for b in self.model.layers])
            cache._qk_affine = affine
        for layer, qk_affine in zip(self.model.layers, affine[1]):
            x = layer.decode(x, cos, sin, mask, cache, cache_position, qk_affine)
        h = self.model.norm(x)[:, -1]  # (R, D)
        return self.lm_head(h) if return_logits else h

    # -- forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T_total incl. cache), 0 = (left) padding
        position_ids: torch.Tensor | None = None,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), aligned with input_ids (shifted here)
        doc_ids: torch.Tensor | None = None,  # (B, T) packed-document ids: block-causal attention
        bidi_ids: torch.Tensor | None = None,  # (B, T) ids > 0: bidirectional spans (image_bidi models)
        cache: StaticKVCache | None = None,
        cache_position: int | None = None,
        loss_weights: torch.Tensor | None = None,  # (B, T) weight of predicting labels[t]
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,  # >0: only the last positions' logits (decode)
        return_logits: bool = True,  # False: no logits (the sampler slices hidden_states; with labels: head on supervised rows only)
        return_dict: bool | None = None,
        **kwargs,  # output_attentions etc. from PEFT/transformers callers: ignored
    ) -> ChameleonOutput:
        cfg = self.config
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        start = int(cache_position or 0)
        if self.model.grid_embed is not None and input_ids is not None:
            x = x + self.model.grid_embed.for_chunk(input_ids, cache, start)
        if position_ids is None:
            if doc_ids is not None:
                position_ids = doc_position_ids(doc_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
            else:
                position_ids = torch.arange(start, start + T, device=x.device)[None]
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (B, T, hd/2) fp32
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)  # (B, 1, T, hd), computed once for all layers
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
        dev = x.device.type
        act_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.lm_head.weight.dtype
        cos, sin = cos.to(act_dtype), sin.to(act_dtype)  # the dtype q/k have when RoPE runs
        if bidi_ids is None and getattr(cfg, "image_bidi", False) and start == 0 and input_ids is not None:
            # image_bidi models read every complete image of a fresh prompt bidirectionally, as
            # training reads the images of understanding samples (an image being generated is
            # never complete in the prompt, so it stays causal)
            bidi_ids = image_span_ids(input_ids, cfg)
        mask, is_causal = build_attention_mask(T, start, attention_mask, doc_ids, x.device, bidi_ids)

        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, is_causal, None, 0, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, start)
        h = self.model.norm(x)  # (B, T, D)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if not return_logits:
            if labels is None:
                return ChameleonOutput(hidden_states=h)
            loss, ce, z = self.loss_from_hidden(h, labels, loss_weights)
            return ChameleonOutput(loss=loss, ce_loss=ce, z_loss=z, hidden_states=h)
        logits = self.lm_head(h)  # (B, T, V): image codes included, nothing masked

        loss = ce = z = None
        if labels is not None:
            loss, ce, z = self.loss_from_logits(logits, labels, loss_weights)
        return ChameleonOutput(loss=loss, logits=logits, ce_loss=ce, z_loss=z, hidden_states=h)

    def _shifted_targets(self, labels, loss_weights):
        """-> (target (N,), weight (N,) or None, n supervised): labels shifted left, flattened."""
        target = torch.full_like(labels, IGNORE_INDEX)
        target[:, :-1] = labels[:, 1:]
        target = target.flatten()  # (N,)
        w = None
        if loss_weights is not None:
            w = torch.zeros_like(loss_weights, dtype=torch.float32)
            w[:, :-1] = loss_weights[:, 1:]
            w = w.flatten()
        return target, w, max(int((target != IGNORE_INDEX).sum()), 1)

    def loss_from_hidden(self, h, labels, loss_weights=None):
        """The loss of `loss_from_logits`, with the LM head applied to supervised rows only.

        Why: in training most positions are read, not predicted (VQA images and questions,
        captioned images, padding); projecting them to the vocabulary and back costs ~3
        (rows x D x V) matmuls and a logits-sized gradient buffer for nothing. Same values
        as `loss_from_logits(lm_head(h), ...)` (rows are independent in the head).
        """
        target, w, n = self._shifted_targets(labels, loss_weights)
        idx = (target != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
        # CPU: pad the row count with ignored rows (CPU_GEMM_ROW_BLOCK): the supervised count
        # changes every step (unpadded: +170 KB of kernels and a growing step time per step)
        pad = -idx.numel() % CPU_GEMM_ROW_BLOCK if h.device.type == "cpu" else 0
        tgt = target.index_select(0, idx)
        if pad:
            idx = torch.cat([idx, idx.new_zeros(pad)])
            tgt = torch.cat([tgt, tgt.new_full((pad,), IGNORE_INDEX)])
        logits = self.lm_head(h.flatten(0, 1).index_select(0, idx))  # (n + pad, V)
        ce_sum, z_sum = fused_cross_entropy(logits, tgt, None if w is None else w.index_select(0, idx))
        ce, z = ce_sum / n, z_sum / n
        loss = ce + self.config.z_loss * z if self.config.z_loss else ce
        return loss, ce.detach(), z.detach()

    def loss_from_logits(self, logits, labels, loss_weights=None):
        """Next-token CE (+ z-loss) over labels != -100; per-token weights optional.

        Shifts the labels left instead of slicing the logits. CE and z-loss share one
        logsumexp in fp32. Normalised by the number of supervised tokens, so weights < 1
        down-weight a modality without changing the scale of the others.
        """
        target, w, n = self._shifted_targets(labels, loss_weights)
        ce_sum, z_sum = fused_cross_entropy(logits.flatten(0, 1), target, w)  # skips unsupervised rows
        ce, z = ce_sum / n, z_sum / n
        loss = ce + self.config.z_loss * z if self.config.z_loss else ce
        return loss, ce.detach(), z.detach()


def register_auto() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `mmkit_chameleon` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("mmkit_chameleon", MmkitChameleonConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MmkitChameleonConfig, MmkitChameleonForCausalLM)
    except ValueError:
        pass


register_auto()
