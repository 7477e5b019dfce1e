"""The attention kernels compile for Hopper (TTIR -> PTX -> cubin, through the ptxas
that ships with Triton), with no GPU present.

The interpreter, which runs the kernels in the other CPU tests, skips Triton's compiler: type
errors in loop-carried values, ops the compiled dialect lacks, or shared memory that does not
fit would only surface on a GPU.  ``attention_gpu_build.py`` compiles every kernel with every
option on, for every dtype, at the autotuner's smallest tiles (and its largest in bf16), in a
subprocess (it needs ``TRITON_INTERPRET`` unset).

Also here, since they need no kernel launch: the autotuner's sequence buckets and pruning.
"""

import json
import os
import subprocess
import sys

import pytest

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
    # attention kernels x plan, their split variants at d96, dropout mask, delta x dtypes, combine
    # and dQ reduce x 2 dtypes, pipelined fwd and dq (unsplit and split)
    assert len(builds) == 5 * 3 + 2 + 1 + 3 + 2 * 2 + 2 * 2
    errors = [b for b in builds if "error" in b]
    assert not errors, "\n".join(f"{b['case']}: {b['error']}" for b in errors)


def test_smallest_tiles_fit_in_shared_memory(builds):
    """The autotuner drops configs that do not fit, but its smallest tiles must always fit."""
    for b in builds:
        if b["case"].endswith(("64x32", "32x64", "64x32-split", "32x64-split")):
            assert b["shared"] <= SMEM_LIMIT[b["arch"]], b


def test_full_key_blocks_are_software_pipelined(builds):
    """As a launch specialises them, the forward's and dQ's full-block key loops copy K/V
    asynchronously across pipeline stages (a data-dependent branch in the loop, as the
    skip-padding-blocks test once was, leaves zero), split into key ranges or not."""
    pipelined = [b for b in builds if b["case"].endswith("-pipelined")]
    assert len(pipelined) == 4 and sum("-split-" in b["case"] for b in pipelined) == 2
    for b in pipelined:
        assert b["async_copies"] > 0, b


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_prune_keeps_the_spill_free_tiles_of_the_head_width(monkeypatch, kind):
    """``TILES`` (measured: no spill on sm_90 at 4 warps) picks the row of the call's head
    width: 96 (UniT's decoder) takes the widest row, 64 (BERT) the middle, 32 the narrowest."""
    configs = _gpu_configs(monkeypatch, kind)
    for dims, row in (((96, 96), 128), ((64, 64), 64), ((32, 32), 32), ((16, 16), 32), ((32, 80), 128)):
        kept = T._prune(configs, {"D": dims[0], "DV": dims[1]}, kind=kind)
        assert _tiles(kept) == set(T.TILES[kind][row]), (kind, dims)
        assert {c.num_warps for c in kept} == {4}


def _gpu_configs(monkeypatch, kind):
    """The autotuner's candidate configs on a GPU (not the interpreter's single one)."""
    monkeypatch.setattr(T, "_interpreted", lambda: False)
    return T._configs(kind)


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs}


def test_seq_bucket():
    assert [T.seq_bucket(n) for n in (0, 1, 16, 17, 100, 128, 129, 3400, 4096, 10_000)] == \
        [16, 16, 16, 32, 128, 128, 256, 4096, 4096, 4096]


