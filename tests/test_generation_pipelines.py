"""Pipelines on tiny saved model directories: answer / caption / generate_images / interleaved, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

NCODES, GRID, RES = 32, 4, 16


@pytest.fixture(scope="module")
def tokenizer():
    from mmkit.text.tokenizer import train_bpe

    texts = ["Question: what color is the circle? Answer: red", "Caption: a red circle and a blue square",
             "Draw: a green triangle"] * 20
    return train_bpe(texts, vocab_size=300, min_frequency=1)


def _vq():
    from mmkit.vq.model import VQModel, preset_config

    torch.manual_seed(0)
    return VQModel(preset_config("shapes-f8", resolution=RES, codebook_size=NCODES, base_channels=8,
                                 channel_multiplier=[1, 2, 2], latent_channels=8, norm_groups=4,
                                 mid_attn=False)).eval()


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory, tokenizer):
    from mmkit.models.chameleon.config import MmkitChameleonConfig
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

    d = tmp_path_factory.mktemp("cham")
    n_text = len(tokenizer)
    cfg = MmkitChameleonConfig(vocab_size=n_text + NCODES, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               boi_token_id=tokenizer.boi_token_id, eoi_token_id=tokenizer.eoi_token_id,
                               image_token_offset=n_text, num_image_tokens=NCODES, image_grid_h=GRID,
                               image_grid_w=GRID, max_position_embeddings=512)
    torch.manual_seed(0)
    model = MmkitChameleonForCausalLM(cfg)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    _vq().save_pretrained(d / "vq")
    return d


def _images(n):
    return [Image.new("RGB", (20 + 3 * i, 18), (40 * i % 255, 100, 200)) for i in range(n)]


def test_chameleon_pipeline_answer_caption_images(chameleon_dir):
    from mmkit.generation import load_pipeline

    pipe = load_pipeline(chameleon_dir, batch_size=2, max_new_tokens=6)
    answers = pipe.answer(_images(3), ["what color?", "how many?", "where?"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # batched (left padded, batch 2) answers equal one-at-a-time answers
    assert answers == [pipe.answer([im], [q])[0] for im, q in zip(_images(3), ["what color?", "how many?", "where?"])]
    caps = pipe.caption(_images(2))
    assert len(caps) == 2
    imgs = pipe.generate_images(["a red circle", "a blue square"], cfg_scale=3.0, seed=0, n=2)
    assert len(imgs) == 4 and all(im.size == (GRID * pipe.vq.downsample,) * 2 for im in imgs)
    again = pipe.generate_image_codes(["a red circle", "a blue square"], cfg_scale=3.0, seed=0, n=2)
    first = pipe.generate_image_codes(["a red circle", "a blue square"], cfg_scale=3.0, seed=0, n=2)
    assert torch.equal(again, first) and again.shape == (4, GRID, GRID)
    assert again.min() >= 0 and again.max() < NCODES
    # prompt images go in as the same span layout the sampler writes
    codes = pipe.encode_images(_images(1))[0]
    toks = pipe.image_tokens(codes)
    assert len(toks) == 1 + pipe.layout.span_len and toks[0] == pipe.layout.boi
    assert torch.equal(pipe.layout.codes_from_span(toks[1:]), codes)


def test_chameleon_interleaved_document(chameleon_dir, tmp_path, biased):
    from mmkit.generation import load_pipeline
    from mmkit.generation.interleaved import write_document

    pipe = load_pipeline(chameleon_dir)
    tok = pipe.tokenizer
    pipe.model = biased(pipe.model, {tok.boi_token_id: 8.0, tok.eos_token_id: -1e4})  # images must appear
    doc, images = pipe.interleaved("Draw: a red circle", max_new_tokens=3 * (pipe.layout.span_len + 1) + 10, seed=1)
    assert doc["kind"] == "interleaved" and len(doc["texts"]) == len(doc["images"]) == len(doc["image_codes"])
    assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
    n_img = sum(i is not None for i in doc["images"])
    assert n_img == len(images) >= 1  # boi is as likely as any token: spans appear
    for meta in doc["image_codes"]:
        if meta is not None:
            assert len(meta["codes"]) == meta["h"] * meta["w"] == GRID * GRID
    paths = write_document(doc, images, tmp_path)
    assert json.loads(paths["json"].read_text())["images"] == doc["images"]
    assert (tmp_path / "sample.img0.png").is_file() and paths["grid"].is_file()
    assert "sample.img0.png" in paths["md"].read_text() and "<img" in paths["html"].read_text()


def test_cli_generate_text_image_interleaved(chameleon_dir, tmp_path, capsys):
    from mmkit.cli import main

    img = tmp_path / "in.png"
    _images(1)[0].save(img)
    assert main(["generate", "text", "--model", str(chameleon_dir), "--prompt", "Caption:", "--image", str(img),
                 "--max-new-tokens", "5"]) == 0
    out = tmp_path / "x.png"
    assert main(["generate", "image", "--model", str(chameleon_dir), "--prompt", "a red circle", "--out", str(out),
                 "--n", "2", "--seed", "3"]) == 0
    assert out.is_file() and (tmp_path / "x-1.png").is_file()
    assert main(["generate", "interleaved", "--model", str(chameleon_dir), "--prompt", "Draw:", "--out",
                 str(tmp_path / "doc"), "--max-new-tokens", "40"]) == 0
    assert (tmp_path / "doc" / "sample.json").is_file()
    # bad input: one line, exit 2
    assert main(["generate", "image", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 2
    assert main(["generate", "text", "--model", str(chameleon_dir), "--prompt", "x", "--temperature", "0",
                 "--do-sample"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmkit: error:") and "Traceback" not in "".join(err)


def test_kimivl_pipeline_answer_matches_generate(tmp_path, tokenizer):
    from mmkit.generation import load_pipeline
    from mmkit.models.kimivl.config import MmkitKimiVLConfig
    from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration
    from mmkit.models.kimivl.processor import KimiVLProcessor

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, pos_emb_height=4,
              pos_emb_width=4)
    cfg = MmkitKimiVLConfig(vision_config=vc, text_config=text, image_token_id=tokenizer.image_token_id,
                            boi_token_id=tokenizer.boi_token_id, eoi_token_id=tokenizer.eoi_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MmkitKimiVLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    KimiVLProcessor(tokenizer).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path, batch_size=2, max_new_tokens=5)
    imgs = [Image.new("RGB", (56, 28 * (i + 1)), (200, 30 * i, 10)) for i in range(3)]
    qs = ["what color?", "how many shapes are there?", "where?"]
    batched = pipe.answer(imgs, qs)
    assert batched == [pipe.answer([im], [q])[0] for im, q in zip(imgs, qs)]
    assert len(pipe.caption(imgs[:1])) == 1
    assert isinstance(pipe.generate_text("Caption:", images=imgs[:1], max_new_tokens=3), str)
    from mmkit.errors import UsageError

    with pytest.raises(UsageError):
        pipe.generate_images(["a red circle"])


def test_chameleon_prompts_equal_training_encoding(chameleon_dir):
    """Inference asks exactly as training taught: VQA / caption / t2i prompts are prefixes
    of the training processor's sequences (up to the supervised target)."""
    from mmkit.data.templates import caption_prompt, vqa_prompt
    from mmkit.generation import load_pipeline
    from mmkit.models.chameleon.processor import ChameleonProcessor

    pipe = load_pipeline(chameleon_dir)
    proc = ChameleonProcessor.from_config(pipe.tokenizer, pipe.model.config, vq=pipe.vq)
    img = Image.new("RGB", (RES, RES), (200, 40, 40))
    img.putpixel((3, 5), (0, 0, 255))
    vqa = {"kind": "vqa", "texts": [None], "images": [img], "meta": {"question": "what color?", "answer": "red"}}
    train = proc.encode_vqa(vqa).input_ids
    ours = pipe._image_prompt(img, vqa_prompt("what color?"))
    assert train[:len(ours)] == ours and train[len(ours):] == pipe._text_ids(" red") + [pipe.model.config.eos_token_id]
    cap = {"kind": "caption", "texts": ["a red square"], "images": [img], "meta": {}}
    train = proc.encode_caption(cap).input_ids
    ours = pipe._image_prompt(img, caption_prompt())
    assert train[:len(ours)] == ours
    t2i = proc.encode_t2i(cap).input_ids
    ours = pipe.t2i_ids("a red square")
    assert t2i[:len(ours)] == ours and ours[-1] == pipe.layout.boi
    assert proc.encode_t2i(cap, drop_condition=True).input_ids[:len(pipe.t2i_ids(None))] == pipe.t2i_ids(None)
