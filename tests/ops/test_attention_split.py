"""Key splitting (flash-decoding) of the attention forward and dQ key loops, against the reference.

The split count is forced through the launchers' ``n_split`` (on CPU the default is 1 split), so
the interpreter, with its 16 x 16 blocks, runs splits of 1 to 3 key blocks, splits left empty
(more splits than key blocks), a fully padded sequence (every split neutral), and a sequence
whose ``kv_end`` falls inside a split, after a full block (that split's masked tail).  Also here:
the split heuristic ``key_splits`` at UniT's shapes and the backward's GEMM count per tile.
"""

import sys
from collections import Counter

import pytest
import torch

from unit_fast import _backend
from unit_fast.ops.attention import attention_ref
from unit_fast.ops.attention import split_kv as SK
from unit_fast.ops.attention import triton as T
from unit_fast.testing import assert_close_ref, assert_within_ref_error

pytestmark = pytest.mark.skipif("triton" not in _backend.backends_for("attention", "cpu")
                                and not torch.cuda.is_available(),
                                reason="Triton unavailable (CPU needs TRITON_INTERPRET=1, set by conftest)")

# 8 is more splits than any shape below has key blocks (S <= 70: 5 blocks of 16).
SPLITS = [2, 3, 8]
# (L, S, D, Dv): partial query and key blocks; 70 keys = 4 full blocks and a 6-key tail.
SHAPES = [(19, 70, 32, 32), (5, 40, 16, 24)]
B, H = 3, 2


def _inputs(L, S, D, Dv, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, d, generator=gen).to(dtype) for n, d in ((L, D), (S, D), (S, Dv)))
    grad = torch.randn(B, H, L, Dv, generator=gen).to(dtype)
    return q, k, v, grad


def _kpm(S):
    """(B, S) bool, True = padding: sequence 0 all padding (kv_end 0: every split neutral);
    sequence 1 ends at key 53 (kv_end inside the last split with 2 splits: a full block 32..47,
    then the 5-key tail); sequence 2 pads a whole block in the middle and one key of the first."""
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0] = True
    kpm[1, min(53, S - 3):] = True
    kpm[2, 16:32] = True
    kpm[2, 3] = True
    return kpm


def _masks(kind, L, S):
    """``(kpm, bias)``: ``bias`` a float ``(L, S)`` additive mask (the CA-MTL path), broadcast."""
    kpm = _kpm(S) if "kpm" in kind else None
    bias = torch.randn(L, S, generator=torch.Generator().manual_seed(3)) if "bias" in kind else None
    return kpm, bias


def _run(q, k, v, grad, kpm, bias, n_split, dropout_p=0.0, seed=0):
    scale = q.shape[-1] ** -0.5
    out, lse = T.attention_fwd_triton(q, k, v, bias, kpm, dropout_p, scale, seed, n_split=n_split)
    grads = T.attention_bwd_triton(grad, q, k, v, out, lse, bias, kpm, dropout_p, scale, seed,
                                   n_split=n_split)
    return out, lse, grads


def _check(q, k, v, grad, kpm, bias, got, dropout_p=0.0, keep=None, msg=""):
    """``got = (out, lse, (dq, dk, dv))`` vs the fp64 reference, with the "2x the reference's
    error in the test dtype" rule (house style section 7); lse exactly -inf on empty rows."""
    out, lse, grads = got
    dtype = q.dtype
    hi = [t.double().requires_grad_() for t in (q, k, v)]
    bias_hi = None if bias is None else bias.double()
    ref_hi, lse_hi = attention_ref(*hi, kpm, bias_hi, dropout_p, dropout_mask=keep, return_lse=True)
    g_hi = torch.autograd.grad(ref_hi, hi, grad.double())
    lo = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_lo = attention_ref(*lo, kpm, bias, dropout_p, dropout_mask=keep, upcast=False)
    g_lo = torch.autograd.grad(ref_lo, lo, grad)
    assert_within_ref_error(out, ref_lo, ref_hi, dtype, msg=f"{msg} out")
    for name, a, b, c in zip("qkv", grads, g_lo, g_hi, strict=True):
        assert_within_ref_error(a, b, c, dtype, msg=f"{msg} d{name}")
    empty = torch.isneginf(lse_hi)
    assert torch.equal(torch.isneginf(lse), empty), msg
    assert_close_ref(lse[~empty], lse_hi[~empty], dtype=torch.float32, msg=f"{msg} lse")
    if kpm is not None:  # the fully padded sequence: output and dQ exactly 0
        assert not out[0].any() and not grads[0][0].any(), msg


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-S{}-D{}-Dv{}".format(*s))
@pytest.mark.parametrize("kind", ["none", "kpm", "bias", "kpm_and_bias"])
@pytest.mark.parametrize("n_split", SPLITS)
def test_split_matches_reference(shape, kind, n_split):
    L, S, D, Dv = shape
    q, k, v, grad = _inputs(L, S, D, Dv)
    kpm, bias = _masks(kind, L, S)
    got = _run(q, k, v, grad, kpm, bias, n_split)
    _check(q, k, v, grad, kpm, bias, got, msg=f"{kind} n_split={n_split}")


