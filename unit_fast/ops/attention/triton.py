"""Triton flash attention with key-padding masks, an additive bias and dropout.

Forward (``_attention_fwd_kernel``), FlashAttention-2 style (Dao 2023): one program per
``(BLOCK_M queries, batch * head)``; it streams the keys in blocks of ``BLOCK_N`` and keeps a
running max ``m``, a running sum ``l`` and the un-normalised output ``acc`` in fp32
(online softmax), so no ``L x S`` buffer exists.  It writes the output and the log-sum-exp
``lse = m + log(l)`` (fp32, natural log), which is all the backward needs.

Backward: ``delta = rowsum(dO * O)`` (``_attention_bwd_delta_kernel``, fp32), then two kernels,
both recomputing the probabilities from ``lse``:
  ``_attention_bwd_dkdv_kernel``: one program per ``(BLOCK_N keys, batch * head)``, looping over
      the queries, accumulates ``dV = P_drop^T dO`` and ``dK = dS^T Q * scale``;
  ``_attention_bwd_dq_kernel``: one program per ``(BLOCK_M queries, batch * head)``, looping over
      the keys, accumulates ``dQ = dS K * scale``.
Two kernels instead of one with atomic ``dQ`` adds: deterministic, and no fp32 ``dQ`` buffer;
the price is 7 GEMMs per (query block, key block) tile instead of FlashAttention-2's 5 (both
kernels recompute ``S = Q K^T`` and ``dP = dO V^T``).

Key splitting (flash-decoding).  Where the row-block grid ``cdiv(L, BLOCK_M) * B * H`` is too
small to fill the GPU (decoder cross-attention: 100 queries over ~3,400 keys), the forward and dQ
kernels take a third grid axis of ``n_split`` key ranges (``key_splits``, ``_split_range``).
Each forward program then writes fp32 partials (its range's lse and normalised output), merged
by ``_attention_fwd_combine_kernel``; each dQ program writes an fp32 partial dQ, summed in split
order by ``_attention_bwd_dq_reduce_kernel``.  The dropout mask does not depend on the split
(its Philox counter is the absolute (query, key) position).

Loops and masks.  The key loops (forward, dQ) end at ``kv_end``: ``S``, or with a key-padding
mask (``(B, S)``, nonzero = padding) one past the last non-padding key of the sequence
(computed on the device), so trailing padding costs nothing.  They run in two parts: the full
blocks below ``kv_end`` with no bounds masks and no data-dependent branch (so the compiler can
pipeline the K/V loads across iterations), then the one partial block, if any, with masks.
Padding inside ``[0, kv_end)`` sets those keys' scores to ``-inf``.  The dK/dV kernel's query
loop is split the same way at the last full query block; a key block of padding only is
skipped by its program as a whole.  The bias is any float tensor broadcast to ``(B, H, L, S)``
by strides (0 where broadcast), so a 2-D ``(L, S)`` mask costs ``L x S``, never
``B x H x L x S``.

Dropout.  Keep decisions come from Philox-4x32-10 (``tl.random.philox``, key = ``seed``), so the
backward regenerates the forward's mask exactly, with no mask stored.  One call yields four
32-bit outputs and each is used: the weight ``(query m, key n)`` of head ``bh = b * H + h``
takes output ``n % 4`` of the call with counter ``(n // 4, m, bh, 0)``, i.e. a quarter of a
Philox call per weight (``_keep_mask`` draws a ``(BLOCK_M, BLOCK_N // 4)`` tile and
interleaves the four outputs along the keys).  ``keep = u >= p`` for ``u`` uniform in [0, 1)
(``tl.random.uint_to_uniform_float``), the keep probability of ``torch.nn.functional.dropout``.
``attention_dropout_mask_triton`` writes the same mask out, for tests.

Autotuning is keyed on the head dims, dtype, masks and power-of-two buckets of ``L`` and ``S``
(and the key-loop kernels on their split count; see ``_TUNE_KEYS``), with the candidate tiles
pruned to the bucket (``_prune``).

Precision: scores, softmax statistics and accumulators are fp32; the two matmul operands are
in the input dtype (``P`` is cast to V's dtype for ``P V``), fp32 inputs use IEEE fp32 dots
(TF32 would miss fp32's error budget).  Scores are scaled by ``scale * log2(e)`` and
exponentiated with ``exp2``.  A row whose keys are all masked keeps ``l = 0``: it gets output 0
and ``lse = -inf``, and the backward gives it zero gradients.
"""

import functools

import torch
import triton
import triton.language as tl

from unit_fast.ops.attention.rows import _query_rows
from unit_fast.ops.attention.split_kv import (
    _attention_bwd_dq_reduce_kernel,
    _attention_fwd_combine_kernel,
    _split_range,
    key_splits,
)

LOG2E = 1.4426950408889634
PHILOX_KEYS_PER_CALL = 4  # keys whose keep decisions share one Philox call (its four outputs)


