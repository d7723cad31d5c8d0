"""The training engine in-process on the toy task: learning, exact resume, atomic
checkpoints, non-finite handling, schedules, weight-decay groups, checkpointing, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmkit.config import from_dict
from mmkit.errors import MmkitError
from mmkit.train import checkpoint as ckpt_io
from mmkit.train.config import Recipe, TrainConfig
from mmkit.train.engine import enable_activation_checkpointing, train
from mmkit.train.optim import BatchedMuon, MuonWithAdamW, build_optimizer, lr_factor, param_groups
from mmkit.train.task import register_task
from mmkit.train.toy import ToyLM, ToyTask

TINY_MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32}


def recipe(task="toy", model=None, **train_kw) -> Recipe:
    t = {"batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup": 2, "log_every": 1, "save_every": 0,
         "trackers": [], **train_kw}
    return from_dict(Recipe, {"task": task, "model": {**TINY_MODEL, **(model or {})},
                              "data": {"corpus_bytes": 8192}, "train": t})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_outputs(tmp_path):
    r = recipe(max_steps=40, log_every=10, sample_every=20, trackers=["tensorboard"], save_every=20, keep_last=1)
    res = train(r, tmp_path, progress=False)
    assert res.status == "done" and res.step == 40 and res.bad_steps == 0
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [10, 20, 30, 40]
    for row in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(row) and row["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows  # from ~ln(256)=5.5 down
    assert math.log(256) - 0.5 < res.losses[1] < math.log(256) + 0.5
    # keep_last=1: only the newest checkpoint remains; final weights reload to the same logits.
    assert [s for s, _ in ckpt_io.complete_checkpoints(tmp_path / "checkpoints")] == [40]
    final = ToyLM.from_pretrained(tmp_path / "final")
    trained = ToyLM(final.cfg)
    trained.load_state_dict(ckpt_io.load(tmp_path / "checkpoints" / "step-00000040", 0)["model"])
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(final(ids), trained(ids), rtol=0, atol=0)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "samples" / "samples.md").read_text().count("- step ") == 2


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    # dropout makes the trajectory depend on the restored torch RNG; grad_accum on the stream.
    kw = dict(model={"dropout": 0.1}, max_steps=12, grad_accum=2, save_every=6)
    full = train(recipe(**kw), tmp_path / "full", progress=False)
    part = train(recipe(**kw), tmp_path / "part", stop_after=6, progress=False)
    assert part.status == "stopped" and part.step == 6
    assert not (tmp_path / "part" / "final").exists()
    assert ckpt_io.latest(tmp_path / "part" / "checkpoints").name == "step-00000006"
    rest = train(recipe(**kw), tmp_path / "part", resume=True, progress=False)
    assert rest.status == "done" and sorted(rest.losses) == list(range(7, 13))
    assert [part.losses[s] for s in range(1, 7)] == [full.losses[s] for s in range(1, 7)]
    assert [rest.losses[s] for s in range(7, 13)] == [full.losses[s] for s in range(7, 13)]  # bit-exact
    # metrics.jsonl of the resumed run holds each step once, in order.
    assert [row["step"] for row in read_metrics(tmp_path / "part")] == list(range(1, 13))
    a = ckpt_io.load(tmp_path / "full" / "checkpoints" / "step-00000012", 0)["model"]
    b = ckpt_io.load(tmp_path / "part" / "checkpoints" / "step-00000012", 0)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_takes_hidden_matrices_and_resumes_exactly(tmp_path):
    # train.optimizer: muon: the block matrices go to (batched) torch Muon, embeddings / head / norms /
    # biases stay with AdamW; the scheduler reaches both; a resumed run is bit-exact.
    model = ToyLM(ToyTask(TINY_MODEL, {}).model_cfg)
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.inner[0], BatchedMuon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.inner[0].param_groups for p in g["params"])
    assert muon == sorted(f"blocks.{i}.{w}.weight" for i in range(2) for w in ("qkv", "proj", "up", "down"))
    adamw = {names[id(p)] for g in opt.inner[1].param_groups for p in g["params"]}
    assert {"embed.weight", "pos.weight", "norm.weight", "blocks.0.up.bias"} <= adamw and not adamw & set(muon)
    kw = dict(optimizer="muon", max_steps=12, save_every=6)
    full = train(recipe(**kw), tmp_path / "full", progress=False)
    assert full.losses[12] < full.losses[1] - 1.0
    rows = read_metrics(tmp_path / "full")
    assert rows[0]["lr"] == pytest.approx(1.5e-3) and rows[-1]["lr"] < 3e-3  # warmup, then cosine
    train(recipe(**kw), tmp_path / "part", stop_after=6, progress=False)
    rest = train(recipe(**kw), tmp_path / "part", resume=True, progress=False)
    assert [rest.losses[s] for s in range(7, 13)] == [full.losses[s] for s in range(7, 13)]  # bit-exact
    # a checkpoint of the other optimizer is refused with a clear message
    train(recipe(max_steps=12, save_every=6), tmp_path / "adamw", stop_after=6, progress=False)
    with pytest.raises(ValueError, match="train.optimizer: muon"):
        train(recipe(**kw), tmp_path / "adamw", resume=True, progress=False)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_equals_torch_muon_bit_for_bit(nesterov):
    # same-shape matrices share one batched Newton-Schulz; tall, wide, square, lone and tiny
    # (one-at-a-time) shapes
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (16, 16), (48, 16), (16, 48), (16, 16), (7, 5), (4, 32), (4, 32)]
    ref = [torch.nn.Parameter(0.1 * torch.randn(s, generator=g)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=2e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    opts = torch.optim.Muon(ref, **kw), BatchedMuon(ours, **kw)
    for _ in range(4):
        for p, q in zip(ref, ours):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        for o in opts:
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(ref, ours))
    assert opts[0].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()
    assert all(torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])
               for p, q in zip(ref, ours))


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    r = recipe(max_steps=9, save_every=3)
    train(r, tmp_path, stop_after=3, progress=False)
    real = ckpt_io.write_tensors

    def crash_on_optimizer(path, tensors, metadata=None):
        if path.name == "optimizer.safetensors":
            raise RuntimeError("simulated crash mid-write")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_io, "write_tensors", crash_on_optimizer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(r, tmp_path, resume=True, progress=False)
    monkeypatch.setattr(ckpt_io, "write_tensors", real)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-00000006" / "model.safetensors").is_file()  # the torn write
    assert not (root / "step-00000006").exists()
    assert ckpt_io.latest(root).name == "step-00000003"
    assert ckpt_io.load(ckpt_io.latest(root), 0)["meta"]["step"] == 3
    res = train(r, tmp_path, resume=True, progress=False)
    assert sorted(res.losses) == list(range(4, 10)) and res.status == "done"
    assert not list(root.glob(".tmp-*"))


class NaNTask(ToyTask):
    """Toy task whose loss is NaN on chosen steps (1-based optimizer steps)."""

    bad: set = set()

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan") if self.calls in self.bad else loss), metrics


register_task("toy_nan_test")(NaNTask)


def test_nonfinite_loss_skips_then_aborts_with_checkpoint(tmp_path):
    NaNTask.bad = {3}
    res = train(recipe("toy_nan_test", max_steps=5), tmp_path / "a", progress=False)
    assert res.bad_steps == 1 and res.status == "done" and math.isnan(res.losses[3])
    assert all(math.isfinite(res.losses[s]) for s in (1, 2, 4, 5))
    assert read_metrics(tmp_path / "a")[2]["bad_steps"] == 1
    # Weights after the skipped step equal the weights before it: an isolated NaN step is a no-op
    # for the model, so a run without that batch's update... check via stop_after at 2 and 3.
    NaNTask.bad = {3}
    w2 = train(recipe("toy_nan_test", max_steps=5), tmp_path / "b", stop_after=2, progress=False)
    w3 = train(recipe("toy_nan_test", max_steps=5), tmp_path / "c", stop_after=3, progress=False)
    m2 = ckpt_io.load(ckpt_io.latest(tmp_path / "b" / "checkpoints"), 0)["model"]
    m3 = ckpt_io.load(ckpt_io.latest(tmp_path / "c" / "checkpoints"), 0)["model"]
    assert w2.step == 2 and w3.step == 3 and all(torch.equal(m2[k], m3[k]) for k in m2)

    NaNTask.bad = set(range(4, 100))
    with pytest.raises(MmkitError, match=r"3 non-finite losses in a row .* at step 6; checkpoint"):
        train(recipe("toy_nan_test", max_steps=20, max_bad_steps=3), tmp_path / "d", progress=False)
    assert ckpt_io.latest(tmp_path / "d" / "checkpoints").name == "step-00000006"
    NaNTask.bad = set()


def test_schedules():
    cos = TrainConfig(max_steps=110, warmup=10, lr=1.0, min_lr=0.1, schedule="cosine")
    assert [lr_factor(s, cos) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.55)
    assert lr_factor(110, cos) == pytest.approx(0.1) and lr_factor(500, cos) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, warmup=10, min_lr=0.0, schedule="wsd", decay_frac=0.2)
    assert [lr_factor(s, wsd) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(100, wsd) == pytest.approx(0.0)
    const = TrainConfig(max_steps=100, warmup=0, schedule="constant")
    assert {lr_factor(s, const) for s in (0, 50, 99)} == {1.0}


def test_no_weight_decay_on_norms_biases_embeddings():
    model = ToyLM(ToyTask(TINY_MODEL, {}).model_cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    got_decay = sorted(names[id(p)] for p in decay["params"])
    got_none = sorted(names[id(p)] for p in no_decay["params"])
    assert got_decay == sorted(f"blocks.{i}.{w}.weight" for i in range(2) for w in ("qkv", "proj", "up", "down"))
    assert "embed.weight" in got_none and "pos.weight" in got_none and "norm.weight" in got_none
    assert "blocks.0.up.bias" in got_none and "blocks.1.attn_norm.weight" in got_none
    n_params = len({id(p) for p in model.parameters()})  # tied head counted once
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_activation_checkpointing_same_loss_and_grads():
    task = ToyTask({**TINY_MODEL, "n_layers": 3}, {"corpus_bytes": 4096})
    batch = next(iter(task.batches(batch_size=2)))
    torch.manual_seed(0)
    ref = task.build_model()
    ac = task.build_model()
    ac.load_state_dict(ref.state_dict())
    keys = list(ac.state_dict())
    assert enable_activation_checkpointing(ac, task) == "generic (3 blocks)"
    assert list(ac.state_dict()) == keys  # checkpoint files stay compatible
    l_ref, _ = task.loss(ref, batch)
    l_ac, _ = task.loss(ac, batch)
    l_ref.backward()
    l_ac.backward()
    assert torch.equal(l_ref, l_ac)
    for (n, a), b in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


class DtypeTask(ToyTask):
    seen: list = []

    def loss(self, model, batch):
        raw = getattr(model, "module", model)
        inner = []
        hook = raw.head.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
        logits = model(batch["input_ids"])  # accelerate casts the outputs back to fp32
        hook.remove()
        DtypeTask.seen.append(inner[0])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        return loss, {"tokens": batch["labels"].numel(), "extra_metric": 2.0}


register_task("toy_dtype_test")(DtypeTask)


def test_bf16_autocast_and_task_metrics(tmp_path):
    DtypeTask.seen = []
    res = train(recipe("toy_dtype_test", max_steps=3, mixed_precision="bf16"), tmp_path, progress=False)
    assert DtypeTask.seen == [torch.bfloat16] * 3 and all(math.isfinite(v) for v in res.losses.values())
    assert read_metrics(tmp_path)[0]["extra_metric"] == 2.0
    assert next(ToyLM.from_pretrained(tmp_path / "final").parameters()).dtype == torch.float32


def test_activation_checkpointing_uses_transformers_hook():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    ref = LlamaForCausalLM(cfg)
    ac = LlamaForCausalLM(cfg)
    ac.load_state_dict(ref.state_dict())
    assert enable_activation_checkpointing(ac, object()) == "transformers"
    assert all(layer.gradient_checkpointing for layer in ac.model.layers)
    ac.train()
    ref.train()
    ids = torch.randint(0, 64, (2, 12))
    l_ref = ref(input_ids=ids, labels=ids).loss
    l_ac = ac(input_ids=ids, labels=ids).loss
    l_ref.backward()
    l_ac.backward()
    torch.testing.assert_close(l_ac, l_ref, rtol=0, atol=0)
    for (n, a), b in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_regional_compile_same_losses_and_keys(tmp_path):
    """train.compile: regional compiles each block in place: the losses of eager to fp32 rounding
    (inductor reorders sums), and the final checkpoint keeps the model's own keys."""
    from mmkit.train.engine import compile_repeated_blocks

    eager = train(recipe(max_steps=5), tmp_path / "eager", progress=False)
    comp = train(recipe(max_steps=5, compile="regional"), tmp_path / "comp", progress=False)
    assert comp.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-4)
    assert len(comp.losses) == 5 and comp.losses[5] < comp.losses[1] - 0.1  # they trained
    keys = set(ToyLM.from_pretrained(tmp_path / "eager" / "final").state_dict())
    assert set(ToyLM.from_pretrained(tmp_path / "comp" / "final").state_dict()) == keys
    model = ToyLM(ToyTask(TINY_MODEL, {"corpus_bytes": 8192}).model_cfg)
    assert compile_repeated_blocks(model) == TINY_MODEL["n_layers"]
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert model.state_dict().keys() == ToyLM(model.cfg).state_dict().keys()


def test_compile_setting_parses():
    assert from_dict(TrainConfig, {"compile": True}).compile == "full"
    assert from_dict(TrainConfig, {"compile": False}).compile == "no"
    assert from_dict(TrainConfig, {"compile": "regional"}).compile == "regional"
    with pytest.raises(Exception, match="regional"):
        from_dict(TrainConfig, {"compile": "blocks"})


def test_compile_only_fills_the_cache_that_training_reads(tmp_path, monkeypatch):
    """`mmkit train --compile-only` (warm_compile) compiles the blocks on the task's example batch;
    a later run of the recipe finds every compiled graph in inductor's on-disk cache."""
    from torch._dynamo.utils import counters

    from mmkit.train.engine import warm_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()  # nothing compiled earlier in this process may serve the example
    r = recipe(max_steps=2, compile="regional")
    assert warm_compile(r) == TINY_MODEL["n_layers"]
    torch._dynamo.reset()
    counters.clear()
    train(r, tmp_path / "run", progress=False)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and not counters["inductor"]["fxgraph_cache_miss"]
    with pytest.raises(MmkitError, match="regional"):
        warm_compile(recipe(compile="no"))
