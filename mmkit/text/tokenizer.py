"""Byte-level BPE text tokenizer trained with Hugging Face `tokenizers` on shard texts.

Saved as a `PreTrainedTokenizerFast` directory that `AutoTokenizer.from_pretrained` loads.
The special tokens of docs/design.md come first (ids 0..7, in SPECIAL_TOKENS order) and are
atomic: BPE never splits or merges them. Named attributes (`tok.boi_token_id`,
`tok.image_token_id`, ...) come from `extra_special_tokens`. The tokenizer adds no bos/eos
by itself: each task places them explicitly, so training and inference agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from mmkit.errors import UsageError

# (attribute name, token); ids are the positions in this list.
SPECIAL_TOKENS: list[tuple[str, str]] = [
    ("bos_token", "<s>"),
    ("eos_token", "</s>"),
    ("pad_token", "<pad>"),
    ("boi_token", "<boi>"),
    ("eoi_token", "<eoi>"),
    ("image_token", "<image>"),  # placeholder replaced by image tokens / features
    ("eot_token", "<eot>"),  # end of turn
    ("eor_token", "<eor>"),  # end of image row
]
SPECIAL_TOKEN_IDS = {tok: i for i, (_, tok) in enumerate(SPECIAL_TOKENS)}


class TextIds:
    """text -> token ids (no special tokens added), memoised per string.

    Why: task streams tokenize the same strings over and over (prompt templates, questions,
    answers, captions of a templated world), and the transformers wrapper costs ~100 us a call:
    a third of the Chameleon quickstart's batch time before this memo. Exact: the ids are a
    pure function of the text for a fixed tokenizer. Bounded: cleared when it holds `max_entries`.
    """

    def __init__(self, tokenizer, max_entries: int = 1 << 16):
        self.tokenizer, self.max_entries = tokenizer, max_entries
        self._memo: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._memo) >= self.max_entries:
                self._memo.clear()
            self._memo[text] = ids
        return list(ids)


def texts_from_doc(doc: dict) -> Iterator[str]:
    """Every text a model will read for one reader doc: the aligned texts, VQA questions and
    answers, and the prompt templates filled in (so their pieces become merges too)."""
    from mmkit.data import templates

    for t in doc.get("texts") or []:
        if isinstance(t, str) and t:
            yield t
    meta = doc.get("meta") or {}
    q, a = meta.get("question"), meta.get("answer")
    if isinstance(q, str) and q:
        yield templates.vqa_prompt(q) + (templates.vqa_target(a) if isinstance(a, str) else "")
    answers = meta.get("answers")
    if isinstance(answers, list):
        for ans in sorted({x for x in answers if isinstance(x, str)}):
            yield templates.vqa_target(ans)
    if doc.get("kind") == "caption":
        for t in doc.get("texts") or []:
            if isinstance(t, str) and t:
                yield templates.caption_prompt() + templates.caption_target(t)
                yield templates.t2i_prompt(t)


def iter_shard_texts(sources) -> Iterator[str]:
    """All texts of the shards in `sources` (dir, shard list or mapping), one pass."""
    from mmkit.data import build_stream

    stream = build_stream(sources, batch_size=64, collate_fn=list, decode_images=False,
                          shuffle_buffer=0, infinite=False)
    for batch in stream:
        for doc in batch:
            yield from texts_from_doc(doc)


def train_bpe(texts: Iterable[str], vocab_size: int = 768, min_frequency: int = 2):
    """Train a byte-level BPE; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise UsageError(f"--vocab-size {vocab_size} is too small (byte-level BPE needs >= {256 + n_special})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[t for _, t in SPECIAL_TOKENS],  # ids 0..7, added as atomic tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    named = dict(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=named["bos_token"],
        eos_token=named["eos_token"],
        pad_token=named["pad_token"],
        extra_special_tokens={k: v for k, v in SPECIAL_TOKENS if k not in ("bos_token", "eos_token", "pad_token")},
    )


def train_text_tokenizer(sources, out_dir, vocab_size: int = 768) -> dict:
    """Train on the shards' texts and save to `out_dir`; returns stats."""
    texts: list[str] = list(iter_shard_texts(sources))
    if not texts:
        raise UsageError(f"no texts found in {sources}")
    tok = train_bpe(texts, vocab_size=vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    n_tokens = sum(len(ids) for ids in tok(texts[:2000], add_special_tokens=False)["input_ids"])
    n_chars = sum(len(t) for t in texts[:2000])
    return {"texts": len(texts), "vocab_size": len(tok), "chars_per_token": round(n_chars / max(n_tokens, 1), 3),
            "out": str(out)}
