"""Registration of ``unit_fast::pairwise_giou`` (Triton), ``unit_fast::pairwise_giou_cpp`` (C++
CPU) and per-call backend dispatch.

The Triton op is a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``
(house style section 4); its backward is its own op, ``unit_fast::_pairwise_giou_backward``.
The C++ pair (schemas in csrc/unit_fast.cpp, kernels in csrc/ops/cpu/pairwise_giou_kernel.cpp)
gets the same fake and autograd wiring here; it is a separate op because the Triton op must
stay callable on CPU tensors through the interpreter, its test device.
"""

import torch

from unit_fast import _backend, _ext
from unit_fast.ops._autograd import double_backward_raises
from unit_fast.ops.pairwise_giou.reference import pairwise_giou_ref
from unit_fast.ops.pairwise_giou.triton import pairwise_giou_bwd_triton, pairwise_giou_fwd_triton


@torch.library.custom_op("unit_fast::pairwise_giou", mutates_args=())
def _pairwise_giou_op(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    return pairwise_giou_fwd_triton(boxes1, boxes2)


@_pairwise_giou_op.register_fake
def _pairwise_giou_fake(boxes1, boxes2):
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))


@torch.library.custom_op("unit_fast::_pairwise_giou_backward", mutates_args=())
def _pairwise_giou_backward_op(grad: torch.Tensor, boxes1: torch.Tensor,
                               boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pairwise_giou_bwd_triton(grad, boxes1, boxes2)


@_pairwise_giou_backward_op.register_fake
def _pairwise_giou_backward_fake(grad, boxes1, boxes2):
    # The Triton launcher returns fresh contiguous tensors, whatever the inputs' strides.
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)


def _setup_context(ctx, inputs, output):
    boxes1, boxes2 = inputs
    ctx.save_for_backward(boxes1, boxes2)


def _backward_with(backward_op):
    def _backward(ctx, grad):
        boxes1, boxes2 = ctx.saved_tensors
        return backward_op(grad, boxes1, boxes2)  # (grad_boxes1, grad_boxes2)

    return _backward


def _no_context(ctx, inputs, output):
    pass


_pairwise_giou_op.register_autograd(_backward_with(_pairwise_giou_backward_op), setup_context=_setup_context)
# Like torchvision's ``_roi_align_backward``: the backward op's own backward raises.
_pairwise_giou_backward_op.register_autograd(double_backward_raises("pairwise_giou"), setup_context=_no_context)


def _cpp_backward_fake(grad, boxes1, boxes2):
    # The C++ kernel returns fresh contiguous tensors too.
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)


if _ext.HAS_EXT:  # the C++ ops exist only when unit_fast._C loaded
    torch.library.register_fake("unit_fast::pairwise_giou_cpp")(_pairwise_giou_fake)
    torch.library.register_fake("unit_fast::_pairwise_giou_cpp_backward")(_cpp_backward_fake)
    torch.library.register_autograd("unit_fast::pairwise_giou_cpp",
                                    _backward_with(torch.ops.unit_fast._pairwise_giou_cpp_backward),
                                    setup_context=_setup_context)
    torch.library.register_autograd("unit_fast::_pairwise_giou_cpp_backward",
                                    double_backward_raises("pairwise_giou_cpp"), setup_context=_no_context)


def _check(boxes1, boxes2):
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"pairwise_giou: {name} must be an (N, 4) tensor, got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        if not b.dtype.is_floating_point:
            raise TypeError(f"pairwise_giou: {name} must be floating, got {b.dtype}")
    if boxes1.dtype != boxes2.dtype or boxes1.device != boxes2.device:
        raise ValueError(f"pairwise_giou: boxes1 ({boxes1.dtype}, {boxes1.device}) and boxes2 "
                         f"({boxes2.dtype}, {boxes2.device}) must share dtype and device")


def pairwise_giou(boxes1, boxes2, backend=None):
    """GIoU of every pair of xyxy boxes: ``(N, 4)``, ``(M, 4)`` -> ``(N, M)``, differentiable.

    Args:
        boxes1: ``(N, 4)`` xyxy (x0, y0, x1, y1), any float dtype, any strides.
        boxes2: ``(M, 4)`` xyxy, same dtype and device.
        backend: ``"triton"`` | ``"cpp"`` | ``"reference"`` | None (``_backend.select_backend``:
            Triton on CUDA, the C++ kernel on CPU when ``unit_fast._C`` is built, else the
            reference; Triton on CPU only through the interpreter).

    Returns:
        ``(N, M)`` GIoU in [-1, 1], in the inputs' dtype (Triton computes in float32, or
        float64).  Differentiable once through the Triton op (one tile pass forward; backward
        recomputes per tile, no atomics); double backward raises.

    Nothing is validated and nothing syncs: inverted or zero-area boxes give what DETR's formula
    gives (NaN for 0 / 0).  ``unit_fast.box_ops.generalized_box_iou`` is the checking drop-in.
    """
    _check(boxes1, boxes2)
    chosen = _backend.select_backend("pairwise_giou", boxes1.device, backend)
    if chosen == "reference":
        return pairwise_giou_ref(boxes1, boxes2)
    if chosen == "cpp":
        return torch.ops.unit_fast.pairwise_giou_cpp(boxes1, boxes2)
    return _pairwise_giou_op(boxes1, boxes2)
