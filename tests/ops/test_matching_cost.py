"""unit_fast::matching_cost (reference, C++ CPU and Triton) against DETR's own cross-image cost in float64.

The check evaluates DETR's ``models/matcher.py`` formula -- ``torch.cdist(p=1)``, softmax (or
MMF's log-softmax) and ``generalized_box_iou`` on the ``[B*Q, sum T]`` matrix -- in float64
and keeps each image's diagonal ``[Q, T_b]`` block; the op must equal it there and be ``+inf``
in the padding columns.  On a CPU-only machine the Triton kernel runs through the interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``), so shapes stay small.
"""

import pytest
import torch

from unit_fast import _backend, _ext
from unit_fast.ops.hungarian_match.reference import _box_cxcywh_to_xyxy, _generalized_box_iou
from unit_fast.ops.matching_cost import matching_cost
from unit_fast.testing import assert_close_ref, devices

COSTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)  # DETR/UniT defaults
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CUDA = torch.cuda.is_available()


def _cases():
    """Every (device, backend), listed explicitly: a backend missing here is skipped with its reason."""
    cases = []
    for device in devices():
        missing = _backend.missing_backends("matching_cost", device)
        for backend in ("reference", "cpp", "triton"):
            marks = [pytest.mark.skipif(backend in missing, reason=str(missing.get(backend)))]
            cases.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return cases


CASES = _cases()


def make_inputs(L, B, Q, T, C1, sizes, dtype=torch.float32, device="cpu", contiguous=True):
    """Random matcher inputs; padding holds garbage (labels out of range, NaN boxes) on purpose.

    Returns ``(pred_logits ([L,] B, Q, C1), pred_boxes ([L,] B, Q, 4), tgt_labels (B, T),
    tgt_boxes (B, T, 4), num_targets (B,))``; ``L=None`` gives the 3-D layout.
    """
    lead = (B, Q) if L is None else (L, B, Q)
    logits = (torch.randn(*lead, C1) * 3).to(dtype)
    boxes = (torch.rand(*lead, 4) * 0.5 + 0.1).to(dtype)  # cxcywh, w and h in [0.1, 0.6)
    labels = torch.randint(0, C1, (B, T))
    tboxes = (torch.rand(B, T, 4) * 0.5 + 0.1).to(dtype)
    num_targets = torch.tensor(sizes, dtype=torch.long)
    pad = torch.arange(T) >= num_targets[:, None]  # [B, T]
    labels[pad] = torch.tensor([-1, C1 + 7]).repeat(B * T)[: int(pad.sum())]  # ignored: never gathered
    tboxes[pad] = float("nan")  # ignored: the padding columns are +inf regardless
    tensors = [logits, boxes, labels, tboxes, num_targets]
    if not contiguous:
        tensors = [_non_contiguous(t) for t in tensors]
    return [t.to(device) for t in tensors]


def _non_contiguous(t):
    """The same values with every stride changed: reversed dims, transposed back, last dim strided."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)  # [..., n, 2]
    flipped = wide.permute(*reversed(range(wide.dim()))).contiguous()  # [2, n, ...]
    out = flipped.permute(*reversed(range(wide.dim())))[..., 0]  # [..., n], strides reversed
    assert torch.equal(out.nan_to_num(), t.nan_to_num()) and (t.dim() < 2 or not out.is_contiguous())
    return out


def detr_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class, cost_bbox, cost_giou,
              logsoftmax=False):
    """DETR's cross-image cost in float64, cut into per-image blocks ``([L,] B, Q, T)``, +inf padding."""
    layered = pred_logits.dim() == 4
    logits = pred_logits if layered else pred_logits[None]  # [L, B, Q, C+1]
    boxes = pred_boxes if layered else pred_boxes[None]  # [L, B, Q, 4]
    L, B, Q, _ = logits.shape
    T = tgt_labels.shape[1]
    sizes = [min(int(n), T) for n in num_targets.cpu()]  # host read: fine in a test
    # torch.cat needs one tensor at least: an empty batch contributes the [0:0] slices.
    tgt_ids = torch.cat([tgt_labels[b, :n] for b, n in enumerate(sizes)] + [tgt_labels.new_zeros(0)]).cpu()
    tgt_bbox = torch.cat([tgt_boxes[b, :n] for b, n in enumerate(sizes)] + [tgt_boxes.new_zeros(0, 4)])
    tgt_bbox = tgt_bbox.cpu().double()  # [sum T, 4]
    out = torch.full((L, B, Q, T), float("inf"), dtype=torch.float64)
    norm = torch.log_softmax if logsoftmax else torch.softmax
    for layer in range(L):
        out_prob = norm(logits[layer].flatten(0, 1).cpu().double(), -1)  # [B*Q, C+1]
        out_bbox = boxes[layer].flatten(0, 1).cpu().double()  # [B*Q, 4]
        c_class = -out_prob[:, tgt_ids]
        c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        c_giou = -_generalized_box_iou(_box_cxcywh_to_xyxy(out_bbox), _box_cxcywh_to_xyxy(tgt_bbox))
        C = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou  # [B*Q, sum T]
        C = C.view(B, Q, len(tgt_ids))  # [B, Q, sum T]
        for b, block in enumerate(C.split(sizes, -1)):
            out[layer, b, :, : sizes[b]] = block[b]  # the diagonal block
    return out if layered else out[0]


