"""The eval runner end to end with a fake pipeline: files + results, scored as the scorers score."""

import json
import random
from pathlib import Path

import pytest

from mmkit.data.shapes import caption as scene_caption
from mmkit.data.shapes import random_scene, render
from mmkit.eval import caption as cap
from mmkit.eval import runner

ROOT = Path(__file__).resolve().parents[1]


class FakePipeline:
    """Answers/captions looked up by image content; t2i renders the prompt's scene or a fixed wrong one."""

    def __init__(self, answers=None, captions=None, scenes=None):
        self.answers, self.captions, self.scenes = answers or {}, captions or {}, scenes or {}
        self.calls = []

    def answer(self, images, questions):
        self.calls.append(len(images))
        return [self.answers[(im.tobytes(), q)] for im, q in zip(images, questions)]

    def caption(self, images):
        self.calls.append(len(images))
        return [self.captions[im.tobytes()] for im in images]

    def generate_images(self, prompts, cfg_scale, seed):
        self.calls.append((len(prompts), cfg_scale, seed))
        return [render(self.scenes[p]) for p in prompts]


def _vqa_files(tmp_path):
    rng = random.Random("vqa")
    imgdir = tmp_path / "images"
    imgdir.mkdir()
    qs, anns, answers = [], [], {}
    # 5 questions: expected official accuracy worked out per question below
    cases = [  # (GT answers, raw model output, accuracy)
        (["red"] * 10, " red\n", 100.0),  # postprocess: first line, stripped
        (["2"] * 7 + ["two"] * 3, "two.", 100.0),  # normalised (GT disagree), trailing period dropped
        (["blue"] * 10, "Blue", 0.0),  # unanimous -> exact, case-sensitive
        (["yes"] * 2 + ["no"] * 8, "yes Question: is it?", 60.0),  # cut at "Question:"
        (["circle"] * 10, "square", 0.0),
    ]
    for i, (gt, out, _) in enumerate(cases):
        img = render(random_scene(rng))
        img.save(imgdir / f"{100 + i}.png")
        q = f"question {i}?"
        qs.append({"question_id": 1000 + i, "image_id": 100 + i, "question": q})
        anns.append({"question_id": 1000 + i, "image_id": 100 + i, "question_type": "what" if i < 3 else "is",
                     "answer_type": "other", "multiple_choice_answer": gt[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(gt)]})
        answers[(img.tobytes(), q)] = out
    (tmp_path / "q.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    task = tmp_path / "vqa.yaml"
    task.write_text(f"name: toy-vqa\ntask: vqa\nsource: files\nquestions: {tmp_path / 'q.json'}\n"
                    f"annotations: {tmp_path / 'a.json'}\nimage_dir: {imgdir}\nimage_pattern: '{{image_id}}.png'\n"
                    "batch_size: 2\n")
    return task, answers, [c[2] for c in cases]


def test_run_vqa_end_to_end(tmp_path, capsys, monkeypatch):
    import mmkit.generation
    from mmkit.cli import main

    task, answers, accs = _vqa_files(tmp_path)
    monkeypatch.setattr(mmkit.generation, "load_pipeline", lambda d: FakePipeline(answers=answers))
    assert main(["eval", "run", "--model", str(tmp_path), "--task", str(task), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert f"| toy-vqa | {tmp_path} | 5 | overall | 52.00 |" in printed and "results.json" in printed
    pipe = FakePipeline(answers=answers)
    res = runner.run_task(tmp_path / "model", task, out_dir=tmp_path / "out", pipeline=pipe)
    assert pipe.calls == [2, 2, 1]  # batched
    assert res["n"] == 5 and res["task"] == "toy-vqa" and res["seed"] == 0 and "evaluator_version" in res
    assert res["metrics"]["overall"] == round(sum(accs) / 5, 2) == 52.0
    assert res["metrics"]["perQuestionType"] == {"what": 66.67, "is": 30.0}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert "| toy-vqa |" in (tmp_path / "out" / "results.md").read_text()
    # the saved predictions score the same through the CLI scorer
    assert main(["eval", "vqa-score", "--predictions", str(tmp_path / "out" / "predictions.json"),
                 "--annotations", str(tmp_path / "a.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 52.0
    # --limit: only the first 3 questions, scored on those
    res = runner.run_task(tmp_path / "model", task, out_dir=tmp_path / "out3", limit=3, pipeline=FakePipeline(answers))
    assert res["n"] == 3 and res["metrics"]["overall"] == round(200 / 3, 2)

    class CappedPipeline(FakePipeline):  # a pipeline that takes max_new_tokens gets the task's value
        def answer(self, images, questions, max_new_tokens=None):
            self.calls.append(max_new_tokens)
            return super().answer(images, questions)

    pipe = CappedPipeline(answers)
    runner.run_task(tmp_path / "model", task, out_dir=tmp_path / "o4", limit=1, overrides=["max_new_tokens=3"],
                    pipeline=pipe)
    assert pipe.calls == [3, 1]


def test_run_caption_and_t2i(tmp_path):
    rng = random.Random("cap")
    imgdir = tmp_path / "images"
    imgdir.mkdir()
    scenes = [random_scene(rng) for _ in range(4)]
    refs, images, caps = [], [], {}
    for i, s in enumerate(scenes):
        img = render(s)
        img.save(imgdir / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png"})
        refs += [{"image_id": i, "id": 10 * i + k, "caption": scene_caption(s, k)} for k in range(5)]
        caps[img.tobytes()] = scene_caption(s, 0) if i % 2 == 0 else "a shape\nsecond line"
    (tmp_path / "refs.json").write_text(json.dumps({"images": images, "annotations": refs}))
    task = tmp_path / "cap.yaml"
    task.write_text(f"name: toy-cap\ntask: caption\nreferences: {tmp_path / 'refs.json'}\n"
                    f"image_dir: {imgdir}\nmeteor: false\nbatch_size: 3\n")
    res = runner.run_task(tmp_path / "m", task, out_dir=tmp_path / "o", pipeline=FakePipeline(captions=caps))
    preds = {i: (scene_caption(s, 0) if i % 2 == 0 else "a shape") for i, s in enumerate(scenes)}
    direct = cap.score_captions(preds, {i: [scene_caption(s, k) for k in range(5)] for i, s in enumerate(scenes)},
                                meteor=False)
    assert res["metrics"] == direct and res["n"] == 4
    assert set(direct) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}

    # t2i: half the prompts get their own scene, half a scene with every object recoloured
    entries, fake = [], {}
    for i, s in enumerate(scenes):
        prompt = scene_caption(s, 0)
        entries.append({"prompt": prompt})
        wrong = type(s).from_dict(s.to_dict())
        unused = [c for c in ("red", "green", "blue", "yellow", "purple", "cyan") if c not in {o.color for o in s.objects}]
        for o, c in zip(wrong.objects, unused):  # distinct new colours: objects stay separate blobs
            o.color = c
        fake[prompt] = s if i < 2 else wrong
    (tmp_path / "prompts.json").write_text(json.dumps(entries))
    task = tmp_path / "t2i.yaml"
    task.write_text(f"name: toy-t2i\ntask: t2i\nprompts: {tmp_path / 'prompts.json'}\nbatch_size: 3\n"
                    "cfg_scale: 2.5\nseed: 7\n")
    pipe = FakePipeline(scenes=fake)
    res = runner.run_task(tmp_path / "m", task, out_dir=tmp_path / "t", pipeline=pipe)
    assert pipe.calls == [(3, 2.5, 7), (1, 2.5, 10)]  # seed + index of the batch's first prompt
    n_obj = [len(s.objects) for s in scenes]
    assert res["metrics"]["color"] == round(100 * sum(n_obj[:2]) / sum(n_obj), 2)
    assert res["metrics"]["shape"] == res["metrics"]["position"] == res["metrics"]["count"] == 100.0
    assert len(list((tmp_path / "t" / "images").glob("*.png"))) == 4


def test_t2i_image_temperature_sets_the_pipelines_sampling_for_the_run(tmp_path):
    """image_temperature 0: images are drawn greedily during the run (the pipeline's own sampling
    is back afterwards, also after an error); > 0 samples at that temperature; unset leaves it."""
    from mmkit.generation import IMAGE_SAMPLING, SamplingParams

    scene = random_scene(random.Random("t"))
    prompt = scene_caption(scene, 0)
    (tmp_path / "prompts.json").write_text(json.dumps([{"prompt": prompt}]))

    class Sampling(FakePipeline):
        image_sampling = IMAGE_SAMPLING

        def generate_images(self, prompts, cfg_scale, seed):
            self.seen = self.image_sampling
            if getattr(self, "fail", False):
                raise RuntimeError("boom")
            return super().generate_images(prompts, cfg_scale, seed)

    for temp, want in [("0", SamplingParams(do_sample=False)),
                       ("0.5", SamplingParams(do_sample=True, temperature=0.5, top_k=IMAGE_SAMPLING.top_k)),
                       ("null", IMAGE_SAMPLING)]:
        task = tmp_path / f"t{temp}.yaml"
        task.write_text(f"name: t\ntask: t2i\nprompts: {tmp_path / 'prompts.json'}\nimage_temperature: {temp}\n")
        pipe = Sampling(scenes={prompt: scene})
        res = runner.run_task(tmp_path / "m", task, out_dir=tmp_path / f"o{temp}", pipeline=pipe)
        assert pipe.seen == want and pipe.image_sampling == IMAGE_SAMPLING
        assert res["image_temperature"] == (None if temp == "null" else float(temp))
    pipe = Sampling(scenes={prompt: scene})
    pipe.fail = True
    with pytest.raises(RuntimeError):
        runner.run_task(tmp_path / "m", tmp_path / "t0.yaml", out_dir=tmp_path / "x", pipeline=pipe)
    assert pipe.image_sampling == IMAGE_SAMPLING
    with pytest.raises(ValueError, match="image_temperature"):
        runner.TaskConfig(name="t", task="t2i", image_temperature=-1)


def test_task_yamls_parse_and_bad_input(tmp_path):
    for path in sorted((ROOT / "eval").glob("*.yaml")):
        cfg = runner.load_task(path)
        assert cfg.name == path.stem
    names = {p.stem for p in (ROOT / "eval").glob("*.yaml")}
    assert names == {"shapes-vqa", "shapes-caption", "shapes-t2i", "vqav2", "gqa", "textvqa", "coco-caption"}
    from mmkit.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: vqa\nbatchsize: 3\n")
    assert main(["eval", "run", "--model", str(tmp_path), "--task", str(bad)]) == 2
    assert main(["eval", "run", "--model", str(tmp_path), "--task", str(ROOT / "eval" / "vqav2.yaml"),
                 "--limit", "0"]) == 2


def test_majority_baseline(tmp_path):
    anns = {"annotations": [
        {"question_id": i, "question_type": "q", "answer_type": "a", "multiple_choice_answer": gold,
         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(gts)]}
        for i, (gold, gts) in enumerate([("yes", ["yes"] * 10), ("yes", ["yes"] * 2 + ["no"] * 8),
                                         ("no", ["no"] * 10), ("2", ["2"] * 10)])]}
    (tmp_path / "vqa_annotations.json").write_text(json.dumps(anns))
    # always "yes": 100 + 60 + 0 + 0 over 4 questions
    assert runner.majority_baseline(tmp_path) == 40.0


def test_gather_scores_once(monkeypatch):
    """Two ranks' partial predictions merge before scoring (never averaged per rank)."""

    class FakeDist:
        def __init__(self, rank, parts):
            self.rank, self.parts = rank, parts

        def get_world_size(self):
            return len(self.parts)

        def get_rank(self):
            return self.rank

        def all_gather_object(self, out, obj):
            out[:] = self.parts

    parts = [{0: "a", 2: "c"}, {1: "b"}]
    assert runner.gather_predictions(parts[0], FakeDist(0, parts)) == {0: "a", 2: "c", 1: "b"}
    assert runner.gather_predictions(parts[1], FakeDist(1, parts)) is None
    # the CIDEr of the whole set is not the mean of per-shard CIDErs (IDF is per set)
    refs = {0: ["a red circle"], 1: ["a blue square"], 2: ["a red square"], 3: ["two green circles"]}
    preds = {0: "a red circle", 1: "a square", 2: "a red square", 3: "green circles"}
    gts = {k: [{"caption": r} for r in v] for k, v in refs.items()}
    res = {k: [{"caption": v}] for k, v in preds.items()}
    g, r = cap.ptb_tokenize(gts), cap.ptb_tokenize(res)
    whole = cap.score_tokenized(g, r, meteor=False)["CIDEr"]
    halves = [cap.score_tokenized({k: g[k] for k in ks}, {k: r[k] for k in ks}, meteor=False)["CIDEr"]
              for ks in ([0, 2], [1, 3])]
    assert whole != pytest.approx(sum(halves) / 2, rel=1e-3)


def test_quickstart_api_on_synth_shards(tmp_path):
    """evaluate_vqa / evaluate_caption / evaluate_t2i on a real held-out split (mmkit data synth)."""
    from mmkit.data import build_stream
    from mmkit.data.shapes import Scene
    from mmkit.data.synth import synth

    synth(tmp_path / "data", n=2, eval_n=6, kinds=("vqa", "caption"))
    eval_dir = tmp_path / "data" / "eval"
    answers, captions, scenes = {}, {}, {}
    for batch in build_stream(str(eval_dir), batch_size=4, collate_fn=list, infinite=False, shuffle_buffer=0):
        for d in batch:
            img = d["images"][0]
            if d["kind"] == "vqa":
                answers[(img.tobytes(), d["meta"]["question"])] = d["meta"]["answer"]
            else:
                captions[img.tobytes()] = d["meta"]["captions"][0]
    for e in json.loads((eval_dir / "t2i_prompts.json").read_text()):
        scenes[e["prompt"]] = Scene.from_dict({"width": e["width"], "height": e["height"],
                                               "objects": [dict(o, jx=0.0, jy=0.0) for o in e["objects"]]})
    oracle = FakePipeline(answers, captions, scenes)
    out = runner.evaluate_vqa(oracle, eval_dir, batch_size=4)
    assert out["overall"] == 100.0 and out["n"] == 6  # the canonical answer is >= 7 of the 10
    assert runner.evaluate_vqa(oracle, eval_dir, limit=2)["n"] == 2
    refs = cap.references_from_coco(json.loads((eval_dir / "captions.json").read_text()))
    got = runner.evaluate_caption(oracle, eval_dir, meteor=False)
    assert got.pop("n") == 6
    assert got == cap.score_captions({k: v[0] for k, v in refs.items()}, refs, meteor=False)
    t2i_out = runner.evaluate_t2i(oracle, eval_dir, cfg_scale=3.0, seed=0)
    assert t2i_out["attribute_accuracy"] == 100.0 and t2i_out["n"] == 6
    assert 0.0 <= runner.majority_baseline(eval_dir) < 100.0


def test_cli_geneval_layout(tmp_path, monkeypatch):
    import mmkit.generation
    from mmkit.cli import main
    from mmkit.data.shapes import Obj, Scene

    scene = Scene(64, 64, [Obj("circle", "red", "large", "left", "top")])
    pipe = FakePipeline(scenes={"a red circle": scene, "two dogs": scene})
    monkeypatch.setattr(mmkit.generation, "load_pipeline", lambda d: pipe)
    meta = [{"tag": "colors", "prompt": "a red circle"}, {"tag": "counting", "prompt": "two dogs"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    assert main(["eval", "geneval", "--model", str(tmp_path), "--metadata", str(tmp_path / "m.jsonl"),
                 "--out", str(tmp_path / "g"), "--n-samples", "2", "--seed", "5"]) == 0
    assert pipe.calls == [(2, 3.0, 5), (2, 3.0, 6)]
    assert json.loads((tmp_path / "g" / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert sorted(p.name for p in (tmp_path / "g" / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Untrained tiny models of both families saved as mmkit model directories + a held-out split."""
    import torch

    from mmkit.data.synth import synth
    from mmkit.models.chameleon.config import MmkitChameleonConfig
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM
    from mmkit.models.kimivl.config import MmkitKimiVLConfig
    from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration
    from mmkit.models.kimivl.processor import KimiVLProcessor
    from mmkit.text.tokenizer import train_bpe
    from mmkit.vq.model import VQModel, preset_config

    root = tmp_path_factory.mktemp("tiny")
    tok = train_bpe(["Question: what color is the circle? Answer: red", "Caption: a red circle and a blue square",
                     "Draw: a green triangle"] * 20, vocab_size=300, min_frequency=1)
    n_text, n_codes = len(tok), 32
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cfg = MmkitChameleonConfig(vocab_size=n_text + n_codes, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                               image_token_offset=n_text, num_image_tokens=n_codes, image_grid_h=4, image_grid_w=4,
                               max_position_embeddings=512, **ids)
    MmkitChameleonForCausalLM(cfg).save_pretrained(root / "cham")
    tok.save_pretrained(root / "cham")
    VQModel(preset_config("shapes-f8", resolution=32, codebook_size=n_codes, base_channels=8,
                          channel_multiplier=[1, 2, 2], latent_channels=8, norm_groups=4, mid_attn=False)
            ).eval().save_pretrained(root / "cham" / "vq")
    text = dict(vocab_size=n_text, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **ids)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  pos_emb_height=4, pos_emb_width=4)
    kcfg = MmkitKimiVLConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                             boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id, **ids)
    MmkitKimiVLForConditionalGeneration(kcfg).save_pretrained(root / "kimi")
    KimiVLProcessor(tok).save_pretrained(root / "kimi")
    synth(root / "data", n=2, eval_n=3, kinds=("vqa", "caption"))
    return root


@pytest.mark.slow
def test_eval_run_real_tiny_models(tiny_models, capsys):
    """`mmkit eval run` with the repo's shapes task files on tiny models of both families."""
    from mmkit.cli import main
    from mmkit.data.templates import postprocess_answer
    from mmkit.generation import load_pipeline

    eval_dir = tiny_models / "data" / "eval"
    # every task file on a real model; both families answer (the caption path is shared code)
    runs = [("cham", "shapes-vqa"), ("cham", "shapes-t2i"), ("kimi", "shapes-vqa"), ("kimi", "shapes-caption")]
    for fam, task in runs:
        out = tiny_models / "out" / fam / task
        assert main(["eval", "run", "--model", str(tiny_models / fam), "--task", str(ROOT / "eval" / f"{task}.yaml"),
                     "--out", str(out), "--limit", "2", "--set", f"eval_dir={eval_dir}", "--set", "meteor=false",
                     "--set", "max_new_tokens=4", "--json"]) == 0, (fam, task)
        res = json.loads(capsys.readouterr().out)
        assert res["n"] == 2 and res["task"] == task and res["model"] == str(tiny_models / fam)
        assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
        headline = {"shapes-vqa": "overall", "shapes-caption": "CIDEr", "shapes-t2i": "attribute_accuracy"}[task]
        assert 0.0 <= res["metrics"][headline] <= 100.0
    # the saved answers are the pipeline's greedy answers on the held-out images
    preds = json.loads((tiny_models / "out" / "cham" / "shapes-vqa" / "predictions.json").read_text())
    items, _ = runner.vqa_items(runner.TaskConfig(name="x", task="vqa", source="shards", eval_dir=str(eval_dir)))
    images = runner._Images(runner.TaskConfig(name="x", task="vqa", source="shards", eval_dir=str(eval_dir)), "vqa")
    pipe = load_pipeline(tiny_models / "cham", max_new_tokens=4)
    direct = pipe.answer([images.get(it["image_key"]) for it in items[:2]], [it["question"] for it in items[:2]])
    assert [p["answer"] for p in preds] == [postprocess_answer(a) for a in direct]
    assert [p["question_id"] for p in preds] == [it["id"] for it in items[:2]]
