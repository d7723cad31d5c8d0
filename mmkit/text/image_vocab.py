"""Image code <-> token id maps for unified (early-fusion) vocabularies.

- `UnifiedImageVocab`: mmkit's own models put the VQ codebook after the text vocabulary:
  token id = `image_token_offset + code` for code in [0, num_image_tokens).
- `ChameleonImageVocab`: transformers / Meta Chameleon checkpoints name image tokens
  `IMGIMG<digits as letters A-J><one trailing char>` in `vocabulary_map`; the code is the
  decoded digits and the id is whatever the map says (4..8195 in the released vocab). The
  map is built from the names, exactly as HF `ChameleonImageVocabularyMapping` does, never
  assumed to be `code + 4`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from mmkit.errors import UsageError

IMG_PREFIX = "IMGIMG"


class UnifiedImageVocab:
    def __init__(self, image_token_offset: int, num_image_tokens: int):
        if image_token_offset < 0 or num_image_tokens < 1:
            raise UsageError(f"bad image vocabulary: offset {image_token_offset}, size {num_image_tokens}")
        self.offset, self.size = int(image_token_offset), int(num_image_tokens)

    @classmethod
    def from_config(cls, config) -> "UnifiedImageVocab":
        """From a model config with `image_token_offset` and `num_image_tokens`."""
        return cls(config.image_token_offset, config.num_image_tokens)

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        return (ids >= self.offset) & (ids < self.offset + self.size)

    def codes_to_ids(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.size):
            raise UsageError(f"image code out of range [0, {self.size}): {int(codes.min())}..{int(codes.max())}")
        return codes + self.offset

    def ids_to_codes(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and not bool(self.is_image_id(ids).all()):
            bad = ids[~self.is_image_id(ids)][0]
            raise UsageError(f"token id {int(bad)} is not an image token [{self.offset}, {self.offset + self.size})")
        return ids - self.offset


def chameleon_image_token_name(code: int) -> str:
    """Meta's name for image code `code`: digits spelled as letters A-J, trailing 'Z'."""
    return IMG_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def chameleon_code_from_name(name: str) -> int:
    """Inverse of `chameleon_image_token_name` (ignores the one trailing character)."""
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len(IMG_PREFIX):-1])
    return int(digits)


class ChameleonImageVocab:
    """codes <-> ids for a Chameleon `vocabulary_map` (token name -> id)."""

    def __init__(self, vocabulary_map: Mapping[str, int]):
        pairs = sorted((int(i), chameleon_code_from_name(n)) for n, i in vocabulary_map.items() if n.startswith(IMG_PREFIX))
        if not pairs:
            raise UsageError("vocabulary_map has no IMGIMG image tokens")
        self.image_token_ids = [i for i, _ in pairs]  # sorted ids, as HF `image_tokens`
        self.bpe2img = dict(pairs)
        self.img2bpe = {c: i for i, c in pairs}
        n_codes = max(self.img2bpe) + 1
        self._img2bpe = torch.full((n_codes,), -1, dtype=torch.long)
        for c, i in self.img2bpe.items():
            self._img2bpe[c] = i
        self._bpe2img = torch.full((max(self.bpe2img) + 1,), -1, dtype=torch.long)
        for i, c in self.bpe2img.items():
            self._bpe2img[i] = c
        self.image_token_id = vocabulary_map.get("<image>")

    @classmethod
    def from_config(cls, config) -> "ChameleonImageVocab":
        vm = getattr(config, "vocabulary_map", None)
        if not vm:
            raise UsageError("config has no vocabulary_map")
        return cls(vm)

    @property
    def num_codes(self) -> int:
        return len(self.img2bpe)

    def codes_to_ids(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(self._img2bpe)):
            raise UsageError(f"image code out of range [0, {len(self._img2bpe)}): {int(codes.min())}..{int(codes.max())}")
        ids = self._img2bpe.to(codes.device)[codes]
        if bool((ids < 0).any()):
            raise UsageError("image code without a token in vocabulary_map")
        return ids

    def ids_to_codes(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        ok = (ids >= 0) & (ids < len(self._bpe2img))
        codes = torch.full_like(ids, -1)
        codes[ok] = self._bpe2img.to(ids.device)[ids[ok]]
        if bool((codes < 0).any()):
            raise UsageError(f"token id {int(ids[codes < 0][0])} is not an image token")
        return codes

    def is_image_id(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        ok = (ids >= 0) & (ids < len(self._bpe2img))
        out = torch.zeros_like(ids, dtype=torch.bool)
        out[ok] = self._bpe2img.to(ids.device)[ids[ok]] >= 0
        return out


def make_chameleon_vocabulary_map(num_codes: int = 8192, offset: int = 4, text_tokens: int = 0) -> dict[str, int]:
    """A vocabulary_map laid out like Meta's (specials 0-3, codes from `offset`, boi/eoi after),
    for tests and for building small Chameleon-format checkpoints."""
    vm = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in range(num_codes):
        vm[chameleon_image_token_name(c)] = offset + c
    nxt = offset + num_codes
    vm["<eoss>"], vm["<racm3:break>"] = nxt, nxt + 1
    vm["<image>"] = nxt + 2
    for i in range(text_tokens):
        vm[f"tok{i}"] = nxt + 3 + i
    return vm


# ----------------------------------------------------------------------------- code order


def check_block(h: int, w: int, block: int, where: str = "image_block") -> None:
    """A code grid (h, w) can be read in `block` x `block` blocks only if both sides divide."""
    if block < 1 or h % block or w % block:
        raise UsageError(f"{where}={block}: the code grid {h}x{w} is not made of {block}x{block} blocks")


def to_block_order(codes: torch.Tensor, block: int) -> torch.Tensor:
    """codes (h, w) -> (h/b, w*b): each row of the result is one row of b x b blocks, each
    block's b*b codes consecutive (raster inside the block, blocks left to right).

    Why: in plain raster order the four codes of a 2x2 block are split over two rows (the
    lower pair comes w+1 tokens after the upper one), so a small model sampling an image
    has to keep an object's upper half in mind while it writes the rest of the row. In
    block order one object of a grid-aligned scene is b*b consecutive tokens. b = 1 is raster.
    """
    h, w = codes.shape
    check_block(h, w, block)
    if block == 1:
        return codes
    b = block
    return codes.view(h // b, b, w // b, b).permute(0, 2, 1, 3).reshape(h // b, w * b)


def from_block_order(rows: torch.Tensor, h: int, w: int, block: int) -> torch.Tensor:
    """Inverse of `to_block_order`: (h/b, w*b) or the flat h*w codes -> (h, w)."""
    check_block(h, w, block)
    b = block
    return rows.reshape(h // b, w // b, b, b).permute(0, 2, 1, 3).reshape(h, w)
