"""Decode-time weight packing on CPU: every `nn.Linear` runs on a oneDNN-blocked weight copy.

Why: a decode step multiplies 1-2 rows by every weight matrix, so it is bound by reading the
weights. On CPU, `F.linear` on a plain (out, in) weight reads it at well below memory
bandwidth for so few rows (bf16 with 2 rows, as in CFG, costs 2x one row; fp32 one row goes
through a slow MKL path). The same product on a weight reordered once into oneDNN's blocked
layout is much faster: measured on the bench model (1 thread, all 33 linears of one step)
bf16 3.5 -> 2.7 ms for 1 row and 6.1 -> 3.0 ms for 2 rows, fp32 9.4 -> 5.2 ms for 1 row and
20.6 -> 6.1 ms for 2 rows. bf16 results match `F.linear` (oneDNN as well) up to rare last-bit
differences; fp32 ones differ by float rounding (~1e-6, another summation order).

The packed copies cost one extra copy of the linear weights in memory; they are kept per
model (weakly referenced) and rebuilt when a weight changes (new storage, dtype or an
in-place update).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

_STORE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(weight: torch.Tensor) -> bool:
    """True where oneDNN packing applies: a CPU weight in fp32/bf16, autocast off."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu"))


def _key(w: torch.Tensor) -> tuple:
    """Identity of a weight's current values: storage, dtype, in-place version, and a 64-value
    sample (a freed-and-reused address after `model.to(...)` round trips keeps version 0)."""
    flat = w.detach().reshape(-1)
    sample = float(flat[:: max(1, flat.numel() // 64)].float().sum())
    return (w.data_ptr(), w.dtype, w._version, tuple(w.shape), sample)


def packed_linear_fn(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (..., in) -> x @ weight.T + bias, through a packed copy of `weight` (out, in)."""
    if not packing_available(weight):
        return lambda x: F.linear(x, weight, bias)
    # batch-size hint 8: fast for 1-8 rows (a hint of 1 makes 2-row inputs ~2x slower)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 8)
    op = torch.ops.mkldnn._linear_pointwise
    b = None if bias is None else bias.detach()
    return lambda x: op(x, packed, b, "none", [], "")


def cached_linear_fn(owner: nn.Module, tag: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     enabled: bool = True, rows: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`packed_linear_fn` of weight (or of weight[rows], rows (N,) long) kept per (owner, tag)
    until the weight changes; F.linear if not enabled."""
    if rows is not None:
        w_rows = lambda: weight.index_select(0, rows)  # noqa: E731
        b_rows = lambda: None if bias is None else bias.index_select(0, rows)  # noqa: E731
    else:
        w_rows, b_rows = (lambda: weight), (lambda: bias)
    if not enabled or not packing_available(weight):
        w, b = w_rows(), b_rows()
        return lambda x: F.linear(x, w, b)
    store = _STORE.setdefault(owner, {})  # tag -> (weight key, forward fn)
    key = _key(weight) + (None if bias is None else _key(bias),)
    if rows is not None:
        key += (rows.numel(), int(rows.sum()), int(rows[0]) if rows.numel() else -1)
    entry = store.get(tag)
    if entry is None or entry[0] != key:
        entry = store[tag] = (key, packed_linear_fn(w_rows(), b_rows()))
    return entry[1]


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While active, each plain `nn.Linear` of `model` on CPU runs through its packed weight.

    Subclasses of nn.Linear (LoRA, quantised layers) are left alone. The patch is an instance
    attribute `forward`, removed on exit; packed weights are cached across calls.
    """
    if not enabled:
        yield
        return
    patched = []
    try:
        for name, mod in model.named_modules():
            if type(mod) is not nn.Linear or "forward" in mod.__dict__ or not packing_available(mod.weight):
                continue
            mod.forward = cached_linear_fn(model, name, mod.weight, mod.bias)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)


def release_packed(model: nn.Module) -> None:
    """Drop `model`'s cached packed weights (they are rebuilt on the next generate call)."""
    _STORE.pop(model, None)