@pytest.mark.parametrize("n_split", SPLITS)
def test_split_dropout_equals_one_split(n_split):
    """Dropout with splits drops the very weights of one split (the reference with the kernels'
    own mask agrees), so outputs and gradients equal the one-split run's -- to fp32 rounding,
    not bit for bit: each split normalises by its own sum and the combine re-weighs by
    ``exp(lse_i - lse)``, and dQ sums fp32 partials, in another order than one running sum."""
    L, S, D, Dv = SHAPES[0]
    p, seed = 0.3, 2**40 + 7
    q, k, v, grad = _inputs(L, S, D, Dv)
    kpm, bias = _masks("kpm_and_bias", L, S)
    one = _run(q, k, v, grad, kpm, bias, 1, p, seed)
    split = _run(q, k, v, grad, kpm, bias, n_split, p, seed)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (*split[:2], *split[2]), (*one[:2], *one[2]),
                          strict=True):
        assert_close_ref(a, b, dtype=torch.float32, msg=f"n_split={n_split} {name}")
    keep = T.attention_dropout_mask_triton(B, H, L, S, p, seed, "cpu")
    _check(q, k, v, grad, kpm, bias, split, dropout_p=p, keep=keep, msg=f"dropout n_split={n_split}")


def test_split_half_precision():
    """fp16 partials and outputs: the partials are fp32 whatever the input dtype."""
    L, S, D, Dv = SHAPES[0]
    q, k, v, grad = _inputs(L, S, D, Dv, torch.float16)
    kpm, bias = _masks("kpm_and_bias", L, S)
    _check(q, k, v, grad, kpm, bias.half(), _run(q, k, v, grad, kpm, bias.half(), 3), msg="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled split path needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_split", [None, 4])
def test_split_compiled_on_cuda(dtype, n_split):
    """The compiled kernels (native bf16 ``tl.dot``; the interpreter upcasts) at a decoder
    cross-attention shape, with the automatic split count (above 1 on any GPU with more SMs
    than this shape's 2 * 2 * 4 row-block programs) and a forced one, padding and bias."""
    L, S, D = 100, 1000, 32
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, n, D, generator=gen).to("cuda", dtype) for n in (L, S, S))
    grad = torch.randn(2, 4, L, D, generator=gen).to("cuda", dtype)
    kpm = torch.zeros(2, S, dtype=torch.bool, device="cuda")
    kpm[0] = True  # _check: a fully padded sequence 0 gives exactly 0
    kpm[1, 613:] = True
    bias = torch.randn(L, S, generator=gen).to("cuda", dtype)
    if n_split is None:
        assert T._splits(None, q, L, S, 2, 4) > 1
    _check(q, k, v, grad, kpm, bias, _run(q, k, v, grad, kpm, bias, n_split), msg=f"cuda {dtype}")


