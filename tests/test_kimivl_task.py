"""Task "kimivl": recipes parse, shard batches carry the right labels, a tiny model learns VQA."""

from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than two fighting over small kernels."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_recipes_parse():
    from mmkit.cli.train import load_recipe
    from mmkit.models.kimivl.config import MmkitKimiVLConfig
    from mmkit.models.kimivl.decoder import MoEDecoderConfig
    from mmkit.models.kimivl.task import KimiVLTask

    for name in ("kimivl-shapes.yaml", "kimivl-a3b.yaml"):
        recipe = load_recipe(str(ROOT / "training" / name), [])
        assert recipe.task == "kimivl"
        task = KimiVLTask(recipe.model, recipe.data, seed=0, out_dir="unused")  # strict sections
        text = MoEDecoderConfig.from_dict(dict(task.cfg.text, vocab_size=task.cfg.text.get("vocab_size", 1000)))
        cfg = MmkitKimiVLConfig(vision_config=task.cfg.vision, text_config=text.to_dict())
        assert cfg.vision_config.hidden_size % cfg.vision_config.num_attention_heads == 0
    a3b = load_recipe(str(ROOT / "training" / "kimivl-a3b.yaml"), [])
    v, t = a3b.model["vision"], a3b.model["text"]
    assert v["hidden_size"] // v["num_attention_heads"] == 72 and t["n_routed_experts"] == 64
    assert (t["kv_lora_rank"], t["num_experts_per_tok"], t["rope_theta"]) == (512, 6, 800000.0)
    assert a3b.train.mixed_precision == "bf16" and a3b.train.activation_checkpointing
    with pytest.raises(Exception, match="unknown key"):
        KimiVLTask(dict(a3b.model, bogus=1), a3b.data, seed=0, out_dir="unused")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmkit.data.synth import synth
    from mmkit.text.tokenizer import train_text_tokenizer

    root = tmp_path_factory.mktemp("kimivl_data")
    synth(root / "data", n=160, seed=0, eval_n=40, shard_size=80)
    train_text_tokenizer(root / "data" / "train", root / "tok", vocab_size=600)
    return root


TINY = dict(
    vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                pos_emb_height=4, pos_emb_width=4),
    text=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    max_len=128)


def test_shard_batches_labels_and_balancing(shards, tmp_path, one_thread):
    from mmkit.models.kimivl.task import KimiVLTask

    task = KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok")),
                      {"sources": str(shards / "data" / "train"), "shuffle_buffer": 16,
                       "weights": {"vqa": 2.0}}, seed=0, out_dir=str(tmp_path))
    src = task._sources()  # one directory + kind weights -> {pattern: weight} for the reader
    assert sorted(src.values()) == [1.0, 1.0, 2.0] and all(k.endswith("-*.tar") for k in src)
    model = task.build_model().train()
    stream = task.batches(rank=0, world_size=1, batch_size=6, num_workers=0)
    batch = next(iter(stream))
    ids, labels = batch["input_ids"], batch["labels"]
    proc = task.processor
    assert int((ids == proc.image_token_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    # images, prompts and padding never carry loss; every target is a real token
    assert not ((labels != -100) & ((ids == proc.image_token_id) | (ids == proc.boi_token_id))).any()
    assert ((labels == ids) | (labels == -100)).all()
    assert (labels != -100).any(dim=1).all()
    loss, metrics = task.loss(model, batch)
    loss.backward()
    assert metrics["tokens"] == int((labels[:, 1:] != -100).sum()) and "moe/load_max" in metrics
    moe = model.language_model.moe_layers()[0]
    before = moe.gate.e_score_correction_bias.clone()
    task.on_optimizer_step(model)  # balancing step moves the bias and clears the counts
    assert not torch.equal(before, moe.gate.e_score_correction_bias)
    assert moe.tokens_per_expert.sum() == 0
    task.save_final(model, str(tmp_path / "final"))
    from mmkit.models import load_model
    from mmkit.models.kimivl.processor import KimiVLProcessor

    again = load_model(tmp_path / "final")
    assert KimiVLProcessor.from_pretrained(tmp_path / "final").image_token_id == proc.image_token_id
    with torch.no_grad():
        model.eval()
        a = model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                  attention_mask=batch["attention_mask"]).logits
        b = again(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                  attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_extra_questions_are_answer_only_turns(shards, tmp_path, one_thread):
    """`data.extra_questions`: VQA docs get more turns about their own scene; only answers + eos
    carry loss, and the answers are those of the doc's scene graph."""
    import random

    from mmkit.data import shapes as S
    from mmkit.data.reader import build_stream
    from mmkit.models.kimivl.task import ExampleBuilder, KimiVLTask

    task = KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok"), max_len=512),
                      {"sources": str(shards / "data" / "train"), "kinds": ["vqa"], "extra_questions": 3},
                      seed=0, out_dir=str(tmp_path))

    doc = next(iter(build_stream(str(shards / "data" / "train" / "vqa-000000.tar"), batch_size=1, collate_fn=list,
                                 shuffle_buffer=0, infinite=False)))[0]
    plain = ExampleBuilder(str(shards / "tok"), task.proc_cfg, 512, ["vqa"], task.tokens)(doc)
    more = ExampleBuilder(str(shards / "tok"), task.proc_cfg, 512, ["vqa"], task.tokens, extra_questions=3)(doc)
    tok = task.processor.tokenizer
    n = len(plain["input_ids"])
    assert torch.equal(more["input_ids"][:n], plain["input_ids"]) and torch.equal(more["labels"][:n], plain["labels"])
    targets = more["labels"][n:]
    answers = tok.decode(targets[targets != -100]).split(tok.eos_token)[:-1]
    assert len(answers) == 3 and (targets == tok.eos_token_id).sum() == 3
    scene = S.Scene.from_dict(doc["meta"]["scenes"][0])
    possible = {S.make_vqa(scene, random.Random(i))["answer"] for i in range(300)}
    assert {a.strip() for a in answers} <= possible


def _base_and_variant(shards, tmp_path, **model_kw):
    """The TINY model and the same with `model_kw`, each built from seed 0."""
    from mmkit.models.kimivl.task import KimiVLTask

    models = []
    for kw in ({}, model_kw):
        torch.manual_seed(0)
        models.append(KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok"), **kw), {},
                                 out_dir=str(tmp_path)).build_model())
    return models


