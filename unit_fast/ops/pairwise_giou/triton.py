"""Triton kernels of ``pairwise_giou``: GIoU of every (N, M) pair of xyxy boxes, and its gradient.

Math (per pair; ``a`` a row box, ``b`` a column box)::

    inter = relu(min(ax1, bx1) - max(ax0, bx0)) * relu(min(ay1, by1) - max(ay0, by0))
    union = area(a) + area(b) - inter
    hull  = relu(max(ax1, bx1) - min(ax0, bx0)) * relu(max(ay1, by1) - min(ay0, by0))
    giou  = inter / union - (hull - union) / hull

Decomposition: both kernels tile the ``(N, M)`` pair matrix in ``(BLOCK_N, BLOCK_M)`` tiles, one
program per tile, boxes loaded once per tile as four coordinate vectors.  The forward writes its
tile.  The backward recomputes its tile (nothing is saved but the boxes), multiplies by the
incoming ``g``, and reduces the tile both ways: over columns into a per-tile partial of
``grad_boxes1`` and over rows into a per-tile partial of ``grad_boxes2``; a ``sum(0)`` over the
tiles of the other axis finishes each gradient.  No atomics, so results are deterministic.

Subgradients follow autograd on the reference: ``clamp(min=0)`` passes no gradient at exactly 0
(touching boxes), and ``min``/``max`` ties give each side half.  Math runs in float32 for
float16, bfloat16 and float32 inputs (float64 for float64): the area products and 0.x / 0.x
ratios lose most of a half-precision mantissa otherwise; outputs are cast back to the inputs'
dtype.  Zero-area pairs give NaN (0 / 0), as the reference does.
"""

import torch
import triton
import triton.language as tl

from unit_fast import _backend


@triton.jit
def _load_boxes(ptr, idx, mask, stride_row, stride_coord, F64: tl.constexpr):
    dt = tl.float64 if F64 else tl.float32
    p = ptr + idx * stride_row
    x0 = tl.load(p, mask=mask, other=0.0).to(dt)
    y0 = tl.load(p + stride_coord, mask=mask, other=0.0).to(dt)
    x1 = tl.load(p + 2 * stride_coord, mask=mask, other=1.0).to(dt)  # masked lanes: unit boxes, no 0/0
    y1 = tl.load(p + 3 * stride_coord, mask=mask, other=1.0).to(dt)
    return x0, y0, x1, y1


@triton.jit
def giou_tile(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1):
    """GIoU of every pair of a ``[BLOCK_A]`` set of xyxy boxes (rows) and a ``[BLOCK_B]`` set
    (columns) -> ``[BLOCK_A, BLOCK_B]``, DETR's formula (0 / 0 = NaN for zero-area pairs).
    Shared by this op's forward and the fused matching cost."""
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    iw = tl.maximum(tl.minimum(ax1[:, None], bx1[None, :]) - tl.maximum(ax0[:, None], bx0[None, :]), 0.0)
    ih = tl.maximum(tl.minimum(ay1[:, None], by1[None, :]) - tl.maximum(ay0[:, None], by0[None, :]), 0.0)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    hw = tl.maximum(tl.maximum(ax1[:, None], bx1[None, :]) - tl.minimum(ax0[:, None], bx0[None, :]), 0.0)
    hh = tl.maximum(tl.maximum(ay1[:, None], by1[None, :]) - tl.minimum(ay0[:, None], by0[None, :]), 0.0)
    hull = hw * hh
    return inter / union - (hull - union) / hull


