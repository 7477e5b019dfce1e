"""Triton kernels of ``pairwise_giou``: GIoU of every (N, M) pair of xyxy boxes, and its gradient.

Math (per pair; ``a`` a row box, ``b`` a column box)::

    inter = relu(min(ax1, bx1) - max(ax0, bx0)) * relu(min(ay1, by1) - max(ay0, by0))
    union = area(a) + area(b) - inter
    hull  = relu(max(ax1, bx1) - min(ax0, bx0)) * relu(max(ay1, by1) - min(ay0, by0))
    giou  = inter / union - (hull - union) / hull

GIoU is symmetric in ``a`` and ``b``, so one backward kernel serves both inputs: it gives the
gradient of ``sum_m g[n, m] * giou(a_n, b_m)`` with respect to each ``a_n``; the gradient for
``b`` is the same kernel with the roles swapped and ``g`` read transposed (strides, no copy).
Subgradients follow autograd on the reference: ``clamp(min=0)`` passes no gradient at exactly 0
(touching boxes), and ``min``/``max`` ties give each side half.  Math runs in float32 (float64
for float64 inputs).
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
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    iw = tl.maximum(tl.minimum(ax1[:, None], bx1[None, :]) - tl.maximum(ax0[:, None], bx0[None, :]), 0.0)
    ih = tl.maximum(tl.minimum(ay1[:, None], by1[None, :]) - tl.maximum(ay0[:, None], by0[None, :]), 0.0)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    hw = tl.maximum(tl.maximum(ax1[:, None], bx1[None, :]) - tl.minimum(ax0[:, None], bx0[None, :]), 0.0)
    hh = tl.maximum(tl.maximum(ay1[:, None], by1[None, :]) - tl.minimum(ay0[:, None], by0[None, :]), 0.0)
    hull = hw * hh
    giou = inter / union - (hull - union) / hull
    out = Out_ptr + rows[:, None] * stride_o_row + cols[None, :] * stride_o_col
    tl.store(out, giou.to(Out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _less_weight(x, y):
    """d min(x, y) / dx as autograd gives it: 1 if x < y, 1/2 on a tie, else 0."""
    return tl.where(x < y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit
def _pairwise_giou_bwd_kernel(
    A_ptr, B_ptr, G_ptr, dA_ptr, N, M,
    stride_a_row, stride_a_coord, stride_b_row, stride_b_coord, stride_g_row, stride_g_col,
    stride_da_row, stride_da_coord,
    F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``dA[n] = sum_m g[n, m] * d giou(a_n, b_m) / d a_n`` for BLOCK_N rows of ``a``.

    Grid ``(cdiv(N, BLOCK_N),)``; each program walks all of ``b`` in BLOCK_M chunks and keeps
    its four gradient sums in registers: no atomics, deterministic.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ax0, ay0, ax1, ay1 = _load_boxes(A_ptr, rows, rmask, stride_a_row, stride_a_coord, F64)
    dt = tl.float64 if F64 else tl.float32
    g0 = tl.zeros([BLOCK_N], dt)
    g1 = tl.zeros([BLOCK_N], dt)
    g2 = tl.zeros([BLOCK_N], dt)
    g3 = tl.zeros([BLOCK_N], dt)
    area_a = (ax1 - ax0) * (ay1 - ay0)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        cmask = cols < M
        mask = rmask[:, None] & cmask[None, :]
        bx0, by0, bx1, by1 = _load_boxes(B_ptr, cols, cmask, stride_b_row, stride_b_coord, F64)
        g = tl.load(G_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=mask,
                    other=0.0).to(dt)
        A0, A1, A2, A3 = ax0[:, None], ay0[:, None], ax1[:, None], ay1[:, None]
        B0, B1, B2, B3 = bx0[None, :], by0[None, :], bx1[None, :], by1[None, :]
        iw_pre = tl.minimum(A2, B2) - tl.maximum(A0, B0)
        ih_pre = tl.minimum(A3, B3) - tl.maximum(A1, B1)
        iw = tl.maximum(iw_pre, 0.0)
        ih = tl.maximum(ih_pre, 0.0)
        inter = iw * ih
        area_b = (B2 - B0) * (B3 - B1)
        union = area_a[:, None] + area_b - inter
        hw_pre = tl.maximum(A2, B2) - tl.minimum(A0, B0)
        hh_pre = tl.maximum(A3, B3) - tl.minimum(A1, B1)
        hw = tl.maximum(hw_pre, 0.0)
        hh = tl.maximum(hh_pre, 0.0)
        hull = hw * hh
        # giou = inter / union - 1 + union / hull with union = area_a + area_b - inter:
        # total derivatives with respect to inter, area_a and hull.
        inv_u2 = 1.0 / (union * union)
        dG_inter = 1.0 / union + inter * inv_u2 - 1.0 / hull
        dG_area = 1.0 / hull - inter * inv_u2
        dG_hull = -union / (hull * hull)
        ciw = tl.where(iw_pre > 0, 1.0, 0.0)
        cih = tl.where(ih_pre > 0, 1.0, 0.0)
        chw = tl.where(hw_pre > 0, 1.0, 0.0)
        chh = tl.where(hh_pre > 0, 1.0, 0.0)
        # d iw / d (A0, A2), d hw / d (A0, A2), and the same in y.
        diw_a0 = -ciw * _less_weight(B0, A0)  # -d max(A0, B0)/dA0
        diw_a2 = ciw * _less_weight(A2, B2)
        dhw_a0 = -chw * _less_weight(A0, B0)
        dhw_a2 = chw * _less_weight(B2, A2)
        dih_a1 = -cih * _less_weight(B1, A1)
        dih_a3 = cih * _less_weight(A3, B3)
        dhh_a1 = -chh * _less_weight(A1, B1)
        dhh_a3 = chh * _less_weight(B3, A3)
        wa, ha = A2 - A0, A3 - A1
        d0 = dG_inter * ih * diw_a0 + dG_area * (-ha) + dG_hull * hh * dhw_a0
        d2 = dG_inter * ih * diw_a2 + dG_area * ha + dG_hull * hh * dhw_a2
        d1 = dG_inter * iw * dih_a1 + dG_area * (-wa) + dG_hull * hw * dhh_a1
        d3 = dG_inter * iw * dih_a3 + dG_area * wa + dG_hull * hw * dhh_a3
        g0 += tl.sum(tl.where(mask, g * d0, 0.0), axis=1)
        g1 += tl.sum(tl.where(mask, g * d1, 0.0), axis=1)
        g2 += tl.sum(tl.where(mask, g * d2, 0.0), axis=1)
        g3 += tl.sum(tl.where(mask, g * d3, 0.0), axis=1)
    out = dA_ptr + rows * stride_da_row
    ty = dA_ptr.dtype.element_ty
    tl.store(out, g0.to(ty), mask=rmask)
    tl.store(out + stride_da_coord, g1.to(ty), mask=rmask)
    tl.store(out + 2 * stride_da_coord, g2.to(ty), mask=rmask)
    tl.store(out + 3 * stride_da_coord, g3.to(ty), mask=rmask)


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


def _grad_rows(a, b, g_strides, grad):
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    if a.shape[0] == 0:
        return da
    if b.shape[0] == 0:
        return da.zero_()
    BLOCK_N, BLOCK_M = 32, 32
    _pairwise_giou_bwd_kernel[(triton.cdiv(a.shape[0], BLOCK_N),)](
        a, b, grad, da, a.shape[0], b.shape[0], *a.stride(), *b.stride(), *g_strides, *da.stride(),
        F64=a.dtype == torch.float64, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
    )
    return da


def pairwise_giou_bwd_triton(grad, boxes1, boxes2):
    """``grad (N, M)`` -> ``(grad_boxes1 (N, 4), grad_boxes2 (M, 4))``."""
    _check_device(boxes1)
    g_stride = grad.stride()
    return (_grad_rows(boxes1, boxes2, g_stride, grad),
            _grad_rows(boxes2, boxes1, (g_stride[1], g_stride[0]), grad))
