"""``compute-sanitizer`` memcheck / racecheck on the LSA kernel, as a subprocess with a timeout.

The workload is ``lsa_sanitize.py``; only kernels whose name holds ``hungarian`` are checked
(``--kernel-name kns=hungarian``: torch's own kernels run unchecked, which keeps the run
short).  torch's caching allocator is turned off in the child so an out-of-bounds access lands
outside any allocation, where memcheck sees it.

Outcomes: ``pass`` (the tool ran, 0 errors, the workload's totals right), ``fail`` (errors
reported, or wrong totals), ``skip`` with the tool's own message when it refuses the device
(seen on gVisor machines: "Device not supported", then error 999), is absent, or times out.
"""

import os
import re
import shutil
import subprocess
import sys

from benchmarks.gpu_check.report import Check

KERNEL_FILTER = "kns=hungarian"
# What the tool prints when it cannot run on this device or driver: not a finding in the kernel.
REFUSALS = ("Device not supported", "device not supported", "error 999", "cudaErrorUnknown",
            "CUDA_ERROR_UNKNOWN", "Failed to initialize")


def command(tool, quick):
    return ["compute-sanitizer", "--tool", tool, "--kernel-name", KERNEL_FILTER, "--error-exitcode", "99",
            sys.executable, "-m", "benchmarks.gpu_check.lsa_sanitize", *(["--quick"] if quick else [])]


def classify(returncode, output):
    """``(status, detail)`` from the sanitizer's exit status and output.  A refusal is checked
    first: on a refused device the tool also counts the failed CUDA calls as errors."""
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-6:])
    refusal = next((r for r in REFUSALS if r in output), None)
    if refusal:
        return "skip", f"compute-sanitizer refused this device ({refusal!r}): {tail}"[:800]
    summary = re.search(r"ERROR SUMMARY: (\d+) error", output)
    if summary is None:
        return "skip", f"compute-sanitizer gave no error summary (rc {returncode}): {tail}"[:800]
    if int(summary.group(1)) > 0:
        return "fail", f"{summary.group(0)}: {tail}"[:800]
    if returncode != 0:
        return "fail", f"the workload failed under the sanitizer (rc {returncode}): {tail}"[:800]
    return "pass", summary.group(0)


def run_sanitizer(item, run, quick=False):
    tool, timeout = item.params["tool"], item.params["timeout_s"]
    if shutil.which("compute-sanitizer") is None:
        run.checks.append(Check(item.topic, f"sanitizer:{tool}", "skip",
                                detail="compute-sanitizer not on PATH"))
        return
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(command(tool, quick), capture_output=True, text=True, timeout=timeout, env=env)
        status, detail = classify(proc.returncode, proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        status, detail = "skip", f"compute-sanitizer {tool} timed out after {timeout} s"
    run.checks.append(Check(item.topic, f"sanitizer:{tool}", status, "float32", "lsa_sanitize", detail))