@triton.jit
def _pairwise_giou_fwd_kernel(
    A_ptr, B_ptr, Out_ptr, N, M,
    stride_a_row, stride_a_coord, stride_b_row, stride_b_coord, stride_o_row, stride_o_col,
    F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_M)`` tile of the GIoU matrix; grid ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask, cmask = rows < N, cols < M
    ax0, ay0, ax1, ay1 = _load_boxes(A_ptr, rows, rmask, stride_a_row, stride_a_coord, F64)
    bx0, by0, bx1, by1 = _load_boxes(B_ptr, cols, cmask, stride_b_row, stride_b_coord, F64)
    giou = giou_tile(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1)
    # int64 offsets: N * M may pass 2**31 even where N, M and the strides fit in int32.
    out = Out_ptr + rows[:, None].to(tl.int64) * stride_o_row + cols[None, :].to(tl.int64) * stride_o_col
    tl.store(out, giou.to(Out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _less_weight(x, y):
    """d min(x, y) / dx as autograd gives it: 1 if x < y, 1/2 on a tie, else 0."""
    return tl.where(x < y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit
def _pairwise_giou_bwd_kernel(
    A_ptr, B_ptr, G_ptr, dA_part_ptr, dB_part_ptr, N, M,
    stride_a_row, stride_a_coord, stride_b_row, stride_b_coord, stride_g_row, stride_g_col,
    F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial gradients of ``sum g * giou`` from one ``(BLOCK_N, BLOCK_M)`` tile.

    Grid ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))``, the forward's.  Program ``(i, j)`` recomputes
    its tile, sums ``g * d giou / d a`` over the tile's columns and ``g * d giou / d b`` over its
    rows, and writes the sums to its own slots: ``dA_part[j, n, :]`` (``(cdiv(M, BLOCK_M), N, 4)``)
    and ``dB_part[i, m, :]`` (``(cdiv(N, BLOCK_N), M, 4)``), both contiguous in the math dtype.
    The launcher sums the partials over their first axis.  No atomics, so the result is
    deterministic, and both gradients come from one launch that is as parallel as the forward
    (a kernel that walked one whole axis per program would leave most SMs idle for the short
    side, e.g. 40 programs for M = 1280).
    """
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask, cmask = rows < N, cols < M
    mask = rmask[:, None] & cmask[None, :]
    dt = tl.float64 if F64 else tl.float32
    ax0, ay0, ax1, ay1 = _load_boxes(A_ptr, rows, rmask, stride_a_row, stride_a_coord, F64)
    bx0, by0, bx1, by1 = _load_boxes(B_ptr, cols, cmask, stride_b_row, stride_b_coord, F64)
    # Masked pairs read g = 0, so they add nothing (their unit boxes keep every division finite).
    g = tl.load(G_ptr + rows[:, None].to(tl.int64) * stride_g_row + cols[None, :].to(tl.int64) * stride_g_col,
                mask=mask, other=0.0).to(dt)
    A0, A1, A2, A3 = ax0[:, None], ay0[:, None], ax1[:, None], ay1[:, None]
    B0, B1, B2, B3 = bx0[None, :], by0[None, :], bx1[None, :], by1[None, :]
    iw_pre = tl.minimum(A2, B2) - tl.maximum(A0, B0)
    ih_pre = tl.minimum(A3, B3) - tl.maximum(A1, B1)
    iw = tl.maximum(iw_pre, 0.0)
    ih = tl.maximum(ih_pre, 0.0)
    inter = iw * ih
    union = (A2 - A0) * (A3 - A1) + (B2 - B0) * (B3 - B1) - inter
    hw_pre = tl.maximum(A2, B2) - tl.minimum(A0, B0)
    hh_pre = tl.maximum(A3, B3) - tl.minimum(A1, B1)
    hw = tl.maximum(hw_pre, 0.0)
    hh = tl.maximum(hh_pre, 0.0)
    hull = hw * hh
    # giou = inter / union - 1 + union / hull with union = area_a + area_b - inter: total
    # derivatives with respect to inter, either box's area (the same for both) and hull,
    # each already multiplied by the incoming gradient g.
    inv_u2 = 1.0 / (union * union)
    dG_inter = g * (1.0 / union + inter * inv_u2 - 1.0 / hull)
    dG_area = g * (1.0 / hull - inter * inv_u2)
    dG_hull = g * (-union / (hull * hull))
    # clamp(min=0) passes gradient only where its input is > 0 (autograd on the reference).
    ciw = dG_inter * ih * tl.where(iw_pre > 0, 1.0, 0.0)  # d loss / d iw
    cih = dG_inter * iw * tl.where(ih_pre > 0, 1.0, 0.0)  # d loss / d ih
    chw = dG_hull * hh * tl.where(hw_pre > 0, 1.0, 0.0)  # d loss / d hw
    chh = dG_hull * hw * tl.where(hh_pre > 0, 1.0, 0.0)  # d loss / d hh
    # iw = min(A2, B2) - max(A0, B0), hw = max(A2, B2) - min(A0, B0): each coordinate gets the
    # share of the min / max it wins (half on a tie), with the sign of its term.
    da0 = -ciw * _less_weight(B0, A0) - chw * _less_weight(A0, B0) - dG_area * (A3 - A1)
    da2 = ciw * _less_weight(A2, B2) + chw * _less_weight(B2, A2) + dG_area * (A3 - A1)
    da1 = -cih * _less_weight(B1, A1) - chh * _less_weight(A1, B1) - dG_area * (A2 - A0)
    da3 = cih * _less_weight(A3, B3) + chh * _less_weight(B3, A3) + dG_area * (A2 - A0)
    db0 = -ciw * _less_weight(A0, B0) - chw * _less_weight(B0, A0) - dG_area * (B3 - B1)
    db2 = ciw * _less_weight(B2, A2) + chw * _less_weight(A2, B2) + dG_area * (B3 - B1)
    db1 = -cih * _less_weight(A1, B1) - chh * _less_weight(B1, A1) - dG_area * (B2 - B0)
    db3 = cih * _less_weight(B3, A3) + chh * _less_weight(A3, B3) + dG_area * (B2 - B0)
    # tl.where, not just g = 0: a masked lane's 0 * (anything finite) is 0, but keep it explicit
    # so padding can never leak into a sum.
    pa = dA_part_ptr + (pid_m.to(tl.int64) * N + rows) * 4
    tl.store(pa, tl.sum(tl.where(mask, da0, 0.0), axis=1), mask=rmask)
    tl.store(pa + 1, tl.sum(tl.where(mask, da1, 0.0), axis=1), mask=rmask)
    tl.store(pa + 2, tl.sum(tl.where(mask, da2, 0.0), axis=1), mask=rmask)
    tl.store(pa + 3, tl.sum(tl.where(mask, da3, 0.0), axis=1), mask=rmask)
    pb = dB_part_ptr + (pid_n.to(tl.int64) * M + cols) * 4
    tl.store(pb, tl.sum(tl.where(mask, db0, 0.0), axis=0), mask=cmask)
    tl.store(pb + 1, tl.sum(tl.where(mask, db1, 0.0), axis=0), mask=cmask)
    tl.store(pb + 2, tl.sum(tl.where(mask, db2, 0.0), axis=0), mask=cmask)
    tl.store(pb + 3, tl.sum(tl.where(mask, db3, 0.0), axis=0), mask=cmask)


def _check_device(t):
    if t.device.type == "cpu" and not _backend.triton_on_cpu():
        raise RuntimeError("pairwise_giou: Triton runs on CPU tensors only through the interpreter "
                           "(TRITON_INTERPRET=1, set before triton is imported)")


def pairwise_giou_fwd_triton(boxes1, boxes2):
    """``(N, 4)``, ``(M, 4)`` xyxy -> ``(N, M)`` GIoU in the inputs' dtype; any strides."""
    _check_device(boxes1)
    N, M = boxes1.shape[0], boxes2.shape[0]
    out = torch.empty((N, M), device=boxes1.device, dtype=boxes1.dtype)
    if out.numel() == 0:
        return out
    BLOCK_N, BLOCK_M = 32, 32
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _pairwise_giou_fwd_kernel[grid](
        boxes1, boxes2, out, N, M, *boxes1.stride(), *boxes2.stride(), *out.stride(),
        F64=boxes1.dtype == torch.float64, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
    )
    return out


def pairwise_giou_bwd_triton(grad, boxes1, boxes2):
    """``grad (N, M)`` -> ``(grad_boxes1 (N, 4), grad_boxes2 (M, 4))``, contiguous, inputs' dtype.

    One launch of ``_pairwise_giou_bwd_kernel`` over the forward's tiles writes per-tile partial
    sums, ``(cdiv(M, BLOCK_M), N, 4)`` and ``(cdiv(N, BLOCK_N), M, 4)`` in float32 (float64 for
    float64 inputs): about ``N * M / 4`` floats in all at 32 x 32 tiles, a quarter of ``grad``.
    A ``sum(0)`` over them, in that precision, is the follow-up reduction.
    """
    _check_device(boxes1)
    N, M = boxes1.shape[0], boxes2.shape[0]
    acc = torch.float64 if boxes1.dtype == torch.float64 else torch.float32
    if N == 0 or M == 0:  # nothing to launch: the gradients are empty or zero
        return boxes1.new_zeros((N, 4)), boxes2.new_zeros((M, 4))
    BLOCK_N, BLOCK_M = 32, 32
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    part1 = torch.empty((grid[1], N, 4), device=boxes1.device, dtype=acc)  # [M / BLOCK_M, N, 4]
    part2 = torch.empty((grid[0], M, 4), device=boxes1.device, dtype=acc)  # [N / BLOCK_N, M, 4]
    _pairwise_giou_bwd_kernel[grid](
        boxes1, boxes2, grad, part1, part2, N, M, *boxes1.stride(), *boxes2.stride(), *grad.stride(),
        F64=acc == torch.float64, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
    )
    return part1.sum(0).to(boxes1.dtype), part2.sum(0).to(boxes2.dtype)  # [N, 4], [M, 4]