def test_one_split_runs_the_single_kernel(monkeypatch):
    """n_split = 1 (the CPU default) launches the forward and dQ kernels unsplit, with no
    workspace and no combine / reduce kernel; n_split = 2 launches both second kernels."""
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.names = name, kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((self.name, dict(zip(self.names, args, strict=False), **kw)))

            return launch

    for name, kernel in (("fwd", T._attention_fwd_kernel), ("dkdv", T._attention_bwd_dkdv_kernel),
                         ("dq", T._attention_bwd_dq_kernel)):
        monkeypatch.setitem(T._TUNED, name, Recorder(name, kernel))
    monkeypatch.setattr(T, "_attention_fwd_combine_kernel",
                        Recorder("combine", T._attention_fwd_combine_kernel))
    monkeypatch.setattr(T, "_attention_bwd_dq_reduce_kernel",
                        Recorder("reduce", T._attention_bwd_dq_reduce_kernel))
    q, k, v, grad = _inputs(*SHAPES[0])
    lse = torch.zeros(B, H, SHAPES[0][0])
    for n_split in (None, 1, 2):
        launches.clear()
        T.attention_fwd_triton(q, k, v, None, None, 0.0, 1.0, 0, n_split=n_split)
        T.attention_bwd_triton(grad, q, k, v, grad, lse, None, None, 0.0, 1.0, 0, n_split=n_split)
        names = [n for n, _ in launches]
        args = dict(launches)
        if n_split == 2:
            assert names == ["fwd", "combine", "dkdv", "dq", "reduce"]
            assert args["fwd"]["SPLIT"] and args["dq"]["SPLIT"]
            assert args["fwd"]["PartO_ptr"].shape == (2, B * H, SHAPES[0][0], SHAPES[0][3])
        else:
            assert names == ["fwd", "dkdv", "dq"]
            assert not args["fwd"]["SPLIT"] and not args["dq"]["SPLIT"] and args["fwd"]["n_split"] == 1
            assert args["fwd"]["PartO_ptr"] is q and args["dq"]["PartDQ_ptr"] is q  # placeholders
    with pytest.raises(ValueError, match="n_split"):
        T.attention_fwd_triton(q, k, v, None, None, 0.0, 1.0, 0, n_split=0)


# ---------------------------------------------------------------------------------------------
# The split heuristic


H100_SMS = 132


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("keys", [3400, 3425])
def test_key_splits_fill_the_gpu_at_the_decoder_shapes(batch, keys):
    """UniT's decoder cross-attention (100 queries, 8 heads): the split grid has at least one
    wave of programs (at BLOCK_M 64: 2 row blocks) and less than two."""
    n = T.key_splits(100, keys, batch, 8, H100_SMS)
    programs = 2 * batch * 8 * n
    assert n > 1 and H100_SMS <= programs < 2 * H100_SMS, (n, programs)


def test_key_splits_numbers():
    assert T.key_splits(100, 3400, 2, 8, H100_SMS) == 5  # 32 programs -> 160
    assert T.key_splits(100, 3400, 8, 8, H100_SMS) == 2  # 128 -> 256
    assert T.key_splits(3400, 3400, 2, 8, H100_SMS) == 1  # encoder: 54 row blocks x 16 = 864 programs
    assert T.key_splits(128, 128, 32, 12, H100_SMS) == 1  # BERT: 768 programs
    assert T.key_splits(100, 100, 2, 8, H100_SMS) == 1  # decoder self-attention: 2 key blocks
    assert T.key_splits(100, 192, 1, 1, H100_SMS) == 1  # 3 key blocks of 64: no 2 splits of 2 blocks ...
    assert T.key_splits(100, 193, 1, 1, H100_SMS) == 2  # ... 4 blocks is the least that splits
    assert T.key_splits(1, 10**6, 1, 1, H100_SMS) == SK.MAX_SPLITS
    assert T.key_splits(0, 3400, 2, 8, H100_SMS) == 1


