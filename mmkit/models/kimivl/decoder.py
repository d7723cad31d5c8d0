"""DeepSeek-V3 / Moonlight-style MoE decoder (MLA + shared/routed experts) for the Kimi-VL family.

Contract with the whole model (`mmkit/models/kimivl/model.py`, `load.py`):
- `MoEDecoderConfig`: strict dataclass; field names = transformers `DeepseekV3Config`
  names (plus `scoring_func`, `topk_method`, `aux_loss_alpha`, `seq_aux`,
  `bias_update_speed` = gamma of aux-loss-free balancing, `experts_impl`).
  `MoEDecoderConfig.from_hf(dict_or_config)` reads a DeepseekV3 / Kimi text config.
- `MoEDecoder(cfg)`: `embed_tokens`, `layers`, `norm`;
  `forward(inputs_embeds (B,T,D), position_ids=None, attention_mask=None (B,T_total), 0 = left pad),
  cache=None, cache_position=0) -> hidden (B,T,D)` (after the final norm).
  Without `position_ids`, positions are `cumsum(attention_mask) - 1` (left-padded rows
  start at 0) or `cache_position + arange(T)`.
  `make_cache(batch_size, max_len, dtype, device) -> MLACache` (compressed latent + rope key).
  `aux_loss` (sum over MoE layers of the last training forward, or None),
  `expert_load() -> {metric: float}` for the trainer's logs,
  `update_balancing_bias()` (call from the task's `on_optimizer_step`).
- `MoECausalLM(cfg)`: `model` (MoEDecoder) + `lm_head`;
  `forward(input_ids=None, inputs_embeds=None, labels=None, attention_mask=None, position_ids=None,
  cache=None, cache_position=0) -> MoEOutput(logits, loss)` (a NamedTuple: unpacks as
  `(logits, loss)` and has `.logits`). Labels are unshifted (HF convention, -100 ignored);
  the loss includes `aux_loss` when aux_loss_alpha > 0.
  Parameter names equal transformers' `DeepseekV3ForCausalLM` (fused experts layout).
- `convert_deepseek_v3_state_dict(hf_sd)` (per-expert or fused HF keys -> mmkit) and
  `to_deepseek_v3_state_dict(sd, per_expert=False)` (the reverse).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.config import from_dict, to_dict
from mmkit.errors import MmkitError
from mmkit.models.kimivl.mla import MLA, MLACache
from mmkit.models.kimivl.moe import MoE, DenseMLP, GroupedExperts, TopKRouter
from mmkit.nn import RMSNorm, rope_cos_sin
from mmkit.nn.loss import IGNORE_INDEX, fused_cross_entropy


@dataclass
class MoEDecoderConfig:
    """Decoder hyper-parameters; names as transformers' DeepseekV3Config (tiny defaults)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176  # dense layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 32  # width of each routed / shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # MLA: every head has its own k/v from the latent
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 32
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 8
    qk_nope_head_dim: int = 16
    v_head_dim: int = 16
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (0 = off)
    seq_aux: bool = True  # per-sequence (True) or per-batch balance statistics
    bias_update_speed: float = 0.001  # gamma: e_score_correction_bias step per optimizer step (0 = frozen)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: Literal["silu"] = "silu"
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    experts_impl: Literal["auto", "grouped_mm", "loop", "reference"] = "auto"

    def __post_init__(self):
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even")

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "MoEDecoderConfig":
        return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_hf(cls, hf) -> "MoEDecoderConfig":
        """From a transformers DeepseekV3Config (or its config.json dict / a Kimi `text_config`).

        Known fields are taken, the rest (tokenizer ids lists, MTP layers, dtype...) ignored.
        Only plain RoPE is supported (YaRN-scaled DeepSeek-V3 configs are refused).
        """
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise MmkitError(f"unsupported rope scaling {rope_type!r} (only plain RoPE)")
        if d.get("rope_interleave") is False:
            raise MmkitError("rope_interleave=False checkpoints are not supported (DeepSeek/Kimi use interleaved)")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0]
        if d.get("moe_layer_freq", 1) != 1:
            raise MmkitError("moe_layer_freq != 1 is not supported")
        kw.pop("experts_impl", None)
        return from_dict(cls, kw, "deepseek_v3 config")

    def to_hf(self) -> dict:
        """transformers DeepseekV3Config kwargs (config.json) for this decoder."""
        d = self.to_dict()
        for k in ("rope_theta", "scoring_func", "topk_method", "aux_loss_alpha", "seq_aux",
                  "bias_update_speed", "experts_impl"):
            d.pop(k)
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_interleave=True,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 num_key_value_heads=self.num_key_value_heads or self.num_attention_heads)
        return d


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)); x + MLP-or-MoE(norm(x))."""

    def __init__(self, cfg: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLA(cfg.hidden_size, cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                             kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                             qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                             attention_bias=cfg.attention_bias)
        if layer_idx >= cfg.first_k_dense_replace:
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_shared_experts,
                           cfg.num_experts_per_tok, scoring_func=cfg.scoring_func, topk_method=cfg.topk_method,
                           n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=cfg.routed_scaling_factor, aux_loss_alpha=cfg.aux_loss_alpha,
                           seq_aux=cfg.seq_aux, experts_impl=cfg.experts_impl)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, cache, cache_position, token_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, cache_position, self.layer_idx)
        h = self.post_attention_layernorm(x)
        h = self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h)
        return x + h


def _attention_mask(pad: torch.Tensor | None, t: int, start: int, device) -> torch.Tensor | None:
    """Bool (B|1, 1, T, S) mask for queries at [start, start+T) over keys [0, S); None = plain causal."""
    s = start + t
    if pad is None and start == 0:
        return None  # SDPA's is_causal (flash path)
    q_pos = torch.arange(start, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if pad is not None:
        allowed = allowed & pad[:, None, None, :s].bool()
        # a left-pad query row would see no key at all (NaN in SDPA): let it see itself
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class MoEDecoder(nn.Module):
    """Embeddings + MLA/MoE layers + final norm; returns hidden states (no lm_head)."""

    def __init__(self, cfg: MoEDecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.aux_loss: torch.Tensor | None = None
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, GroupedExperts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)
        elif isinstance(m, TopKRouter):
            nn.init.normal_(m.weight, std=std)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> MLACache:
        c = self.config
        return MLACache(c.num_hidden_layers, batch_size, max_len, c.kv_lora_rank, c.qk_rope_head_dim, dtype, device)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: MLACache | None = None,
                cache_position: int = 0) -> torch.Tensor:
        b, t, _ = inputs_embeds.shape
        start = int(cache_position)
        if attention_mask is None and cache is not None:
            attention_mask = cache.attention_mask
        pad = None
        if attention_mask is not None:
            pad = attention_mask[:, : start + t]
            if bool(pad.all()):
                pad = None  # nothing padded: keep the fast causal path
        if position_ids is None:
            if pad is not None:
                position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            else:
                position_ids = torch.arange(start, start + t, device=inputs_embeds.device)[None].expand(b, t)
        cos, sin = rope_cos_sin(position_ids, self.config.qk_rope_head_dim, self.config.rope_theta)  # (B, T, R/2)
        attn_mask = _attention_mask(pad, t, start, inputs_embeds.device)
        if attn_mask is None and start > 0 and t > 1:  # chunked prefill without padding
            attn_mask = _attention_mask(torch.ones(b, start + t, device=inputs_embeds.device), t, start,
                                        inputs_embeds.device)
        token_mask = pad[:, start:].bool() if pad is not None else None  # (B, T): not counted for balance
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, start, token_mask)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        self.aux_loss = torch.stack(aux).sum() if aux else None
        return self.norm(x)

    # --- balancing, for the trainer ---------------------------------------------------------
    @torch.no_grad()
    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, E) tokens routed per expert since the last bias update."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.config.n_routed_experts)
        return torch.stack([m.tokens_per_expert for m in layers]).cpu()

    def expert_load(self) -> dict[str, float]:
        """Load statistics for the logs: max/min expert load relative to uniform, bias spread."""
        counts = self.expert_counts()
        if counts.numel() == 0 or counts.sum() == 0:
            return {}
        rel = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-9)  # (L, E), 1 = balanced
        bias = torch.stack([m.gate.e_score_correction_bias for m in self.moe_layers()]).cpu()
        out = {"moe/load_max": rel.max(1).values.mean().item(), "moe/load_min": rel.min(1).values.mean().item(),
               "moe/load_cv": (counts.std(1) / counts.mean(1).clamp(min=1e-9)).mean().item(),
               "moe/bias_absmax": bias.abs().max().item()}
        for i, r in enumerate(rel):
            out[f"moe/layer{i}_load_max"] = r.max().item()
        return out

    def update_balancing_bias(self) -> None:
        """Aux-loss-free balancing step; call once per optimizer step (clears the counts)."""
        for m in self.moe_layers():
            m.update_bias(self.config.bias_update_speed)


class MoEOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None


class MoECausalLM(nn.Module):
    """MoEDecoder + lm_head; names equal transformers' DeepseekV3ForCausalLM."""

    def __init__(self, cfg: MoEDecoderConfig):
        super().__init__()
        self.config = cfg
        self.model = MoEDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch_size, max_len, dtype=torch.float32, device="cpu") -> MLACache:
        return self.model.make_cache(batch_size, max_len, dtype, device)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.model.aux_loss

    def expert_load(self) -> dict[str, float]:
        return self.model.expert_load()

    def update_balancing_bias(self) -> None:
        self.model.update_balancing_bias()

    def forward(self, input_ids=None, inputs_embeds=None, labels=None, attention_mask=None, position_ids=None,
                cache=None, cache_position: int = 0) -> MoEOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids / inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden = self.model(inputs_embeds, position_ids, attention_mask, cache, cache_position)  # (B, T, D)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if self.model.aux_loss is not None:
                loss = loss + self.model.aux_loss
        return MoEOutput(logits, loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy, mean over non-ignored targets (fp32 math, as transformers)."""
    # Chunked fused CE (mmkit.nn.loss): ~6 fewer full (N, V) fp32 passes than the autograd path.
    shift = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # (B, T): target of position t is labels[t+1]
    target = shift.reshape(-1).masked_fill(shift.reshape(-1) == ignore_index, IGNORE_INDEX)
    ce_sum, _ = fused_cross_entropy(logits.reshape(-1, logits.shape[-1]), target)  # skips unsupervised rows
    return ce_sum / (target != IGNORE_INDEX).sum().clamp(min=1)


# --- checkpoint conversion ---------------------------------------------------------------------
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def convert_deepseek_v3_state_dict(hf_sd: dict[str, torch.Tensor],
                                   num_hidden_layers: int | None = None) -> dict[str, torch.Tensor]:
    """transformers DeepseekV3ForCausalLM state dict -> MoECausalLM state dict.

    Accepts the fused layout (`experts.gate_up_proj` (E,2I,D), `experts.down_proj` (E,D,I)) and
    the original per-expert layout (`experts.N.{gate,up,down}_proj.weight`, what
    `save_pretrained` writes by default and Moonlight ships). Drops rotary `inv_freq` buffers and
    layers >= num_hidden_layers (DeepSeek-V3's multi-token-prediction layer).
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in hf_sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        m = re.match(r"^model\.layers\.(\d+)\.", key)
        if m and num_hidden_layers is not None and int(m.group(1)) >= num_hidden_layers:
            continue
        em = _EXPERT_KEY.match(key)
        if em:
            experts.setdefault(em.group(1), {}).setdefault(int(em.group(2)), {})[em.group(3)] = value
            continue
        out[key] = value
    for prefix, per in experts.items():
        ids = sorted(per)
        if ids != list(range(len(ids))):
            raise MmkitError(f"{prefix}: expert indices are not 0..{len(ids) - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([per[e]["down_proj"] for e in ids])
    for key in [k for k in out if k.endswith("e_score_correction_bias")]:
        out[key] = out[key].float()
    return out


def to_deepseek_v3_state_dict(sd: dict[str, torch.Tensor], per_expert: bool = False) -> dict[str, torch.Tensor]:
    """MoECausalLM state dict -> transformers DeepseekV3ForCausalLM keys (fused, or per-expert)."""
    out = {}
    for key, value in sd.items():
        if per_expert and key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e, w in enumerate(value.unbind(0)):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
        elif per_expert and key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e, w in enumerate(value.unbind(0)):
                out[f"{prefix}.{e}.down_proj.weight"] = w.contiguous()
        else:
            out[key] = value
    return out
