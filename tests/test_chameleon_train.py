"""Chameleon family: processor layouts, packing, the task's stream, overfitting, recipes."""

import itertools
from pathlib import Path

import pytest
import torch

from mmkit.data import templates
from mmkit.data.synth import make_doc
from mmkit.errors import UsageError
from mmkit.models.chameleon.config import MmkitChameleonConfig
from mmkit.models.chameleon.model import MmkitChameleonForCausalLM
from mmkit.models.chameleon.processor import IMAGE, ChameleonProcessor, token_weights
from mmkit.models.chameleon.task import ChameleonDataConfig, ChameleonTask, EncodeDoc, PackCollate


ROOT = Path(__file__).resolve().parents[1]
N_CODES, GRID = 32, 4


def reader_doc(kind, i, codes_seed=0):
    """A reader-style doc (as build_stream yields) with stored random image codes."""
    doc, _ = make_doc(kind, i, seed=0, split="train", with_images=False)
    g = torch.Generator().manual_seed(codes_seed * 1000 + i + {"caption": 1, "vqa": 2, "interleaved": 3}[kind] * 100)
    codes = [None if im is None else {"h": GRID, "w": GRID,
                                       "codes": torch.randint(0, N_CODES, (GRID * GRID,), generator=g).tolist()}
             for im in doc["images"]]
    meta = {k: v for k, v in doc.items() if k not in ("kind", "texts", "images")}
    meta["image_codes"] = codes
    return {"__key__": f"{kind}{i}", "kind": kind, "texts": doc["texts"], "images": doc["images"], "meta": meta}


@pytest.fixture(scope="module")
def tokenizer():
    from mmkit.text.tokenizer import texts_from_doc, train_bpe

    docs = [reader_doc(k, i) for k in ("caption", "vqa", "interleaved") for i in range(30)]
    return train_bpe([t for d in docs for t in texts_from_doc(d)], vocab_size=300)


def make_config(tokenizer, multires=False, **kw):
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "boi_token_id": tokenizer.convert_tokens_to_ids("<boi>"),
           "eoi_token_id": tokenizer.convert_tokens_to_ids("<eoi>")}
    v = len(tokenizer)
    extra = dict(eor_token_id=tokenizer.convert_tokens_to_ids("<eor>"), size_token_offset=v + N_CODES,
                 max_grid_size=8) if multires else {}
    base = dict(vocab_size=v + N_CODES + (9 if multires else 0), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, image_token_offset=v, num_image_tokens=N_CODES,
                image_grid_h=GRID, image_grid_w=GRID, max_position_embeddings=512)
    base.update(kw)
    return MmkitChameleonConfig(**base, **ids, **extra)


def test_processor_formats_follow_templates(tokenizer):
    cfg = make_config(tokenizer)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    vqa = reader_doc("vqa", 0)
    enc = proc.encode_vqa(vqa)
    codes = torch.tensor(vqa["meta"]["image_codes"][0]["codes"]).view(GRID, GRID)
    img = [cfg.boi_token_id] + (codes.flatten() + cfg.image_token_offset).tolist() + [cfg.eoi_token_id]
    prompt = proc.text_ids(templates.vqa_prompt(vqa["meta"]["question"]))
    answer = proc.text_ids(templates.vqa_target(vqa["meta"]["answer"])) + [cfg.eos_token_id]
    assert enc.input_ids == [cfg.bos_token_id] + img + prompt + answer
    assert enc.supervised == [False] * (1 + len(img) + len(prompt)) + [True] * len(answer)
    # text-to-image: prompt first, loss on the image span and eos; condition dropout -> "Draw:"
    cap = reader_doc("caption", 1)
    t2i = proc.encode_t2i(cap)
    draw = proc.text_ids(templates.t2i_prompt(cap["texts"][1]))
    assert t2i.input_ids[:1 + len(draw)] == [cfg.bos_token_id] + draw
    assert t2i.modality[1 + len(draw):-1] == [IMAGE] * (GRID * GRID + 2)
    assert all(t2i.supervised[1 + len(draw):])
    uncond = proc.encode_t2i(cap, drop_condition=True)
    assert uncond.input_ids[1:1 + len(proc.text_ids(templates.t2i_prompt(None)))] == proc.text_ids("Draw:")
    # interleaved: every text and image in order, all supervised except bos
    inter = reader_doc("interleaved", 2)
    e = proc.encode_interleaved(inter)
    n_img = sum(im is not None for im in inter["images"])
    assert e.input_ids.count(cfg.boi_token_id) == n_img and e.input_ids[-1] == cfg.eos_token_id
    assert e.modality.count(IMAGE) == n_img * (GRID * GRID + 2) and not e.supervised[0] and all(e.supervised[1:])
    # loss options
    w_text, = token_weights([t2i], "text")
    w_img, = token_weights([t2i], "image", image_weight=0.5)
    assert sum(w_text) == 1.0  # only eos is a text target in t2i
    assert sum(w_img) == 0.5 * (GRID * GRID + 2)