def test_key_splits_keep_two_key_blocks_a_split():
    for S in range(1, 3000, 37):
        for B_ in (1, 3):
            n = T.key_splits(50, S, B_, 1, H100_SMS)
            assert 1 <= n <= SK.MAX_SPLITS
            if n > 1:
                assert -(-S // SK.SPLIT_BLOCK_N) >= SK.MIN_SPLIT_BLOCKS * n, (S, n)


def test_default_is_one_split_off_cuda():
    q = torch.zeros(1, 1, 100, 8)
    assert T._splits(None, q, 100, 3400, 1, 1) == 1
    assert T._splits(4, q, 100, 3400, 1, 1) == 4


def test_split_count_is_in_the_key_loop_tune_keys():
    """Splitting divides the key trips ``_prune`` fits the pipeline depth to: the forward and dQ
    autotuners key on ``n_split``; dK/dV, parallel over key blocks, does not split."""
    assert "n_split" in T._TUNE_KEYS["fwd"] and "n_split" in T._TUNE_KEYS["dq"]
    assert "n_split" not in T._TUNE_KEYS["dkdv"]
    for kind in ("fwd", "dq", "dkdv"):
        kernel = {"fwd": T._attention_fwd_kernel, "dq": T._attention_bwd_dq_kernel,
                  "dkdv": T._attention_bwd_dkdv_kernel}[kind]
        assert set(T._TUNE_KEYS[kind]) <= set(kernel.arg_names)


# ---------------------------------------------------------------------------------------------
# GEMM count


def _count_gemms(monkeypatch):
    """A Counter of ``_dot`` calls by kernel (the ``_attention_*`` function on the interpreter's
    stack), filled while the interpreted kernels run."""
    counts = Counter()
    dot = T._dot

    def counting(*args, **kwargs):
        frame = sys._getframe(1)
        while not frame.f_code.co_name.startswith("_attention_"):
            frame = frame.f_back
        counts[frame.f_code.co_name] += 1
        return dot(*args, **kwargs)

    monkeypatch.setattr(T, "_dot", counting)
    return counts


@pytest.mark.parametrize("n_split", [1, *SPLITS])
def test_splits_visit_only_the_keys_below_kv_end(monkeypatch, n_split):
    """The split ranges cover each sequence's ``[0, kv_end)`` and nothing past it: 64 keys (4
    blocks), one sequence ending at key 20 (2 blocks: a full one and a tail), one all padding
    (none).  Ranges sized over ``S`` would still give the right numbers (the padding mask hides
    those keys) but visit 8 tiles, not 2: counted as the forward's 2 and dQ's 3 GEMMs a tile."""
    counts = _count_gemms(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, grad = (torch.randn(2, 1, 16, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 1, 64, 16, generator=gen) for _ in range(2))
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[0, :20] = False
    _run(q, k, v, grad, kpm, None, n_split)
    tiles = 2  # cdiv(20, 16) + 0
    assert counts["_attention_fwd_kernel"] == 2 * tiles and counts["_attention_bwd_dq_kernel"] == 3 * tiles


def test_backward_gemms_per_tile_vs_flash_attention_2(monkeypatch):
    """7 GEMMs per (query block, key block) tile in the backward, against FlashAttention-2's 5.

    FA2's backward is one kernel per key block: per tile it computes ``S = Q K^T``, ``dP = dO
    V^T``, ``dV += P^T dO``, ``dK += dS^T Q`` and ``dQ += dS K``, the last with atomic fp32 adds
    into a shared dQ buffer (nondeterministic order).  Here the dK/dV kernel does the first four
    and a separate dQ kernel, looping over keys, recomputes ``S`` and ``dP`` before ``dQ += dS
    K``: 4 + 3 = 7, two extra GEMMs a tile (and a second pass over K/V) bought for a
    deterministic dQ without atomics or an fp32 dQ buffer.  Key splitting adds no GEMM (3 per
    tile in every split).  Counted by wrapping the module's ``_dot`` (every GEMM goes through it)
    and attributing each call to the kernel on the interpreter's stack.
    """
    counts = _count_gemms(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 1, 16, 16, generator=gen) for _ in range(4))  # one 16 x 16 tile
    _run(q, k, v, grad, None, None, 1)
    assert counts == {"_attention_fwd_kernel": 2, "_attention_bwd_dkdv_kernel": 4,
                      "_attention_bwd_dq_kernel": 3}
    assert counts["_attention_bwd_dkdv_kernel"] + counts["_attention_bwd_dq_kernel"] == 7  # FA2: 5

    counts.clear()
    k2, v2 = torch.cat([k, k], 2), torch.cat([v, v], 2)  # two key blocks, one per split
    _run(q, k2, v2, grad, None, None, 2)
    assert counts == {"_attention_fwd_kernel": 2 * 2, "_attention_bwd_dkdv_kernel": 4 * 2,
                      "_attention_bwd_dq_kernel": 3 * 2}