def test_attention_init_std(shards, tmp_path):
    """`model.attention_init_std` re-draws only the decoder's q / kv projections."""
    base, wide = _base_and_variant(shards, tmp_path, attention_init_std=0.2)
    for a, b in zip(base.language_model.layers, wide.language_model.layers):
        for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
            wa, wb = getattr(a.self_attn, name).weight, getattr(b.self_attn, name).weight
            assert wa.std() < 0.03 and 0.15 < wb.std() < 0.25
        assert torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)
    assert torch.equal(base.lm_head.weight, wide.lm_head.weight)


STEPS = 80


def test_tiny_model_learns_vqa_above_majority(shards, tmp_path, one_thread):
    """Train on VQA shards for a few dozen steps; greedy answers on held-out questions beat the
    majority answer (VQA accuracy, min(#humans agreeing / 3, 1))."""
    from mmkit.data import templates as T
    from mmkit.data.reader import build_stream
    from mmkit.models.kimivl.model import greedy_generate
    from mmkit.models.kimivl.task import KimiVLTask

    torch.manual_seed(0)
    task = KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok")),
                      {"sources": str(shards / "data" / "train"), "kinds": ["vqa"], "shuffle_buffer": 64},
                      seed=0, out_dir=str(tmp_path))
    model = task.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    it = iter(task.batches(rank=0, world_size=1, batch_size=16, num_workers=0))
    for _ in range(STEPS):
        loss, _ = task.loss(model, next(it))
        loss.backward()
        opt.step()
        opt.zero_grad()
        task.on_optimizer_step(model)
    model.eval()
    evals = [d for batch in build_stream(str(shards / "data" / "eval"), batch_size=40, collate_fn=list,
                                         shuffle_buffer=0, infinite=False) for d in batch if d["kind"] == "vqa"]
    proc = task.processor
    score = 0.0
    for d in evals:
        enc = proc.encode([next(im for im in d["images"] if im is not None), T.vqa_prompt(d["meta"]["question"])])
        new = greedy_generate(model, torch.tensor([enc["input_ids"]]), enc["pixel_values"], enc["image_grid_thw"],
                              max_new_tokens=6, eos_token_id=proc.tokenizer.eos_token_id)
        answer = T.postprocess_answer(proc.tokenizer.decode(new[0], skip_special_tokens=True))
        score += min(1.0, sum(a == answer for a in d["meta"]["answers"]) / 3)
    majority = Counter(d["meta"]["answer"] for d in evals).most_common(1)[0][0]
    baseline = sum(min(1.0, sum(a == majority for a in d["meta"]["answers"]) / 3) for d in evals)
    assert len(evals) == 40
    print(f"vqa score {score:.1f} vs majority {baseline:.1f} of {len(evals)}")
    assert score > baseline + 2, (score, baseline)