def test_multires_layout_matches_sampler(tokenizer):
    from mmkit.generation.sampler import image_layout_from_config

    cfg = make_config(tokenizer, multires=True)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    codes = torch.arange(6).view(2, 3)  # a non-square grid
    ids = proc.image_ids(codes)
    lay = image_layout_from_config(cfg, 2, 3)
    it = iter((codes.flatten() + cfg.image_token_offset).tolist())
    assert ids == [cfg.boi_token_id] + [next(it) if t == -1 else t for t in lay.template()]
    assert ids[1:3] == [cfg.size_token_offset + 2, cfg.size_token_offset + 3]
    assert ids.count(cfg.eor_token_id) == 2
    assert torch.equal(lay.codes_from_span(ids[1:]), codes)


def test_block_order_layout_matches_sampler(tokenizer):
    """image_block 2: each 2x2 block's codes are consecutive, a token row is a row of blocks,
    the processor writes exactly the sampler's template, and both read back the grid."""
    from mmkit.generation.sampler import image_layout_from_config
    from mmkit.text.image_vocab import from_block_order, to_block_order

    cfg = make_config(tokenizer, multires=True, image_block=2)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    codes = torch.arange(24).view(4, 6)
    ids = proc.image_ids(codes)
    off = cfg.image_token_offset
    row0 = [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]  # blocks of rows 0-1, left to right
    assert ids[:3] == [cfg.boi_token_id, cfg.size_token_offset + 4, cfg.size_token_offset + 6]
    assert ids[3:3 + 13] == [off + c for c in row0] + [cfg.eor_token_id]
    assert ids.count(cfg.eor_token_id) == 2 and ids[-1] == cfg.eoi_token_id
    lay = image_layout_from_config(cfg, 4, 6)
    it = iter([i for i in ids[1:] if off <= i < off + N_CODES])
    assert ids == [cfg.boi_token_id] + [next(it) if t == -1 else t for t in lay.template()]
    assert torch.equal(lay.codes_from_span(ids[1:]), codes)
    assert torch.equal(from_block_order(to_block_order(codes, 2), 4, 6, 2), codes)
    assert torch.equal(to_block_order(codes, 1), codes)
    # a grid that is not made of whole blocks is refused
    with pytest.raises(UsageError, match="2x2 blocks"):
        image_layout_from_config(cfg, 3, 6)
    with pytest.raises(UsageError, match="2x2 blocks"):
        proc.image_ids(torch.zeros(3, 4, dtype=torch.long))


def test_image_bidi_marks_input_images_only_and_packs_span_ids(tokenizer):
    """image_bidi: the image span of a VQA / caption sample is bidirectional (it is read), the
    t2i image is not (it is written); the packed batch numbers each span and the model's span
    finder gives the same spans from the ids alone."""
    from mmkit.models.chameleon.model import image_span_ids

    cfg = make_config(tokenizer, image_bidi=True)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    vqa = proc.encode_vqa(reader_doc("vqa", 0))
    boi, eoi = vqa.input_ids.index(cfg.boi_token_id), vqa.input_ids.index(cfg.eoi_token_id)
    assert vqa.bidi == [boi <= i <= eoi for i in range(len(vqa))]
    cap, t2i = proc.encode(reader_doc("caption", 1), cond_dropout=0.0)
    assert sum(cap.bidi) == GRID * GRID + 2 and not any(t2i.bidi)
    data = ChameleonDataConfig(seq_len=256, cond_dropout=0.0)
    items = [EncodeDoc(proc, data, seed=0)(reader_doc(k, i)) for k, i in [("vqa", 0), ("caption", 1)]]
    batch = PackCollate(256, cfg.pad_token_id, first_fit=False)(items)
    bidi = batch["bidi_ids"][0]
    assert sorted(set(bidi.tolist()) - {0}) == [1, 2]  # the VQA image and the caption image
    spans = image_span_ids(batch["input_ids"], cfg)[0]
    assert torch.equal(bidi > 0, (spans > 0) & (spans <= 2))  # the t2i span (the 3rd) stays causal
    plain = PackCollate(256, cfg.pad_token_id)([EncodeDoc(ChameleonProcessor.from_config(tokenizer, make_config(
        tokenizer)), data, seed=0)(reader_doc("vqa", 0))])
    assert "bidi_ids" not in plain


