"""`mmkit quickstart`: the whole toolkit end to end on the embedded shapes world.

Stages (each timed, each result saved under DIR/stages/<name>.json so a re-run reuses
finished stages; a stage that fails says which and why):

  data        synthesise train/eval shards (interleaved, captions, VQA) + eval JSONs
  text_tok    train the byte-level BPE text tokenizer
  vq          train the VQ image tokenizer (training engine); evaluated beside generate + evaluate
  codes       store VQ codes into the training shards (so training skips the VQ encoder); the
              held-out split's codes are made at the generate stage
  chameleon   pretrain the Chameleon-style model (training engine)
  kimivl      pretrain the Kimi-VL-style model (training engine)
  generate    images from captions (CFG), captions and answers, an interleaved document
  evaluate    shapes-vqa (official metric) both families, shapes-caption, shapes-t2i
  report      DIR/report.md, DIR/report.html, DIR/results.json

With 2 processes (`--procs 2`, the default on a CPU-only machine with >= 2 cores) the
Kimi-VL model trains in a child process with half the cores while the main process trains the
VQ with the other half; the moment the child ends the main process takes every core back,
mid-stage (`_CoresBackOnExit`). The Chameleon model then trains in a fresh process on all cores
(in this process, after the codes stage, its steps ran ~10 % slower). Why lanes: these models
are small, so a second thread inside one process gives 1.4x at best (VQ, Chameleon on a 2-core
host), while two 1-thread processes run side by side at full speed. (Data-parallel Chameleon
training in 2 gloo processes was measured too: no faster than 2 threads, the gradient
all-reduce costing what the second core gains.) `--procs 1` runs every stage but the
Chameleon training in this process, one after another.

Every stage calls the same public entry points a user would (`mmkit.cli.main([...])`
with the documented flags, or the documented Python APIs), so the quickstart doubles as
an integration test of the contracts in docs/design.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from mmkit.errors import MmkitError, UsageError

STAGES = ["data", "text_tok", "vq", "codes", "chameleon", "kimivl", "generate", "evaluate", "report"]


# Per-stage recipe overrides of the default (CPU-minutes) run, passed to `mmkit train` as
# key=value. The recipes themselves are sized for the 15-minute budget on 2 CPU cores
# (training/chameleon-shapes.yaml: 4 x 128, 256-token first-fit rows, bf16, 2000 steps);
# the quickstart only quietens logging and skips intermediate checkpoints.
CHAMELEON_OVERRIDES = ["train.log_every=25", "train.save_every=0"]
KIMIVL_OVERRIDES: list[str] = []
VQ_OVERRIDES: list[str] = []


@dataclasses.dataclass
class Plan:
    """Sizes of one quickstart run; `--scale` multiplies, `--smoke` shrinks to a wiring run."""

    n_train: int = 8000          # documents per kind in the train split (synth ~9 s; with square codes the
                                 # Chameleon model gains from scenes: 1200 -> 8000 took t2i 37 -> 52 %)
    n_eval: int = 200            # documents per kind in the held-out split (= VQA questions scored)
    vq_steps: int = 0            # 0 = the recipe's own value
    chameleon_steps: int = 0     # 0 = the recipe's own value
    kimivl_steps: int = 0
    eval_limit: int | None = None
    n_t2i_images: int = 8        # images in the generation grid
    smoke: bool = False
    vq_overrides: list[str] = dataclasses.field(default_factory=lambda: list(VQ_OVERRIDES))
    chameleon_overrides: list[str] = dataclasses.field(default_factory=lambda: list(CHAMELEON_OVERRIDES))
    kimivl_overrides: list[str] = dataclasses.field(default_factory=lambda: list(KIMIVL_OVERRIDES))

    @classmethod
    def make(cls, scale: float, smoke: bool) -> "Plan":
        if smoke:
            return cls(n_train=48, n_eval=16, vq_steps=4, chameleon_steps=4, kimivl_steps=4,
                       eval_limit=8, n_t2i_images=2, smoke=True,
                       # 4 steps do not repay inductor's compile (the engine tests cover train.compile)
                       chameleon_overrides=CHAMELEON_OVERRIDES + ["train.compile=no"],
                       vq_overrides=VQ_OVERRIDES + ["model.loss.codebook_refit_batches=2",  # wiring, not the recipe's
                                                     "model.loss.decoder_finetune_steps=2"])
        p = cls()
        if scale != 1.0:
            root = recipes_root()
            p.n_train = int(p.n_train * scale)
            p.n_eval = int(p.n_eval * max(1.0, scale ** 0.5))
            p.vq_steps = max(1, int((p.vq_steps or _recipe_steps(root / "tokenizers/vq-shapes.yaml")) * scale))
            p.chameleon_steps = max(1, int((p.chameleon_steps or _recipe_steps(root / "training/chameleon-shapes.yaml"))
                                           * scale))
            p.kimivl_steps = max(1, int((p.kimivl_steps or _recipe_steps(root / "training/kimivl-shapes.yaml"))
                                        * scale))
        return p

    def key(self) -> dict:
        return dataclasses.asdict(self)


def _recipe_steps(path: Path) -> int:
    from mmkit.config import read_yaml

    return int(read_yaml(path)["train"]["max_steps"])


def _chameleon_image_size(path: Path, overrides: list[str]) -> int | None:
    """The Chameleon recipe's model.image_size (after overrides): its codes are made square."""
    from mmkit.config import apply_overrides, read_yaml

    raw = read_yaml(path)
    apply_overrides(raw, list(overrides))
    size = (raw.get("model") or {}).get("image_size")
    return int(size) if size else None


