"""Text tokenizer (byte-level BPE, `mmkit.text.tokenizer`) and image-code <-> token-id maps
(`mmkit.text.image_vocab`). See docs/tokenizers.md."""