def test_pack_collate_keeps_documents_and_targets(tokenizer):
    cfg = make_config(tokenizer)
    data = ChameleonDataConfig(seq_len=128, cond_dropout=0.0)
    enc = EncodeDoc(ChameleonProcessor.from_config(tokenizer, cfg), data, seed=0)
    items = [enc(reader_doc(k, i)) for k, i in [("vqa", 0), ("caption", 1), ("vqa", 2)]]
    seqs = [s for it in items for s in it]
    assert len(seqs) == 4  # a caption doc gives a captioning and a t2i sequence
    batch = PackCollate(128, cfg.pad_token_id)(items)
    assert batch["input_ids"].shape[1] == 128
    real = batch["doc_ids"] >= 0
    assert int(real.sum()) == sum(len(s) for s, _ in seqs)
    assert int((batch["labels"] != -100).sum()) == sum(int(sum(w)) for _, w in seqs)
    assert "loss_weights" not in batch  # all weights 0/1: the labels carry them
    # positions restart at every document start
    starts = (batch["position_ids"] == 0) & real
    assert int(starts.sum()) == len(seqs)
    assert (batch["input_ids"][starts] == cfg.bos_token_id).all()


def test_tiny_model_overfits_shapes_documents(tokenizer):
    """Text and image tokens of a handful of shapes-world documents -> near-zero loss."""
    torch.manual_seed(0)
    cfg = make_config(tokenizer, z_loss=1e-4)
    data = ChameleonDataConfig(seq_len=256, cond_dropout=0.0)
    enc = EncodeDoc(ChameleonProcessor.from_config(tokenizer, cfg), data, seed=0)
    docs = [reader_doc("interleaved", 0), reader_doc("caption", 1), reader_doc("vqa", 2)]
    batch = PackCollate(256, cfg.pad_token_id)([enc(d) for d in docs])
    n_image_targets = int(cfg.is_image_token(batch["labels"]).sum())
    assert n_image_targets >= 3 * GRID * GRID  # image codes are trained too (interleaved + t2i images)
    model = MmkitChameleonForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(140):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                    labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.ce_loss < 0.05, float(out.ce_loss)
    model.eval()
    with torch.no_grad():  # greedy predictions reproduce the image codes
        logits = model(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"]).logits
    pred, tgt = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    is_img = cfg.is_image_token(tgt)
    assert (pred[is_img] == tgt[is_img]).float().mean() > 0.99


def test_task_stream_encodes_with_vq_and_saves_self_contained_dir(tokenizer, tmp_path):
    """The task end to end on real shards: VQ-encoded images, packed batches, loss, save_final."""
    import mmkit
    from mmkit.data.synth import synth
    from mmkit.vq.model import VQConfig, VQModel

    synth(tmp_path / "data", n=4, seed=0, eval_n=1, shard_size=8)
    tok_dir, vq_dir = tmp_path / "tok", tmp_path / "vq"
    tokenizer.save_pretrained(str(tok_dir))
    VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                     codebook_size=N_CODES, norm_groups=4, mid_attn=False)).save_pretrained(vq_dir)
    task = ChameleonTask({"text_tokenizer": str(tok_dir), "vq": str(vq_dir), "hidden_size": 64,
                          "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "multires": True, "max_grid_size": 16, "image_pos_embed": True, "qk_norm_init": 2.0,
                          "image_embed_init": "vq_mask", "vqa_question_first": True},
                         {"sources": str(tmp_path / "data" / "train"), "vq_encode": True, "seq_len": 256,
                          "vary_per_epoch": True, "kind_weights": {"vqa": 1.0, "caption": 1.0, "interleaved": 1.0}},
                         seed=0)
    model = task.build_model()
    assert model.config.image_grid_h == 8 and model.config.num_image_tokens == N_CODES
    assert bool((model.model.layers[0].attn.q_norm.weight == 2.0).all()) and model.config.vqa_question_first
    assert model.config.image_token_offset == len(tokenizer)
    batch = next(iter(task.batches(batch_size=4)))
    assert cfg_has_images(model.config, batch["input_ids"])
    loss, metrics = task.loss(model, batch)
    assert torch.isfinite(loss) and metrics["tokens"] == float((batch["doc_ids"] >= 0).sum())
    task.save_final(model, str(tmp_path / "final"))
    again = mmkit.load_model(tmp_path / "final")
    assert (tmp_path / "final" / "vq" / "config.json").is_file()
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"][:1, :32]).logits,
                                   model.eval()(batch["input_ids"][:1, :32]).logits)


