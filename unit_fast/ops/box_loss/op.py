"""Registration of ``unit_fast::box_loss`` (+ ``unit_fast::_box_loss_backward``), of
``unit_fast::box_loss_cpp`` (+ ``unit_fast::_box_loss_cpp_backward``), and dispatch.

The first pair are ``torch.library.custom_op``s whose bodies launch the Triton kernels of
``triton.py`` (house style section 4); the second pair are C++ ops (schemas in
csrc/unit_fast.cpp, CPU kernels in csrc/ops/cpu/box_loss_kernel.cpp), separate ops because the
Triton pair must stay callable on CPU tensors through the interpreter (its test device).
Both pairs get fakes and the same autograd wiring here, so ``torch.compile`` sees two opaque
ops.  The ops return the two *unnormalised* sums; dividing by ``num_boxes``
is plain torch in ``box_loss`` (a python number, or a 0-d tensor divided on the device).
Triton is imported at the first launch, not here: the package imports without it.
"""

import torch
from torch import Tensor

from unit_fast import _backend, _ext
from unit_fast.ops._autograd import double_backward_raises
from unit_fast.ops.box_loss.reference import box_loss_ref, compute_dtype


def _check_inputs(src_boxes, target_boxes):
    """Shapes, dtypes, device: metadata only (no host sync), the same messages on every backend
    (the C++ ops' own checks, csrc/ops/box_loss.h, word them alike).  Plain ``raise`` rather
    than ``torch._check``: Dynamo traces it in ``box_loss`` under ``fullgraph=True``."""
    if not (src_boxes.dim() == 2 and src_boxes.shape[-1] == 4):
        raise RuntimeError(f"box_loss: src_boxes must be (N, 4), got {tuple(src_boxes.shape)}")
    if target_boxes.shape != src_boxes.shape:
        raise RuntimeError(f"box_loss: target_boxes {tuple(target_boxes.shape)} != "
                           f"src_boxes {tuple(src_boxes.shape)}")
    if not (src_boxes.dtype.is_floating_point and target_boxes.dtype.is_floating_point):
        raise RuntimeError(f"box_loss: boxes must be floating, got {src_boxes.dtype} and "
                           f"{target_boxes.dtype}")
    if src_boxes.device != target_boxes.device:
        raise RuntimeError(f"box_loss: boxes on {src_boxes.device} and {target_boxes.device}")


