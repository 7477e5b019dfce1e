"""Triton kernels of ``box_loss``: DETR's L1 + GIoU box loss over matched pairs, fused.

One pass over the ``N`` pairs in blocks of ``BLOCK_N`` (grid ``cdiv(N, BLOCK_N)``), each pair
being 4 + 4 coordinates.  The forward writes one ``(sum L1, sum (1 - GIoU))`` partial per
program into a ``(num_programs, 2)`` buffer that torch then sums: deterministic (no atomics),
and the buffer is ``N / 1024`` rows.  The backward recomputes the per-pair intermediates (16 to
32 bytes read per pair, cheaper than storing them) and writes the gradients analytically.

Everything is computed in float32 (float64 when an input is float64), whatever the storage
dtype: MMF casts the predictions with ``.float()``, and a float16 sum over thousands of pairs
would lose the loss's low bits.  Nothing here reads a device value on the host.
"""

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_N = 1024
NUM_WARPS = 4
# The backward holds more live values per pair (both boxes' gradients): at 4 warps (8 pairs a
# thread) ptxas spills at 255 registers on sm_90 (benchmarks/kernel_report); 8 warps halve that.
BWD_NUM_WARPS = 8


@triton.jit
def _load_box(ptr, rows, stride_row, stride_col, mask, ACC_FP64: tl.constexpr):
    """The 4 coordinates of rows ``rows`` of an ``(N, 4)`` tensor, each ``[BLOCK_N]``, in the
    compute dtype.  Four strided loads rather than one ``[BLOCK_N, 4]`` tile: the other three
    hit the cache lines the first one brought in, so DRAM traffic is the same."""
    base = ptr + rows * stride_row
    # Masked lanes read the unit box (1, 1, 1, 1), not zeros: a zero box has union 0 and
    # its 0 / 0 would raise numpy warnings under the interpreter.  Their results are dropped.
    c0 = tl.load(base, mask=mask, other=1.0)
    c1 = tl.load(base + stride_col, mask=mask, other=1.0)
    c2 = tl.load(base + 2 * stride_col, mask=mask, other=1.0)
    c3 = tl.load(base + 3 * stride_col, mask=mask, other=1.0)
    # One return after the constexpr branch: no early return inside a JIT function.
    if ACC_FP64:
        c0, c1, c2, c3 = c0.to(tl.float64), c1.to(tl.float64), c2.to(tl.float64), c3.to(tl.float64)
    else:
        c0, c1, c2, c3 = c0.to(tl.float32), c1.to(tl.float32), c2.to(tl.float32), c3.to(tl.float32)
    return c0, c1, c2, c3


@triton.jit
def _max(a, b):
    # torch.max / clamp propagate NaN; Triton's default maximum may not (PTX max.f32 drops it).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_grad_weights(a, b):
    """Shares of ``d max(a, b)`` that go to ``a`` and ``b``, as autograd's ``maximum``
    backward splits them: the larger gets all, a tie gives half to each.  A NaN compares
    false both ways, so each side gets all (what ``masked_fill`` leaves)."""
    wa = tl.where(a == b, 0.5, tl.where(a < b, 0.0, 1.0))
    wb = tl.where(a == b, 0.5, tl.where(a > b, 0.0, 1.0))
    return wa, wb


@triton.jit
def _min_grad_weights(a, b):
    """As ``_max_grad_weights`` for ``minimum``: the smaller gets all, a tie half each."""
    wa = tl.where(a == b, 0.5, tl.where(a > b, 0.0, 1.0))
    wb = tl.where(a == b, 0.5, tl.where(a < b, 0.0, 1.0))
    return wa, wb