def cfg_has_images(cfg, ids):
    return bool(cfg.is_image_token(ids).any()) and bool((ids == cfg.boi_token_id).any())


@pytest.mark.parametrize("recipe", ["chameleon-shapes.yaml", "chameleon-7b-anole.yaml"])
def test_recipes_parse(recipe):
    from mmkit.cli.train import load_recipe

    r = load_recipe(str(ROOT / "training" / recipe), ["model.text_tokenizer=/x/tok"], data="/x/data")
    assert r.task == "chameleon"
    task = ChameleonTask(r.model, r.data, seed=0)  # strict parse of model/data sections
    assert task.data.sources == "/x/data" and task.section.text_tokenizer == "/x/tok"
    if recipe == "chameleon-7b-anole.yaml":
        assert r.train.mixed_precision == "bf16" and r.train.activation_checkpointing
        assert task.section.init_from and task.data.seq_len == 4096
    else:
        assert task.section.num_hidden_layers <= 4 and task.data.cond_dropout == 0.1


def test_recipe_unknown_key_is_an_error():
    from mmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_sise"):
        ChameleonTask({"hidden_sise": 3}, {}, seed=0)


def test_task_weights_scale_one_task_only(tokenizer):
    cfg = make_config(tokenizer)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    seqs = proc.encode(reader_doc("vqa", 0)) + proc.encode(reader_doc("caption", 1))
    assert [s.task for s in seqs] == ["vqa", "caption", "t2i"]
    plain = token_weights(seqs)
    weighted = token_weights(seqs, task_weights={"vqa": 4.0, "t2i": 0.0})
    assert weighted[0] == [4.0 * w for w in plain[0]] and any(weighted[0])
    assert weighted[1] == plain[1] and not any(weighted[2])
    with pytest.raises(ValueError, match="task_weights"):
        ChameleonDataConfig(task_weights={"vqa2": 1.0})


def test_vqa_extra_questions_reuse_the_image(tokenizer):
    """Extra turns come after the doc's own question (the inference layout stays the prefix)
    and their answers are the scene's (checked against the scene-graph question generator)."""
    import random

    from mmkit.data.shapes import Scene, make_vqa

    proc = ChameleonProcessor.from_config(tokenizer, make_config(tokenizer))
    doc = reader_doc("vqa", 3)
    one = proc.encode_vqa(doc)
    more = proc.encode_vqa(doc, extra_questions=3, rng=random.Random(5))
    assert more.input_ids[:len(one)] == one.input_ids and more.supervised[:len(one)] == one.supervised
    assert more.input_ids.count(tokenizer.eos_token_id) == 4
    text = tokenizer.decode(more.input_ids[len(one):])
    rng, scene = random.Random(5), Scene.from_dict(doc["meta"]["scenes"][0])
    qas = [make_vqa(scene, rng) for _ in range(9)]
    asked = [qa for qa in qas if qa["question"] != doc["meta"]["question"]]
    for qa in asked[:3]:  # same rng -> the same questions, answered as the generator answers them
        assert f"{templates.vqa_prompt(qa['question'])} {qa['answer']}" in text
    # only answers (and their eos) are targets
    sup = [t for t, s in zip(more.input_ids, more.supervised) if s]
    answers = [doc["meta"]["answer"]] + [qa["answer"] for qa in asked[:3]]
    assert sup == [t for a in answers for t in proc.text_ids(templates.vqa_target(a)) + [tokenizer.eos_token_id]]


