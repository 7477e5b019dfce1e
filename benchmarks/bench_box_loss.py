"""``unit_fast::box_loss`` (L1 + GIoU over matched pairs) against DETR's loss_boxes and peers.

Group ``box_loss:<shape>`` (shapes.py ``BOX_LOSS_SHAPES``), forward + backward on float32
``(N, 4)`` cxcywh pairs, each provider timed in one run on the same inputs:
  detr_reference        ``box_loss_ref``: DETR's composition (l1_loss + per-pair GIoU), eager
  torchvision           ``F.l1_loss(sum)`` + ``torchvision.ops.generalized_box_iou_loss(sum)``
  torch_compile_ref     ``torch.compile(box_loss_ref)`` (Inductor)
  unit_fast_triton      ``box_loss(..., backend="triton")`` (CUDA only: the interpreter is
                        never benchmarked)
  unit_fast_cpp         ``box_loss(..., backend="cpp")``: the C++ CPU kernels (CPU only)

The timed call returns both losses and the gradient wrt the predictions (the targets need
none, as in training), for ``5 * loss_bbox + 2 * loss_giou`` (DETR's loss weights).  Before
timing, each provider's result is checked against the float64 reference.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision

from benchmarks.conftest import baseline_and_triton_cases, measure
from benchmarks.shapes import BOX_LOSS_DTYPE, BOX_LOSS_SHAPES, box_loss_pairs
from unit_fast import _ext
from unit_fast.ops.box_loss import box_loss, box_loss_ref
from unit_fast.ops.box_loss.reference import box_cxcywh_to_xyxy

WEIGHTS = (5.0, 2.0)  # DETR bbox_loss_coef, giou_loss_coef
# float32 sums over up to 1M pairs, and torchvision's eps = 1e-7 in its denominators.
CHECK_TOL = {"rtol": 1e-4, "atol": 1e-5}

NO_EXT = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"unit_fast._C not loaded: {_ext.EXT_ERROR}")
CASES = baseline_and_triton_cases(("detr_reference", "torchvision", "torch_compile_ref")) + [
    pytest.param("unit_fast_cpp", "cpu", id="unit_fast_cpp-cpu", marks=NO_EXT)]


def _torchvision_losses(src, tgt, num_boxes):
    loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    loss_giou = torchvision.ops.generalized_box_iou_loss(
        box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), reduction="sum") / num_boxes
    return loss_bbox, loss_giou


@functools.cache
def _compiled_reference():
    return torch.compile(box_loss_ref)


def _losses_fn(provider):
    if provider == "detr_reference":
        return box_loss_ref
    if provider == "torchvision":
        return _torchvision_losses
    if provider == "torch_compile_ref":
        return _compiled_reference()
    if provider == "unit_fast_cpp":
        return functools.partial(box_loss, backend="cpp")
    return functools.partial(box_loss, backend="triton")


def _forward_backward(losses_fn, num_boxes):
    """``(src, tgt) -> (loss_bbox, loss_giou, d(5 loss_bbox + 2 loss_giou)/d src)``."""

    def call(pair):
        src, tgt = pair
        loss_bbox, loss_giou = losses_fn(src, tgt, num_boxes)
        (grad_src,) = torch.autograd.grad(WEIGHTS[0] * loss_bbox + WEIGHTS[1] * loss_giou, src)
        return loss_bbox, loss_giou, grad_src

    return call


@functools.cache
def _expected(shape_name):
    """float64 reference results of each input set of a shape (CPU), keyed by set index."""
    shape = BOX_LOSS_SHAPES[shape_name]
    call = _forward_backward(box_loss_ref, float(shape.N))
    out = []
    for src, tgt in box_loss_pairs(shape):
        out.append([t.detach() for t in call((src.double().requires_grad_(), tgt.double()))])
    return out


@pytest.mark.parametrize("shape", list(BOX_LOSS_SHAPES.values()), ids=list(BOX_LOSS_SHAPES))
@pytest.mark.parametrize("provider,device", CASES)
def test_box_loss(benchmark, provider, device, shape):
    benchmark.group = f"box_loss:{shape.name}"
    benchmark.extra_info.update(
        op="box_loss", case=shape.name, provider=provider, device=device, shape=shape.as_dict(),
        dtype=str(BOX_LOSS_DTYPE).removeprefix("torch."),
        role="unit_fast" if provider.startswith("unit_fast") else "baseline",
    )
    inputs = [(src.requires_grad_(), tgt) for src, tgt in box_loss_pairs(shape, device)]
    want = {id(x): w for x, w in zip(inputs, _expected(shape.name))}
    call = _forward_backward(_losses_fn(provider), float(shape.N))

    def check(x, out):
        for name, got, expected in zip(("loss_bbox", "loss_giou", "grad_src"), out, want[id(x)]):
            torch.testing.assert_close(
                got.detach().double().cpu(), expected, **CHECK_TOL,
                msg=lambda m, name=name: f"{provider} {name} vs float64 reference: {m}")

    measure(benchmark, call, inputs, device, check)
