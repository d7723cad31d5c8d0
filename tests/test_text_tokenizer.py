"""Text tokenizer (byte-level BPE) and image-code <-> token-id maps."""

import random

import pytest
import torch

from mmkit.errors import UsageError
from mmkit.text.image_vocab import (
    ChameleonImageVocab,
    UnifiedImageVocab,
    chameleon_code_from_name,
    chameleon_image_token_name,
    make_chameleon_vocabulary_map,
)
from mmkit.text.tokenizer import SPECIAL_TOKENS, TextIds, texts_from_doc, train_bpe


def _corpus():
    rng = random.Random(0)
    colors, shapes = ["red", "blue", "green"], ["circle", "square", "triangle"]
    out = []
    for _ in range(300):
        c, s = rng.choice(colors), rng.choice(shapes)
        out.append(f"A large {c} {s} in the top left.")
        out.append(f"Question: What color is the {s}? Answer: {c}")
    return out


def test_bpe_round_trip_special_tokens_atomic(tmp_path):
    from transformers import AutoTokenizer

    train_bpe(_corpus(), vocab_size=400).save_pretrained(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400  # merges learned, cap respected
    for i, (attr, t) in enumerate(SPECIAL_TOKENS):  # fixed ids 0..7, named attributes
        assert tok.convert_tokens_to_ids(t) == i and getattr(tok, attr) == t and getattr(tok, attr + "_id") == i
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)

    text = "<s>Draw: a red circle<boi><image><eor><eoi><eot> Übergrößen ✓ 日本</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    toks = tok.convert_ids_to_tokens(ids)
    for _, t in SPECIAL_TOKENS:
        if t in text and t != "<pad>":
            assert t in toks, t  # special tokens stay whole
    # a special-token string glued to text is still one token, and never merged with neighbours
    ids2 = tok("x<boi>y", add_special_tokens=False)["input_ids"]
    assert ids2[1] == 3 and tok.decode(ids2) == "x<boi>y"
    # learned merges: frequent words become single tokens
    assert len(tok(" circle", add_special_tokens=False)["input_ids"]) == 1
    # no implicit bos/eos: tasks place them explicitly
    assert tok("red")["input_ids"] == tok("red", add_special_tokens=False)["input_ids"]


def test_text_ids_memo_equals_the_tokenizer_and_stays_bounded():
    tok = train_bpe(_corpus(), vocab_size=400)
    calls = []
    real = tok.__call__

    class Counting:  # counts the calls that reach the tokenizer
        def __call__(self, text, **kw):
            calls.append(text)
            return real(text, **kw)

    memo = TextIds(Counting(), max_entries=3)
    texts = _corpus()[:40] + ["<s>x<boi>y", ""]
    for t in texts + texts:
        assert memo(t) == tok(t, add_special_tokens=False)["input_ids"]
    first = memo("A red circle.")
    first.append(-1)  # callers extend the list they get: the memo must not see it
    assert memo("A red circle.") == tok("A red circle.", add_special_tokens=False)["input_ids"]
    # each distinct text reached the tokenizer once while it was held; the memo never holds > 3
    assert len(memo._memo) <= 3 and len(calls) <= 2 * len(texts) + 2
    memo2 = TextIds(Counting())
    calls.clear()
    for t in texts + texts:
        memo2(t)
    assert len(calls) == len(set(texts))


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(UsageError, match="too small"):
        train_bpe(["abc"], vocab_size=100)


def test_texts_from_doc_covers_all_kinds():
    doc = {"kind": "vqa", "texts": [None, "Is there a cube?"], "images": ["img0.png", None],
           "meta": {"question": "Is there a cube?", "answer": "no", "answers": ["no"] * 9 + ["yes"]}}
    texts = list(texts_from_doc(doc))
    assert "Question: Is there a cube? Answer: no" in texts and " yes" in texts and " no" in texts
    cap = list(texts_from_doc({"kind": "caption", "texts": ["A red circle.", None], "images": [None, "img0.png"]}))
    assert "Caption: A red circle." in cap and "Draw: A red circle." in cap


def test_unified_image_vocab_round_trip():
    v = UnifiedImageVocab(image_token_offset=1000, num_image_tokens=512)
    codes = torch.randint(0, 512, (2, 8, 8))
    ids = v.codes_to_ids(codes)
    assert int(ids.min()) >= 1000 and int(ids.max()) < 1512
    assert torch.equal(v.ids_to_codes(ids), codes)
    assert v.is_image_id(torch.tensor([999, 1000, 1511, 1512])).tolist() == [False, True, True, False]
    with pytest.raises(UsageError):
        v.codes_to_ids(torch.tensor([512]))
    with pytest.raises(UsageError):
        v.ids_to_codes(torch.tensor([5]))


def test_chameleon_names_and_parity_with_transformers():
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    assert chameleon_image_token_name(0) == "IMGIMGAZ" and chameleon_image_token_name(8191) == "IMGIMGIBJBZ"
    assert all(chameleon_code_from_name(chameleon_image_token_name(c)) == c for c in range(0, 9000, 7))
    vm = make_chameleon_vocabulary_map(num_codes=300, offset=4, text_tokens=20)
    # shuffle ids so that id != code + 4: the map must come from the names
    rng = random.Random(1)
    img_names = [n for n in vm if n.startswith("IMGIMG")]
    ids = [vm[n] for n in img_names]
    rng.shuffle(ids)
    vm.update(dict(zip(img_names, ids)))

    ours, hf = ChameleonImageVocab(vm), ChameleonImageVocabularyMapping(vm)
    assert ours.image_token_ids == hf.image_tokens and ours.bpe2img == hf.bpe2img
    assert ours.image_token_id == hf.image_token_id == vm["<image>"]
    codes = torch.randint(0, 300, (2, 5, 5))
    assert torch.equal(ours.codes_to_ids(codes), hf.convert_img2bpe(codes).long())
    assert torch.equal(ours.ids_to_codes(ours.codes_to_ids(codes)), codes)
    assert ours.is_image_id(torch.tensor([vm["<s>"], vm["IMGIMGAZ"]])).tolist() == [False, True]
    with pytest.raises(UsageError):
        ours.ids_to_codes(torch.tensor([vm["<image>"]]))
    with pytest.raises(UsageError):
        ours.codes_to_ids(torch.tensor([300]))