def test_first_fit_packing_uses_fewer_rows_and_keeps_every_token(tokenizer):
    from mmkit.models.chameleon.task import first_fit_order

    lengths = [90, 200, 60, 150, 100, 40, 300, 110]
    order = first_fit_order(lengths, 256)
    assert sorted(order) == list(range(len(lengths))) and order[-1] == 6  # too long: last, split
    items = [[(list(range(n)), [1.0] * n)] for n in lengths]
    greedy = PackCollate(256, 0, first_fit=False)(items)
    ffd = PackCollate(256, 0)(items)
    assert ffd["input_ids"].shape[0] < greedy["input_ids"].shape[0]
    for b in (greedy, ffd):
        assert int((b["doc_ids"] >= 0).sum()) == sum(lengths)
        assert int((b["position_ids"] == 0).logical_and(b["doc_ids"] >= 0).sum()) == len(lengths)


def test_image_rows_from_vq_follow_decoded_patches(tokenizer):
    """Codes that decode to the same patch start with the same embedding; text rows untouched."""
    from mmkit.models.chameleon.task import init_image_rows_from_vq
    from mmkit.vq.model import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                          codebook_size=N_CODES, norm_groups=4, mid_attn=False)).eval()
    with torch.no_grad():
        base = vq.decode(torch.arange(N_CODES)[:, None, None].expand(N_CODES, 2, 2))
    cfg = make_config(tokenizer)
    model = MmkitChameleonForCausalLM(cfg)
    text_before = model.get_input_embeddings().weight[:cfg.image_token_offset].clone()
    init_image_rows_from_vq(model, vq, share=1.0)
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(emb[:cfg.image_token_offset], text_before)
    img = emb[cfg.image_token_offset:cfg.image_token_offset + N_CODES]
    assert abs(float(img.std()) - cfg.initializer_range) < 1e-3
    # nearest patch in pixel space == nearest embedding (the projection keeps the geometry)
    pix = torch.nn.functional.adaptive_avg_pool2d(base, 4).flatten(1)
    d_pix = torch.cdist(pix, pix) + torch.eye(N_CODES) * 1e9
    d_emb = torch.cdist(img, img) + torch.eye(N_CODES) * 1e9
    agree = (d_pix.argmin(1) == d_emb.argmin(1)).float().mean()
    assert agree > 0.5, float(agree)


@pytest.mark.parametrize("free", [True, False])
def test_code_rows_from_pixels_train_shared_and_bake_to_a_plain_model(tokenizer, tmp_path, free):
    """image_embed_param: code rows = free rows + pixels @ proj (shared by all codes); codes that
    decode alike stay alike through training (pixels_only), the projection gets the gradient, and
    the baked model is a plain checkpoint with the same logits."""
    from torch.nn.utils import parametrize

    from mmkit.models.chameleon.task import bake_code_rows, code_pixel_features, tie_code_rows_to_pixels
    from mmkit.train.optim import param_groups
    from mmkit.vq.model import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                          codebook_size=N_CODES, norm_groups=4, mid_attn=False)).eval()
    decode = vq.decode
    vq.decode = lambda c: decode(torch.where(c == 2, 1, c))  # codes 1 and 2 look the same
    feats = code_pixel_features(vq)
    assert feats.shape == (N_CODES, 4 * 64) and torch.allclose(feats[1], feats[2])
    cfg = make_config(tokenizer)
    model = MmkitChameleonForCausalLM(cfg)
    off, n = cfg.image_token_offset, N_CODES
    text_before = model.get_input_embeddings().weight[:off].clone()
    mode = "pixels" if free else "pixels_only"
    tie_code_rows_to_pixels(model, vq, embed=mode, head=mode)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = module.weight
        assert torch.equal(w[:off], text_before) if module is model.get_input_embeddings() else True
        proj = module.parametrizations.weight[0].proj
        torch.testing.assert_close(w[off:off + n], feats @ proj)
        assert abs(float(w[off:off + n].detach().std()) - cfg.initializer_range) < 5e-3
    # embedding tables and the projections below them are not weight-decayed
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert id(model.get_input_embeddings().parametrizations.weight[0].proj) in no_decay
    # nor the QK-norm's per-head gains and biases, though they are 2-D (H, hd)
    qk_norm = [p for n, p in model.named_parameters() if ".q_norm." in n or ".k_norm." in n]
    assert qk_norm and all(p.ndim == 2 and id(p) in no_decay for p in qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[cfg.bos_token_id, off + 1, off + 3, off + 2, off + 5, cfg.eos_token_id]])
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        proj = model.get_input_embeddings().parametrizations.weight[0].proj
        assert proj.grad is not None and proj.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    emb = model.get_input_embeddings().weight.detach()
    if free:
        assert not torch.allclose(emb[off + 1], emb[off + 2])  # the free rows learnt per code
    else:
        torch.testing.assert_close(emb[off + 1], emb[off + 2])  # alike codes stay alike
    with torch.no_grad():
        before = model(ids).logits
    bake_code_rows(model)
    assert not parametrize.is_parametrized(model.get_input_embeddings())
    model.save_pretrained(tmp_path / "m")
    again = MmkitChameleonForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("parametrizations" in k for k in again.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, before)


