"""`mmkit quickstart --smoke`: every stage runs through the public entry points and every file lands."""

import json
import os

import pytest

from mmkit.cli import main

REQUIRED = ["wall_time_s", "stages", "vq.psnr", "vq.codebook_usage", "vqa.chameleon.overall",
            "vqa.kimivl.overall", "vqa.majority_baseline", "caption.chameleon.CIDEr", "caption.kimivl.CIDEr",
            "t2i.chameleon.attribute_accuracy", "generation.image_seconds"]


def _get(d, dotted):
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, f"results.json lacks {dotted}"
        d = d[part]
    return d


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path):
    out = tmp_path / "qs"
    assert main(["quickstart", "--smoke", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in REQUIRED:
        value = _get(res, key)
        assert value is not None, key
    assert set(res["stages"]) >= {"data", "text_tok", "vq", "codes", "chameleon", "kimivl", "generate", "evaluate"}
    for f in ["report.md", "report.html", "samples/text_to_image.png", "vq/final/config.json",
              "chameleon/final/config.json", "kimivl/final/config.json"]:
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    assert "<img" in html and "shapes-VQA" in html
    from mmkit.quickstart import default_procs

    assert "mmkit train: done" in (out / "chameleon.log").read_text()  # trained in its own process
    recs = {n: json.loads((out / "stages" / f"{n}.json").read_text()) for n in res["stages"]}
    if default_procs() == 2:  # the CI machine: Kimi-VL trained in a second process beside the VQ lane
        assert (out / "kimivl.log").is_file()
        assert recs["kimivl"]["start"] < recs["vq"]["end"] and recs["vq"]["start"] < recs["kimivl"]["end"]
        assert res["wall_time_s"] < sum(res["stages"].values())
    # a re-run reuses every finished stage and rewrites only the report
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert main(["quickstart", "--smoke", "--out", str(out)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"report.json"}
    _side_work_runs_once(out)
    _early_codes_equal_the_stage_codes(out)


def _side_work_runs_once(out):
    """The VQ's held-out evaluation ran once, in a 1-thread child beside generate + evaluate (with 2
    processes), and the held-out codes were made; a run that stopped before them gets them again,
    from a child or in-process (`--procs 1`), with the same figures."""
    import shutil

    import torch

    from mmkit.quickstart import Plan, Quickstart, default_procs

    vq = json.loads((out / "stages" / "vq.json").read_text())["results"]
    assert vq["eval_seconds"] > 0 and vq["psnr"] > 0
    assert (out / "data" / "eval_codes" / "sizes.json").is_file()
    assert (out / "vq_eval.log").is_file() == (default_procs() == 2)
    threads = torch.get_num_threads()
    for procs in (1, 2):
        qs = Quickstart(out, Plan.make(1.0, smoke=True), log=lambda m: None, procs=procs)
        qs._start_side_lane()  # both done: nothing runs
        assert qs._vq_eval_child is None
        rec = json.loads((out / "stages" / "vq.json").read_text())
        for k in ("psnr", "ssim", "codebook_usage", "perplexity", "eval_seconds"):
            del rec["results"][k]
        (out / "stages" / "vq.json").write_text(json.dumps(rec))
        shutil.rmtree(out / "data" / "eval_codes")
        qs._start_side_lane()
        assert (qs._vq_eval_child is not None) == (procs == 2)
        qs._finish_side_lane()
        again = json.loads((out / "stages" / "vq.json").read_text())["results"]
        assert {k: again[k] for k in ("psnr", "codebook_usage")} == {k: vq[k] for k in ("psnr", "codebook_usage")}
        assert (out / "data" / "eval_codes" / "sizes.json").is_file() and torch.get_num_threads() == threads


def _codes_of(d):
    """{(shard, key): the stored image_codes} of every sample under d."""
    from mmkit.data.reader import iter_shard_raw

    return {(p.name, raw["__key__"]): json.loads(raw["members"]["json"])["image_codes"]
            for p in sorted(d.glob("*.tar")) for raw in iter_shard_raw(str(p))}


def _early_codes_equal_the_stage_codes(out):
    """The VQ stage's hook (right after the codebook refit) encodes the training split in a
    second process; the codes stage then waits for it: the same codes as the codes stage's own."""
    import shutil

    import torch

    from mmkit.quickstart import Plan, Quickstart
    from mmkit.vq.model import VQModel

    ref = _codes_of(out / "data" / "train_codes")
    assert ref and any(c for v in ref.values() for c in v)
    shutil.rmtree(out / "data" / "train_codes")
    threads = torch.get_num_threads()
    qs = Quickstart(out, Plan.make(1.0, smoke=True), log=lambda m: None, procs=2)
    qs._start_codes_early(VQModel.from_pretrained(out / "vq" / "final"))  # its decoder is not used
    assert qs._codes_child is not None and (out / "vq" / "refit" / "config.json").is_file()
    res = qs.stage_codes()
    assert res["train_split_background_s"] > 0 and torch.get_num_threads() == threads
    assert not (out / "vq" / "refit").exists() and "tokenized" in (out / "codes.log").read_text()
    assert _codes_of(out / "data" / "train_codes") == ref


def test_quickstart_bad_flag_is_usage_error(capsys):
    assert main(["quickstart", "--scale", "0"]) == 2
    assert "scale" in capsys.readouterr().err
    assert main(["quickstart", "--procs", "0"]) == 2
    assert "--procs" in capsys.readouterr().err


def test_wall_time_counts_overlapping_stages_once():
    from mmkit.quickstart.report import _covered

    # vq 0-10 beside kimivl 2-12, chameleon 12-20, a re-run's evaluate 100-103, an old record of 5 s
    spans = [(0, 10, 10), (2, 12, 10), (12, 20, 8), (100, 103, 3), (None, None, 5)]
    assert _covered(spans) == 20 + 3 + 5


@pytest.mark.slow
def test_quickstart_background_lane_failure_names_the_stage(tmp_path):
    """A Kimi-VL lane that fails is reported as the kimivl stage, with the child's error."""
    from mmkit.errors import MmkitError
    from mmkit.quickstart import Plan, Quickstart

    out = tmp_path / "qs"
    plan = Plan.make(1.0, smoke=True)
    assert main(["quickstart", "--smoke", "--out", str(out), "--stages", "data", "text_tok"]) == 0
    plan.kimivl_overrides = ["model.no_such_key=1"]
    qs = Quickstart(out, plan, log=lambda m: None, procs=2)
    with pytest.raises(MmkitError, match="stage 'kimivl' failed: .*no_such_key"):
        qs.run(only=["data", "text_tok", "vq", "kimivl"])
    rec = json.loads((out / "stages" / "kimivl.json").read_text())
    assert rec["ok"] is False and "no_such_key" in rec["error"]
    assert qs._background is None  # nothing left running


def test_main_lane_gets_its_threads_back_when_the_lane_ends():
    """The threads come back mid-stage, in the main thread, as soon as the lane's process exits."""
    import subprocess
    import sys
    import time

    import torch

    from mmkit.quickstart import _CoresBackOnExit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    back = _CoresBackOnExit(proc.wait, 3)
    try:
        assert torch.get_num_threads() == 1  # not before the process ends
        deadline = time.time() + 30
        while torch.get_num_threads() != 3 and time.time() < deadline:
            torch.ones(4).sum()  # the main thread keeps working, as a training loop does
            time.sleep(0.01)
        assert proc.poll() is not None and torch.get_num_threads() == 3
    finally:
        back.close()
        torch.set_num_threads(before)


def test_meteor_jvm_prestarted_at_idle_priority(monkeypatch):
    """The Chameleon stage starts METEOR's JVM under SCHED_IDLE (every thread), and the evaluate
    stage's scorer is that same process."""
    import os
    import shutil

    from mmkit.eval import caption
    from mmkit.quickstart import _prestart_meteor

    if shutil.which("java") is None or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Java and Linux's /proc")
    monkeypatch.setattr(caption, "_METEOR", None)  # a fresh scorer; the module's own comes back after
    _prestart_meteor()
    proc = caption._METEOR.meteor_p
    try:
        assert caption.get_meteor().meteor_p is proc
        assert caption._meteor({"a": ["a red circle"]}, {"a": ["a red circle"]}) > 0.9  # it scores
        policies = {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{proc.pid}/task")}
        assert policies == {os.SCHED_IDLE}
    finally:
        proc.kill()
        proc.wait()


def test_compile_warmup_follows_kimivl_in_its_lane(tmp_path, monkeypatch):
    """The Kimi-VL lane runs the Chameleon's compile warm-up after its own training, and the main
    lane gets its threads back only when both have ended; the kimivl record keeps its own end."""
    import torch

    from mmkit.quickstart import Plan, Quickstart

    out = tmp_path / "qs"
    assert main(["quickstart", "--smoke", "--out", str(out), "--stages", "data", "text_tok"]) == 0
    default = Quickstart(out, Plan.make(1.0, smoke=False), log=lambda m: None, procs=2)._warmup_argv()
    assert default[0] == "train" and default[-3:] == ["--compile-only", "train.log_every=25", "train.save_every=0"]
    qs = Quickstart(out, Plan.make(1.0, smoke=True), log=lambda m: None, procs=2)
    assert qs._warmup_argv() is None  # the smoke plan trains the Chameleon eager
    monkeypatch.setattr(qs, "_warmup_argv", lambda: ["--version"])
    threads = torch.get_num_threads()
    qs._start_kimivl_lane()
    assert torch.get_num_threads() == max(1, (os.cpu_count() or 2) - max(1, (os.cpu_count() or 2) // 2))
    qs._join_kimivl_lane()
    rec = json.loads((out / "stages" / "kimivl.json").read_text())
    assert rec["ok"] and rec["results"]["compile_warmup_s"] >= 0
    assert "mmkit" in (out / "compile_warmup.log").read_text()  # it ran: --version's line
    assert rec["end"] <= (out / "compile_warmup.log").stat().st_mtime + 1e-3
    assert torch.get_num_threads() == threads and qs._warmup is None
