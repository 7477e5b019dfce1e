"""The attention kernels compile for Hopper (TTIR -> PTX -> cubin, through the ptxas
that ships with Triton), with no GPU present.

The interpreter, which runs the kernels in the other CPU tests, skips Triton's compiler: type
errors in loop-carried values, ops the compiled dialect lacks, or shared memory that does not
fit would only surface on a GPU.  ``attention_gpu_build.py`` compiles every kernel with every
option on, for every dtype, at the autotuner's smallest tiles (and its largest in bf16), in a subprocess (it needs
``TRITON_INTERPRET`` unset).
"""

import json
import os
import subprocess
import sys

import pytest
import triton

from unit_fast.ops.attention import triton as T

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = {90: 227 * 1024}  # bytes a block may use: H100 / H200


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "attention_gpu_build.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90(builds):
    assert len(builds) == 5 * 3 + 1
    errors = [b for b in builds if "error" in b]
    assert not errors, "\n".join(f"{b['case']}: {b['error']}" for b in errors)


def test_smallest_tiles_fit_in_shared_memory(builds):
    """The autotuner drops configs that do not fit, but its smallest tiles must always fit."""
    for b in builds:
        if b["case"].endswith(("64x32", "32x64")):
            assert b["shared"] <= SMEM_LIMIT[b["arch"]], b


def test_prune_keeps_register_sized_tiles_for_wide_heads():
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in ((128, 128), (128, 64), (64, 32))]
    wide = T._prune(configs, {"D": 96, "DV": 96})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in wide] == [(128, 64), (64, 32)]
    assert T._prune(configs, {"D": 32, "DV": 32}) == configs