def test_multires_pipeline_reads_images_at_their_own_size(tokenizer):
    """Training codes are stored at each image's own size; a multi-resolution model must
    read eval images the same way (no square centre crop that cuts objects off)."""
    from PIL import Image

    from mmkit.generation.pipelines import ChameleonPipeline
    from mmkit.vq.model import VQConfig, VQModel

    vq = VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                          codebook_size=N_CODES, norm_groups=4, mid_attn=False, resolution=64)).eval()
    f = vq.config.downsample
    img = Image.new("RGB", (8 * f, 6 * f), (200, 30, 30))  # w x h (within the test model's max_grid_size 8)
    multi = ChameleonPipeline(MmkitChameleonForCausalLM(make_config(tokenizer, multires=True)), tokenizer, vq)
    codes = multi.encode_images([img])[0]
    assert tuple(codes.shape) == (6, 8)
    toks = multi.image_tokens(codes)
    assert toks.count(tokenizer.convert_tokens_to_ids("<eor>")) == 6
    fixed = ChameleonPipeline(MmkitChameleonForCausalLM(make_config(tokenizer)), tokenizer, vq)
    assert tuple(fixed.encode_images([img]).shape[1:]) == (64 // f, 64 // f)  # fixed-size model: resize + crop


def test_vqa_question_first_layout_is_the_pipeline_prompt(tokenizer):
    """Option vqa_question_first: "Question: q" precedes the image as well; the pipeline's
    VQA prompt is exactly the training sequence up to the answer."""
    from PIL import Image

    from mmkit.generation.pipelines import ChameleonPipeline
    from mmkit.vq.model import VQConfig, VQModel

    cfg = make_config(tokenizer, multires=True, vqa_question_first=True)
    proc = ChameleonProcessor.from_config(tokenizer, cfg)
    doc = reader_doc("vqa", 0)
    codes = torch.tensor(doc["meta"]["image_codes"][0]["codes"]).view(GRID, GRID)
    q = doc["meta"]["question"]
    enc = proc.encode_vqa(doc)
    prefix = [cfg.bos_token_id] + proc.text_ids(f"Question: {q}")
    img = proc.image_ids(codes)
    prompt = prefix + img + proc.text_ids(templates.vqa_prompt(q))
    assert enc.input_ids[:len(prompt)] == prompt and proc.vqa_prompt_ids(codes, q) == prompt
    assert not any(enc.supervised[:len(prompt)]) and all(enc.supervised[len(prompt):])
    plain = ChameleonProcessor.from_config(tokenizer, make_config(tokenizer, multires=True))
    assert plain.encode_vqa(doc).input_ids == [cfg.bos_token_id] + img + enc.input_ids[len(prefix) + len(img):]
    vq = VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                          codebook_size=N_CODES, norm_groups=4, mid_attn=False, resolution=64)).eval()
    pipe = ChameleonPipeline(MmkitChameleonForCausalLM(cfg), tokenizer, vq)
    seen = []
    pipe._run_text = lambda prompts, max_new_tokens=None: seen.extend(prompts) or ["yes"] * len(prompts)
    im = Image.new("RGB", (32, 32), (200, 30, 30))
    assert pipe.answer([im], [q]) == ["yes"]
    assert seen == [proc.vqa_prompt_ids(pipe.encode_images([im])[0], q)]