def check(out, inputs, logsoftmax):
    """``out`` equals DETR's float64 cost on the real columns and is +inf on the padding."""
    want = detr_cost(*inputs, **COSTS, logsoftmax=logsoftmax)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert out.device == inputs[0].device
    assert torch.equal(torch.isinf(out).cpu(), torch.isinf(want)), "+inf exactly on the padding columns"
    # The op computes in float32 from the given inputs, and the float64 check is evaluated on
    # those same (already rounded) inputs, so float32's tolerance applies whatever their dtype.
    assert_close_ref(out, want, dtype=torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [None, 1, 6], ids=["3d", "L1", "L6"])
@pytest.mark.parametrize("logsoftmax", [False, True], ids=["softmax", "logsoftmax"])
def test_matches_detr(device, backend, dtype, L, logsoftmax):
    inputs = make_inputs(L, 3, 37, 11, 92, [11, 0, 5], dtype, device)  # COCO's 91 classes + no-object
    out = matching_cost(*inputs, **COSTS, logsoftmax=logsoftmax, backend=backend)
    check(out, inputs, logsoftmax)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "L,B,Q,T,C1,sizes",
    [
        (None, 1, 1, 1, 1, [1]),  # 1x1, a single class
        (None, 2, 5, 0, 7, [0, 0]),  # T = 0: empty result, no launch
        (2, 2, 5, 3, 7, [0, 0]),  # no targets anywhere: all +inf
        (None, 0, 5, 3, 7, []),  # empty batch
        (None, 2, 0, 3, 7, [3, 1]),  # no queries
        (None, 2, 70, 67, 300, [67, 13]),  # > 1 block of queries, of targets and of classes
        (2, 3, 33, 17, 129, [17, 16, 1]),  # one past a power of two everywhere
        (None, 2, 6, 4, 5, [9, 2]),  # num_targets > T acts as T
    ],
)
def test_shapes(device, backend, L, B, Q, T, C1, sizes):
    inputs = make_inputs(L, B, Q, T, C1, sizes, device=device)
    out = matching_cost(*inputs, **COSTS, backend=backend)
    check(out, inputs, False)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("L", [None, 6], ids=["3d", "L6"])