@triton.jit
def _box_loss_fwd_kernel(
    S_ptr, T_ptr, Partial_ptr,
    N,
    stride_s_row, stride_s_col,
    stride_t_row, stride_t_col,
    ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial sums of one block of pairs: ``Partial[pid] = (sum L1, sum (1 - GIoU))``.

    Math, per pair (``s``, ``t`` cxcywh; ``a``, ``b`` their xyxy boxes)::

        L1    = sum_k |s_k - t_k|
        I     = clamp(min(a_x1, b_x1) - max(a_x0, b_x0), 0) * clamp(... y ..., 0)
        U     = area(a) + area(b) - I          (areas from the xyxy corners, as DETR)
        C     = clamp(max(a_x1, b_x1) - min(a_x0, b_x0), 0) * clamp(... y ..., 0)
        GIoU  = I / U - (C - U) / C            (DETR's operation order, for equal rounding)

    Masked lanes are zeroed with ``where`` before the sums.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: row * stride may pass 2**31
    mask = rows < N
    scx, scy, sw, sh = _load_box(S_ptr, rows, stride_s_row, stride_s_col, mask, ACC_FP64)
    tcx, tcy, tw, th = _load_box(T_ptr, rows, stride_t_row, stride_t_col, mask, ACC_FP64)

    l1 = tl.abs(scx - tcx) + tl.abs(scy - tcy) + tl.abs(sw - tw) + tl.abs(sh - th)

    ax0, ay0, ax1, ay1 = scx - 0.5 * sw, scy - 0.5 * sh, scx + 0.5 * sw, scy + 0.5 * sh
    bx0, by0, bx1, by1 = tcx - 0.5 * tw, tcy - 0.5 * th, tcx + 0.5 * tw, tcy + 0.5 * th
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    iw = _max(_min(ax1, bx1) - _max(ax0, bx0), 0.0)
    ih = _max(_min(ay1, by1) - _max(ay0, by0), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / union
    cw = _max(_max(ax1, bx1) - _min(ax0, bx0), 0.0)
    ch = _max(_max(ay1, by1) - _min(ay0, by0), 0.0)
    hull = cw * ch
    giou = iou - (hull - union) / hull

    l1 = tl.where(mask, l1, 0.0)
    lg = tl.where(mask, 1.0 - giou, 0.0)
    tl.store(Partial_ptr + pid * 2, tl.sum(l1, axis=0))
    tl.store(Partial_ptr + pid * 2 + 1, tl.sum(lg, axis=0))


@triton.jit
def _box_loss_bwd_kernel(
    S_ptr, T_ptr, GradBbox_ptr, GradGiou_ptr, DS_ptr, DT_ptr,
    N,
    stride_s_row, stride_s_col,
    stride_t_row, stride_t_col,
    stride_ds_row, stride_dt_row,
    ACC_FP64: tl.constexpr,
    NEED_DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Gradients of ``g_bbox * sum L1 + g_giou * sum (1 - GIoU)`` wrt both boxes of each pair.

    Reverse mode through the forward's graph, in autograd's order and with its subgradients:
      - ``|d|``: ``sign(d)``, 0 at ``d = 0`` and for NaN (``abs`` backward is ``sgn``);
      - ``clamp(x, min=0)``: passes the gradient where ``x > 0`` and blocks it elsewhere --
        touching edges (``x = 0``) and NaN included (torch's clamp backward, checked);
      - ``max(a, b)`` / ``min(a, b)``: all to the winner, half to each on a tie;
      - ``I / U``, ``(C - U) / C``: the two partials of a division, as ``div`` backward forms them.
    ``g_bbox`` and ``g_giou`` are read from device memory: no host sync for them.
    Output ``DS``/``DT``: ``(N, 4)`` with unit column stride (the launcher allocates them).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < N
    scx, scy, sw, sh = _load_box(S_ptr, rows, stride_s_row, stride_s_col, mask, ACC_FP64)
    tcx, tcy, tw, th = _load_box(T_ptr, rows, stride_t_row, stride_t_col, mask, ACC_FP64)
    if ACC_FP64:
        g_bbox = tl.load(GradBbox_ptr).to(tl.float64)
        g_giou = tl.load(GradGiou_ptr).to(tl.float64)
    else:
        g_bbox = tl.load(GradBbox_ptr).to(tl.float32)
        g_giou = tl.load(GradGiou_ptr).to(tl.float32)

    # ---- recompute the forward
    ax0, ay0, ax1, ay1 = scx - 0.5 * sw, scy - 0.5 * sh, scx + 0.5 * sw, scy + 0.5 * sh
    bx0, by0, bx1, by1 = tcx - 0.5 * tw, tcy - 0.5 * th, tcx + 0.5 * tw, tcy + 0.5 * th
    aw, ah = ax1 - ax0, ay1 - ay0
    bw, bh = bx1 - bx0, by1 - by0
    area_a = aw * ah
    area_b = bw * bh
    riw = _min(ax1, bx1) - _max(ax0, bx0)
    rih = _min(ay1, by1) - _max(ay0, by0)
    iw = _max(riw, 0.0)
    ih = _max(rih, 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    rcw = _max(ax1, bx1) - _min(ax0, bx0)
    rch = _max(ay1, by1) - _min(ay0, by0)
    cw = _max(rcw, 0.0)
    ch = _max(rch, 0.0)
    hull = cw * ch
    excess = hull - union

    # ---- loss = 1 - (iou - excess / hull): d loss / d giou = -g_giou
    d_giou = -g_giou
    d_inter = d_giou / union  # iou = inter / union
    d_union = -d_giou * (inter / union) / union
    d_excess = -d_giou / hull  # excess / hull
    d_hull = d_giou * (excess / hull) / hull
    d_hull += d_excess  # excess = hull - union
    d_union -= d_excess
    d_area_a = d_union  # union = area_a + area_b - inter
    d_area_b = d_union
    d_inter -= d_union

    # inter = iw * ih; iw = clamp(riw, 0); riw = min(ax1, bx1) - max(ax0, bx0)
    d_riw = tl.where(riw > 0, d_inter * ih, 0.0)
    d_rih = tl.where(rih > 0, d_inter * iw, 0.0)
    # hull = cw * ch; cw = clamp(rcw, 0); rcw = max(ax1, bx1) - min(ax0, bx0)
    d_rcw = tl.where(rcw > 0, d_hull * ch, 0.0)
    d_rch = tl.where(rch > 0, d_hull * cw, 0.0)

    # corners: areas, then the intersection's and the hull's min / max
    d_ax1 = d_area_a * ah
    d_ax0 = -d_area_a * ah
    d_ay1 = d_area_a * aw
    d_ay0 = -d_area_a * aw
    d_bx1 = d_area_b * bh
    d_bx0 = -d_area_b * bh
    d_by1 = d_area_b * bw
    d_by0 = -d_area_b * bw

    wa, wb = _min_grad_weights(ax1, bx1)
    d_ax1 += d_riw * wa
    d_bx1 += d_riw * wb
    wa, wb = _max_grad_weights(ax0, bx0)
    d_ax0 -= d_riw * wa
    d_bx0 -= d_riw * wb
    wa, wb = _min_grad_weights(ay1, by1)
    d_ay1 += d_rih * wa
    d_by1 += d_rih * wb
    wa, wb = _max_grad_weights(ay0, by0)
    d_ay0 -= d_rih * wa
    d_by0 -= d_rih * wb

    wa, wb = _max_grad_weights(ax1, bx1)
    d_ax1 += d_rcw * wa
    d_bx1 += d_rcw * wb
    wa, wb = _min_grad_weights(ax0, bx0)
    d_ax0 -= d_rcw * wa
    d_bx0 -= d_rcw * wb
    wa, wb = _max_grad_weights(ay1, by1)
    d_ay1 += d_rch * wa
    d_by1 += d_rch * wb
    wa, wb = _min_grad_weights(ay0, by0)
    d_ay0 -= d_rch * wa
    d_by0 -= d_rch * wb

    # xyxy = (cx -/+ w / 2, cy -/+ h / 2), plus the L1 term's sign(s - t)
    d = scx - tcx
    l1_cx = g_bbox * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    d = scy - tcy
    l1_cy = g_bbox * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    d = sw - tw
    l1_w = g_bbox * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    d = sh - th
    l1_h = g_bbox * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))

    ds = DS_ptr + rows * stride_ds_row
    tl.store(ds, l1_cx + (d_ax0 + d_ax1), mask=mask)
    tl.store(ds + 1, l1_cy + (d_ay0 + d_ay1), mask=mask)
    tl.store(ds + 2, l1_w + 0.5 * (d_ax1 - d_ax0), mask=mask)
    tl.store(ds + 3, l1_h + 0.5 * (d_ay1 - d_ay0), mask=mask)
    if NEED_DT:
        dt = DT_ptr + rows * stride_dt_row
        tl.store(dt, -l1_cx + (d_bx0 + d_bx1), mask=mask)
        tl.store(dt + 1, -l1_cy + (d_by0 + d_by1), mask=mask)
        tl.store(dt + 2, -l1_w + 0.5 * (d_bx1 - d_bx0), mask=mask)
        tl.store(dt + 3, -l1_h + 0.5 * (d_by1 - d_by0), mask=mask)


def _device_ctx(t):
    """Launches on ``t``'s GPU (Triton launches on the current device); nothing on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc_dtype(src_boxes, target_boxes):
    return torch.promote_types(torch.promote_types(src_boxes.dtype, target_boxes.dtype), torch.float32)


def box_loss_fwd_triton(src_boxes, target_boxes):
    """``(sum_i L1_i, sum_i (1 - GIoU_i))`` of ``(N, 4)`` cxcywh pairs: two 0-d tensors of the
    compute dtype (float32, float64 when an input is float64).  Unnormalised: dividing by
    ``num_boxes`` is the caller's.  ``N = 0``: two zeros, no launch.  No host sync."""
    acc = _acc_dtype(src_boxes, target_boxes)
    N = src_boxes.shape[0]
    if N == 0:
        return src_boxes.new_zeros((), dtype=acc), src_boxes.new_zeros((), dtype=acc)
    grid = (triton.cdiv(N, BLOCK_N),)
    partial = torch.empty(grid[0], 2, device=src_boxes.device, dtype=acc)  # [programs, 2]
    with _device_ctx(src_boxes):
        _box_loss_fwd_kernel[grid](
            src_boxes, target_boxes, partial,
            N,
            src_boxes.stride(0), src_boxes.stride(1),
            target_boxes.stride(0), target_boxes.stride(1),
            ACC_FP64=acc == torch.float64,
            BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS,
        )
    # Two separate sums, not one .sum(0): the outputs must not share storage (custom_op rule).
    return partial[:, 0].sum(), partial[:, 1].sum()


def box_loss_bwd_triton(grad_bbox, grad_giou, src_boxes, target_boxes, need_target_grad=True):
    """Gradients of ``grad_bbox * sum L1 + grad_giou * sum (1 - GIoU)`` (0-d upstream grads, read
    on the device) wrt ``src_boxes`` and ``target_boxes``: ``(N, 4)`` tensors of their dtypes.
    With ``need_target_grad=False`` the second is an empty ``(0, 4)`` tensor and nothing is
    written for it (a quarter less traffic).  ``N = 0``: no launch."""
    acc = _acc_dtype(src_boxes, target_boxes)
    N = src_boxes.shape[0]
    grad_src = torch.empty(N, 4, device=src_boxes.device, dtype=src_boxes.dtype)
    grad_tgt = torch.empty(N if need_target_grad else 0, 4, device=target_boxes.device,
                           dtype=target_boxes.dtype)
    if N == 0:
        return grad_src, grad_tgt
    grad_bbox = grad_bbox.to(device=src_boxes.device, dtype=acc).contiguous()  # 0-d
    grad_giou = grad_giou.to(device=src_boxes.device, dtype=acc).contiguous()  # 0-d
    grid = (triton.cdiv(N, BLOCK_N),)
    with _device_ctx(src_boxes):
        _box_loss_bwd_kernel[grid](
            src_boxes, target_boxes, grad_bbox, grad_giou,
            grad_src, grad_tgt if need_target_grad else grad_src,  # DT unused without NEED_DT
            N,
            src_boxes.stride(0), src_boxes.stride(1),
            target_boxes.stride(0), target_boxes.stride(1),
            grad_src.stride(0), 4,
            ACC_FP64=acc == torch.float64,
            NEED_DT=need_target_grad,
            BLOCK_N=BLOCK_N,
            num_warps=BWD_NUM_WARPS,
        )
    return grad_src, grad_tgt