def test_vary_per_epoch_draws_new_questions_and_captions(tokenizer):
    """data.vary_per_epoch: epoch 0 encodes as without the option, later epochs ask other
    questions and use other caption phrasings of the same scene (parse_caption recovers it)."""
    from mmkit.data.shapes import parse_caption

    proc = ChameleonProcessor.from_config(tokenizer, make_config(tokenizer))
    fixed = EncodeDoc(proc, ChameleonDataConfig(vqa_extra_questions=4), seed=0)
    vary = EncodeDoc(proc, ChameleonDataConfig(vqa_extra_questions=4, vary_per_epoch=True, cond_dropout=0.0), seed=0)
    doc = reader_doc("vqa", 4)
    first = fixed(doc)
    assert fixed({**doc, "__epoch__": 3}) == first and vary({**doc, "__epoch__": 0}) == first
    later = [vary({**doc, "__epoch__": e})[0][0] for e in (1, 2, 3)]
    assert any(ids != first[0][0] for ids in later)
    cap = reader_doc("caption", 5)
    want = sorted(map(str, parse_caption(cap["texts"][1])))
    texts = set()
    for e in range(1, 6):
        (c_ids, c_w), (t_ids, t_w) = vary({**cap, "__epoch__": e})
        target = tokenizer.decode([t for t, w in zip(c_ids, c_w) if w][:-1]).strip()
        assert sorted(map(str, parse_caption(target))) == want  # the same scene, maybe other words
        texts.add(target)
    assert len(texts) > 1


def test_memo_docs_stream_equals_the_plain_stream(tokenizer, tmp_path):
    """data.memo_docs: the task's batches over several epochs equal those without it (EncodeDoc
    draws from (seed, key) alone); with vary_per_epoch it is a config error."""
    from mmkit.data.synth import synth
    from mmkit.vq.model import VQConfig, VQModel

    synth(tmp_path / "data", n=4, seed=0, eval_n=1, shard_size=8)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    VQModel(VQConfig(base_channels=8, channel_multiplier=[1, 1, 1, 1], latent_channels=8, embed_dim=4,
                     codebook_size=N_CODES, norm_groups=4, mid_attn=False)).save_pretrained(tmp_path / "vq")
    model = {"text_tokenizer": str(tmp_path / "tok"), "vq": str(tmp_path / "vq"), "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    data = {"sources": str(tmp_path / "data" / "train"), "vq_encode": True, "seq_len": 256, "vqa_extra_questions": 3,
            "kind_weights": {"vqa": 1.0, "caption": 1.0, "interleaved": 1.0}}
    plain = ChameleonTask(model, data, seed=3).batches(batch_size=4)
    memo = ChameleonTask(model, {**data, "memo_docs": True}, seed=3).batches(batch_size=4)
    for a, b in zip(itertools.islice(plain, 12), itertools.islice(memo, 12)):  # 48 docs of 12: 4 epochs
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(memo.plan.memo) == 12 and memo.stats == plain.stats
    with pytest.raises(ValueError, match="memo_docs"):
        ChameleonDataConfig(memo_docs=True, vary_per_epoch=True)


def test_vqa_question_weights_steer_the_extra_questions(tokenizer):
    """data.vqa_question_weights: the extra turns follow the re-weighted question types (only
    relation questions here; the doc's own question is unchanged); bad types are a config error."""
    from mmkit.config import ConfigError

    proc = ChameleonProcessor.from_config(tokenizer, make_config(tokenizer))
    only_rel = {t: 0.0 for t in ("color", "shape", "count", "exist", "where", "size")} | {"relation": 1.0}
    data = ChameleonDataConfig(vqa_extra_questions=3, vqa_question_weights=only_rel, cond_dropout=0.0)
    enc, plain = EncodeDoc(proc, data, seed=0), EncodeDoc(proc, ChameleonDataConfig(vqa_extra_questions=3), seed=0)
    n_rel = n_rel_plain = 0
    for i in range(8):
        doc = reader_doc("vqa", i)
        own = len(proc.encode_vqa(doc).input_ids)
        if len(doc["meta"]["scenes"][0]["objects"]) < 2:
            continue  # a relation needs two objects: no extra turns
        ids = enc(doc)[0][0]
        text, text_plain = tokenizer.decode(ids[own:]), tokenizer.decode(plain(doc)[0][0][own:])
        assert ids[:own] == proc.encode_vqa(doc).input_ids  # the doc's own question comes first, unchanged
        n_rel += text.count("Question: Is the ")
        n_rel_plain += text_plain.count("Question: Is the ")
        assert text.count("Question:") == 3 and text.count("Question: Is the ") == 3
    assert n_rel > n_rel_plain
    with pytest.raises(ConfigError, match="vqa_question_weights"):
        ChameleonTask({}, {"vqa_question_weights": {"relations": 1.0}}, seed=0)
