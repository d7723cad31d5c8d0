"""Atomic, pickle-free training checkpoints.

Layout of `OUT/checkpoints/step-00000012/`:
  model.safetensors                 full (unsharded) model state dict
  optimizer.safetensors + .json     optimizer tensors / everything else (param groups, format)
  scheduler.json                    LambdaLR.state_dict()
  rank-R.safetensors + rank-R.json  per rank: torch (CPU, CUDA) RNG / python + numpy RNG,
                                    data-stream state (BatchStream.state_dict(), JSON)
  meta.json                         step, world size, ... written last

Everything is written into `.tmp-step-XXXXXXXX/` and renamed into place only when complete,
so a crash (or kill -9) mid-write leaves the previous checkpoint the newest complete one;
`latest()` also requires `meta.json`. Tensors go to safetensors, the rest to JSON: loading a
checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmkit.errors import MmkitError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "meta.json").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


# --------------------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj)))
    _fsync_file(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors save; tensors sharing storage (tied weights) are cloned, as safetensors requires."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t.contiguous().cpu()
    save_file(out, str(path), metadata=metadata or {"format": "pt"})
    _fsync_file(path)


# --------------------------------------------------------------------------- state pieces
def optimizer_to_files(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON). State keys may be ints (ids) or names (FQNs)."""
    tensors, scalars = {}, {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    keys_are_ints = all(isinstance(pid, int) for pid in osd["state"])
    meta = {"param_groups": osd["param_groups"], "scalars": scalars, "int_keys": keys_are_ints}
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    conv = int if meta["int_keys"] else str
    state: dict = {}
    for name, t in tensors.items():
        pid, k = name.rsplit("/", 1)
        state.setdefault(conv(pid), {})[k] = t
    for pid, st in meta["scalars"].items():
        state.setdefault(conv(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- save / load
def save(
    root: str | Path,
    step: int,
    *,
    rank: int,
    is_main: bool,
    barrier,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    stream_state: dict,
    meta: dict,
    keep_last: int,
) -> Path:
    """Write the checkpoint for `step` atomically; every rank calls this (collective).

    `model_state` / `optimizer_state` / `scheduler_state` are only used on the main process
    (full, unsharded states); each rank writes its own RNG and stream state.
    """
    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"
    final = step_dir(root, step)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rng_t, rng_meta = rng_state()
    write_tensors(tmp / f"rank-{rank}.safetensors", rng_t)
    try:
        write_json(tmp / f"rank-{rank}.json", {"rng": rng_meta, "stream": stream_state})
    except TypeError as e:
        raise MmkitError(f"checkpoint: the task's BatchStream.state_dict() must be JSON-serialisable ({e})") from None
    if is_main:
        write_tensors(tmp / "model.safetensors", model_state)
        opt_t, opt_meta = optimizer_to_files(optimizer_state)
        write_tensors(tmp / "optimizer.safetensors", opt_t)
        write_json(tmp / "optimizer.json", opt_meta)
        write_json(tmp / "scheduler.json", scheduler_state)
    barrier()
    if is_main:
        write_json(tmp / "meta.json", {"step": step, **meta})  # last: marks the content complete
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. abort right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop leftovers of crashed writes."""
    for _, d in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(d, ignore_errors=True)


def load(ckpt: str | Path, rank: int) -> dict:
    """Read a checkpoint directory back (CPU tensors); `rank` picks the per-rank files."""
    ckpt = Path(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    rank_file = ckpt / f"rank-{rank}.json"
    if not rank_file.is_file():
        raise MmkitError(
            f"{ckpt} was written by {meta.get('world_size')} process(es); it has no state for rank {rank} "
            "(resume with the same number of processes)"
        )
    per_rank = json.loads(rank_file.read_text())
    return {
        "meta": meta,
        "model": load_file(str(ckpt / "model.safetensors")),
        "optimizer": optimizer_from_files(
            load_file(str(ckpt / "optimizer.safetensors")), json.loads((ckpt / "optimizer.json").read_text())
        ),
        "scheduler": json.loads((ckpt / "scheduler.json").read_text()),
        "rng": (load_file(str(ckpt / f"rank-{rank}.safetensors")), per_rank["rng"]),
        "stream": per_rank["stream"],
    }