@torch.library.custom_op("unit_fast::box_loss", mutates_args=())
def _box_loss_op(src_boxes: Tensor, target_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_i L1_i, sum_i (1 - GIoU_i))`` over ``(N, 4)`` cxcywh pairs (see ``box_loss``)."""
    from unit_fast.ops.box_loss.triton import box_loss_fwd_triton

    _check_inputs(src_boxes, target_boxes)
    return box_loss_fwd_triton(src_boxes, target_boxes)


@_box_loss_op.register_fake
def _box_loss_fake(src_boxes, target_boxes):
    _check_inputs(src_boxes, target_boxes)
    acc = compute_dtype(src_boxes, target_boxes)
    return src_boxes.new_empty((), dtype=acc), src_boxes.new_empty((), dtype=acc)


@torch.library.custom_op("unit_fast::_box_loss_backward", mutates_args=())
def _box_loss_backward_op(
    grad_bbox: Tensor, grad_giou: Tensor, src_boxes: Tensor, target_boxes: Tensor, need_target_grad: bool
) -> tuple[Tensor, Tensor]:
    """Gradients wrt ``src_boxes`` ``(N, 4)`` and ``target_boxes`` (``(N, 4)``, or ``(0, 4)``
    when ``need_target_grad`` is false) of ``grad_bbox * sum L1 + grad_giou * sum (1 - GIoU)``."""
    from unit_fast.ops.box_loss.triton import box_loss_bwd_triton

    return box_loss_bwd_triton(grad_bbox, grad_giou, src_boxes, target_boxes, need_target_grad)


@_box_loss_backward_op.register_fake
def _box_loss_backward_fake(grad_bbox, grad_giou, src_boxes, target_boxes, need_target_grad):
    n = src_boxes.shape[0]
    return (src_boxes.new_empty((n, 4)),
            target_boxes.new_empty((n if need_target_grad else 0, 4)))


def _setup_context(ctx, inputs, output):
    src_boxes, target_boxes = inputs
    ctx.save_for_backward(src_boxes, target_boxes)


def _backward_with(backward_op):
    def _backward(ctx, grad_bbox, grad_giou):
        src_boxes, target_boxes = ctx.saved_tensors
        need_src, need_tgt = ctx.needs_input_grad
        grad_src, grad_tgt = backward_op(grad_bbox, grad_giou, src_boxes, target_boxes, bool(need_tgt))
        return (grad_src if need_src else None), (grad_tgt if need_tgt else None)

    return _backward


torch.library.register_autograd("unit_fast::box_loss", _backward_with(torch.ops.unit_fast._box_loss_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("unit_fast::_box_loss_backward", double_backward_raises("box_loss"))

if _ext.HAS_EXT:  # the C++ ops exist only when unit_fast._C loaded
    torch.library.register_fake("unit_fast::box_loss_cpp")(_box_loss_fake)
    torch.library.register_fake("unit_fast::_box_loss_cpp_backward")(_box_loss_backward_fake)
    torch.library.register_autograd("unit_fast::box_loss_cpp",
                                    _backward_with(torch.ops.unit_fast._box_loss_cpp_backward),
                                    setup_context=_setup_context)
    torch.library.register_autograd("unit_fast::_box_loss_cpp_backward", double_backward_raises("box_loss_cpp"))


def box_loss(src_boxes, target_boxes, num_boxes, backend=None):
    """DETR's box losses of matched pairs, fused: ``SetCriterion.loss_boxes`` after indexing.

    Args:
        src_boxes: ``(N, 4)`` predicted boxes, cxcywh, any floating dtype, any strides.
        target_boxes: ``(N, 4)`` their matched targets, cxcywh, same device.
        num_boxes: python number or 0-d tensor (DETR's all-reduced, clamped target count).
        backend: ``"triton"``, ``"cpp"`` or ``"reference"`` (default: the device's first, see
            ``_backend``: Triton on CUDA, the C++ kernel on CPU when ``unit_fast._C`` is built).

    Returns:
        ``(loss_bbox, loss_giou)``, 0-d tensors::

            loss_bbox = sum_i sum_k |src[i, k] - tgt[i, k]| / num_boxes
            loss_giou = sum_i (1 - GIoU(xyxy(src[i]), xyxy(tgt[i]))) / num_boxes

        computed in float32 (float64 when an input is float64), as MMF's ``.float()``; a
        float64 ``num_boxes`` tensor promotes the result to float64, as in DETR.  Gradients
        flow to both inputs (in their own dtypes); a second derivative raises on the Triton
        and C++ backends.  Bad shapes or dtypes raise ``RuntimeError`` on every backend.

    No host synchronisation: the kernels write per-block partial sums that torch adds on the
    device, ``num_boxes`` is divided by on the device, and nothing is checked on the host.
    Hence, as in the reference: NaN in a prediction propagates into both losses (no error);
    ``N = 0`` gives two zeros (no launch); a pair of two zero-area boxes (identical or not)
    has union 0, GIoU ``0 / 0`` = NaN, so ``loss_giou`` is NaN -- DETR's formula, kept; a
    zero-area box against a proper box has a finite loss.  Inverted boxes (``w < 0``) are
    not rejected (DETR asserts, a host sync); they get what the formula gives.
    """
    _check_inputs(src_boxes, target_boxes)  # metadata only: no host sync
    chosen = _backend.select_backend("box_loss", src_boxes.device, backend)
    if chosen == "reference":
        return box_loss_ref(src_boxes, target_boxes, num_boxes)
    op = torch.ops.unit_fast.box_loss_cpp if chosen == "cpp" else torch.ops.unit_fast.box_loss
    sum_bbox, sum_giou = op(src_boxes, target_boxes)
    return sum_bbox / num_boxes, sum_giou / num_boxes
