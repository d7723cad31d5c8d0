"""Config of the Chameleon-style early-fusion model (one decoder over text + VQ image codes).

Field names follow transformers' `ChameleonConfig` where they mean the same thing, so a
converted checkpoint reads naturally; the unified-vocabulary fields (`boi_token_id`,
`eoi_token_id`, `image_token_offset`, `num_image_tokens`, grid size, row/size tokens) are
the ones the sampler and the processor read (docs/design.md).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MmkitChameleonConfig(PretrainedConfig):
    model_type = "mmkit_chameleon"
    keys_to_ignore_at_inference = ["past_key_values"]

    # decoder
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qk_norm: bool = True  # LayerNorm(head_dim) with per-head weight+bias, before RoPE
    swin_norm: bool = False  # Chameleon-34B ordering: norm after attn/FFN, inside the residual
    dropout: float = 0.0  # residual dropout after attention and FFN (paper: 0.1 at 7B)
    attention_dropout: float = 0.0
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) over supervised tokens (e.g. 1e-5)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = False

    # unified vocabulary: image code c <-> token id image_token_offset + c
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None  # the <image> placeholder (processor only)
    eot_token_id: int | None = None  # end of turn
    image_token_offset: int = 4
    num_image_tokens: int = 8192
    image_grid_h: int = 32  # code grid of a generated image (fixed-size mode)
    image_grid_w: int = 32
    # optional Lumina-mGPT/Emu3-style multi-resolution tokens: boi, <h>, <w>, rows each
    # closed by eor, eoi. Size token of n = size_token_offset + n.
    eor_token_id: int | None = None
    size_token_offset: int | None = None
    max_grid_size: int = 0
    # mmkit-only (not in Chameleon, default off so converted checkpoints stay exact): learned
    # row + column embeddings added to image-code tokens (needs the multires layout: the
    # row/column of a code is counted from boi / eor in the token stream)
    image_pos_embed: bool = False
    # input images are resized to image_size x image_size px before VQ encoding (training codes from
    # `mmkit data tokenize-images --square`, the pipeline likewise); None = each image at its own size
    image_size: int | None = None
    # mmkit-only, square models (image_size) with size tokens: the size tokens after boi name the
    # source image's size in VQ-factor units (its aspect before the square resize), not the fixed
    # code grid; a generated image asks for a square source unless another size is given
    source_size_tokens: bool = False
    # mmkit-only layout (processor + sampler): image codes are written in image_block x image_block
    # blocks, each block's codes consecutive (mmkit.text.image_vocab.to_block_order); 1 = raster
    image_block: int = 1
    # mmkit-only: images that are read, not written (VQA / caption inputs in training; every complete
    # image span of a fresh prompt at inference) attend bidirectionally inside their span, like a
    # ViT; images being generated stay causal
    image_bidi: bool = False
    # mmkit-only layout (processor + pipeline): a VQA prompt names the question before the
    # image too, so the image tokens are read with the question in view
    vqa_question_first: bool = False
    # kept from a transformers checkpoint (name -> id), so export writes it back unchanged
    vocabulary_map: dict | None = None
    hf_vq_config: dict | None = None  # the source checkpoint's VQGAN config (weights not kept)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.image_pos_embed and (self.eor_token_id is None or self.max_grid_size <= 0):
            raise ValueError("image_pos_embed needs the multires layout (eor_token_id, max_grid_size > 0)")
        if self.image_block < 1:
            raise ValueError(f"image_block must be >= 1 (got {self.image_block})")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be a positive pixel side or None (got {self.image_size})")
        if self.source_size_tokens and (self.image_size is None or self.size_token_offset is None):
            raise ValueError("source_size_tokens needs a square model (image_size) with size tokens (multires)")
        if self.image_token_offset + self.num_image_tokens > self.vocab_size:
            raise ValueError("image codes [image_token_offset, +num_image_tokens) exceed vocab_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_image_token(self, ids):
        """Bool mask of ids that are image codes (tensor or int)."""
        return (ids >= self.image_token_offset) & (ids < self.image_token_offset + self.num_image_tokens)
