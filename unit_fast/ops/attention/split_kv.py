"""Key splitting (flash-decoding) for the attention kernels of ``triton.py``: the split count
``key_splits``, each split's key range ``_split_range`` (called inside the forward and dQ
kernels) and the two kernels that merge the splits' fp32 partials -- the forward's
``_attention_fwd_combine_kernel`` and dQ's ``_attention_bwd_dq_reduce_kernel``.  See the
"Key splitting" paragraph of ``triton.py``'s docstring for the layout of the partials.
"""

import triton
import triton.language as tl

from unit_fast.ops.attention.rows import _query_rows

# Key splitting (``key_splits``): the tile it assumes (the launcher picks the split count before
# the autotuner picks the tile): BLOCK_M 64, the forward's and dQ's usual row tile at UniT's head
# dims, and BLOCK_N 64, the widest key tile, so "2 blocks a split" holds for every candidate.
SPLIT_BLOCK_M, SPLIT_BLOCK_N = 64, 64
MAX_SPLITS = 16  # partials cost n_split x (B H L Dv) fp32 writes and reads; flash-decoding caps near here
MIN_SPLIT_BLOCKS = 2  # key blocks a split at least: fewer, and the partial's write-out dominates


def key_splits(L, S, B, H, num_sms, block_m=SPLIT_BLOCK_M, block_n=SPLIT_BLOCK_N):
    """Key ranges to split each query block's key loop into (forward and dQ), for ``num_sms``
    streaming multiprocessors.  1 when ``cdiv(L, block_m) * B * H`` row-block programs already
    fill the SMs (encoder self-attention) or the keys give fewer than two splits of
    ``MIN_SPLIT_BLOCKS`` blocks; otherwise the fewest splits that reach ``num_sms`` programs (one
    wave, and less than two since the unsplit grid is under one), at most ``MAX_SPLITS`` and at
    least ``MIN_SPLIT_BLOCKS`` key blocks a split.  Pure Python: no device query."""
    programs = triton.cdiv(L, block_m) * B * H
    if programs == 0 or programs >= num_sms:
        return 1
    by_keys = triton.cdiv(S, block_n) // MIN_SPLIT_BLOCKS
    return max(1, min(triton.cdiv(num_sms, programs), by_keys, MAX_SPLITS))


@triton.jit
def _split_range(kv_end, n_split, BLOCK_N: tl.constexpr):
    """``[lo, hi)``: the keys of this program's split (``program_id(2)``) of ``[0, kv_end)``.
    Whole ``BLOCK_N`` blocks, ``cdiv(blocks, n_split)`` a split, so only the last non-empty split
    ends inside a block, at ``kv_end`` (its masked tail); a split past the last block gets
    ``lo == hi``, no iteration, hence the neutral partial ``(lse -inf, out 0)``.  Sized by the
    sequence's own ``kv_end``, so a padded sequence spreads its keys over every split too."""
    per = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), n_split) * BLOCK_N  # keys a split, a multiple of BLOCK_N
    lo = tl.program_id(2) * per
    hi = tl.maximum(tl.minimum(lo + per, kv_end), lo)  # lo >= kv_end: empty, and no partial block
    return lo, hi


@triton.jit
def _attention_fwd_combine_kernel(
    PartO_ptr, PartLSE_ptr, Out_ptr, LSE_ptr,
    stride_o_b, stride_o_h, stride_o_l, stride_o_d,
    H, L, DV, n_split,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merges the forward's ``n_split`` partials, one program per ``(BLOCK_M queries, batch *
    head)``: with ``lse_i`` (log2) and ``o_i`` (normalised) of split ``i``, ``lse = log2 sum_i
    2^lse_i`` and ``out = sum_i 2^(lse_i - lse) o_i`` (flash-decoding's reduction), as an online
    max over the splits in index order (deterministic).  Neutral partials weigh 0; a row whose
    splits are all neutral gets ``out = 0`` and ``lse = -inf``, as the single-kernel path."""
    bh, b, h, offs_m = _query_rows(H, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_in = offs_m < L
    mask = m_in[:, None] & (offs_dv[None, :] < DV)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for i in range(0, n_split):
        row0 = (i * tl.num_programs(1) + bh).to(tl.int64) * L  # as the forward's partial stores
        lse_i = tl.load(PartLSE_ptr + row0 + offs_m, mask=m_in, other=float("-inf"))
        o_i = tl.load(PartO_ptr + row0 * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_i)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _fwd_block: no -inf - -inf
        alpha = tl.math.exp2(m_i - m_shift)
        w = tl.math.exp2(lse_i - m_shift)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_i
        m_i = m_new
    empty = l_i == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(LSE_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=m_in)
    tl.store(Out_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l
             + offs_dv[None, :] * stride_o_d, out.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_dq_reduce_kernel(
    PartDQ_ptr, DQ_ptr,
    stride_dq_b, stride_dq_h, stride_dq_l, stride_dq_d,
    H, L, D, scale, n_split,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dQ = scale * sum_i PartDQ[i]`` over the ``n_split`` partials in index order (fp32, a
    fixed order: deterministic), one program per ``(BLOCK_M queries, batch * head)``."""
    bh, b, h, offs_m = _query_rows(H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for i in range(0, n_split):
        row0 = (i * tl.num_programs(1) + bh).to(tl.int64) * L
        dq += tl.load(PartDQ_ptr + row0 * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DQ_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_l
             + offs_d[None, :] * stride_dq_d, (dq * scale).to(DQ_ptr.dtype.element_ty), mask=mask)
