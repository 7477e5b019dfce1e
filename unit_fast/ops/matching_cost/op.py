"""Registration of ``unit_fast::matching_cost`` / ``unit_fast::matching_cost_cpp`` and dispatch.

Three backends, one per op or none:
  ``triton``     ``unit_fast::matching_cost``, a ``torch.library.custom_op`` whose body launches
                 the Triton kernel (CUDA, or CPU through the interpreter in tests);
  ``cpp``        ``unit_fast::matching_cost_cpp``, a C++ op (schema in csrc/unit_fast.cpp, CPU
                 kernel in csrc/ops/cpu/matching_cost_kernel.cpp); its fake and autograd are
                 registered here, as torchvision registers its C++ ops' (house style section 4);
  ``reference``  plain torch, called directly.
The C++ kernel is its own op rather than a CPU kernel of the Triton custom op: the Triton op
must stay callable on CPU tensors (the interpreter is the CPU test device of the Triton kernel),
so one schema cannot carry both on the CPU key; and a C++ schema lets a CUDA C++ kernel join
later under the same name.  Both are forward only: the matcher computes its cost under
``torch.no_grad()``.  Their registered backward raises (with the way out: the reference
supports autograd), so asking for a gradient fails loudly instead of silently returning none.
"""

import torch

from unit_fast import _backend, _ext
from unit_fast.ops.matching_cost.reference import matching_cost_ref


@torch.library.custom_op("unit_fast::matching_cost", mutates_args=())
def _matching_cost_op(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_labels: torch.Tensor,
                      tgt_boxes: torch.Tensor, num_targets: torch.Tensor, cost_class: float, cost_bbox: float,
                      cost_giou: float, logsoftmax: bool) -> torch.Tensor:
    # Imported here: triton is optional, and the interpreter flag must be set before its import.
    from unit_fast.ops.matching_cost.triton import matching_cost_fwd_triton

    return matching_cost_fwd_triton(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                                    cost_class, cost_bbox, cost_giou, logsoftmax)


@_matching_cost_op.register_fake
def _matching_cost_fake(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class, cost_bbox,
                        cost_giou, logsoftmax):
    torch._check(pred_logits.dim() in (3, 4), lambda: "matching_cost: pred_logits must be [(L,) B, Q, C+1]")
    torch._check(tgt_labels.dim() == 2, lambda: "matching_cost: tgt_labels must be [B, T]")
    return pred_logits.new_empty((*pred_logits.shape[:-1], tgt_labels.shape[1]), dtype=torch.float32)


def _no_backward_of(name):
    def _no_backward(ctx, grad):
        raise NotImplementedError(
            f"unit_fast::{name} has no backward: it is the matcher's cost, computed under "
            "torch.no_grad(). Call matching_cost(..., backend='reference') to differentiate through it."
        )

    return _no_backward


_matching_cost_op.register_autograd(_no_backward_of("matching_cost (Triton)"))

if _ext.HAS_EXT:  # the C++ op exists only when unit_fast._C loaded
    torch.library.register_fake("unit_fast::matching_cost_cpp")(_matching_cost_fake)
    torch.library.register_autograd("unit_fast::matching_cost_cpp",
                                    _no_backward_of("matching_cost_cpp (C++)"))


def _check_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets):
    """Shape and dtype checks; metadata only, so no host sync."""
    if pred_logits.dim() not in (3, 4):
        raise ValueError(f"pred_logits must be [B, Q, C+1] or [L, B, Q, C+1], got {tuple(pred_logits.shape)}")
    lead = pred_logits.shape[:-1]  # [(L,) B, Q]
    if tuple(pred_boxes.shape) != (*lead, 4):
        raise ValueError(f"pred_boxes must be {(*lead, 4)} to match pred_logits, "
                         f"got {tuple(pred_boxes.shape)}")
    if pred_logits.shape[-1] < 1:
        raise ValueError("pred_logits needs at least one class (C+1 >= 1)")
    B = lead[-2]
    if tgt_labels.dim() != 2 or tgt_labels.shape[0] != B:
        raise ValueError(f"tgt_labels must be [B={B}, T], got {tuple(tgt_labels.shape)}")
    T = tgt_labels.shape[1]
    if tuple(tgt_boxes.shape) != (B, T, 4):
        raise ValueError(f"tgt_boxes must be {(B, T, 4)}, got {tuple(tgt_boxes.shape)}")
    if tuple(num_targets.shape) != (B,):
        raise ValueError(f"num_targets must be [B={B}], got {tuple(num_targets.shape)}")
    for name, t in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes), ("tgt_boxes", tgt_boxes)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    for name, t in (("tgt_labels", tgt_labels), ("num_targets", num_targets)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (int64), got {t.dtype}")
    devices = {t.device for t in (pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets)}
    if len(devices) != 1:
        raise ValueError(f"matching_cost inputs must share one device, got {sorted(map(str, devices))}")


def matching_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class, cost_bbox,
                  cost_giou, logsoftmax=False, backend=None):
    """The DETR/MMF matcher cost per image, ``(B, Q, T)`` (or ``(L, B, Q, T)``), in float32.

    Arguments and result as ``reference.matching_cost_ref`` (shapes, padding, ``+inf``
    columns past ``num_targets[b]``, NaN rows for NaN predictions); ``backend`` forces
    ``"triton"``, ``"cpp"`` or ``"reference"`` (default: Triton on CUDA, the C++ kernel on CPU
    when ``unit_fast._C`` is built, else the reference; see ``unit_fast._backend``).  No host
    sync on any backend.  The Triton and C++ backends have no backward (the matcher runs under
    ``torch.no_grad()``): asking them for a gradient raises.
    """
    _check_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets)
    chosen = _backend.select_backend("matching_cost", pred_logits.device, backend)
    if chosen == "reference":
        return matching_cost_ref(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class,
                                 cost_bbox, cost_giou, logsoftmax)
    if chosen == "cpp":
        return torch.ops.unit_fast.matching_cost_cpp(pred_logits, pred_boxes, tgt_labels, tgt_boxes,
                                                     num_targets, float(cost_class), float(cost_bbox),
                                                     float(cost_giou), bool(logsoftmax))
    return torch.ops.unit_fast.matching_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                                             float(cost_class), float(cost_bbox), float(cost_giou),
                                             bool(logsoftmax))