def recipes_root() -> Path:
    """The repo's recipe folders (tokenizers/, training/, eval/) beside the package."""
    import mmkit

    root = Path(mmkit.__file__).resolve().parents[1]
    if not (root / "training").is_dir():
        raise UsageError(f"recipe folders not found next to the mmkit package ({root}); run from a clone")
    return root


def default_procs() -> int:
    """2 on a CPU-only machine with >= 2 cores (the Kimi-VL lane beside the VQ lane), else 1."""
    import torch

    return 2 if (os.cpu_count() or 1) >= 2 and not torch.cuda.is_available() else 1


def _tail(path: Path, n: int = 5) -> str:
    lines = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


class _Child:
    """`mmkit ARGV` in a child process with `threads` intra-op threads, output to `log`
    (`echo`: also copied to this process's stdout, so its progress bar shows)."""

    def __init__(self, argv: list, log: Path, threads: int, echo: bool = False, env: dict | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
        self.cmd = [sys.executable, "-m", "mmkit"] + [str(a) for a in argv]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(log, "wb")
        self.start = time.time()
        self._pump = None
        # this process's stdout now: work done meanwhile may capture sys.stdout (`_cli(capture=True)`)
        self._stdout = sys.stdout
        if echo:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            self._pump = threading.Thread(target=self._copy, daemon=True)
            self._pump.start()
        else:
            self.proc = subprocess.Popen(self.cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env)

    def _copy(self) -> None:
        out = getattr(self._stdout, "buffer", None)
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self._f.write(chunk)
            self._f.flush()
            if out is not None:
                out.write(chunk)
                out.flush()
            else:  # a text-only stdout (pytest's capture)
                self._stdout.write(chunk.decode(errors="replace"))

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.join()
        self._f.close()

    def wait(self, check: bool = True) -> int:
        """Block until it ends -> its status; with `check`, a non-zero status becomes an MmkitError
        with the log's tail."""
        rc = self.proc.wait()
        self._close()
        if check and rc != 0:
            raise MmkitError(f"`mmkit {' '.join(self.cmd[3:])}` exited with status {rc}: {_tail(self.log)} "
                             f"(log: {self.log})")
        return rc

    def ended_at(self) -> float:
        """When it ended, by its log's last write (it may be joined a stage later)."""
        return max(self.start, min(time.time(), self.log.stat().st_mtime))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._close()


class _CoresBackOnExit:
    """Give the main process its intra-op threads back the moment `proc` ends, mid-stage.

    The Kimi-VL lane ends well before the VQ stage it runs beside (~200 vs ~400 s on a 2-core
    host); waiting for the next stage boundary left a core idle meanwhile. OpenMP's thread count
    belongs to the calling thread, so a watcher thread cannot set it for the main thread; it raises
    SIGUSR1 there instead (`_thread.interrupt_main`), and Python runs the handler in the main
    thread between two bytecodes, i.e. between two torch ops. Off the main thread or without
    SIGUSR1 (Windows) this does nothing and the threads come back at the next stage, as before.
    """

    def __init__(self, wait: Callable[[], Any], threads: int):
        """`wait()` returns when the lane has ended (e.g. a child process's `wait`)."""
        import _thread
        import signal

        import torch

        self._active = False
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            return
        self._old = signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(threads))
        self._active = True

        def watch():
            wait()
            if self._active:
                _thread.interrupt_main(signal.SIGUSR1)

        threading.Thread(target=watch, daemon=True).start()

    def close(self) -> None:
        import signal

        if self._active:
            self._active = False
            signal.signal(signal.SIGUSR1, self._old)


