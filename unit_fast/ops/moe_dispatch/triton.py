"""Triton kernels of ``moe_dispatch``: grouped GEMMs over expert-sorted slots, no host sync.

Routing (torch, on the device): the ``M = N * k`` slots are sorted by expert (``sort_slots``:
stable, dropped slots last, as segment ``E``), and a tile table is built from the segment
sizes: tile ``t`` covers rows ``[row0, row_end)`` (at most ``BLOCK_M``) of one segment.  The
number of tiles depends on the data, so the grid is its upper bound ``cdiv(M, BLOCK_M) + E + 1``
and the surplus programs find an empty row range and store nothing: nothing is read on the
host.  Tiles of segment ``E`` (the dropped slots) do no matmul and store zeros, so every output
buffer is written in full without a memset.

Forward, two grouped GEMMs, grid ``(tiles, column blocks)``:
  ``_moe_dispatch_fwd_fc1_kernel``: ``H = X[tok] @ W1[e] + b1[e]``, rows of ``X`` gathered by
      token inside the kernel; relu applied here (``H`` = the activation), gelu not (``H`` = the
      pre-activation, which gelu's backward needs; readers apply gelu on load);
  ``_moe_dispatch_fwd_fc2_kernel``: ``Y_slot[slot] = gate[slot] * (act(H) @ W2[e] + b2[e])``,
      float32, stored at the slot's own row (``n * k + j``) -- a deterministic scatter: each row
      is written once.  ``y = Y_slot.view(N, k, d).sum(1)`` (torch) then adds the ``k`` slots
      in a fixed order.  No atomics anywhere.
Backward, all grouped GEMMs:
  ``_moe_dispatch_bwd_dh_kernel``: ``G = dY[tok] @ W2[e]^T``; per slot and column block the
      gate gradient's partial ``<G, act(H)>`` (plus ``<dY, b2[e]>`` in block 0), written to a
      ``(column blocks, M)`` float32 buffer summed by torch; ``dH = gate * G * act'(H)``;
  ``_moe_dispatch_bwd_dw_kernel`` (twice): per expert and output tile, a loop over the
      expert's segment: ``dW2[e] = act(H)^T (gate dY[tok])`` with ``db2[e]`` its column sums,
      and ``dW1[e] = X[tok]^T dH`` with ``db1[e]``; an expert with no rows gets zeros;
  ``_moe_dispatch_bwd_dx_kernel``: ``dX_slot[slot] = dH @ W1[e]^T`` (float32, slot rows),
      ``dx = dX_slot.view(N, k, d).sum(1)`` (torch).
Every gradient is a Triton kernel; torch only sorts, builds the tile table and adds the ``k``
slot rows (and the gate partials).

Precision: operands in the input dtype, accumulators float32 (``ACC``; float64 for float64
inputs, gradcheck's dtype); fp32 inputs use IEEE fp32 dots (TF32 would miss fp32's error
budget).  ``H`` and ``dH`` are stored in the input dtype (they are the next GEMM's operands),
the per-slot outputs and gradients in the accumulator dtype.  Under the interpreter bf16
operands are upcast to float32 before ``tl.dot`` (triton 3.8's interpreted bf16 dot is wrong;
see ``ops/attention/triton.py``).

Tiles are fixed, not autotuned (``_config``): no GPU was available to tune them.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from unit_fast.ops.moe_dispatch.grouped import sort_slots

ACT_RELU, ACT_GELU = 0, 1
DOT_NATIVE, DOT_IEEE, DOT_UPCAST, DOT_FP64 = 0, 1, 2, 3
# tl.constexpr, not plain floats: the GPU compiler refuses a @jit function reading a plain module
# global (NameError; the interpreter allows it, so only an sm_90 compile, benchmarks/kernel_report,
# caught it).
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """``a @ b`` accumulated in float32 (``DOT_IEEE``: exact fp32; ``DOT_UPCAST``: bf16 upcast
    first, exact since a bf16 product fits in fp32), or in float64 (``DOT_FP64``)."""
    if DOT == 1:
        r = tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 3:
        r = tl.dot(a, b, out_dtype=tl.float64)
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _gelu(x):
    """Exact (erf) gelu of an accumulator-dtype tile, as ``F.gelu``."""
    return 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def _gelu_grad(x):
    """``d gelu / dx`` of an accumulator-dtype tile: ``Phi(x) + x phi(x)``."""
    return 0.5 * (1.0 + tl.math.erf(x * SQRT1_2)) + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _tile_rows(TileSeg_ptr, TileRow_ptr, TileEnd_ptr, BLOCK_M: tl.constexpr):
    """``(segment, rows [BLOCK_M], row_mask)`` of this program's tile (``program_id(0)``).
    Surplus programs have ``row0 == row_end``: an all-false mask."""
    pid = tl.program_id(0)
    seg = tl.load(TileSeg_ptr + pid)
    row0 = tl.load(TileRow_ptr + pid)
    row_end = tl.load(TileEnd_ptr + pid)
    rows = row0 + tl.arange(0, BLOCK_M)
    return seg, rows, rows < row_end


@triton.jit
def _rows_matmul(A_ptr, a_rows, row_mask, stride_a_row, stride_a_col,
                 B_ptr, stride_b_row, stride_b_col, cols, col_mask, K,
                 A_GELU: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` ``ACC`` ``act(A[a_rows, :K]) @ B[:K, cols]``: ``a_rows`` are any
    row indices (sorted rows, or tokens: a gather); ``A_GELU`` applies gelu to A on load."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    a_base = A_ptr + a_rows.to(tl.int64)[:, None] * stride_a_row  # int64: row * stride may pass 2**31
    b_base = B_ptr + cols.to(tl.int64)[None, :] * stride_b_col
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_base + ks[None, :] * stride_a_col, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if A_GELU:
            a = _gelu(a.to(ACC)).to(A_ptr.dtype.element_ty)
        b = tl.load(b_base + ks.to(tl.int64)[:, None] * stride_b_row,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += _dot(a, b, DOT)
    return acc


@triton.jit
def _moe_dispatch_fwd_fc1_kernel(
    X_ptr, W1_ptr, B1_ptr, Order_ptr, TileSeg_ptr, TileRow_ptr, TileEnd_ptr, H_ptr,
    D, F, K_SLOTS, E,
    stride_x_row, stride_x_col,
    stride_w1_e, stride_w1_row, stride_w1_col,
    stride_b1_e, stride_b1_col,
    stride_h_row,
    ACT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``H[rows, cols] = X[tok] @ W1[e] + b1[e]`` (relu'd for relu) of one tile, ``(BLOCK_M
    sorted rows) x (BLOCK_N of f)``; zeros on the dropped segment."""
    seg, rows, row_mask = _tile_rows(TileSeg_ptr, TileRow_ptr, TileEnd_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    out = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if seg < E:
        e = seg.to(tl.int64)
        tok = tl.load(Order_ptr + rows, mask=row_mask, other=0) // K_SLOTS
        out = _rows_matmul(X_ptr, tok, row_mask, stride_x_row, stride_x_col,
                           W1_ptr + e * stride_w1_e, stride_w1_row, stride_w1_col, cols, col_mask, D,
                           False, DOT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        bias = tl.load(B1_ptr + e * stride_b1_e + cols * stride_b1_col, mask=col_mask, other=0.0)
        out += bias.to(ACC)[None, :]
        if ACT == 0:
            out = tl.maximum(out, 0.0)
    tl.store(H_ptr + rows.to(tl.int64)[:, None] * stride_h_row + cols[None, :],
             out.to(H_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_dispatch_fwd_fc2_kernel(
    H_ptr, W2_ptr, B2_ptr, Gates_ptr, Order_ptr, TileSeg_ptr, TileRow_ptr, TileEnd_ptr, YSlot_ptr,
    D, F, K_SLOTS, E,
    stride_h_row,
    stride_w2_e, stride_w2_row, stride_w2_col,
    stride_b2_e, stride_b2_col,
    stride_g_row, stride_g_col,
    stride_ys_row,
    ACT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``Y_slot[slot, cols] = gate[slot] * (act(H[rows]) @ W2[e] + b2[e])`` of one tile,
    ``(BLOCK_M sorted rows) x (BLOCK_N of d)``, stored at the slots' rows; zeros on the dropped
    segment."""
    seg, rows, row_mask = _tile_rows(TileSeg_ptr, TileRow_ptr, TileEnd_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    slot = tl.load(Order_ptr + rows, mask=row_mask, other=0)
    out = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if seg < E:
        e = seg.to(tl.int64)
        out = _rows_matmul(H_ptr, rows, row_mask, stride_h_row, 1,
                           W2_ptr + e * stride_w2_e, stride_w2_row, stride_w2_col, cols, col_mask, F,
                           ACT == 1, DOT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        bias = tl.load(B2_ptr + e * stride_b2_e + cols * stride_b2_col, mask=col_mask, other=0.0)
        gate = tl.load(Gates_ptr + (slot // K_SLOTS) * stride_g_row + (slot % K_SLOTS) * stride_g_col,
                       mask=row_mask, other=0.0)
        out = (out + bias.to(ACC)[None, :]) * gate.to(ACC)[:, None]
    tl.store(YSlot_ptr + slot[:, None] * stride_ys_row + cols[None, :], out,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_dispatch_bwd_dh_kernel(
    DY_ptr, W2_ptr, B2_ptr, H_ptr, Gates_ptr, Order_ptr, TileSeg_ptr, TileRow_ptr, TileEnd_ptr,
    DH_ptr, DGP_ptr,
    D, F, M, K_SLOTS, E,
    stride_dy_row, stride_dy_col,
    stride_w2_e, stride_w2_row, stride_w2_col,
    stride_b2_e, stride_b2_col,
    stride_h_row,
    stride_g_row, stride_g_col,
    stride_dh_row,
    ACT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile, ``(BLOCK_M sorted rows) x (BLOCK_N of f)``, of the hidden layer's gradient:
    ``G = dY[tok] @ W2[e]^T``, ``dH = gate * G * act'(H)`` (stored), and the gate gradient's
    partial ``DGP[pid_n, slot] = <G, act(H)>_cols (+ <dY[tok], b2[e]> in column block 0)``,
    since ``d y / d gate = act(H) @ W2[e] + b2[e]``.  Zeros on the dropped segment."""
    seg, rows, row_mask = _tile_rows(TileSeg_ptr, TileRow_ptr, TileEnd_ptr, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    mask = row_mask[:, None] & col_mask[None, :]
    slot = tl.load(Order_ptr + rows, mask=row_mask, other=0)
    dh = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    dg = tl.zeros((BLOCK_M,), ACC)
    if seg < E:
        e = seg.to(tl.int64)
        tok = slot // K_SLOTS
        # W2[e]^T as a (d, f) operand: swap W2's strides.
        g_mat = _rows_matmul(DY_ptr, tok, row_mask, stride_dy_row, stride_dy_col,
                             W2_ptr + e * stride_w2_e, stride_w2_col, stride_w2_row, cols, col_mask, D,
                             False, DOT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        h = tl.load(H_ptr + rows.to(tl.int64)[:, None] * stride_h_row + cols[None, :], mask=mask,
                    other=0.0).to(ACC)
        if ACT == 1:
            a = _gelu(h).to(H_ptr.dtype.element_ty).to(ACC)  # the A the forward multiplied
            act_grad = _gelu_grad(h)
        else:
            a = h  # H holds relu's output: > 0 exactly where relu passed the gradient
            act_grad = tl.where(h > 0, 1.0, 0.0)
        dg = tl.sum(g_mat * a, axis=1)
        if pid_n == 0:  # <dY[tok], b2[e]>, once per slot
            dy_base = DY_ptr + tok.to(tl.int64)[:, None] * stride_dy_row
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < D
                dy = tl.load(dy_base + ks[None, :] * stride_dy_col, mask=row_mask[:, None] & k_mask[None, :],
                             other=0.0)
                b2 = tl.load(B2_ptr + e * stride_b2_e + ks * stride_b2_col, mask=k_mask, other=0.0)
                dg += tl.sum(dy.to(ACC) * b2.to(ACC)[None, :], axis=1)
        gate = tl.load(Gates_ptr + (slot // K_SLOTS) * stride_g_row + (slot % K_SLOTS) * stride_g_col,
                       mask=row_mask, other=0.0)
        dh = g_mat * gate.to(ACC)[:, None] * act_grad
    tl.store(DH_ptr + rows.to(tl.int64)[:, None] * stride_dh_row + cols[None, :],
             dh.to(DH_ptr.dtype.element_ty), mask=mask)
    tl.store(DGP_ptr + pid_n.to(tl.int64) * M + slot, dg, mask=row_mask)


@triton.jit
def _moe_dispatch_bwd_dx_kernel(
    DH_ptr, W1_ptr, Order_ptr, TileSeg_ptr, TileRow_ptr, TileEnd_ptr, DXSlot_ptr,
    D, F, E,
    stride_dh_row,
    stride_w1_e, stride_w1_row, stride_w1_col,
    stride_dxs_row,
    DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dX_slot[slot, cols] = dH[rows] @ W1[e]^T`` of one tile, ``(BLOCK_M sorted rows) x
    (BLOCK_N of d)``, stored at the slots' rows; zeros on the dropped segment."""
    seg, rows, row_mask = _tile_rows(TileSeg_ptr, TileRow_ptr, TileEnd_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    slot = tl.load(Order_ptr + rows, mask=row_mask, other=0)
    out = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if seg < E:
        e = seg.to(tl.int64)
        # W1[e]^T as an (f, d) operand: swap W1's strides.
        out = _rows_matmul(DH_ptr, rows, row_mask, stride_dh_row, 1,
                           W1_ptr + e * stride_w1_e, stride_w1_col, stride_w1_row, cols, col_mask, F,
                           False, DOT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(DXSlot_ptr + slot[:, None] * stride_dxs_row + cols[None, :], out,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_dispatch_bwd_dw_kernel(
    P_ptr, Q_ptr, Gates_ptr, Order_ptr, SegStart_ptr, SegEnd_ptr, DW_ptr, DB_ptr,
    P_COLS, Q_COLS, K_SLOTS,
    stride_p_row, stride_p_col,
    stride_q_row, stride_q_col,
    stride_g_row, stride_g_col,
    stride_dw_e, stride_dw_row, stride_dw_col,
    stride_db_e, stride_db_col,
    P_GATHER: tl.constexpr, P_GELU: tl.constexpr, Q_GATHER: tl.constexpr, Q_GATE: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Weight gradient of expert ``e = program_id(2)``, one ``(BLOCK_P, BLOCK_Q)`` output tile:
    ``DW[e] = sum_r P_r^T Q_r`` over the rows ``r`` of ``e``'s segment (a loop whose length is
    read on the device), and ``DB[e] = sum_r Q_r`` (by the programs of P block 0).

    ``P_r`` / ``Q_r`` is row ``r`` of a sorted-row tensor, or of a token tensor gathered by
    ``tok = order[r] // k`` (``*_GATHER``); ``P_GELU`` applies gelu to P on load, ``Q_GATE``
    scales Q by the slot's gate.  Used as ``dW2 = act(H)^T (gate dY[tok])`` and
    ``dW1 = X[tok]^T dH``.  An expert with no rows stores zeros."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    pcols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qcols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = pcols < P_COLS
    q_mask = qcols < Q_COLS
    start = tl.load(SegStart_ptr + e)
    end = tl.load(SegEnd_ptr + e)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), ACC)
    bacc = tl.zeros((BLOCK_Q,), ACC)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < end
        slot = tl.load(Order_ptr + rows, mask=r_mask, other=0)
        tok = slot // K_SLOTS
        prow = tok if P_GATHER else rows
        qrow = tok if Q_GATHER else rows
        p = tl.load(P_ptr + prow.to(tl.int64)[:, None] * stride_p_row + pcols[None, :] * stride_p_col,
                    mask=r_mask[:, None] & p_mask[None, :], other=0.0)
        if P_GELU:
            p = _gelu(p.to(ACC)).to(P_ptr.dtype.element_ty)
        q = tl.load(Q_ptr + qrow.to(tl.int64)[:, None] * stride_q_row + qcols[None, :] * stride_q_col,
                    mask=r_mask[:, None] & q_mask[None, :], other=0.0)
        if Q_GATE:
            gate = tl.load(Gates_ptr + (slot // K_SLOTS) * stride_g_row + (slot % K_SLOTS) * stride_g_col,
                           mask=r_mask, other=0.0)
            q = (q.to(ACC) * gate.to(ACC)[:, None]).to(Q_ptr.dtype.element_ty)
        acc += _dot(tl.trans(p), q, DOT)
        if pid_p == 0:
            bacc += tl.sum(q.to(ACC), axis=0)
    tl.store(DW_ptr + e * stride_dw_e + pcols[:, None] * stride_dw_row + qcols[None, :] * stride_dw_col,
             acc.to(DW_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
    if pid_p == 0:
        tl.store(DB_ptr + e * stride_db_e + qcols * stride_db_col, bacc.to(DB_ptr.dtype.element_ty),
                 mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_mode(dtype):
    if dtype == torch.float64:
        return DOT_FP64
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and _interpreted():
        return DOT_UPCAST
    return DOT_NATIVE


def _acc(dtype):
    """The accumulator: ``(tl dtype, torch dtype)``, float64 for float64 inputs (gradcheck's
    test dtype), else float32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _config():
    """Tile sizes and launch options.  16 under the interpreter (numpy cost grows with the tile);
    on a GPU a common grouped-GEMM choice, untuned (no GPU was available when written)."""
    if _interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), {}
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), dict(num_warps=4, num_stages=3)


def _schedule(expert_idx, num_experts, block_m):
    """The sorted slots and the tile table, on the device, with no host sync.

    Returns ``order`` ``(M,)`` int64 (``sort_slots``), ``seg_start`` / ``seg_end`` ``(E + 1,)``
    int64 (segment ``E``: the dropped slots), and per tile ``t`` of the ``cdiv(M, BLOCK_M) + E + 1``
    launched: ``tile_seg``, ``tile_row``, ``tile_end`` ``(T,)`` int32 (surplus tiles: segment
    ``E + 1`` and an empty row range).
    """
    order, counts = sort_slots(expert_idx, num_experts)
    M = order.numel()
    seg_end = counts.cumsum(0)  # [E + 1]
    seg_start = seg_end - counts  # [E + 1]
    tiles = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")  # [E + 1]
    tile_cum = tiles.cumsum(0)  # [E + 1]
    T = triton.cdiv(M, block_m) + num_experts + 1  # >= sum_e cdiv(counts[e], BLOCK_M)
    t = torch.arange(T, device=order.device)  # [T]
    tile_seg = torch.searchsorted(tile_cum, t, right=True)  # [T], in [0, E + 1]
    seg = tile_seg.clamp(max=num_experts)  # [T]
    tile_row = seg_start[seg] + (t - (tile_cum[seg] - tiles[seg])) * block_m  # [T]
    surplus = tile_seg > num_experts
    tile_row = torch.where(surplus, M, tile_row)
    tile_end = torch.where(surplus, M, torch.minimum(seg_end[seg], tile_row + block_m))
    as32 = lambda v: v.to(torch.int32)  # noqa: E731
    return order, seg_start, seg_end, as32(tile_seg), as32(tile_row), as32(tile_end)


def moe_dispatch_fwd_triton(x, expert_idx, gates, w1, b1, w2, b2, activation):
    """``(y (N, d) x.dtype, h (N * k, f) x.dtype)``; ``h`` in sorted-slot order as the torch
    backend's (``grouped.moe_dispatch_fwd_torch``): relu's output or gelu's pre-activation,
    zeros on dropped slots.  ``N = 0``: no launch.  No host sync."""
    N, d = x.shape
    k = expert_idx.shape[1]
    E, f = w1.shape[0], w1.shape[2]
    M = N * k
    h = x.new_empty(M, f)
    if M == 0:
        return x.new_zeros(N, d), h
    blocks, launch = _config()
    order, _, _, tile_seg, tile_row, tile_end = _schedule(expert_idx, E, blocks["BLOCK_M"])
    T = tile_seg.numel()
    act = ACT_GELU if activation == "gelu" else ACT_RELU
    dot = _dot_mode(x.dtype)
    acc, acc_dtype = _acc(x.dtype)
    y_slot = torch.empty(M, d, dtype=acc_dtype, device=x.device)  # [M, d], slot rows
    with _device_ctx(x):
        _moe_dispatch_fwd_fc1_kernel[(T, triton.cdiv(f, blocks["BLOCK_N"]))](
            x, w1, b1, order, tile_seg, tile_row, tile_end, h,
            d, f, k, E,
            x.stride(0), x.stride(1), *w1.stride(), *b1.stride(), h.stride(0),
            ACT=act, DOT=dot, ACC=acc, **blocks, **launch,
        )
        _moe_dispatch_fwd_fc2_kernel[(T, triton.cdiv(d, blocks["BLOCK_N"]))](
            h, w2, b2, gates, order, tile_seg, tile_row, tile_end, y_slot,
            d, f, k, E,
            h.stride(0), *w2.stride(), *b2.stride(), *gates.stride(), y_slot.stride(0),
            ACT=act, DOT=dot, ACC=acc, **blocks, **launch,
        )
    y = y_slot.view(N, k, d).sum(1)  # [N, d]: the k slots added in slot order (deterministic)
    return y.to(x.dtype), h


def moe_dispatch_bwd_triton(grad_y, x, expert_idx, gates, w1, b1, w2, b2, h, activation):
    """``(dx, dgates, dw1, db1, dw2, db2)``, each in its input's dtype and shape, all computed
    by the Triton kernels.  ``N = 0``: zeros, no launch.  No host sync."""
    N, d = x.shape
    k = expert_idx.shape[1]
    E, f = w1.shape[0], w1.shape[2]
    M = N * k
    if M == 0:
        return (torch.zeros_like(x), torch.zeros_like(gates), torch.zeros_like(w1), torch.zeros_like(b1),
                torch.zeros_like(w2), torch.zeros_like(b2))
    blocks, launch = _config()
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    order, seg_start, seg_end, tile_seg, tile_row, tile_end = _schedule(expert_idx, E, bm)
    T = tile_seg.numel()
    act = ACT_GELU if activation == "gelu" else ACT_RELU
    dot = _dot_mode(x.dtype)
    acc, acc_dtype = _acc(x.dtype)
    grad_y = grad_y.to(x.dtype)
    n_fblocks = triton.cdiv(f, bn)
    dh = torch.empty(M, f, dtype=x.dtype, device=x.device)  # [M, f], sorted rows
    dg_part = torch.empty(n_fblocks, M, dtype=acc_dtype, device=x.device)  # [f blocks, M]
    dx_slot = torch.empty(M, d, dtype=acc_dtype, device=x.device)  # [M, d], slot rows
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    db1, db2 = torch.empty_like(b1), torch.empty_like(b2)
    with _device_ctx(x):
        _moe_dispatch_bwd_dh_kernel[(T, n_fblocks)](
            grad_y, w2, b2, h, gates, order, tile_seg, tile_row, tile_end, dh, dg_part,
            d, f, M, k, E,
            grad_y.stride(0), grad_y.stride(1), *w2.stride(), *b2.stride(), h.stride(0),
            *gates.stride(), dh.stride(0),
            ACT=act, DOT=dot, ACC=acc, **blocks, **launch,
        )
        dw_blocks = dict(BLOCK_P=bn, BLOCK_Q=bn, BLOCK_R=bk)
        # dW2[e] (f, d) = act(H)^T (gate dY[tok]); db2[e] = sum of gate dY[tok]
        _moe_dispatch_bwd_dw_kernel[(triton.cdiv(f, bn), triton.cdiv(d, bn), E)](
            h, grad_y, gates, order, seg_start, seg_end, dw2, db2,
            f, d, k,
            h.stride(0), h.stride(1), grad_y.stride(0), grad_y.stride(1), *gates.stride(),
            *dw2.stride(), *db2.stride(),
            P_GATHER=False, P_GELU=act == ACT_GELU, Q_GATHER=True, Q_GATE=True, DOT=dot, ACC=acc,
            **dw_blocks, **launch,
        )
        # dW1[e] (d, f) = X[tok]^T dH; db1[e] = sum of dH
        _moe_dispatch_bwd_dw_kernel[(triton.cdiv(d, bn), triton.cdiv(f, bn), E)](
            x, dh, gates, order, seg_start, seg_end, dw1, db1,
            d, f, k,
            x.stride(0), x.stride(1), dh.stride(0), dh.stride(1), *gates.stride(),
            *dw1.stride(), *db1.stride(),
            P_GATHER=True, P_GELU=False, Q_GATHER=False, Q_GATE=False, DOT=dot, ACC=acc,
            **dw_blocks, **launch,
        )
        _moe_dispatch_bwd_dx_kernel[(T, triton.cdiv(d, bn))](
            dh, w1, order, tile_seg, tile_row, tile_end, dx_slot,
            d, f, E,
            dh.stride(0), *w1.stride(), dx_slot.stride(0),
            DOT=dot, ACC=acc, **blocks, **launch,
        )
    dx = dx_slot.view(N, k, d).sum(1)  # [N, d]: the k slots added in slot order
    dgates = dg_part.sum(0).view(N, k)  # [N, k]
    return dx.to(x.dtype), dgates.to(gates.dtype), dw1, db1, dw2, db2


def _device_ctx(t):
    """Launches on ``t``'s GPU (Triton launches on the current device); nothing on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
