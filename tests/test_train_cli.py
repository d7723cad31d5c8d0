"""`mmkit train` from the command line: one-line usage errors, kill -9 + --resume, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmkit.cli import main
from mmkit.train import checkpoint as ckpt_io

RECIPE = """
task: toy
model: {dim: 32, n_layers: 2, n_heads: 2, seq_len: 32}
data: {corpus_bytes: 8192}
train: {batch_size: 4, max_steps: 400, lr: 3.0e-3, warmup: 5, log_every: 1, save_every: 5, keep_last: 2,
        trackers: []}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def recipe_file(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(RECIPE)
    return p


@pytest.mark.parametrize("argv_tail, needle", [
    ([], "--out"),
    (["--out", "X", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["--out", "X", "train.mixed_precision=fp16"], "train.mixed_precision"),
    (["--out", "X", "task=nope"], "unknown task 'nope'"),
    (["--out", "X", "model.dims=3"], "unknown key 'dims'"),
    (["--out", "X", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--out", "X", "--data", "/no/such/dir"], "no such file or directory"),
    (["--out", "X", "train.batch_size=0"], "train.batch_size must be >= 1"),
    (["model.dim=16", "--max-steps", "0", "--out", "X"], "--max-steps must be >= 1"),  # flags after overrides
    (["model.dim=16", "--bogus", "3", "--out", "X"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_exit_2(recipe_file, capsys, argv_tail, needle):
    assert main(["train", "--config", str(recipe_file), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_missing_config_and_unwritten_task(tmp_path, capsys, monkeypatch):
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--out", "X"]) == 2
    assert "config file not found" in capsys.readouterr().err
    from mmkit.train import task as task_mod

    monkeypatch.setitem(task_mod.TASK_MODULES, "later", "mmkit.models.not_written_yet.task")
    cfg = tmp_path / "r.yaml"
    cfg.write_text("task: later\n")
    assert main(["train", "--config", str(cfg), "--out", "X"]) == 2
    err = capsys.readouterr().err.strip()
    assert "task 'later' is not available" in err and len(err.splitlines()) == 1


def _launch(recipe_file, out, *extra):
    cmd = [sys.executable, "-m", "mmkit", "train", "--config", str(recipe_file), "--out", str(out), "--no-progress",
           *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc, timeout=60.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def test_kill_9_then_resume_continues_from_last_complete_checkpoint(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _launch(recipe_file, out)
    _wait_for(lambda: any(s >= 10 for s, _ in ckpt_io.complete_checkpoints(out / "checkpoints")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = _losses(out)  # what the uninterrupted run logged, possibly past the checkpoint
    last = ckpt_io.latest(out / "checkpoints")
    start = ckpt_io.load(last, 0)["meta"]["step"]
    assert start >= 10 and max(killed) >= start
    stop = start + 4
    assert main(["train", "--config", str(recipe_file), "--out", str(out), "--resume", "--stop-after", str(stop),
                 "--no-progress"]) == 0
    assert f"stopped at step {stop}" in capsys.readouterr().out
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, stop + 1))  # each step once: stale records dropped
    overlap = [s for s in range(start + 1, stop + 1) if s in killed]
    assert all(resumed[s] == killed[s] for s in overlap)  # same trajectory, bit for bit
    assert all(resumed[s] == killed[s] for s in range(1, start + 1))


def test_sigterm_saves_checkpoint_and_exits_cleanly(recipe_file, tmp_path):
    out = tmp_path / "run"
    proc = _launch(recipe_file, out)
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "sigterm at step" in stdout and "Traceback" not in stderr
    step = int(stdout.split("sigterm at step ")[1].split(",")[0])
    assert 3 <= step < 400
    ckpt = ckpt_io.latest(out / "checkpoints")
    meta = ckpt_io.load(ckpt, 0)["meta"]
    assert meta["step"] == step and meta["reason"] == "sigterm"
    assert max(_losses(out)) == step and not (out / "final").exists()


def test_fresh_run_into_a_used_directory_is_refused(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    # overrides and flags interleaved, as users type them
    args = ["train", "--config", str(recipe_file), "model.dim=16", "--out", str(out), "--no-progress",
            "--max-steps", "2", "train.log_every=2", "train.mixed_precision=no"]  # YAML: no -> False
    assert main(args) == 0
    assert (out / "final" / "model.safetensors").is_file()
    import yaml

    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (saved["model"]["dim"], saved["train"]["max_steps"], saved["train"]["log_every"]) == (16, 2, 2)
    assert saved["train"]["mixed_precision"] == "no"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [2]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds checkpoints (step-00000002): pass --resume" in err and len(err.splitlines()) == 1
    assert main([*args, "--resume"]) == 0  # nothing left to do: step 2 of 2 already done
    assert "done at step 2" in capsys.readouterr().out