def _prestart_meteor() -> None:
    """Start METEOR's JVM now, as an idle-priority process, for the evaluate stage's caption scores.

    Why: the JVM spends ~7 CPU s loading its paraphrase table before it scores anything, and the
    evaluate stage waited for that (~4.6 s of it; its other core runs the VQ's evaluation).
    Started beside the Chameleon's training under SCHED_IDLE (Linux: it runs only on a core
    nothing else wants; its threads inherit the policy), it loads in the training's idle moments
    without slowing it (400 steps: 59.9 / 53.5 s against 59.5 / 55.6 without; nice 19 still took
    CPU from it). The evaluate stage's `get_meteor()` then finds it running: same scorer, same scores.
    """
    from mmkit.eval.caption import get_meteor

    try:
        proc = get_meteor().meteor_p
    except MmkitError:
        return  # no Java: the evaluate stage says so in one line
    task_dir = Path(f"/proc/{proc.pid}/task")
    with contextlib.suppress(AttributeError, OSError):  # no SCHED_IDLE (not Linux), or it has ended
        os.sched_setscheduler(proc.pid, os.SCHED_IDLE, os.sched_param(0))  # threads started from now inherit it
        for tid in os.listdir(task_dir) if task_dir.is_dir() else []:  # any started before
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def _cli(argv: list[str], capture: bool = False) -> str:
    """Run `mmkit ARGV` in-process; a non-zero status becomes an MmkitError."""
    from mmkit.cli import main

    buf = io.StringIO()
    ctx = contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext()
    with ctx:
        rc = main([str(a) for a in argv])
    if rc != 0:
        raise MmkitError(f"`mmkit {' '.join(map(str, argv))}` exited with status {rc}")
    return buf.getvalue()


