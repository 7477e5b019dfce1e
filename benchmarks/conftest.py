"""Shared benchmark machinery (house style section 8, shared/BENCHMARKS.md).

- ``bench_*.py`` files are collected here (pyproject's ``python_files`` stays ``test_*.py``).
- ``measure()`` is the one timing path: warm up, check, record host syncs and peak memory,
  then time a callable that synchronizes CUDA (gpt-fast ``device_sync``).
- The run's commit, versions and device names go into pytest-benchmark's ``machine_info``,
  so ``python -m benchmarks.results`` converts what the run itself recorded.

Nothing here touches CUDA unless ``torch.cuda.is_available()``.
"""

import itertools
import os
import platform
import re
import subprocess
import time
import warnings
from importlib import metadata

import pytest
import torch

from unit_fast.testing import devices  # noqa: F401  (re-exported for bench files)

CUDA = torch.cuda.is_available()

# A case whose warm-up call takes longer than this is timed with pedantic rounds
# (3 to 5) instead of pytest-benchmark's calibration, which would spend ~1 s or more on it.
SLOW_CALL_S = 0.02

# CUDA runtime calls that block the host until the GPU catches up.  A blocking D2H copy
# (``.cpu()``, ``.item()``, ``nonzero``) is ``cudaMemcpyAsync`` + ``cudaStreamSynchronize``.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def sync(device):
    """Waits for ``device``'s queued work (CUDA only; a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cuda_only(reason="needs a CUDA device"):
    """Marks for a case that exists only on CUDA: skipped, with ``reason``, where none is present."""
    return [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=reason)]


def baseline_and_triton_cases(baselines):
    """``(provider, device)`` params: each baseline on every device, plus ``unit_fast_triton`` on
    CUDA only (the Triton interpreter's speed on CPU means nothing, so it is never timed)."""
    cases = [pytest.param(p, d, id=f"{p}-{d}") for p in baselines for d in devices()]
    cases.append(pytest.param("unit_fast_triton", "cuda", id="unit_fast_triton-cuda",
                              marks=cuda_only("the Triton kernels are benchmarked on CUDA only (the CPU "
                                              "interpreter's speed means nothing); no CUDA device here")))
    return cases


def peak_mem_mb(fn, device):
    """CUDA memory one call of ``fn`` allocates at its peak, above what was allocated before, in
    MiB; None on CPU (no allocator statistics there)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 3)


def count_host_syncs(fn, device):
    """How many times one call of ``fn`` makes the host wait for the GPU; None on CPU.

    Counted with the profiler (CUPTI sees every CUDA runtime call, including those made inside
    extensions), inside a ``record_function`` window so the profiler's own synchronisation
    is not counted.  Where the profiler records no CUDA runtime calls (no CUPTI), falls back
    to ``torch.cuda.set_sync_debug_mode("warn")``, which sees only torch's own syncs.
    """
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile, record_function

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("benchmarks::timed_call"):
            fn()
    sync(device)
    events = list(prof.events())
    windows = [e.time_range for e in events if e.name == "benchmarks::timed_call"]
    inside = [
        e for e in events
        if any(w.start <= e.time_range.start and e.time_range.end <= w.end for w in windows)
    ]
    if any(e.name.startswith("cuda") for e in inside):
        return sum(e.name in SYNC_CALLS for e in inside)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    sync(device)
    return sum("synchronizing" in str(w.message) for w in caught)


def measure(benchmark, call, inputs, device, check=None):
    """Benchmarks ``call(x)`` over ``inputs`` (cycled) on ``device``.

    Before timing: one call per input set warms up (compilation, autotuning, allocator) and
    its result goes to ``check(x, out)``; on CUDA one more call each records
    ``host_syncs`` and ``peak_mem_mb`` in ``benchmark.extra_info``.  The timed callable
    synchronizes CUDA before pytest-benchmark reads its host clock.
    """
    call_s = float("inf")  # the fastest warm-up call: the first one also pays one-time set-up
    for x in inputs:
        start = time.perf_counter()
        out = call(x)
        sync(device)
        call_s = min(call_s, time.perf_counter() - start)
        if check is not None:
            check(x, out)
    benchmark.extra_info["host_syncs"] = count_host_syncs(lambda: call(inputs[0]), device)
    benchmark.extra_info["peak_mem_mb"] = peak_mem_mb(lambda: call(inputs[0]), device)
    cycle = itertools.cycle(inputs)

    def timed():
        out = call(next(cycle))
        sync(device)
        return out

    if call_s > SLOW_CALL_S:
        rounds = 3 if call_s > 0.5 else 5
        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    return benchmark(timed)


def cpu_name():
    """The CPU model from /proc/cpuinfo (or platform), with the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = re.sub(r"\s+", " ", model)
    return f"{model} ({cores} cores)"


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_head():
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout, or no commit yet


def pytest_benchmark_update_machine_info(config, machine_info):
    """Records what ``benchmarks.results`` needs: commit, versions, device names."""
    machine_info["unit_fast"] = {
        "commit": _git_head(),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "devices": {
            "cpu": cpu_name(),
            "cuda": torch.cuda.get_device_name() if CUDA else None,
        },
        "torch_num_threads": torch.get_num_threads(),
    }
