"""Configs of the Kimi-VL family: MoonViT (vision), the MoE decoder (text), the whole model.

transformers configs (dataclass-style in transformers 5), so `save_pretrained` /
`from_pretrained` / Auto classes work. The text sub-config is the decoder's own config
(`mmkit.models.kimivl.decoder.MoEDecoderConfig`, DeepseekV3Config field names) and is
stored as its plain dict in config.json.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoonViTConfig(PretrainedConfig):
    """MoonViT hyper-parameters; defaults are Kimi-VL-A3B's (hd = 1152/16 = 72)."""

    model_type = "mmkit_moonvit"

    patch_size: int = 14
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    merge_kernel_size: list[int] | tuple[int, int] = (2, 2)
    rope_theta: float = 10000.0
    use_rope: bool = True  # off only to reproduce a ViT initialised from open_clip at its own resolution
    hidden_act: str = "gelu_pytorch_tanh"  # Kimi-VL; "gelu" (erf) for ViTs copied from exact-GELU models
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.merge_kernel_size = list(self.merge_kernel_size)
        super().__post_init__(**kwargs)
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision hidden_act must be 'gelu_pytorch_tanh' or 'gelu', got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must be a multiple of num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("vision head_dim must be a multiple of 4 (2-D RoPE pairs per axis)")


class MmkitKimiVLConfig(PretrainedConfig):
    """MoonViT + 2x2 merge MLP projector + MoE decoder.

    `image_token_id` is the placeholder (one per merged image token), wrapped in
    `boi_token_id` / `eoi_token_id` (mmkit tokenizer: `<image>`, `<boi>`, `<eoi>`).
    """

    model_type = "mmkit_kimivl"
    sub_configs_defaults = {"vision_config": MoonViTConfig}

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | None = None
    projector_layer_norm_eps: float = 1e-5
    image_token_id: int = 5
    boi_token_id: int | None = 3
    eoi_token_id: int | None = 4
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = 2
    ignore_index: int = -100
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            self.text_config = {}
        elif not isinstance(self.text_config, dict):  # a MoEDecoderConfig object
            self.text_config = text_config_to_dict(self.text_config)
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.get("vocab_size", 0))

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.get("hidden_size", 0))


def text_config_to_dict(cfg) -> dict:
    """MoEDecoderConfig (dataclass or PretrainedConfig) -> plain JSON-able dict."""
    import dataclasses

    if isinstance(cfg, dict):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, PretrainedConfig):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, PretrainedConfig):
        d = cfg.to_dict()
        for k in ("transformers_version", "model_type", "architectures", "dtype", "torch_dtype"):
            d.pop(k, None)
        return d
    raise TypeError(f"unsupported text config type {type(cfg).__name__}")