def test_tune_key_names_kernel_arguments():
    """``triton.autotune`` silently drops a key that is no argument name: every key must be one."""
    kernels = {"fwd": T._attention_fwd_kernel, "dkdv": T._attention_bwd_dkdv_kernel,
               "dq": T._attention_bwd_dq_kernel}
    for kind, kernel in kernels.items():
        assert set(T._TUNE_KEY) <= set(T._TUNE_KEYS[kind]) <= set(kernel.arg_names), kernel
        assert T._launcher(kind).keys == T._TUNE_KEYS[kind]


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq"])
def test_launchers_pass_the_sequence_buckets(monkeypatch, name):
    """Decoder cross-attention (100 queries, ~3,400 keys) and encoder self-attention (3,400 x
    3,400) reach the autotuner with different keys (no kernel runs: the launch is recorded)."""
    import torch

    seen = []
    kernels = {"fwd": T._attention_fwd_kernel, "dkdv": T._attention_bwd_dkdv_kernel,
               "dq": T._attention_bwd_dq_kernel}

    class Recorder:
        def __init__(self, n):
            self.n = n

        def __getitem__(self, grid):
            names = kernels[self.n].arg_names
            return lambda *args, **kwargs: seen.append((self.n, dict(zip(names, args, strict=False))))

    for n in kernels:
        monkeypatch.setitem(T._TUNED, n, Recorder(n))
    keys = {}
    for L, S in ((100, 3400), (3400, 3400)):
        q, k, v = torch.zeros(1, 1, L, 8), torch.zeros(1, 1, S, 8), torch.zeros(1, 1, S, 8)
        seen.clear()
        if name == "fwd":
            T.attention_fwd_triton(q, k, v, None, None, 0.0, 1.0, 0)
        else:
            out, lse = torch.zeros(1, 1, L, 8), torch.zeros(1, 1, L)
            T.attention_bwd_triton(out, q, k, v, out, lse, None, None, 0.0, 1.0, 0)
        (args,) = [a for n, a in seen if n == name]
        assert (args["bucket_l"], args["bucket_s"]) == (T.seq_bucket(L), T.seq_bucket(S))
        keys[L, S] = tuple(args[key] for key in T._TUNE_KEY if key in args)
    assert keys[100, 3400] != keys[3400, 3400]


@pytest.mark.parametrize("kind, loop", [("fwd", "keys"), ("dkdv", "queries"), ("dq", "keys")],
                         ids=["fwd", "dkdv", "dq"])
def test_prune_fits_tiles_and_stages_to_the_buckets(monkeypatch, kind, loop):
    configs = _gpu_configs(monkeypatch, kind)
    smallest = min(m * n for m, n in _tiles(configs))
    full = T._prune(configs, {"D": 32, "DV": 32}, kind=kind, loop=loop)
    assert full == configs  # no buckets, narrow heads: nothing to drop
    for bucket_l in (16, 32, 64, 128, 256, 4096):
        for bucket_s in (16, 32, 64, 128, 256, 4096):
            args = {"D": 32, "DV": 32, "bucket_l": bucket_l, "bucket_s": bucket_s}
            kept = T._prune(configs, args, kind=kind, loop=loop)
            assert kept and all(c in configs for c in kept)
            min_m = min(m for m, _ in _tiles(configs))
            min_n = min(n for _, n in _tiles(configs))
            cap_m, cap_n = max(bucket_l, min_m), max(bucket_s, min_n)
            fitting = {(m, n) for m, n in _tiles(configs) if m <= cap_m and n <= cap_n}
            if fitting:
                assert _tiles(kept) <= fitting
            else:  # nothing short in both directions: the smallest tiles
                assert {m * n for m, n in _tiles(kept)} == {smallest}
            for c in kept:  # no stage beyond the loop's trip count (but the shallowest is kept)
                trips = bucket_s // c.kwargs["BLOCK_N"] if loop == "keys" else bucket_l // c.kwargs["BLOCK_M"]
                assert c.num_stages <= max(trips, min(x.num_stages for x in configs))
    # The decoder's 100 queries (bucket 128) against its own 100 queries: no more configs than the
    # encoder's 3,400 x 3,400 (fewer where a tile is 128 long), all of them short enough; 16 x 16
    # strictly fewer.
    def at(bucket):
        args = {"D": 32, "DV": 32, "bucket_l": bucket, "bucket_s": bucket}
        return T._prune(configs, args, kind=kind, loop=loop)

    enc, self_dec, tiny = at(4096), at(128), at(16)
    assert enc == configs and len(self_dec) <= len(enc) and len(tiny) < len(enc)
    if any(m > 64 or n > 64 for m, n in _tiles(configs)):
        assert len(self_dec) < len(enc)
    assert {m * n for m, n in _tiles(tiny)} == {smallest} and len(tiny) <= 4


def test_configs_per_bucket_are_few(monkeypatch):
    """At most 14 configs per (kernel, bucket) to benchmark at the first step (there were 20),
    all at 4 warps (two blocks resident per SM at any register count)."""
    for kind in ("fwd", "dkdv", "dq"):
        configs = _gpu_configs(monkeypatch, kind)
        assert 0 < len(configs) <= 14
        assert {c.num_warps for c in configs} == {4}