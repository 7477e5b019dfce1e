"""Triton kernel of ``matching_cost``: the DETR/MMF matcher cost in one pass, forward only."""

import torch
import triton
import triton.language as tl

from unit_fast import _backend
from unit_fast.ops.pairwise_giou.triton import giou_tile


@triton.jit
def _matching_cost_fwd_kernel(
    X_ptr, PB_ptr, TL_ptr, TB_ptr, NT_ptr, Out_ptr,
    B, Q, T, C1,
    stride_x_layer, stride_x_img, stride_x_row, stride_x_col,
    stride_pb_layer, stride_pb_img, stride_pb_row, stride_pb_coord,
    stride_tl_img, stride_tl_col,
    stride_tb_img, stride_tb_col, stride_tb_coord,
    stride_nt,
    cost_class, cost_bbox, cost_giou,
    LOGSOFTMAX: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One ``(BLOCK_Q, BLOCK_T)`` tile of image ``b``'s cost, for one decoder layer.

    Math, in float32 whatever the input dtypes (for query ``q``, target ``t``)::

        lse[q]     = log sum_c exp(x[q, c])                       (x: the C+1 logits)
        p[q, t]    = exp(x[q, label_t] - lse[q])   (or x[q, label_t] - lse[q] with LOGSOFTMAX)
        L1[q, t]   = sum_k |pred[q, k] - tgt[t, k]|                (cxcywh)
        GIoU[q, t] = inter / union - (hull - union) / hull        (on xyxy boxes)
        out[q, t]  = cost_bbox * L1 + cost_class * (-p) + cost_giou * (-GIoU)   (DETR's order)

    and ``out[q, t] = +inf`` for ``t >= num_targets[b]``.

    Tiling: grid ``(L * B, cdiv(Q, BLOCK_Q), cdiv(T, BLOCK_T))``; axis 0 (the only one with no
    65535 limit) is the (layer, image) pair.  Each program first streams its BLOCK_Q logit rows
    through ``BLOCK_C``-wide class blocks with an online max / rescaled sum (any C+1, one pass,
    no ``(Q, C+1)`` tile held in registers), then gathers ``x[q, label_t]`` -- the rows were just
    read, so this hits cache -- and computes L1 and GIoU from the 4+4 box coordinates.  When
    T needs several target blocks, each of their programs recomputes its query block's
    log-sum-exp: with DETR's T <= a few hundred that is a few extra reads of rows already in
    L2, cheaper than a second kernel and an ``(L, B, Q)`` buffer.

    ``num_targets`` is read here, on the device: the caller never syncs to learn T_b.  A NaN
    among a query's logits or box coordinates makes its whole row NaN (as torch's softmax and
    GIoU do), which the solver reports as INVALID.
    """
    pid_g = tl.program_id(0).to(tl.int64)  # layer * B + image; int64: offsets may pass 2**31
    pid_q = tl.program_id(1)
    pid_t = tl.program_id(2)
    layer = pid_g // B
    img = pid_g % B

    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    row_mask = rows < Q
    num_t = tl.load(NT_ptr + img * stride_nt)
    col_real = (cols < T) & (cols < num_t)  # [BLOCK_T]: real targets; the rest is +inf padding

    # 1. Log-sum-exp over the C+1 classes, online (flash-attention style) in float32.
    x_row = X_ptr + layer * stride_x_layer + img * stride_x_img + rows[:, None] * stride_x_row  # [BLOCK_Q, 1]
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_Q], tl.float32)
    for c0 in range(0, C1, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C1
        # Masked rows load 0 (not -inf), so they never form -inf - -inf = NaN; they are not stored.
        x_mask = row_mask[:, None] & cls_mask[None, :]
        x = tl.load(x_row + cls[None, :] * stride_x_col, mask=x_mask, other=0.0)
        x = tl.where(cls_mask[None, :], x.to(tl.float32), float("-inf"))  # [BLOCK_Q, BLOCK_C]
        # propagate_nan: a NaN logit must make the whole row NaN, as torch.softmax does.
        m_new = tl.maximum(m, tl.max(x, axis=1), propagate_nan=tl.PropagateNan.ALL)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)  # [BLOCK_Q]

    # 2. Class cost: gather the target's logit.  Padding columns and out-of-range labels read
    # nothing (no out-of-bounds access); an out-of-range real label gives NaN, as the reference.
    label = tl.load(TL_ptr + img * stride_tl_img + cols * stride_tl_col, mask=col_real, other=0)  # [BLOCK_T]
    label_ok = (label >= 0) & (label < C1)
    x_t = tl.load(x_row + label[None, :] * stride_x_col,
                  mask=row_mask[:, None] & (col_real & label_ok)[None, :], other=0.0).to(tl.float32)
    logp = x_t - lse[:, None]  # [BLOCK_Q, BLOCK_T]
    if LOGSOFTMAX:
        c_class = -logp
    else:
        c_class = -tl.exp(logp)
    c_class = tl.where(label_ok[None, :], c_class, float("nan"))

    # 3. Boxes: pred [BLOCK_Q] x 4 coordinates, target [BLOCK_T] x 4, cxcywh, cast to float32.
    pb = PB_ptr + layer * stride_pb_layer + img * stride_pb_img + rows * stride_pb_row
    pcx = tl.load(pb, mask=row_mask, other=0.0).to(tl.float32)
    pcy = tl.load(pb + stride_pb_coord, mask=row_mask, other=0.0).to(tl.float32)
    # Masked lanes get unit boxes, so they never divide 0 by 0 (they are not stored anyway).
    pw = tl.load(pb + 2 * stride_pb_coord, mask=row_mask, other=1.0).to(tl.float32)
    ph = tl.load(pb + 3 * stride_pb_coord, mask=row_mask, other=1.0).to(tl.float32)
    tb = TB_ptr + img * stride_tb_img + cols * stride_tb_col
    tcx = tl.load(tb, mask=col_real, other=0.0).to(tl.float32)
    tcy = tl.load(tb + stride_tb_coord, mask=col_real, other=0.0).to(tl.float32)
    tw = tl.load(tb + 2 * stride_tb_coord, mask=col_real, other=1.0).to(tl.float32)
    th = tl.load(tb + 3 * stride_tb_coord, mask=col_real, other=1.0).to(tl.float32)

    # L1 on cxcywh, summed in coordinate order as the reference's .sum(-1).
    c_bbox = (tl.abs(pcx[:, None] - tcx[None, :]) + tl.abs(pcy[:, None] - tcy[None, :])
              + tl.abs(pw[:, None] - tw[None, :]) + tl.abs(ph[:, None] - th[None, :]))

    # xyxy corners, computed as the reference's _cxcywh_to_xyxy (c - 0.5 * w, c + 0.5 * w).
    px0, px1 = pcx - 0.5 * pw, pcx + 0.5 * pw
    py0, py1 = pcy - 0.5 * ph, pcy + 0.5 * ph
    tx0, tx1 = tcx - 0.5 * tw, tcx + 0.5 * tw
    ty0, ty1 = tcy - 0.5 * th, tcy + 0.5 * th
    giou = giou_tile(px0, py0, px1, py1, tx0, ty0, tx1, ty1)  # [BLOCK_Q, BLOCK_T]

    cost = cost_bbox * c_bbox + cost_class * c_class + cost_giou * (-giou)
    cost = tl.where(col_real[None, :], cost, float("inf"))
    out = Out_ptr + pid_g * Q * T + rows[:, None] * T + cols[None, :]  # contiguous (L, B, Q, T)
    tl.store(out, cost, mask=row_mask[:, None] & (cols < T)[None, :])


def matching_cost_fwd_triton(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class,
                             cost_bbox, cost_giou, logsoftmax=False):
    """Launches ``_matching_cost_fwd_kernel``.  Arguments and result as ``matching_cost_ref``.

    Any strides; nothing is copied and nothing is read on the host.  Empty outputs launch
    nothing.
    """
    if pred_logits.device.type == "cpu" and not _backend.triton_on_cpu():
        raise RuntimeError("matching_cost: Triton runs on CPU tensors only through the interpreter "
                           "(TRITON_INTERPRET=1, set before triton is imported)")
    layered = pred_logits.dim() == 4
    x = pred_logits if layered else pred_logits.unsqueeze(0)  # [L, B, Q, C+1]
    pb = pred_boxes if layered else pred_boxes.unsqueeze(0)  # [L, B, Q, 4]
    L, B, Q, C1 = x.shape
    T = tgt_labels.shape[1]
    out = torch.empty((*pred_logits.shape[:-1], T), device=pred_logits.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    # Fixed tiles, not autotuned: no GPU was at hand to tune them.  32 x 64 keeps the ~10 live
    # float32 [BLOCK_Q, BLOCK_T] temporaries of the box math at 16 registers each with 4 warps.
    BLOCK_Q = 32
    BLOCK_T = min(64, max(16, triton.next_power_of_2(T)))
    BLOCK_C = min(128, max(16, triton.next_power_of_2(C1)))
    grid = (L * B, triton.cdiv(Q, BLOCK_Q), triton.cdiv(T, BLOCK_T))
    _matching_cost_fwd_kernel[grid](
        x, pb, tgt_labels, tgt_boxes, num_targets, out,
        B, Q, T, C1,
        *x.stride(), *pb.stride(), *tgt_labels.stride(), *tgt_boxes.stride(), num_targets.stride(0),
        float(cost_class), float(cost_bbox), float(cost_giou),
        LOGSOFTMAX=bool(logsoftmax), BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        num_warps=4,
    )
    return out
