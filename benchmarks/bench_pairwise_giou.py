"""``unit_fast::pairwise_giou`` (forward; forward + backward) against DETR's generalized_box_iou and peers.

Groups ``pairwise_giou:<shape>:<pass>`` (shapes.py ``PAIRWISE_GIOU_SHAPES``), float32 xyxy boxes,
two passes, each its own group (and results case) so providers line up:
  fwd      the GIoU matrix under ``torch.no_grad()`` (how DETR's matcher calls it);
  fwd_bwd  the matrix and the gradient of its weighted sum with respect to both inputs (the
           pairwise-GIoU loss path).
Providers:
  detr_reference      ``pairwise_giou_ref`` (DETR's composition), eager
  torchvision         ``torchvision.ops.generalized_box_iou``
  torch_compile_ref   ``torch.compile(pairwise_giou_ref)`` (Inductor)
  unit_fast_triton    ``pairwise_giou(..., backend="triton")`` (CUDA only: the interpreter is
                      never benchmarked)
  unit_fast_cpp       ``pairwise_giou(..., backend="cpp")``: the C++ CPU kernels (CPU only)
Before timing, every provider's result is checked against the float64 reference.
"""

import functools

import pytest
import torch
import torchvision

from benchmarks.conftest import baseline_and_triton_cases, measure
from benchmarks.shapes import PAIRWISE_GIOU_SHAPES, pairwise_boxes
from unit_fast import _ext
from unit_fast.ops.pairwise_giou import pairwise_giou, pairwise_giou_ref

# float32 gradients are sums over up to 6400 pairs of terms up to ~1/area (~100s): 1e-3.
CHECK_TOL = {"rtol": 1e-3, "atol": 1e-3}

NO_EXT = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"unit_fast._C not loaded: {_ext.EXT_ERROR}")
CASES = baseline_and_triton_cases(("detr_reference", "torchvision", "torch_compile_ref")) + [
    pytest.param("unit_fast_cpp", "cpu", id="unit_fast_cpp-cpu", marks=NO_EXT)]


@functools.cache
def _compiled_reference():
    return torch.compile(pairwise_giou_ref)


def _giou_fn(provider):
    return {
        "detr_reference": pairwise_giou_ref,
        "torchvision": torchvision.ops.generalized_box_iou,
        "torch_compile_ref": _compiled_reference(),
        "unit_fast_triton": functools.partial(pairwise_giou, backend="triton"),
        "unit_fast_cpp": functools.partial(pairwise_giou, backend="cpp"),
    }[provider]


def _forward(giou_fn):
    def call(pair):
        with torch.no_grad():
            return (giou_fn(*pair),)  # ([N, M],)

    return call


def _forward_backward(giou_fn):
    def call(pair):
        a, b = pair
        out = giou_fn(a, b)  # [N, M]
        weights = torch.linspace(0.5, 1.5, out.shape[1], device=out.device)  # [M]: not all-ones
        grads = torch.autograd.grad((out * weights).sum(), (a, b))
        return (out, *grads)

    return call


PASSES = {"fwd": _forward, "fwd_bwd": _forward_backward}


@pytest.mark.parametrize("pass_", list(PASSES))
@pytest.mark.parametrize("shape", list(PAIRWISE_GIOU_SHAPES.values()), ids=list(PAIRWISE_GIOU_SHAPES))
@pytest.mark.parametrize("provider,device", CASES)
def test_pairwise_giou(benchmark, provider, device, shape, pass_):
    case = f"{shape.name}:{pass_}"
    benchmark.group = f"pairwise_giou:{case}"
    benchmark.extra_info.update(op="pairwise_giou", case=case, provider=provider, device=device,
                                shape=shape.as_dict(), dtype="float32",
                                role="unit_fast" if provider.startswith("unit_fast") else "baseline")
    if device == "cpu" and shape.N * shape.M > 1_000_000 and provider == "torch_compile_ref":
        pytest.skip("Inductor compile + run of the 8M-pair case is minutes on a 2-core CPU")
    inputs = pairwise_boxes(shape, device, num_sets=2)
    if pass_ == "fwd_bwd":
        inputs = [(a.requires_grad_(), b.requires_grad_()) for a, b in inputs]
    make = PASSES[pass_]
    ref = make(pairwise_giou_ref)

    def check(x, out):
        a, b = x
        h1 = a.detach().double().cpu().requires_grad_(pass_ == "fwd_bwd")
        h2 = b.detach().double().cpu().requires_grad_(pass_ == "fwd_bwd")
        for got, expected in zip(out, ref((h1, h2)), strict=True):
            torch.testing.assert_close(got.detach().double().cpu(), expected.detach(), **CHECK_TOL)

    measure(benchmark, make(_giou_fn(provider)), inputs, device, check)