def test_non_contiguous(device, backend, L):
    inputs = make_inputs(L, 3, 9, 5, 11, [5, 2, 0], device=device, contiguous=False)
    out = matching_cost(*inputs, **COSTS, logsoftmax=True, backend=backend)
    check(out, inputs, True)


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_predictions_and_bad_labels(device, backend):
    """NaN in a query's logits or box -> NaN costs in its row; a bad real label -> NaN column."""
    logits, boxes, labels, tboxes, num_targets = make_inputs(2, 2, 6, 4, 9, [4, 3], device=device)
    logits[0, 1, 2, 5] = float("nan")  # a class the targets may not even use
    boxes[1, 0, 4, 3] = float("nan")
    labels[1, 2] = 9  # == C+1: out of range, a real target (num_targets[1] = 3)
    out = matching_cost(logits, boxes, labels, tboxes, num_targets, **COSTS, backend=backend).cpu()
    nan = torch.zeros(2, 2, 6, 4, dtype=torch.bool)
    nan[0, 1, 2, :3] = nan[1, 0, 4, :] = True
    nan[:, 1, :, 2] = True
    nan[..., 1, :, 3] = False  # image 1's column 3 is padding: +inf wins
    assert torch.equal(torch.isnan(out), nan)
    assert torch.isinf(out[:, 1, :, 3]).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_default_and_forced_backend(device, backend):
    inputs = make_inputs(None, 2, 5, 3, 7, [3, 1], device=device)
    want = _backend.backends_for("matching_cost", device)[0]
    cpu_default = "cpp" if _ext.HAS_EXT else "reference"
    assert want == ("triton" if device == "cuda" else cpu_default)
    default = matching_cost(*inputs, **COSTS)
    forced = matching_cost(*inputs, **COSTS, backend=backend)
    torch.testing.assert_close(default, forced, rtol=1.3e-6, atol=1e-5)


def test_input_checks():
    logits, boxes, labels, tboxes, nt = make_inputs(None, 2, 5, 3, 7, [3, 1])
    with pytest.raises(ValueError, match="pred_boxes"):
        matching_cost(logits, boxes[:, :4], labels, tboxes, nt, **COSTS)
    with pytest.raises(ValueError, match="tgt_labels"):
        matching_cost(logits, boxes, labels[:1], tboxes, nt, **COSTS)
    with pytest.raises(ValueError, match="num_targets"):
        matching_cost(logits, boxes, labels, tboxes, nt[:1], **COSTS)
    with pytest.raises(TypeError, match="num_targets"):
        matching_cost(logits, boxes, labels, tboxes, nt.float(), **COSTS)
    with pytest.raises(ValueError, match="pred_logits"):
        matching_cost(logits[0], boxes[0], labels, tboxes, nt, **COSTS)


@pytest.mark.parametrize("device,backend", CASES)
def test_gradient(device, backend):
    """The reference is differentiable; the Triton and C++ ops are forward only and say so."""
    logits, boxes, labels, tboxes, nt = make_inputs(None, 2, 4, 3, 6, [3, 2], device=device)
    logits.requires_grad_()
    out = matching_cost(logits, boxes, labels, tboxes, nt, **COSTS, backend=backend)
    loss = out[torch.isfinite(out)].sum()
    if backend == "reference":
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
    else:
        with pytest.raises(NotImplementedError, match="no backward"):
            loss.backward()


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.id.endswith(("triton", "cpu-cpp"))])
@pytest.mark.parametrize("L", [None, 2], ids=["3d", "L2"])
def test_opcheck(device, backend, L):
    inputs = make_inputs(L, 2, 5, 3, 7, [3, 1], device=device)
    op = torch.ops.unit_fast.matching_cost_cpp if backend == "cpp" else torch.ops.unit_fast.matching_cost
    torch.library.opcheck(op.default, (*inputs, 1.0, 5.0, 2.0, False))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    inputs = make_inputs(2, 2, 5, 3, 7, [3, 1], device=device)

    def fn(*args):
        return matching_cost(*args, **COSTS, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1.3e-6, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="host syncs only exist with a CUDA device; none here")