def test_question_first_repeat_image_turns(shards, tmp_path, one_thread):
    """`prompt_order: question_first` + `data.repeat_image`: every turn is `Question: q [image]
    Answer:` | ` a</s>`, with the image's pixels once per turn; only answers carry loss."""
    from mmkit.data.reader import build_stream
    from mmkit.models.kimivl.task import ExampleBuilder, KimiVLTask

    task = KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok"), max_len=512, prompt_order="question_first"),
                      {"sources": str(shards / "data" / "train"), "kinds": ["vqa"], "extra_questions": 2,
                       "repeat_image": True}, seed=0, out_dir=str(tmp_path))
    doc = next(iter(build_stream(str(shards / "data" / "train" / "vqa-000000.tar"), batch_size=1, collate_fn=list,
                                 shuffle_buffer=0, infinite=False)))[0]
    ex = ExampleBuilder(str(shards / "tok"), task.proc_cfg, 512, ["vqa"], task.tokens, extra_questions=2,
                        repeat_image=True)(doc)
    proc, ids, labels = task.processor, ex["input_ids"].tolist(), ex["labels"]
    starts = [i for i, t in enumerate(ids) if t == proc.boi_token_id]
    assert len(starts) == 3 and ex["image_grid_thw"].shape[0] == 3
    assert ex["pixel_values"].shape[0] == 3 * int(ex["image_grid_thw"][0].prod())
    assert torch.equal(ex["pixel_values"][: len(ex["pixel_values"]) // 3], ex["pixel_values"][-(len(ex["pixel_values"]) // 3):])
    text = proc.tokenizer.decode(ex["input_ids"])
    assert text.count("Question:") == 3 and text.count("Answer:") == 3
    assert all(text.split("<boi>")[i].rstrip().endswith("?") for i in range(3))  # the question precedes each image
    assert int((labels == proc.tokenizer.eos_token_id).sum()) == 3
    assert not ((labels != -100) & (ex["input_ids"] == proc.image_token_id)).any()
    model = task.build_model()
    batch = task.batches(batch_size=2)
    out = task.loss(model, next(iter(batch)))[0]
    assert torch.isfinite(out)


def test_pos_emb_init_std(shards, tmp_path):
    """`model.pos_emb_init_std` re-draws only MoonViT's position table."""
    base, big = _base_and_variant(shards, tmp_path, pos_emb_init_std=0.5)
    assert base.vision_tower.patch_embed.pos_emb.weight.std() < 0.05
    assert 0.3 < big.vision_tower.patch_embed.pos_emb.weight.std() < 0.7
    assert torch.equal(base.vision_tower.patch_embed.proj.weight, big.vision_tower.patch_embed.proj.weight)


def test_pos_emb_init_sincos(shards, tmp_path):
    """`model.pos_emb_init: sincos`: a smooth grid of the asked std in which every cell has its own
    code, nearer cells more alike (row and column alike); the rest of the model as with noise."""
    from mmkit.models.kimivl.task import sincos_grid

    base, sc = _base_and_variant(shards, tmp_path, pos_emb_init="sincos", pos_emb_init_std=0.3)
    table = sc.vision_tower.patch_embed.pos_emb.weight.detach()  # (H0, W0, D)
    assert abs(float(table.std()) - 0.3) < 1e-4
    codes = table.flatten(0, 1)
    dist = torch.cdist(codes, codes)  # (H0*W0, H0*W0)
    assert dist[~torch.eye(len(codes), dtype=torch.bool)].min() > 0.1  # every cell distinct
    assert dist[0, 1] < dist[0, 2] and torch.allclose(table[0, 1] - table[0, 0], (table[1, 0] - table[0, 0]).roll(table.shape[-1] // 2))
    assert torch.equal(base.vision_tower.patch_embed.proj.weight, sc.vision_tower.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="% 4"):
        sincos_grid(4, 4, 30, std=0.1)


def test_question_weights_reach_more_vqa(shards, tmp_path, one_thread):
    """`data.question_weights` is validated with the data set's question types and re-weights the
    extra questions: with only "exist" left, every extra answer is yes/no."""
    from mmkit.models.kimivl.task import KimiVLDataSection, KimiVLTask

    with pytest.raises(ValueError, match="data.question_weights"):
        KimiVLDataSection(question_weights={"colour": 0.3})
    with pytest.raises(ValueError, match="data.question_weights"):
        KimiVLDataSection(question_weights={"exist": -1.0})
    only_exist = {t: 0.0 for t in ("color", "shape", "count", "relation", "where", "size")} | {"exist": 1.0}
    task = KimiVLTask(dict(TINY, text_tokenizer=str(shards / "tok"), max_len=512),
                      {"sources": str(shards / "data" / "train"), "kinds": ["vqa"], "extra_questions": 3,
                       "question_weights": only_exist}, seed=0, out_dir=str(tmp_path))
    tok = task.processor.tokenizer
    batch = next(iter(task.batches(batch_size=4)))
    for labels in batch["labels"]:
        answers = [a.strip() for a in tok.decode(labels[labels != -100]).split(tok.eos_token)[:-1]]
        assert len(answers) == 4  # the doc's own question (any type) + 3 extra exist questions
        assert all(a in ("yes", "no") for a in answers[1:]), answers