class Quickstart:
    def __init__(self, out: Path, plan: Plan, log: Callable[[str], None] = print, procs: int | None = None):
        self.out = out
        self.plan = plan
        self.log = log
        self.procs = default_procs() if procs is None else procs
        self.stage_dir = out / "stages"
        self.root = recipes_root()
        self._background: _Child | None = None  # the Kimi-VL lane while it runs
        self._lane_done = False  # the lane trained kimivl in this run
        self._cores_back: _CoresBackOnExit | None = None  # gives the main lane its threads back
        self._codes_child: _Child | None = None  # train-split codes, encoded while the VQ decoder fine-tunes
        self._codes_back: _CoresBackOnExit | None = None
        self._codes_threads = 1
        self._vq_eval_child: _Child | None = None  # the VQ's held-out evaluation, beside generate + evaluate
        self._vq_eval_threads = 1
        self._only: list[str] | None = None  # run(only=...): the stages this invocation may run
        self._warmup: _Child | None = None  # the Chameleon's compile warm-up, in the Kimi-VL lane after it
        self._lane_idle = threading.Event()  # the lane (Kimi-VL, then the warm-up) has ended
        self._lane_lock = threading.Lock()
        self._stopping = False

    # -- paths (docs/design.md "Quickstart directory layout") --
    @property
    def data(self) -> Path:
        return self.out / "data"

    def final(self, name: str) -> Path:
        return self.out / name / "final"

    # -- stage bookkeeping --
    def _record(self, name: str) -> Path:
        return self.stage_dir / f"{name}.json"

    def done(self, name: str) -> dict | None:
        f = self._record(name)
        if f.is_file():
            rec = json.loads(f.read_text())
            if rec.get("plan") == self.plan.key() and rec.get("ok"):
                return rec
        return None

    def _runs(self, name: str) -> bool:
        """Whether this invocation may run stage `name` (`run(only=...)`)."""
        return not self._only or name in self._only

    def run(self, only: list[str] | None = None) -> dict:
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self._only = only
        t_all = time.time()
        rerun = False  # once a stage runs again, every later stage must too
        try:
            for i, name in enumerate(STAGES, 1):
                if not self._runs(name):
                    continue
                prev = self.done(name)
                if prev is not None and name != "report" and not rerun:
                    self.log(f"[quickstart] {i}/{len(STAGES)} {name}: reused ({prev['seconds']:.1f} s earlier)")
                    continue
                rerun = True
                if name in ("vq", "codes") and self.procs > 1 and self._runs("kimivl"):
                    self._start_kimivl_lane()  # no-op if already running
                lane = self._background
                if name in ("chameleon", "kimivl") or (lane is not None and lane.proc.poll() is not None):
                    self._join_kimivl_lane()  # the main lane gets every core back (Chameleon waits for it)
                if name == "kimivl" and self._lane_done:
                    continue
                self.log(f"[quickstart] {i}/{len(STAGES)} {name} ...")
                self._run_stage(name, i)
            self._join_kimivl_lane()
        finally:
            with self._lane_lock:
                self._stopping = True
            if self._background is not None:  # an error or Ctrl-C in the main lane
                self._cores_back.close()
                self._background.kill()
                self._background = None
            if self._warmup is not None:
                self._warmup.kill()
                self._warmup = None
            if self._codes_child is not None:
                self._codes_back.close()
                self._codes_child.kill()
                self._codes_child = None
            if self._vq_eval_child is not None:
                self._vq_eval_child.kill()
                self._vq_eval_child = None
        results = json.loads((self.out / "results.json").read_text()) if (self.out / "results.json").exists() else {}
        results.setdefault("wall_time_s_this_run", round(time.time() - t_all, 1))
        return results

    def _run_stage(self, name: str, i: int) -> None:
        t0 = time.time()
        try:
            results = getattr(self, f"stage_{name}")() or {}
        except MmkitError as e:
            self._fail(name, str(e), t0)
        except Exception as e:  # a stage's bug: say which stage, keep the trace in a file
            (self.stage_dir / f"{name}.error.txt").write_text(traceback.format_exc())
            self._fail(name, f"{type(e).__name__}: {e} (trace: {self.stage_dir / (name + '.error.txt')})", t0)
        self._save(name, t0, results)
        self.log(f"[quickstart] {i}/{len(STAGES)} {name}: done in {time.time() - t0:.1f} s")

    def _save(self, name: str, t0: float, results: dict, t1: float | None = None) -> None:
        t1 = time.time() if t1 is None else t1
        rec = {"ok": True, "seconds": round(t1 - t0, 2), "start": t0, "end": t1, "plan": self.plan.key(),
               "results": results}
        self._record(name).write_text(json.dumps(rec, indent=1))

    # -- the Kimi-VL lane (procs > 1) --
    def _start_kimivl_lane(self) -> None:
        import torch

        if self._background is not None or self._lane_done:
            return
        out = self.out / "kimivl"
        self.log(f"[quickstart] {STAGES.index('kimivl') + 1}/{len(STAGES)} kimivl: training in a second process "
                 f"beside the VQ lane (log: {out}.log)")
        argv = self._train_argv("training/kimivl-shapes.yaml", out, self.data / "train", self.plan.kimivl_steps,
                                self._kimivl_extra()) + ["--no-progress"]
        cores = os.cpu_count() or 2
        threads = max(1, cores // self.procs)  # the lane's share; the main lane keeps the rest
        self._background = _Child(argv, self.out / "kimivl.log", threads)
        self._main_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, cores - threads))
        self._lane_idle.clear()
        kimi, warm_argv = self._background, self._warmup_argv()

        def lane() -> None:  # the watcher thread: Kimi-VL, then the warm-up on the lane's core
            try:
                if kimi.proc.wait() == 0 and warm_argv:
                    with self._lane_lock:
                        if self._stopping:
                            return
                        # the Chameleon's thread count: inductor's kernels (and its cache keys) depend on it;
                        # one compile worker: the lane's core
                        self._warmup = _Child(warm_argv, self.out / "compile_warmup.log", self._main_threads,
                                              env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
                    self._warmup.proc.wait()
            finally:
                self._lane_idle.set()

        threading.Thread(target=lane, daemon=True).start()  # its own thread: the join waits for it in any case
        self._cores_back = _CoresBackOnExit(self._lane_idle.wait, self._main_threads)

    def _warmup_argv(self) -> list | None:
        """`mmkit train --compile-only` of the Chameleon recipe, when this invocation trains it with
        `train.compile: regional` (the recipe's default): inductor's cache is then warm when the
        Chameleon's process starts (~6 s to its first step instead of ~32 s on 2 cores)."""
        from mmkit.cli.train import load_recipe

        if self.done("chameleon") or not self._runs("chameleon"):
            return None
        recipe, extra = self.root / "training/chameleon-shapes.yaml", list(self.plan.chameleon_overrides)
        try:
            if load_recipe(str(recipe), extra).train.compile != "regional":
                return None
        except MmkitError:
            return None  # the Chameleon stage reports a bad recipe itself
        return ["train", "--config", recipe, "--compile-only", *extra]

    def _join_kimivl_lane(self) -> None:
        import torch

        child, self._background = self._background, None
        if child is None:
            return
        self._cores_back.close()
        if child.proc.poll() is None:
            self.log("[quickstart] waiting for the kimivl lane ...")
        try:
            child.wait()
        except MmkitError as e:
            self._fail("kimivl", str(e), child.start)
        finally:
            torch.set_num_threads(self._main_threads)
        end = child.ended_at()
        summary = self._train_summary(self.out / "kimivl")
        if not self._lane_idle.is_set():
            self.log("[quickstart] waiting for the Chameleon's compile warm-up ...")
        self._lane_idle.wait()
        warm, self._warmup = self._warmup, None
        if warm is not None:
            if warm.wait(check=False) != 0:  # harmless: the Chameleon's process compiles its blocks itself
                self.log(f"[quickstart] the Chameleon's compile warm-up failed ({_tail(warm.log, 1)}); "
                         "its training compiles itself")
            summary["compile_warmup_s"] = round(warm.ended_at() - warm.start, 1)  # after kimivl, same lane
        self._save("kimivl", child.start, summary, end)
        self._lane_done = True
        self.log(f"[quickstart] {STAGES.index('kimivl') + 1}/{len(STAGES)} kimivl: done in "
                 f"{end - child.start:.1f} s (second process)")

    def _fail(self, name: str, why: str, t0: float):
        rec = {"ok": False, "seconds": round(time.time() - t0, 2), "plan": self.plan.key(), "error": why}
        self._record(name).write_text(json.dumps(rec, indent=1))
        raise MmkitError(f"quickstart stage '{name}' failed: {why}")

    # -- stages --
    def stage_data(self) -> dict:
        if self.data.exists():
            shutil.rmtree(self.data)
        _cli(["data", "synth", "--out", self.data, "--n", self.plan.n_train, "--eval-n", self.plan.n_eval,
              "--seed", 0])
        sizes = json.loads((self.data / "train" / "sizes.json").read_text())
        return {"train_samples": sum(sizes.values()) if isinstance(sizes, dict) else sizes}

    def stage_text_tok(self) -> dict:
        _cli(["tokenizer", "train-text", "--data", self.data / "train", "--out", self.out / "text_tokenizer"])
        return {}

    def _train_argv(self, recipe: str, out: Path, data: Path, steps: int, extra: list[str]) -> list:
        argv = ["train", "--config", self.root / recipe, "--out", out, "--data", data] + extra
        if steps:
            argv += ["--max-steps", steps]
        if out.exists() and not (out / "final").exists():
            shutil.rmtree(out)  # an unfinished earlier attempt with another plan
        return argv

    @staticmethod
    def _train_summary(out: Path) -> dict:
        metrics = out / "metrics.jsonl"
        logs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        losses = [r["loss"] for r in logs if "loss" in r]
        return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "steps": max((r.get("step", 0) for r in logs), default=0)}  # optimizer steps, not log lines

    def _train(self, recipe: str, out: Path, data: Path, steps: int, extra: list[str]) -> dict:
        _cli(self._train_argv(recipe, out, data, steps, extra))
        return self._train_summary(out)

    def stage_vq(self) -> dict:
        from mmkit.vq import task as vq_task

        hook = self._start_codes_early
        vq_task.AFTER_REFIT.append(hook)
        try:
            res = self._train("tokenizers/vq-shapes.yaml", self.out / "vq", self.data / "train", self.plan.vq_steps,
                              list(self.plan.vq_overrides))
        finally:
            vq_task.AFTER_REFIT.remove(hook)
        return res  # the held-out evaluation: _start_side_lane / _finish_side_lane

    def _vq_eval_pending(self) -> bool:
        rec = self.done("vq")
        return rec is not None and "psnr" not in rec["results"]

    def _save_vq_eval(self, report: dict, seconds: float) -> None:
        """Held-out PSNR, SSIM and codebook usage of the final VQ, added to the vq stage's record."""
        rec = self.done("vq")
        rec["results"].update({k: report[k] for k in ("psnr", "ssim", "codebook_usage", "perplexity")},
                              eval_seconds=round(seconds, 2))
        self._record("vq").write_text(json.dumps(rec, indent=1))

    def _vq_eval_argv(self) -> list:
        return ["tokenizer", "eval-vq", "--model", self.final("vq"), "--data", self.data / "eval", "--json"]

    def _start_side_lane(self) -> None:
        """The VQ's held-out evaluation in a 1-thread child while this process generates and evaluates
        on one thread (plus the held-out codes, here).

        Why: nothing waits for it before the report, and the generate + evaluate stages leave the
        second core nearly idle (their decoding loops are per-token work: evaluate took 20.5-21.5 s
        at 1 thread and 19.5-19.7 s at 2); before the Chameleon, or beside its start, it cost
        ~10 s of the run. With one process (`--procs 1`) it runs in-process at the report.
        """
        import torch

        if self._vq_eval_child is None and self._vq_eval_pending() and self.procs > 1:
            self._vq_eval_child = _Child(self._vq_eval_argv(), self.out / "vq_eval.log", 1)
            self._vq_eval_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        if self.done("codes") is not None and not (self.data / "eval_codes" / "sizes.json").is_file():
            # codes of the held-out split, for users' own evaluations (the quickstart's encode the images)
            _cli(self._codes_argv(self.final("vq"), "eval"))

    def _finish_side_lane(self) -> None:
        """Join the VQ evaluation child (or evaluate in-process if none ran) and record its figures."""
        import torch

        child, self._vq_eval_child = self._vq_eval_child, None
        if child is not None:
            try:
                child.wait()
            except MmkitError as e:
                raise MmkitError(f"VQ evaluation failed: {e}") from None
            finally:
                torch.set_num_threads(self._vq_eval_threads)
            lines = [ln for ln in child.log.read_text().splitlines() if ln.startswith("{")]
            self._save_vq_eval(json.loads(lines[-1]), child.ended_at() - child.start)
        elif self._vq_eval_pending():
            t0 = time.time()
            self._save_vq_eval(json.loads(_cli(self._vq_eval_argv(), capture=True)), time.time() - t0)

    def _codes_argv(self, model: Path, split: str) -> list:
        # square codes when the Chameleon recipe reads square images (model.image_size: S)
        square = _chameleon_image_size(self.root / "training/chameleon-shapes.yaml", self.plan.chameleon_overrides)
        return ["data", "tokenize-images", "--model", model, self.data / split,
                "--out", self.data / f"{split}_codes"] + (["--square", square] if square else [])

    def _start_codes_early(self, vq) -> None:
        """After the VQ's codebook refit: encode the training images in a 1-thread child while
        this process fine-tunes the decoder on the other cores (all of them again once the child
        has ended, `_CoresBackOnExit`).

        Why: the fine-tune trains the decoder only, so the refit model's codes are the final
        model's (`test_decoder_finetune_trains_only_the_decoder`), and two 1-thread processes
        run side by side at full speed while a second thread gives the VQ and the encoder ~1.4x.
        Only with >= 2 processes and once the Kimi-VL lane has ended (its core is free).
        """
        import torch

        lane = self._background
        if self.procs < 2 or (os.cpu_count() or 1) < 2 or (lane is not None and lane.proc.poll() is None):
            return
        if self._cores_back is not None:  # the lane has ended: its watcher must not hand out threads now
            self._cores_back.close()
        snapshot = self.out / "vq" / "refit"  # encoder + refit codebook; its decoder is not fine-tuned yet
        vq.save_pretrained(snapshot)
        self._codes_threads = torch.get_num_threads()
        self._codes_child = _Child(self._codes_argv(snapshot, "train"), self.out / "codes.log", 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        # the child is done before the fine-tune (1 thread: ~1.5x its 2-thread time): its core comes back then
        self._codes_back = _CoresBackOnExit(self._codes_child.proc.wait, self._codes_threads)
        self.log(f"[quickstart] {STAGES.index('codes') + 1}/{len(STAGES)} codes: encoding the training images in "
                 f"a second process while the VQ decoder fine-tunes (log: {self.out / 'codes.log'})")

    def stage_codes(self) -> dict:
        import torch

        child, self._codes_child = self._codes_child, None
        shutil.rmtree(self.data / "eval_codes", ignore_errors=True)  # an older VQ's: _start_side_lane makes them again
        if child is None:
            _cli(self._codes_argv(self.final("vq"), "train"))
            return {}
        try:  # the train split was started by the VQ stage (_start_codes_early)
            child.wait()
        finally:
            self._codes_back.close()
            torch.set_num_threads(self._codes_threads)
            shutil.rmtree(self.out / "vq" / "refit", ignore_errors=True)
        return {"train_split_background_s": round(child.ended_at() - child.start, 1)}  # inside the VQ stage

    def stage_chameleon(self) -> dict:
        """Trains in a fresh process with this process's threads: in this process, after the codes stage, the
        same steps ran ~10 % slower (0.144 vs 0.127-0.137 s on a 2-core host; not the garbage
        collector, not malloc's free lists: docs/quickstart.md)."""
        import torch

        out = self.out / "chameleon"
        argv = self._train_argv("training/chameleon-shapes.yaml", out, self.data / "train_codes",
                                self.plan.chameleon_steps,
                                [f"model.text_tokenizer={self.out / 'text_tokenizer'}", f"model.vq={self.final('vq')}"]
                                + list(self.plan.chameleon_overrides))
        child = _Child(argv, self.out / "chameleon.log", torch.get_num_threads(), echo=True)
        if self._runs("evaluate"):  # every later stage reruns after this one
            _prestart_meteor()
        try:
            child.wait()
        finally:
            child.kill()  # Ctrl-C or an error here: stop it (a no-op once it has ended)
        return self._train_summary(out)

    def _kimivl_extra(self) -> list[str]:
        return [f"model.text_tokenizer={self.out / 'text_tokenizer'}"] + list(self.plan.kimivl_overrides)

    def stage_kimivl(self) -> dict:
        return self._train("training/kimivl-shapes.yaml", self.out / "kimivl", self.data / "train",
                           self.plan.kimivl_steps, self._kimivl_extra())

    def stage_generate(self) -> dict:
        from mmkit.quickstart.samples import generate_samples

        self._start_side_lane()
        return generate_samples(self)

    def stage_evaluate(self) -> dict:
        from mmkit.eval.runner import evaluate_caption, evaluate_t2i, evaluate_vqa, load_task, majority_baseline
        from mmkit.generation import load_pipeline

        self._start_side_lane()  # a no-op when the generate stage started it
        eval_dir = self.data / "eval"
        lim = self.plan.eval_limit
        out: dict[str, Any] = {"vqa": {}, "caption": {}, "t2i": {}}
        for fam in ("chameleon", "kimivl"):
            pipe = load_pipeline(self.final(fam))
            out["vqa"][fam] = evaluate_vqa(pipe, eval_dir, limit=lim)
            out["caption"][fam] = evaluate_caption(pipe, eval_dir, limit=lim)
            if fam == "chameleon":
                # the eval recipe's settings (CFG scale, how image codes are chosen)
                task = load_task(self.root / "eval/shapes-t2i.yaml")
                out["t2i"][fam] = evaluate_t2i(pipe, eval_dir, cfg_scale=task.cfg_scale, seed=task.seed, limit=lim,
                                               image_temperature=task.image_temperature)
                out["t2i"][fam].update(cfg_scale=task.cfg_scale, image_temperature=task.image_temperature)
        out["vqa"]["majority_baseline"] = majority_baseline(eval_dir)
        self._finish_side_lane()
        return out

    def stage_report(self) -> dict:
        from mmkit.quickstart.report import write_report

        self._finish_side_lane()  # a run that stopped before its evaluate stage ended
        return write_report(self)


def run_quickstart(out: str | Path, scale: float = 1.0, smoke: bool = False, only: list[str] | None = None,
                   log: Callable[[str], None] = print, procs: int | None = None) -> dict:
    if scale <= 0:
        raise UsageError("--scale must be positive")
    if procs is not None and procs < 1:
        raise UsageError("--procs must be >= 1")
    qs = Quickstart(Path(out), Plan.make(scale, smoke), log=log, procs=procs)
    return qs.run(only=only)


def stage_results(qs: Quickstart) -> dict[str, dict]:
    """name -> saved record of every finished stage."""
    recs = {}
    for name in STAGES:
        f = qs._record(name)
        if f.is_file():
            recs[name] = json.loads(f.read_text())
    return recs


def esc(s: Any) -> str:
    return html.escape(str(s))