def test_no_host_sync_cuda():
    inputs = make_inputs(6, 4, 30, 7, 92, [7, 0, 3, 5], device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = matching_cost(*inputs, **COSTS, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    check(out, inputs, False)


CPP = [c for c in CASES if c.id == "cpu-cpp"]


@pytest.mark.parametrize("device,backend", CPP)
@pytest.mark.parametrize("logsoftmax", [False, True], ids=["softmax", "logsoftmax"])
def test_cpp_non_finite_like_reference(device, backend, logsoftmax):
    """+-inf and NaN logits and boxes: the C++ kernel's NaN / inf pattern is the reference's."""
    logits, boxes, labels, tboxes, nt = make_inputs(2, 2, 8, 5, 40, [5, 3], device=device)
    logits[0, 0, 0, 3] = float("inf")  # a +inf logit: torch's softmax gives the row NaN
    logits[0, 0, 1, :] = float("-inf")  # all -inf: NaN
    logits[0, 0, 2, 7] = float("-inf")  # one -inf: finite
    logits[1, 1, 3, 0] = float("nan")
    boxes[0, 1, 4, 2] = float("inf")  # infinite width: L1 inf, GIoU NaN
    boxes[1, 0, 5, 0] = float("-inf")
    tboxes[0, 1, 3] = float("inf")  # a real target with an infinite height
    tboxes[1, 2, 0] = float("nan")  # a real target with a NaN centre
    boxes[1, 1, 6, 0] = boxes[1, 1, 6, 2] = float("inf")  # cx - w / 2 = inf - inf: NaN corner, L1 inf
    tboxes[0, 4, 1] = tboxes[0, 4, 3] = float("inf")  # the same on a real target
    args = (logits, boxes, labels, tboxes, nt)
    ref = matching_cost(*args, **COSTS, logsoftmax=logsoftmax, backend="reference")
    out = matching_cost(*args, **COSTS, logsoftmax=logsoftmax, backend=backend)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1.3e-6, atol=1e-5)


def _bad_inputs():
    """(name, args, exception, message regex) of every argument check, on 6-layer inputs."""
    logits, boxes, labels, tboxes, nt = make_inputs(6, 2, 5, 3, 7, [3, 1])
    good = (logits, boxes, labels, tboxes, nt)

    def swap(i, value):
        return tuple(value if j == i else a for j, a in enumerate(good))

    return [
        ("logits_2d", swap(0, logits[0, 0]), ValueError, "pred_logits must be"),
        ("boxes_shape", swap(1, boxes[..., :4, :]), ValueError, "pred_boxes must be"),
        ("no_classes", (logits[..., :0], *good[1:]), ValueError, "at least one class"),
        ("labels_batch", swap(2, labels[:1]), ValueError, "tgt_labels must be"),
        ("tboxes_shape", swap(3, tboxes[:, :2]), ValueError, "tgt_boxes must be"),
        ("num_targets_shape", swap(4, nt[:1]), ValueError, "num_targets must be"),
        ("logits_int", swap(0, logits.long()), TypeError, "pred_logits must be a floating tensor"),
        ("boxes_int", swap(1, boxes.int()), TypeError, "pred_boxes must be a floating tensor"),
        ("tboxes_int", swap(3, tboxes.long()), TypeError, "tgt_boxes must be a floating tensor"),
        ("labels_float", swap(2, labels.float()), TypeError, "tgt_labels must hold integers"),
        ("num_targets_bool", swap(4, nt.bool()), TypeError, "num_targets must hold integers"),
    ]


@pytest.mark.parametrize("device,backend", CPP)
@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_cpp_errors_like_reference(device, backend, case):
    """Bad shapes and dtypes raise the reference path's exception type and message, through the
    public function and when the C++ op is called directly (its own checks, same wording)."""
    _, args, exc, message = _bad_inputs()[case]
    with pytest.raises(exc, match=message) as ref_err:
        matching_cost(*args, **COSTS, backend="reference")
    with pytest.raises(exc) as cpp_err:
        matching_cost(*args, **COSTS, backend=backend)
    assert str(cpp_err.value) == str(ref_err.value)
    with pytest.raises(exc) as op_err:
        torch.ops.unit_fast.matching_cost_cpp(*args, 1.0, 5.0, 2.0, False)
    assert str(op_err.value).splitlines()[0] == str(ref_err.value)


@pytest.mark.parametrize("device,backend", CPP)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_thread_count_invariant(device, backend, threads):
    """No cross-task accumulation: the result is bitwise the same at any thread count."""
    inputs = make_inputs(6, 5, 37, 11, 92, [11, 0, 5, 3, 9])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matching_cost(*inputs, **COSTS, backend=backend)
        torch.set_num_threads(threads)
        many = matching_cost(*inputs, **COSTS, backend=backend)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one.nan_to_num(), many.nan_to_num())
