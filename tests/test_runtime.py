"""mmkit.runtime: glibc allocator tuning applies on Linux and is idempotent."""

import sys

import pytest

from mmkit import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_cpu_allocator_applies_once(monkeypatch):
    calls = []
    real_cdll = runtime.ctypes.CDLL

    def counting_cdll(*a, **k):
        calls.append(a)
        return real_cdll(*a, **k)

    monkeypatch.setattr(runtime, "_tuned", None)
    monkeypatch.setattr(runtime.ctypes, "CDLL", counting_cdll)
    assert runtime.tune_cpu_allocator() is True  # both mallopt calls accepted by glibc
    assert runtime.tune_cpu_allocator() is True
    assert len(calls) == 1  # the second call returns the cached result