@triton.jit
def _keep_mask(seed, offs_m, start_n, bh, dropout_p, BLOCK_N: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` bool: True where the weight ``(query m, key start_n + j)`` of head
    ``bh`` survives dropout.  Counter-based, so any program can regenerate any tile; one Philox
    call per 4 keys (``start_n`` is a multiple of ``BLOCK_N``, itself a multiple of 4, so a
    group of 4 never straddles two tiles)."""
    tl.static_assert(BLOCK_N % 4 == 0, "BLOCK_N must be a multiple of 4 (four keys per Philox call)")
    offs_g = start_n // 4 + tl.arange(0, BLOCK_N // 4)  # key groups
    c0 = (offs_g[None, :] + 0 * offs_m[:, None]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 4)
    c1 = (offs_m[:, None] + 0 * offs_g[None, :]).to(tl.uint32)
    c2 = c0 * 0 + bh.to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, c2, c0 * 0)
    # Compare on the quarter tiles and interleave int8 flags (a quarter of the bytes of the
    # uint32 outputs to move into the score layout).  interleave(interleave(a, c),
    # interleave(b, d)) puts a, b, c, d at keys 4g, 4g + 1, 4g + 2, 4g + 3.
    k0 = (tl.random.uint_to_uniform_float(r0) >= dropout_p).to(tl.int8)
    k1 = (tl.random.uint_to_uniform_float(r1) >= dropout_p).to(tl.int8)
    k2 = (tl.random.uint_to_uniform_float(r2) >= dropout_p).to(tl.int8)
    k3 = (tl.random.uint_to_uniform_float(r3) >= dropout_p).to(tl.int8)
    return tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3)) != 0  # (BLOCK_M, BLOCK_N)


DOT_NATIVE, DOT_IEEE, DOT_UPCAST = 0, 1, 2


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation.  ``DOT_IEEE`` for fp32 inputs (TF32 would miss fp32's
    error budget); ``DOT_UPCAST`` under the interpreter for bf16 inputs, whose bf16 ``tl.dot``
    returns garbage there (triton 3.8) -- exact, since a bf16 x bf16 product fits in fp32."""
    if DOT == 1:
        r = tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _scores(q, k, bias_ptrs, bias_mask, valid_n, qk_scale, HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr,
            DOT: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` fp32 scores in log2 units: ``(q k^T * scale + bias) * log2(e)``,
    and with ``MASK_N`` ``-inf`` where ``valid_n`` is False."""
    s = _dot(q, tl.trans(k), DOT)
    s = s * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptrs, mask=bias_mask, other=0.0)
        s = s + bias.to(tl.float32) * 1.4426950408889634
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))
    return s


@triton.jit
def _valid_keys(kpm_base, offs_n, kv_end, HAS_KPM: tl.constexpr, EVEN_N: tl.constexpr):
    """``(BLOCK_N,)`` bool: key below ``kv_end`` and not padding.  ``EVEN_N``: the block lies
    below ``kv_end`` (no bounds test, an unmasked padding load)."""
    if EVEN_N:
        valid = tl.full(offs_n.shape, 1, tl.int1)
        if HAS_KPM:
            valid = tl.load(kpm_base + offs_n) == 0
    else:
        valid = offs_n < kv_end
        if HAS_KPM:
            valid = valid & (tl.load(kpm_base + offs_n, mask=valid, other=1) == 0)
    return valid


@triton.jit
def _key_block_masks(kpm_base, start_n, kv_end, m_in, D, DV, HAS_KPM: tl.constexpr, EVEN_N: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Offsets and load masks of the key block at ``start_n`` (forward and dQ): ``(offs_n,
    offs_d, offs_dv, valid_n, k_mask, v_mask, bias_mask)``; a full block (``EVEN_N``) without a
    padding mask gets no key mask at all."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_n = _valid_keys(kpm_base, offs_n, kv_end, HAS_KPM, EVEN_N)
    if HAS_KPM or not EVEN_N:
        k_mask = valid_n[:, None] & (offs_d[None, :] < D)
        v_mask = valid_n[:, None] & (offs_dv[None, :] < DV)
        bias_mask = m_in[:, None] & valid_n[None, :]
    else:
        k_mask = offs_d[None, :] < D
        v_mask = offs_dv[None, :] < DV
        bias_mask = m_in[:, None]
    return offs_n, offs_d, offs_dv, valid_n, k_mask, v_mask, bias_mask


@triton.jit
def _fwd_block(acc, l_i, m_i, q, offs_m, m_in, start_n, kv_end, k_base, v_base, bias_base, kpm_base,
               stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l, stride_bias_s,
               D, DV, qk_scale, dropout_p, seed, bh,
               HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
               EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block of the forward's online softmax; ``EVEN_N``: a full block below ``kv_end``."""
    offs_n, offs_d, offs_dv, valid_n, k_mask, v_mask, bias_mask = _key_block_masks(
        kpm_base, start_n, kv_end, m_in, D, DV, HAS_KPM, EVEN_N, BLOCK_N, BLOCK_D, BLOCK_DV)
    MASK_N: tl.constexpr = HAS_KPM or not EVEN_N
    k = tl.load(k_base + offs_n[:, None] * stride_k_s + offs_d[None, :] * stride_k_d, mask=k_mask, other=0.0)
    bias_ptrs = bias_base + offs_m[:, None] * stride_bias_l + offs_n[None, :] * stride_bias_s
    s = _scores(q, k, bias_ptrs, bias_mask, valid_n, qk_scale, HAS_BIAS, MASK_N, DOT)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing allowed so far has m = -inf: shift by 0 instead (exp2(-inf) = 0,
    # where -inf - -inf would be NaN).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the normaliser counts dropped weights too
    if HAS_DROPOUT:
        p = tl.where(_keep_mask(seed, offs_m, start_n, bh, dropout_p, BLOCK_N), p, 0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_v_s + offs_dv[None, :] * stride_v_d, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Bias_ptr, KPM_ptr, KVEnd_ptr, Out_ptr, LSE_ptr, PartO_ptr, PartLSE_ptr,
    stride_q_b, stride_q_h, stride_q_l, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_s,
    stride_kpm_b,
    stride_o_b, stride_o_h, stride_o_l, stride_o_d,
    H, L, S, D, DV, qk_scale, dropout_p, seed, bucket_l, bucket_s, n_split,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per ``(BLOCK_M queries, batch * head[, key split])``.  Without ``SPLIT`` it
    writes ``Out`` and ``LSE``; with ``SPLIT`` (grid axis 2 = ``n_split`` key ranges,
    ``_split_range``) it writes its range's fp32 partials to ``PartO`` ``(n_split, B * H, L, Dv)``
    (normalised by the range's own sum) and ``PartLSE`` ``(n_split, B * H, L)`` (log2 units,
    ``-inf`` where the range allows no key), merged by ``_attention_fwd_combine_kernel``."""
    # bucket_l, bucket_s, n_split: read by the autotuner (``_TUNE_KEYS``); n_split also here.
    bh, b, h, offs_m = _query_rows(H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_in = offs_m < L

    q = tl.load(Q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l
                + offs_d[None, :] * stride_q_d, mask=m_in[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K_ptr + b * stride_k_b + h * stride_k_h
    v_base = V_ptr + b * stride_v_b + h * stride_v_h
    bias_base = Bias_ptr + b * stride_bias_b + h * stride_bias_h
    kpm_base = KPM_ptr + b * stride_kpm_b

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)

    kv_end = S
    if HAS_KPM:
        kv_end = tl.load(KVEnd_ptr + b)  # one past the last non-padding key of this sequence
    if SPLIT:
        lo, hi = _split_range(kv_end, n_split, BLOCK_N)
    else:
        lo = 0
        hi = kv_end
    hi_full = (hi // BLOCK_N) * BLOCK_N  # full blocks: no bounds masks
    # Counted in blocks, not keys: with a split's nonzero start, ``range(lo, hi_full, BLOCK_N)``
    # cost the sm_90 build registers (dQ at head dim 96 spilled 4 B; forward 255 registers, now
    # 229), and ``tl.multiple_of(lo, BLOCK_N)`` did not help.
    for blk in range(lo // BLOCK_N, hi_full // BLOCK_N):
        start_n = blk * BLOCK_N
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, offs_m, m_in, start_n, kv_end, k_base, v_base, bias_base,
                                   kpm_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l,
                                   stride_bias_s, D, DV, qk_scale, dropout_p, seed, bh, HAS_BIAS, HAS_KPM,
                                   HAS_DROPOUT, DOT, True, BLOCK_N, BLOCK_D, BLOCK_DV)
    if hi_full < hi:  # the partial last block (only where hi == kv_end)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, offs_m, m_in, hi_full, kv_end, k_base, v_base, bias_base,
                                   kpm_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l,
                                   stride_bias_s, D, DV, qk_scale, dropout_p, seed, bh, HAS_BIAS, HAS_KPM,
                                   HAS_DROPOUT, DOT, False, BLOCK_N, BLOCK_D, BLOCK_DV)

    empty = l_i == 0.0  # every key (of this range) masked: output 0, lse -inf
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    if SPLIT:
        # Partial (split, bh) is the (L[, Dv]) slab at row (split * B * H + bh) * L of a contiguous
        # fp32 buffer: an int64 scalar base plus int32 tile offsets (int64 offsets per element
        # would cost two registers each; at Dv 128 the dQ kernel spilled).
        row0 = (tl.program_id(2) * tl.num_programs(1) + bh).to(tl.int64) * L
        tl.store(PartLSE_ptr + row0 + offs_m, lse2, mask=m_in)
        tl.store(PartO_ptr + row0 * DV + offs_m[:, None] * DV + offs_dv[None, :], out,
                 mask=m_in[:, None] & (offs_dv[None, :] < DV))
    else:
        tl.store(LSE_ptr + bh.to(tl.int64) * L + offs_m, lse2 / 1.4426950408889634, mask=m_in)
        tl.store(Out_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l
                 + offs_dv[None, :] * stride_o_d, out.to(Out_ptr.dtype.element_ty),
                 mask=m_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attention_bwd_delta_kernel(
    Out_ptr, DO_ptr, Delta_ptr,
    stride_o_b, stride_o_h, stride_o_l, stride_o_d,
    stride_do_b, stride_do_h, stride_do_l, stride_do_d,
    H, L, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``delta[bh, m] = sum_d dO[m, d] O[m, d]`` in fp32 (= ``sum_n P dP``, the softmax-backward
    row term), one program per ``(BLOCK_M queries, batch * head)``; ``Delta`` is ``(B, H, L)``
    contiguous."""
    bh, b, h, offs_m = _query_rows(H, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(Out_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_l
                + offs_dv[None, :] * stride_o_d, mask=mask, other=0.0)
    do = tl.load(DO_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l
                 + offs_dv[None, :] * stride_do_d, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta_ptr + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _lse_log2(LSE_ptr, row_base, offs_m, L, EVEN_M: tl.constexpr):
    """``(BLOCK_M,)`` the saved lse in log2 units; ``+inf`` for empty rows (lse = -inf) and rows
    past ``L``, so their recomputed weights ``exp2(s - inf)`` are 0."""
    if EVEN_M:
        lse = tl.load(LSE_ptr + row_base + offs_m)
        r = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    else:
        lse = tl.load(LSE_ptr + row_base + offs_m, mask=offs_m < L, other=0.0)
        r = tl.where((lse == float("-inf")) | (offs_m >= L), float("inf"), lse * 1.4426950408889634)
    return r


@triton.jit
def _bwd_tile(q, k, v, do, lse2, delta, offs_m, start_n, valid_n, bias_ptrs, bias_mask, qk_scale, seed, bh,
              dropout_p, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_N: tl.constexpr,
              DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` tile of the backward, shared by both backward kernels:
    ``(P_drop, dS)`` with ``P`` recomputed from the lse, ``P_drop`` the weights after dropout
    (for ``dV = P_drop^T dO``) and ``dS = P * (dP - delta)``, ``dP`` the gradient wrt the
    dropped-out weights mapped back through the dropout (for ``dQ = dS K``, ``dK = dS^T Q``)."""
    s = _scores(q, k, bias_ptrs, bias_mask, valid_n, qk_scale, HAS_BIAS, MASK_N, DOT)
    p = tl.math.exp2(s - lse2[:, None])  # softmax weights
    dp = _dot(do, tl.trans(v), DOT)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, offs_m, start_n, bh, dropout_p, BLOCK_N)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    return p_drop, p * (dp - delta[:, None])


@triton.jit
def _dkdv_block(dk, dv, k, v, start_m, start_n, valid_n, q_base, do_base, bias_base, LSE_ptr, Delta_ptr,
                row_base, stride_q_l, stride_q_d, stride_do_l, stride_do_d, stride_bias_l, stride_bias_s,
                L, D, DV, qk_scale, dropout_p, seed, bh,
                HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr, EVEN_M: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One query block of the dK/dV accumulation; ``EVEN_M``: a full block below ``L``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if EVEN_M:
        q_mask = offs_d[None, :] < D
        do_mask = offs_dv[None, :] < DV
        bias_mask = valid_n[None, :]
        delta = tl.load(Delta_ptr + row_base + offs_m)
    else:
        m_in = offs_m < L
        q_mask = m_in[:, None] & (offs_d[None, :] < D)
        do_mask = m_in[:, None] & (offs_dv[None, :] < DV)
        bias_mask = m_in[:, None] & valid_n[None, :]
        delta = tl.load(Delta_ptr + row_base + offs_m, mask=m_in, other=0.0)
    q = tl.load(q_base + offs_m[:, None] * stride_q_l + offs_d[None, :] * stride_q_d, mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_do_l + offs_dv[None, :] * stride_do_d, mask=do_mask,
                 other=0.0)
    lse2 = _lse_log2(LSE_ptr, row_base, offs_m, L, EVEN_M)
    bias_ptrs = bias_base + offs_m[:, None] * stride_bias_l + offs_n[None, :] * stride_bias_s
    # MASK_N=False: an invalid key's scores only reach its own dK/dV row, zeroed at the store.
    p_drop, ds = _bwd_tile(q, k, v, do, lse2, delta, offs_m, start_n, valid_n, bias_ptrs, bias_mask, qk_scale,
                           seed, bh, dropout_p, HAS_BIAS, HAS_DROPOUT, False, DOT, BLOCK_N)
    dv += _dot(tl.trans(p_drop.to(do.dtype)), do, DOT)
    dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, Bias_ptr, KPM_ptr, DO_ptr, LSE_ptr, Delta_ptr, DK_ptr, DV_ptr,
    stride_q_b, stride_q_h, stride_q_l, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_s,
    stride_kpm_b,
    stride_do_b, stride_do_h, stride_do_l, stride_do_d,
    stride_dk_b, stride_dk_h, stride_dk_s, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_s, stride_dv_d,
    H, L, S, D, DV, scale, qk_scale, dropout_p, seed, bucket_l, bucket_s,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid_n = _valid_keys(KPM_ptr + b * stride_kpm_b, offs_n, S, HAS_KPM, False)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # Outside any loop: a program whose keys are all padding does no work.
    if tl.max(valid_n.to(tl.int32), axis=0) > 0:
        k = tl.load(K_ptr + b * stride_k_b + h * stride_k_h + offs_n[:, None] * stride_k_s
                    + offs_d[None, :] * stride_k_d, mask=valid_n[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V_ptr + b * stride_v_b + h * stride_v_h + offs_n[:, None] * stride_v_s
                    + offs_dv[None, :] * stride_v_d, mask=valid_n[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        q_base = Q_ptr + b * stride_q_b + h * stride_q_h
        do_base = DO_ptr + b * stride_do_b + h * stride_do_h
        bias_base = Bias_ptr + b * stride_bias_b + h * stride_bias_h
        row_base = bh.to(tl.int64) * L
        l_full = (L // BLOCK_M) * BLOCK_M  # full query blocks: no bounds masks
        for start_m in range(0, l_full, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, start_m, start_n, valid_n, q_base, do_base, bias_base, LSE_ptr,
                                 Delta_ptr, row_base, stride_q_l, stride_q_d, stride_do_l, stride_do_d,
                                 stride_bias_l, stride_bias_s, L, D, DV, qk_scale, dropout_p, seed, bh,
                                 HAS_BIAS, HAS_DROPOUT, DOT, True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        if l_full < L:  # the partial last query block
            dk, dv = _dkdv_block(dk, dv, k, v, l_full, start_n, valid_n, q_base, do_base, bias_base, LSE_ptr,
                                 Delta_ptr, row_base, stride_q_l, stride_q_d, stride_do_l, stride_do_d,
                                 stride_bias_l, stride_bias_s, L, D, DV, qk_scale, dropout_p, seed, bh,
                                 HAS_BIAS, HAS_DROPOUT, DOT, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    # Padding keys get zero gradients (their rows above hold garbage: scores were not masked).
    dk = tl.where(valid_n[:, None], dk, 0.0)
    dv = tl.where(valid_n[:, None], dv, 0.0)
    n_in = offs_n < S
    tl.store(DK_ptr + b * stride_dk_b + h * stride_dk_h + offs_n[:, None] * stride_dk_s
             + offs_d[None, :] * stride_dk_d, (dk * scale).to(DK_ptr.dtype.element_ty),
             mask=n_in[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ptr + b * stride_dv_b + h * stride_dv_h + offs_n[:, None] * stride_dv_s
             + offs_dv[None, :] * stride_dv_d, dv.to(DV_ptr.dtype.element_ty),
             mask=n_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, offs_m, m_in, start_n, kv_end, k_base, v_base, bias_base, kpm_base,
              stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l, stride_bias_s,
              D, DV, qk_scale, dropout_p, seed, bh,
              HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
              EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block of the dQ accumulation; ``EVEN_N``: a full block below ``kv_end``."""
    offs_n, offs_d, offs_dv, valid_n, k_mask, v_mask, bias_mask = _key_block_masks(
        kpm_base, start_n, kv_end, m_in, D, DV, HAS_KPM, EVEN_N, BLOCK_N, BLOCK_D, BLOCK_DV)
    MASK_N: tl.constexpr = HAS_KPM or not EVEN_N
    k = tl.load(k_base + offs_n[:, None] * stride_k_s + offs_d[None, :] * stride_k_d, mask=k_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_v_s + offs_dv[None, :] * stride_v_d, mask=v_mask, other=0.0)
    bias_ptrs = bias_base + offs_m[:, None] * stride_bias_l + offs_n[None, :] * stride_bias_s
    _, ds = _bwd_tile(q, k, v, do, lse2, delta, offs_m, start_n, valid_n, bias_ptrs, bias_mask, qk_scale,
                      seed, bh, dropout_p, HAS_BIAS, HAS_DROPOUT, MASK_N, DOT, BLOCK_N)
    return dq + _dot(ds.to(k.dtype), k, DOT)


@triton.jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, Bias_ptr, KPM_ptr, KVEnd_ptr, DO_ptr, LSE_ptr, Delta_ptr, DQ_ptr, PartDQ_ptr,
    stride_q_b, stride_q_h, stride_q_l, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_s,
    stride_kpm_b,
    stride_do_b, stride_do_h, stride_do_l, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_l, stride_dq_d,
    H, L, S, D, DV, scale, qk_scale, dropout_p, seed, bucket_l, bucket_s, n_split,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per ``(BLOCK_M queries, batch * head[, key split])``.  Without ``SPLIT`` it
    writes ``dQ``; with ``SPLIT`` (the forward's key ranges, ``_split_range``) its range's
    unscaled fp32 ``dS K`` to ``PartDQ`` ``(n_split, B * H, L, D)``, which
    ``_attention_bwd_dq_reduce_kernel`` sums in split order (no atomics: deterministic)."""
    bh, b, h, offs_m = _query_rows(H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_in = offs_m < L

    q = tl.load(Q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l
                + offs_d[None, :] * stride_q_d, mask=m_in[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l
                 + offs_dv[None, :] * stride_do_d, mask=m_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row_base = bh.to(tl.int64) * L
    lse2 = _lse_log2(LSE_ptr, row_base, offs_m, L, False)
    delta = tl.load(Delta_ptr + row_base + offs_m, mask=m_in, other=0.0)
    k_base = K_ptr + b * stride_k_b + h * stride_k_h
    v_base = V_ptr + b * stride_v_b + h * stride_v_h
    bias_base = Bias_ptr + b * stride_bias_b + h * stride_bias_h
    kpm_base = KPM_ptr + b * stride_kpm_b

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kv_end = S
    if HAS_KPM:
        kv_end = tl.load(KVEnd_ptr + b)
    if SPLIT:
        lo, hi = _split_range(kv_end, n_split, BLOCK_N)
    else:
        lo = 0
        hi = kv_end
    hi_full = (hi // BLOCK_N) * BLOCK_N
    for blk in range(lo // BLOCK_N, hi_full // BLOCK_N):  # in blocks, as the forward's
        start_n = blk * BLOCK_N
        dq = _dq_block(dq, q, do, lse2, delta, offs_m, m_in, start_n, kv_end, k_base, v_base, bias_base,
                       kpm_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l, stride_bias_s,
                       D, DV, qk_scale, dropout_p, seed, bh, HAS_BIAS, HAS_KPM, HAS_DROPOUT, DOT, True,
                       BLOCK_N, BLOCK_D, BLOCK_DV)
    if hi_full < hi:
        dq = _dq_block(dq, q, do, lse2, delta, offs_m, m_in, hi_full, kv_end, k_base, v_base, bias_base,
                       kpm_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d, stride_bias_l, stride_bias_s,
                       D, DV, qk_scale, dropout_p, seed, bh, HAS_BIAS, HAS_KPM, HAS_DROPOUT, DOT, False,
                       BLOCK_N, BLOCK_D, BLOCK_DV)
    d_in = m_in[:, None] & (offs_d[None, :] < D)
    if SPLIT:
        row0 = (tl.program_id(2) * tl.num_programs(1) + bh).to(tl.int64) * L  # as the forward's partials
        tl.store(PartDQ_ptr + row0 * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=d_in)  # empty: 0
    else:
        tl.store(DQ_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_l
                 + offs_d[None, :] * stride_dq_d, (dq * scale).to(DQ_ptr.dtype.element_ty), mask=d_in)


@triton.jit
def _attention_dropout_mask_kernel(Mask_ptr, H, L, S, dropout_p, seed,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(seed, offs_m, pid_n * BLOCK_N, bh, dropout_p, BLOCK_N)
    ptrs = Mask_ptr + (bh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_mode(dtype):
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and _interpreted():
        return DOT_UPCAST
    return DOT_NATIVE


# Tile shapes, warps and pipeline stages are tuned on the device at the first call of each
# (head dims, dtype, masks, dropout, L bucket, S bucket) combination (``triton.autotune``).  The
# sequence lengths enter as power-of-two buckets, not exactly: padded batches change L and S at
# every step, and re-tuning each would cost seconds; but encoder self-attention (thousands of
# keys) and decoder cross-attention (~100 queries) want different tiles.
_TUNE_KEY = ["D", "DV", "HAS_BIAS", "HAS_KPM", "HAS_DROPOUT", "DOT", "bucket_l", "bucket_s"]
# The key-loop kernels also key on their split count: it divides each program's key trips (which
# ``_prune`` fits the pipeline depth to) and multiplies the grid, so the best tile of a split launch
# is not that of the same bucket unsplit.  It costs one tuning run per count seen, and the count is
# a function of (L, S, B, H, SMs): a few values per shape (the batch size's).
_TUNE_KEYS = {"fwd": _TUNE_KEY + ["n_split"], "dq": _TUNE_KEY + ["n_split"], "dkdv": _TUNE_KEY}
SEQ_BUCKET_MIN, SEQ_BUCKET_MAX = 16, 4096


def seq_bucket(n):
    """The autotuning bucket of a sequence length: its next power of two, clamped to
    ``[SEQ_BUCKET_MIN, SEQ_BUCKET_MAX]`` (past 4096 keys the best tile no longer changes, and
    each bucket costs one tuning run)."""
    return min(max(triton.next_power_of_2(max(int(n), 1)), SEQ_BUCKET_MIN), SEQ_BUCKET_MAX)


# The tiles each kernel may use, by head width (``max(D, Dv)`` rounded up to the kernel's
# ``BLOCK_D``: 32, 64, or wider), all at 4 warps.  Measured by compiling every candidate for sm_90
# (ptxas 13.0, Triton 3.8, bf16 with padding mask and dropout; ``benchmarks/kernel_report``,
# whose test re-checks the pruned set): a tile is listed when no stage count of it spills.  Why
# 4 warps: 128 threads at <= 255 registers keep 2 blocks resident per SM (65,536 registers);
# every 8-warp tile compiled needs > 128 registers a thread, so 1 block.  Larger tiles spilled
# (e.g. forward 128 x 64 at width 32: 24 B; 64 x 64 at width 128: 92 B; dK/dV 64 x 128 at width
# 32: 172 B).  Head dim 96 (UniT's decoder, 768 / 8) pads to 128, so it has the wide row.
TILES = {
    "fwd": {32: ((64, 32), (64, 64), (128, 32)), 64: ((64, 32), (64, 64)), 128: ((64, 32),)},
    "dkdv": {32: ((32, 64), (64, 32), (64, 64)), 64: ((64, 32),), 128: ((64, 32),)},
    "dq": {32: ((32, 64), (64, 32), (64, 64)), 64: ((32, 64), (64, 32), (64, 64)), 128: ((64, 32),)},
}
NUM_WARPS = 4
STAGES = {"fwd": (2, 3), "dkdv": (1, 2), "dq": (1, 2)}


def _width_class(named_args):
    """32, 64 or 128: the ``TILES`` row of these head dims (any width past 64 takes the last)."""
    width = max(named_args["D"], named_args["DV"])
    return 32 if width <= 32 else 64 if width <= 64 else 128


def _configs(kind):
    """Candidate ``triton.Config``s of kernel ``kind`` (every width's tiles; ``_prune`` keeps the
    row of the call's head dims).  One 16 x 16 config under the interpreter (numpy cost grows
    with the tile; with a single config the autotuner runs it without benchmarking, so CPU
    tests go through the same launch path as the GPU)."""
    if _interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = sorted({t for row in TILES[kind].values() for t in row})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=NUM_WARPS, num_stages=st)
            for m, n in tiles for st in STAGES[kind]]


def _prune(configs, named_args, kind="fwd", loop="keys", **kwargs):
    """The configs worth benchmarking for these arguments.

    Always: keep the tiles ``TILES[kind]`` lists for the call's head width (if none of
    ``configs`` is listed, e.g. the interpreter's single config, all of them).  With the
    sequence buckets (``named_args["bucket_l"]``, ``["bucket_s"]``, which the launchers pass):
    drop tiles longer than the sequence they tile (``BLOCK_M > bucket_l`` or ``BLOCK_N >
    bucket_s``; if no tile fits both, the smallest tiles), and pipelines deeper than the kernel's
    loop has iterations (``loop`` is ``"keys"`` for the forward and dQ kernels, ``"queries"`` for
    dK/dV; a key loop split ``n_split`` ways has ``1 / n_split`` of the trips): a stage without an
    iteration to prefetch costs shared memory for nothing.  Never returns an empty list."""
    allowed = TILES[kind][_width_class(named_args)]
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in allowed]
    kept = kept or configs
    if "bucket_l" not in named_args:  # a caller asking about head dims only
        return kept
    bucket_l, bucket_s = named_args["bucket_l"], named_args["bucket_s"]
    cap_m = max(bucket_l, min(c.kwargs["BLOCK_M"] for c in kept))
    cap_n = max(bucket_s, min(c.kwargs["BLOCK_N"] for c in kept))
    fit = [c for c in kept if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    if not fit:  # no tile is short in both directions (e.g. 16 x 16 against 32 x 64, 64 x 32)
        smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept)
        fit = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]
    kept = fit
    min_stages = min(c.num_stages for c in kept)

    n_split = max(int(named_args.get("n_split", 1)), 1)

    def trips(c):
        if loop == "keys":
            return bucket_s // (c.kwargs["BLOCK_N"] * n_split)
        return bucket_l // c.kwargs["BLOCK_M"]

    return [c for c in kept if c.num_stages <= max(trips(c), min_stages)]


def _tuned(kernel, kind, loop):
    prune = functools.partial(_prune, kind=kind, loop=loop)
    return triton.autotune(configs=_configs(kind), key=_TUNE_KEYS[kind],
                           prune_configs_by={"early_config_prune": prune})(kernel)


_TUNED = {}


def _launcher(name):
    """The autotuned wrapper of kernel ``name``, built at first use (after ``TRITON_INTERPRET``
    is final) and cached."""
    if name not in _TUNED:
        kernel = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel,
                  "dq": _attention_bwd_dq_kernel}[name]
        _TUNED[name] = _tuned(kernel, name, loop="queries" if name == "dkdv" else "keys")
    return _TUNED[name]


@functools.cache
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count  # host query, cached; no sync


def _splits(n_split, q, L, S, B, H):
    """The split count of a launch: ``n_split`` when given (tests force it in the interpreter),
    else ``key_splits`` on CUDA and 1 elsewhere (the CPU interpreter)."""
    if n_split is not None:
        if int(n_split) < 1:
            raise ValueError(f"attention: n_split must be >= 1, got {n_split}")
        return int(n_split)
    if q.device.type != "cuda" or _interpreted():
        return 1
    return key_splits(L, S, B, H, _num_sms(q.device.index if q.device.index is not None else 0))


def _strides4(t):
    return [t.stride(i) for i in range(4)]


def _masks(bias, kpm, q, B, H, L, S):
    """Broadcast bias strides, kpm as uint8 and the per-sequence key-loop end (device ops only)."""
    if bias is None:
        bias_arg, bias_strides = q, [0, 0, 0, 0]
    else:
        bias_arg = bias.expand(B, H, L, S)
        bias_strides = _strides4(bias_arg)
    if kpm is None:
        kpm_arg, kv_end, stride_kpm = q, q, 0
    else:
        kpm_arg = kpm.to(torch.uint8) if kpm.dtype == torch.bool else kpm
        idx = torch.arange(1, S + 1, device=kpm.device, dtype=torch.int32)
        kv_end = torch.where(kpm_arg == 0, idx, 0).amax(dim=1).to(torch.int32)  # (B,)
        if kpm_arg.stride(1) != 1:
            kpm_arg = kpm_arg.contiguous()
        stride_kpm = kpm_arg.stride(0)
    return bias_arg, bias_strides, kpm_arg, kv_end, stride_kpm


def empty_like_layout(t, shape, dtype=None):
    """An empty tensor of ``shape`` (same rank as ``t``) whose dims are laid out in ``t``'s
    stride order: a sequence-first ``(B, H, L, D)`` view gets a sequence-first buffer, so the
    caller's ``view(L, B, H * D)`` needs no copy."""
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    buf = torch.empty([shape[i] for i in order], dtype=dtype or t.dtype, device=t.device)
    inverse = [order.index(i) for i in range(t.dim())]
    return buf.permute(inverse)


def _row_block(block_d):
    """Rows a program of the memory-bound kernels (delta, combine, dQ reduce) takes: about 4096
    elements of each operand (16 fp32 registers a thread at 4 warps)."""
    return min(128, max(16, 4096 // block_d))


def attention_fwd_triton(q, k, v, bias, kpm, dropout_p, scale, seed, n_split=None):
    """``(out (B, H, L, Dv) in q's layout, lse (B, H, L) fp32)``; see the module docstring.
    ``n_split``: key ranges per query block (default ``key_splits`` on CUDA, 1 on CPU)."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    out = empty_like_layout(q, (B, H, L, DV))
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    if S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    bias_arg, bias_strides, kpm_arg, kv_end, stride_kpm = _masks(bias, kpm, q, B, H, L, S)
    # Key splitting (issue 18, section 2): the grid has cdiv(L, BLOCK_M) * B * H programs, so the
    # decoder's 100 queries give 2 * B * H (32 at B = 2 on 132 SMs), each streaming all ~3,400
    # keys.  Flash-decoding (Dao et al. 2023) / FlashAttention-2's split-KV path add a grid axis
    # of key ranges: each program runs the same online softmax over its range and writes an fp32
    # (lse, normalised out) partial; a combine kernel weighs them by exp(lse_i - lse).  Taken from
    # there: the partial format, the combine and the "one wave of programs" split count
    # (``key_splits``).  Different: ranges are whole key blocks of each sequence's own kv_end,
    # and dQ splits the same way (FA2 splits only its inference forward).  With one split the
    # single kernel runs as before: no workspace, no combine.
    n_split = _splits(n_split, q, L, S, B, H)
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    split = n_split > 1
    part_o = part_lse = q  # unused unless split
    if split:
        part_o = torch.empty((n_split, B * H, L, DV), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_split, B * H, L), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H, n_split)  # noqa: E731
    _launcher("fwd")[grid](
        q, k, v, bias_arg, kpm_arg, kv_end, out, lse, part_o, part_lse,
        *_strides4(q), *_strides4(k), *_strides4(v), *bias_strides, stride_kpm, *_strides4(out),
        H, L, S, D, DV, scale * LOG2E, dropout_p, seed, seq_bucket(L), seq_bucket(S), n_split,
        HAS_BIAS=bias is not None, HAS_KPM=kpm is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT=_dot_mode(q.dtype), SPLIT=split, BLOCK_D=block_d, BLOCK_DV=block_dv,
    )
    if split:
        block_m = _row_block(block_dv)
        _attention_fwd_combine_kernel[(triton.cdiv(L, block_m), B * H)](
            part_o, part_lse, out, lse, *_strides4(out), H, L, DV, n_split,
            BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=4)
    return out, lse


def attention_bwd_delta_triton(grad_out, out):
    """``delta = rowsum(dO * O)`` ``(B, H, L)`` fp32 contiguous, for ``grad_out`` and ``out``
    ``(B, H, L, Dv)`` of any strides (the softmax-backward row term ``sum_j P_ij dP_ij``)."""
    B, H, L, DV = out.shape
    delta = torch.empty((B, H, L), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    block_dv = max(16, triton.next_power_of_2(DV))
    block_m = _row_block(block_dv)  # memory-bound: no tuning
    _attention_bwd_delta_kernel[(triton.cdiv(L, block_m), B * H)](
        out, grad_out, delta, *_strides4(out), *_strides4(grad_out), H, L, DV,
        BLOCK_M=block_m, BLOCK_DV=block_dv, num_warps=4)
    return delta


def attention_bwd_triton(grad_out, q, k, v, out, lse, bias, kpm, dropout_p, scale, seed, n_split=None):
    """``(dq, dk, dv)``, each in the layout of its input.  ``n_split``: key ranges of the dQ
    kernel's key loop (default as the forward's; dK/dV already has a program per key block)."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    dq, dk, dv = empty_like_layout(q, q.shape), empty_like_layout(k, k.shape), empty_like_layout(v, v.shape)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = attention_bwd_delta_triton(grad_out, out)  # (B, H, L) fp32
    bias_arg, bias_strides, kpm_arg, kv_end, stride_kpm = _masks(bias, kpm, q, B, H, L, S)
    consts = dict(HAS_BIAS=bias is not None, HAS_KPM=kpm is not None, HAS_DROPOUT=dropout_p > 0.0,
                  DOT=_dot_mode(q.dtype),
                  BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)))
    buckets = (seq_bucket(L), seq_bucket(S))
    common = (*_strides4(q), *_strides4(k), *_strides4(v), *bias_strides, stride_kpm, *_strides4(grad_out))
    _launcher("dkdv")[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)](
        q, k, v, bias_arg, kpm_arg, grad_out, lse, delta, dk, dv,
        *common, *_strides4(dk), *_strides4(dv),
        H, L, S, D, DV, scale, scale * LOG2E, dropout_p, seed, *buckets, **consts,
    )
    n_split = _splits(n_split, q, L, S, B, H)
    split = n_split > 1
    # fp32 partial dQ per split, summed in split order by a second kernel: deterministic, unlike
    # FA2's atomic dQ adds.
    part_dq = torch.empty((n_split, B * H, L, D), dtype=torch.float32, device=q.device) if split else q
    _launcher("dq")[lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H, n_split)](
        q, k, v, bias_arg, kpm_arg, kv_end, grad_out, lse, delta, dq, part_dq,
        *common, *_strides4(dq),
        H, L, S, D, DV, scale, scale * LOG2E, dropout_p, seed, *buckets, n_split, **consts, SPLIT=split,
    )
    if split:
        block_m = _row_block(consts["BLOCK_D"])
        _attention_bwd_dq_reduce_kernel[(triton.cdiv(L, block_m), B * H)](
            part_dq, dq, *_strides4(dq), H, L, D, scale, n_split,
            BLOCK_M=block_m, BLOCK_D=consts["BLOCK_D"], num_warps=4)
    return dq, dk, dv


def attention_dropout_mask_triton(B, H, L, S, dropout_p, seed, device):
    """``(B, H, L, S)`` bool, True = kept: the dropout mask the kernels use for ``seed``."""
    mask = torch.empty((B, H, L, S), dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(L, 16), triton.cdiv(S, 16), B * H)
        _attention_dropout_mask_kernel[grid](mask, H, L, S, dropout_p, seed, BLOCK_M=16, BLOCK_N=16)
    return mask.bool()
