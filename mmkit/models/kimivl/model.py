"""The whole Kimi-VL-style model: MoonViT -> 2x2 merge projector -> MoE decoder.

transformers calling convention and layouts (`pixel_values` (N, 3, 14, 14) patches,
`image_grid_thw` rows (1, h, w), as Kimi-K2.5): the projected image features replace the
embeddings at the `image_token_id` placeholders (counts must match). Decoder positions are
plain 1-D and causal (no M-RoPE), as in Kimi-VL.

Fast generation (docs/design.md): `make_cache` delegates to the decoder's MLA latent cache;
`forward(..., cache=, cache_position=, position_ids=)` runs prefill (images allowed) and
decode steps (text only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from mmkit.models.kimivl.config import MmkitKimiVLConfig, MoonViTConfig
from mmkit.models.kimivl.decoder import causal_lm_loss
from mmkit.models.kimivl.projector import PatchMergerProjector
from mmkit.models.kimivl.vision import MoonViT


def build_decoder_config(text_config: dict):
    from mmkit.models.kimivl.decoder import MoEDecoderConfig

    return MoEDecoderConfig.from_dict(dict(text_config), "text_config")


@dataclass
class KimiVLOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


class MmkitKimiVLPreTrainedModel(PreTrainedModel):
    config_class = MmkitKimiVLConfig
    config: MmkitKimiVLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["VisionBlock", "DecoderLayer"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    @torch.no_grad()
    def _init_weights(self, module):
        # the decoder config's initializer_range (DeepseekV3 name; 0.02 by default) for every module
        std = getattr(getattr(self, "text_config", None), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv2d):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif type(module).__name__ in ("GroupedExperts", "TopKRouter"):
            self.language_model._init_weights(module)  # the decoder's own init for its fused params
        if hasattr(module, "pos_emb") and isinstance(getattr(module.pos_emb, "weight", None), nn.Parameter):
            module.pos_emb.weight.normal_(0.0, std)


class MmkitKimiVLForConditionalGeneration(MmkitKimiVLPreTrainedModel):
    """`model(input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, labels=None)`."""

    def __init__(self, config: MmkitKimiVLConfig):
        super().__init__(config)
        from mmkit.models.kimivl.decoder import MoEDecoder

        vcfg: MoonViTConfig = config.vision_config
        self.text_config = build_decoder_config(config.text_config)
        kh, kw = vcfg.merge_kernel_size
        self.vision_tower = MoonViT(vcfg)
        self.multi_modal_projector = PatchMergerProjector(vcfg.hidden_size, self.text_config.hidden_size, kh * kw,
                                                          config.projector_layer_norm_eps)
        self.language_model = MoEDecoder(self.text_config)
        self.lm_head = nn.Linear(self.text_config.hidden_size, self.text_config.vocab_size, bias=False)
        self.post_init()

    # --- transformers plumbing -------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def enable_activation_checkpointing(self) -> None:
        """Recompute every ViT block and decoder layer in backward (state_dict keys unchanged)."""
        from torch.utils.checkpoint import checkpoint

        self.vision_tower.gradient_checkpointing = True
        for layer in self.language_model.layers:
            if getattr(layer, "_mmkit_checkpointed", False):
                continue
            orig = layer.forward

            def fwd(*args, _orig=orig, **kwargs):
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

            layer.forward = fwd
            layer._mmkit_checkpointed = True

    # --- parts -------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, 3, p, p) patches + (n, 3) grids -> (N/4, D_text) merged, projected tokens in order."""
        meta = self.vision_tower.build_meta(image_grid_thw, pixel_values.device)
        feats = self.vision_tower(pixel_values, image_grid_thw, meta=meta)  # (N, Dv)
        merged = self.vision_tower.merge_2x2(feats, meta)  # (N/4, 4, Dv)
        return self.multi_modal_projector(merged)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with image features scattered at the placeholders."""
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        ids = input_ids.masked_fill(image_mask | (input_ids >= self.text_config.vocab_size), 0)
        embeds = self.get_input_embeddings()(ids)  # (B, T, D)
        feats = None
        if pixel_values is not None and pixel_values.numel():
            feats = self.get_image_features(pixel_values, image_grid_thw).to(embeds.dtype)
            n = int(image_mask.sum())
            if n != feats.shape[0]:
                raise ValueError(f"{n} image placeholder tokens but {feats.shape[0]} image features")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats)
        return embeds, feats

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' auxiliary balance losses of the last forward (None if off)."""
        return self.language_model.aux_loss

    def expert_load(self):
        return self.language_model.expert_load()

    def update_balancing_bias(self, *args, **kwargs):
        return self.language_model.update_balancing_bias(*args, **kwargs)

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"):
        return self.language_model.make_cache(batch_size, max_len, dtype=dtype, device=device)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, cache_position: int = 0, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> KimiVLOutput:
        feats = None
        if inputs_embeds is None:
            inputs_embeds, feats = self.embed(input_ids, pixel_values, image_grid_thw)
        hidden = self.language_model(inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                                     cache=cache, cache_position=cache_position)  # (B, T, D)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = lm_loss = aux = None
        if labels is not None:
            # next-token CE over non-ignored targets (mean), as transformers' ForCausalLMLoss,
            # through the chunked fused kernel (no full fp32 copies of the logits)
            lm_loss = causal_lm_loss(logits, labels, ignore_index=self.config.ignore_index)
            aux = self.aux_loss() if self.training else None
            loss = lm_loss if aux is None else lm_loss + aux
        return KimiVLOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_loss=aux, image_features=feats)


def register_auto() -> None:
    """Make AutoConfig / AutoModel* resolve `mmkit_kimivl` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    for name, cls in (("mmkit_moonvit", MoonViTConfig), ("mmkit_kimivl", MmkitKimiVLConfig)):
        try:
            AutoConfig.register(name, cls)
        except ValueError:
            pass
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            auto.register(MmkitKimiVLConfig, MmkitKimiVLForConditionalGeneration)
        except ValueError:
            pass


register_auto()


@torch.no_grad()
def greedy_generate(model: MmkitKimiVLForConditionalGeneration, input_ids: torch.Tensor, pixel_values=None,
                    image_grid_thw=None, max_new_tokens: int = 16, eos_token_id: int | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Minimal greedy decoding with the latent cache (images in the prefill only); (B, <= N) new ids.

    The full sampler lives in mmkit.generation; this is for tests and training samples.
    """
    B, T = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = model.make_cache(B, T + max_new_tokens, dtype=dtype, device=input_ids.device)
    if attention_mask is not None:
        cache.attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], 1)
    logits = model(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, cache=cache,
                   cache_position=0, logits_to_keep=1).logits
    out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)  # (B,)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        out.append(nxt)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache, cache_position=T + step).logits
    return torch.stack(out, 1)
