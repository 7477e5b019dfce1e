"""Package-level behaviour: extension loading and fallback, env report, demo."""

import subprocess
import sys

import pytest
import torch

import unit_fast
from unit_fast import _backend, _ext


def run_python(code, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    env.pop("UNIT_FAST_SKIP_EXT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


FALLBACK = """
import sys, warnings
sys.modules["unit_fast._C"] = None  # as if the extension were missing or broken
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, unit_fast
    from unit_fast import _ext, _backend
ours = [w for w in caught if "unit_fast._C could not be loaded" in str(w.message)]
print("warnings", len(ours))
print("has_ext", _ext.HAS_EXT)
print("backends", _backend.backends_for("hungarian_match", "cpu"))
cost = torch.rand(3, 6, 4)
out = unit_fast.batched_linear_sum_assignment(cost)
print("assigned", int((out >= 0).sum()))
print("op", torch.ops.unit_fast.hungarian_match(cost, None, False, False).shape)
rows, cols = unit_fast.linear_sum_assignment([[1, 2], [2, 1]])
print("lsa", rows.tolist(), cols.tolist())
"""


def test_missing_extension_falls_back_with_one_warning():
    res = run_python(FALLBACK)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "warnings 1" in out
    assert "has_ext False" in out
    assert "backends ['reference']" in out
    assert "assigned 12" in out
    assert "op torch.Size([3, 6])" in out
    assert "lsa [0, 1] [0, 1]" in out


def test_skip_ext_env_silences_the_warning():
    res = run_python(FALLBACK, {"UNIT_FAST_SKIP_EXT": "1"})
    assert res.returncode == 0, res.stderr
    assert "warnings 0" in res.stdout


def test_env_report():
    res = subprocess.run([sys.executable, "-m", "unit_fast.env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for word in ("python", "torch", "triton", "extension", "hungarian_match"):
        assert word in res.stdout
    if not _ext.HAS_CUDA_EXT:
        assert "built without CUDA kernels" in res.stdout or "not loaded" in res.stdout
    if _ext.HAS_EXT:  # the solver build it reports is the one the op says runs
        assert f"CPU LSA build    {torch.ops.unit_fast._lsa_cpu_isa()}" in res.stdout


def test_forced_unavailable_backend_raises(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "ImportError: simulated")
    assert _backend.backends_for("hungarian_match", "cpu") == ["reference"]
    with pytest.raises(RuntimeError, match="forced .*unavailable: unit_fast._C not loaded"):
        _backend.select_backend("hungarian_match", "cpu", "cpp")
    monkeypatch.setenv("UNIT_FAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="unavailable"):
        _backend.select_backend("hungarian_match", "cuda")


def test_demo_runs():
    res = subprocess.run(
        [sys.executable, "-m", "unit_fast.demo", "--layers", "1", "--batch", "4", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "all totals equal scipy's" in res.stdout


def test_version():
    assert unit_fast.__version__
