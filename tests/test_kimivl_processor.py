"""Kimi-VL processor: resize policy, patch layout (== transformers' Kimi-K2.5), placeholders."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.models.kimivl.processor import ImageProcessorConfig, KimiVLImageProcessor, KimiVLProcessor, navit_resize


@pytest.fixture(scope="module")
def tokenizer():
    from mmkit.text.tokenizer import train_bpe

    return train_bpe(["Question: what color is the circle? Answer: red", "Caption: a small red circle"] * 20,
                     vocab_size=300)


def _img(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_policy():
    # never upscale; pad each side to a multiple of 28
    assert navit_resize(48, 96, 14, 2, 16384, 512) == ((48, 96), (56, 112))
    assert navit_resize(56, 28, 14, 2, 16384, 512) == ((56, 28), (56, 28))
    # patch cap: 1400x1400 has 100x100 patches; cap 2500 -> scale 0.5 -> 700 px -> padded to 700
    (rh, rw), (ph, pw) = navit_resize(1400, 1400, 14, 2, 2500, 512)
    assert (rh, rw) == (700, 700) and (ph // 14) * (pw // 14) <= 2500 and ph % 28 == 0
    # per-side cap
    (rh, rw), _ = navit_resize(14 * 40, 14 * 4, 14, 2, 16384, 20)
    assert rh == 14 * 20 and rw == 14 * 2


def test_pixels_match_transformers_kimi_k25():
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    images = [_img(56, 84, 0), _img(112, 28, 1), _img(56, 84, 2)]  # multiples of 28: no resampling involved
    ref = Kimi_K25ImageProcessor()(images, return_tensors="pt")
    ours = KimiVLImageProcessor()(images)
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape == (2 * 4 * 6 + 8 * 2, 3, 14, 14)
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-5
    # padded images: same grid as transformers for sizes that need padding
    odd = [_img(48, 96), _img(80, 64)]
    ref = Kimi_K25ImageProcessor()(odd, return_tensors="pt")
    assert torch.equal(KimiVLImageProcessor()(odd)["image_grid_thw"], ref["image_grid_thw"])


def test_placeholder_expansion(tokenizer, tmp_path):
    proc = KimiVLProcessor(tokenizer)
    assert (proc.image_token_id, proc.boi_token_id, proc.eoi_token_id) == (5, 3, 4)
    enc = proc.encode([_img(48, 96), "Question: what color?", _img(96, 96)])
    ids = enc["input_ids"]
    grids = enc["image_grid_thw"].tolist()
    assert grids == [[1, 4, 8], [1, 8, 8]]
    assert ids.count(5) == 4 * 8 // 4 + 8 * 8 // 4 == 24  # one placeholder per merged token
    assert ids.count(3) == ids.count(4) == 2 and ids[0] == tokenizer.bos_token_id
    s, e, kind = enc["spans"][0]
    assert kind == "image" and ids[s] == 3 and ids[e - 1] == 4 and set(ids[s + 1:e - 1]) == {5}
    assert enc["pixel_values"].shape[0] == 4 * 8 + 8 * 8
    # batch call with <image> markers, left padded
    batch = proc(["<image>Caption:", "<image>Question: what color? Answer:"], [_img(56, 56), _img(48, 96)])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0, 0] == 0
    assert int((batch["input_ids"] == 5).sum()) == 4 * 4 // 4 + 4 * 8 // 4  # 56x56 -> 4x4 patches, 48x96 -> 4x8
    with pytest.raises(Exception, match="markers"):
        proc(["<image> <image>"], [_img(56, 56)])
    # save / load round trip keeps the policy
    proc2 = KimiVLProcessor(tokenizer, KimiVLImageProcessor(ImageProcessorConfig(pad_mode="resize", max_patches=64)))
    proc2.save_pretrained(tmp_path)
    again = KimiVLProcessor.from_pretrained(tmp_path)
    assert again.image_processor.config == proc2.image_processor.config
    assert again.encode(["hi", _img(48, 96)])["input_ids"] == proc2.encode(["hi", _img(48, 96)])["input_ids"]


def test_square_mode_and_prompt_order(tokenizer, tmp_path):
    """`pad_mode="square"`: every aspect ratio becomes the same grid (the padded long side);
    `prompt_order` lays VQA prompts out image-first or question-first and survives a save."""
    proc = KimiVLProcessor(tokenizer, KimiVLImageProcessor(ImageProcessorConfig(
        patch_size=8, max_patches_per_side=6, pad_mode="square")), prompt_order="question_first")
    for h, w in ((48, 96), (96, 48), (80, 64), (48, 48)):
        enc = proc.encode([_img(h, w)])
        assert enc["image_grid_thw"].tolist() == [[1, 6, 6]] and enc["pixel_values"].shape == (36, 3, 8, 8)
    img = _img(48, 96)
    segs = proc.vqa_segments(img, "what color is the circle?")
    assert segs[0] == "Question: what color is the circle?" and segs[1] is img and segs[2] == "Answer:"
    assert proc.caption_segments(img)[0] is img
    ids = proc.encode(segs)["input_ids"]
    assert ids.index(proc.boi_token_id) > 3 and ids[-1] != proc.eoi_token_id  # question, image, "Answer:"
    proc.save_pretrained(tmp_path)
    again = KimiVLProcessor.from_pretrained(tmp_path)
    assert again.prompt_order == "question_first" and again.image_processor.config.pad_mode == "square"
    assert again.encode(again.vqa_segments(img, "what color is the circle?"))["input_ids"] == ids
    first = KimiVLProcessor(tokenizer)
    assert first.vqa_segments(img, "q?") == [img, "Question: q? Answer:"]
    with pytest.raises(Exception, match="prompt_order"):
        KimiVLProcessor(tokenizer, prompt_order="sideways")


def test_square_side_resizes_every_image(tokenizer, tmp_path):
    """`square_side`: every image (smaller ones too: upscaled) becomes that square, so a coarser
    patch keeps the token grid while each token sees more pixels; saved with the processor."""
    proc = KimiVLProcessor(tokenizer, KimiVLImageProcessor(ImageProcessorConfig(
        patch_size=16, max_patches_per_side=6, pad_mode="square", square_side=96)))
    for h, w in ((48, 96), (48, 48), (80, 64)):
        enc = proc.encode([_img(h, w)])
        assert enc["image_grid_thw"].tolist() == [[1, 6, 6]] and enc["pixel_values"].shape == (36, 3, 16, 16)
    proc.save_pretrained(tmp_path)
    assert KimiVLProcessor.from_pretrained(tmp_path).image_processor.config.square_side == 96
    for bad in (dict(pad_mode="pad", square_side=96), dict(pad_mode="square", square_side=80)):
        with pytest.raises(Exception, match="square_side"):
            ImageProcessorConfig(patch_size=16, **bad)
