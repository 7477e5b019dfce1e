"""``unit_fast.ops.matching_cost`` (the Hungarian matcher's cost) against DETR's and the torch composition.

Group ``matching_cost:<shape>`` (shapes.py ``MATCHING_COST_SHAPES``), timed in one run on the
same float32 inputs, all on the case's device:
  detr_cross_image     DETR ``models/matcher.py``, once per decoder layer as its criterion calls
                       it: softmax, ``torch.cdist(p=1)`` and ``generalized_box_iou`` on the whole
                       ``[B*Q, sum T]`` matrix, viewed ``[B, Q, sum T]`` (no ``.cpu()``: only the
                       cost is timed).  It computes B times the useful blocks.
  reference            ``matching_cost_ref``: the padded ``[L, B, Q, T]`` torch composition.
  reference_compiled   ``torch.compile(matching_cost_ref)`` (Inductor).
  unit_fast_triton     ``matching_cost(..., backend="triton")``: CUDA only; the Triton
                       interpreter's speed means nothing, so it is never timed on CPU.
  unit_fast_cpp        ``matching_cost(..., backend="cpp")``: the C++ CPU kernel (CPU only;
                       skipped when ``unit_fast._C`` is not built).

Every image has T targets (``num_targets = T``), so the cross-image ``sum T`` is ``B * T`` and
the padded providers do no wasted work; targets arrive already batched (padded, or flattened
for DETR), so no provider pays for collating them.  Before timing, each result's per-image
blocks are checked against the reference's.
"""

import functools

import pytest
import torch

from benchmarks.conftest import cuda_only, devices, measure
from benchmarks.shapes import MATCHER_COSTS, MATCHING_COST_SHAPES, NUM_INPUT_SETS, matching_cost_inputs
from unit_fast import _ext
from unit_fast.ops.hungarian_match.reference import _box_cxcywh_to_xyxy, _generalized_box_iou
from unit_fast.ops.matching_cost import matching_cost, matching_cost_ref

# The providers differ in float32 rounding only (cdist vs a broadcast sum, fused vs unfused).
CHECK_TOL = {"rtol": 1e-5, "atol": 1e-4}

# DETR's cross-image cost materialises several [B*Q, B*T] float32 temporaries per layer (the GIoU
# takes ~8 of them): at RT-DETR's 64 x 300 x 100 that is ~4 GB, and ~8 s per 6-layer call already
# at 64 x 100 x 50 on a 2-core CPU.  Past this many elements per layer it is timed on CUDA only.
CPU_CROSS_IMAGE_MAX = 10**7


def _cases():
    baselines = ("detr_cross_image", "reference", "reference_compiled")
    cases = [pytest.param(p, d, id=f"{p}-{d}") for p in baselines for d in devices()]
    reason = "Triton is timed on CUDA only (the interpreter's speed means nothing); no CUDA device here"
    cases.append(pytest.param("unit_fast_triton", "cuda", id="unit_fast_triton-cuda",
                              marks=cuda_only(reason)))
    no_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"unit_fast._C not loaded ({_ext.EXT_ERROR})")
    cases.append(pytest.param("unit_fast_cpp", "cpu", id="unit_fast_cpp-cpu", marks=no_ext))
    return cases


def detr_cross_image(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets):
    """DETR's ``HungarianMatcher.forward`` cost, per layer: list of L ``(B, Q, sum T)`` float32."""
    del num_targets  # every image has T targets: sum T = B * T
    tgt_ids = tgt_labels.flatten()  # [sum T]
    tgt_bbox = tgt_boxes.flatten(0, 1)  # [sum T, 4]
    out = []
    for logits, boxes in zip(pred_logits, pred_boxes):  # [B, Q, C+1], [B, Q, 4] per layer
        B, Q = logits.shape[:2]
        out_prob = logits.flatten(0, 1).softmax(-1)  # [B*Q, C+1]
        out_bbox = boxes.flatten(0, 1)  # [B*Q, 4]
        c_class = -out_prob[:, tgt_ids]  # [B*Q, sum T]
        c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)  # [B*Q, sum T]
        c_giou = -_generalized_box_iou(_box_cxcywh_to_xyxy(out_bbox.float()), _box_cxcywh_to_xyxy(tgt_bbox))
        C = MATCHER_COSTS["cost_bbox"] * c_bbox + MATCHER_COSTS["cost_class"] * c_class \
            + MATCHER_COSTS["cost_giou"] * c_giou
        out.append(C.view(B, Q, -1))  # [B, Q, sum T]
    return out


def _diagonal_blocks(cross, T):
    """Per-image blocks of DETR's per-layer ``(B, Q, B*T)`` costs -> ``(L, B, Q, T)``."""
    blocks = []
    for c in cross:
        B, Q = c.shape[:2]
        blocks.append(torch.diagonal(c.view(B, Q, B, T), dim1=0, dim2=2).permute(2, 0, 1))  # [B, Q, T]
    return torch.stack(blocks)  # [L, B, Q, T]


@functools.cache
def _compiled_reference():
    return torch.compile(matching_cost_ref, dynamic=False)


def _provider(provider):
    """``provider``'s cost as a callable of one input tuple."""
    if provider == "detr_cross_image":
        return lambda x: detr_cross_image(*x)
    if provider == "reference":
        return lambda x: matching_cost_ref(*x, **MATCHER_COSTS)
    if provider == "reference_compiled":
        compiled = _compiled_reference()
        return lambda x: compiled(*x, **MATCHER_COSTS)
    if provider == "unit_fast_cpp":
        return lambda x: matching_cost(*x, **MATCHER_COSTS, backend="cpp")
    return lambda x: matching_cost(*x, **MATCHER_COSTS, backend="triton")


@pytest.mark.parametrize("shape", list(MATCHING_COST_SHAPES.values()), ids=list(MATCHING_COST_SHAPES))
@pytest.mark.parametrize("provider,device", _cases())
def test_matching_cost(benchmark, provider, device, shape):
    cross_elems = shape.B * shape.Q * shape.B * shape.T
    if provider == "detr_cross_image" and device == "cpu" and cross_elems > CPU_CROSS_IMAGE_MAX:
        pytest.skip(f"DETR's cross-image cost is {cross_elems:.2e} elements per layer here; "
                    f"timed on CUDA only (CPU limit {CPU_CROSS_IMAGE_MAX:.0e})")
    benchmark.group = f"matching_cost:{shape.name}"
    benchmark.extra_info.update(
        op="matching_cost", case=shape.name, provider=provider, device=device, shape=shape.as_dict(),
        dtype="float32", role="unit_fast" if provider.startswith("unit_fast") else "baseline",
    )
    # CUDA rotates input sets so no call re-reads its inputs from L2; these inputs (>= 2 MB) are
    # past a CPU's L2 anyway, and one set keeps the CPU warm-up short.
    inputs = matching_cost_inputs(shape, device, num_sets=1 if device == "cpu" else NUM_INPUT_SETS)
    want = {id(x): matching_cost_ref(*x, **MATCHER_COSTS) for x in inputs}  # [L, B, Q, T]

    def check(x, out):
        got = _diagonal_blocks(out, shape.T) if provider == "detr_cross_image" else out
        torch.testing.assert_close(got, want[id(x)], **CHECK_TOL,
                                   msg=lambda m: f"{provider} vs reference: {m}")

    measure(benchmark, _provider(provider), inputs, device, check)


