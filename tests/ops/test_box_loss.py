"""unit_fast::box_loss: every backend on every device against DETR's loss_boxes (the fp64
reference), torchvision's generalized_box_iou_loss and torch's L1.

Losses are reductions: values and gradients follow the "2x the reference's own error" rule
(``assert_within_ref_error``).  On a CPU-only machine the Triton kernels run through the
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from unit_fast import _backend, _ext
from unit_fast.box_ops import box_xyxy_to_cxcywh
from unit_fast.ops.box_loss import BoxLoss, box_loss, box_loss_ref
from unit_fast.ops.box_loss import triton as box_loss_triton
from unit_fast.ops.box_loss.reference import box_cxcywh_to_xyxy
from unit_fast.testing import REF_ERROR_ATOL, assert_close_ref, assert_within_ref_error

CUDA = torch.cuda.is_available()
# On CPU every backend, explicitly: Triton is never a CPU default, the interpreter runs it.
NO_EXT = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"unit_fast._C not loaded ({_ext.EXT_ERROR})")
CPP = pytest.param("cpu", "cpp", marks=NO_EXT, id="cpu-cpp")
DEVICE_BACKENDS = [("cpu", "reference"), ("cpu", "triton"), CPP]
if CUDA:
    DEVICE_BACKENDS += [("cuda", b) for b in _backend.backends_for("box_loss", "cuda")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Hand-made pairs (cxcywh): each exercises one branch of the GIoU's max / min / clamp.  The
# coordinates are dyadic, so corners are exact in every dtype and a tie in float64 is one in
# float32 too (otherwise the subgradient at the kink would legitimately differ).
CASES = {
    "overlapping": ([0.375, 0.5, 0.25, 0.125], [0.5, 0.4375, 0.25, 0.25]),
    "disjoint": ([0.125, 0.125, 0.0625, 0.0625], [0.875, 0.875, 0.125, 0.125]),
    "nested": ([0.5, 0.5, 0.5, 0.5], [0.53125, 0.46875, 0.25, 0.125]),
    "identical": ([0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]),
    "touching_edge": ([0.5, 0.5, 0.25, 0.25], [0.75, 0.5, 0.25, 0.25]),  # x1 == x0: clamp at 0
    "touching_corner": ([0.5, 0.5, 0.25, 0.25], [0.75, 0.75, 0.25, 0.25]),
    "shared_left_edge": ([0.5, 0.5, 0.25, 0.5], [0.5625, 0.5, 0.375, 0.25]),  # max / min ties
    "cross": ([0.5, 0.5, 0.25, 0.75], [0.5, 0.5, 0.75, 0.25]),
    "point_in_box": ([0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.25, 0.25]),  # zero-area src
}


def random_pairs(n, dtype=torch.float32, device="cpu"):
    """``n`` matched pairs of cxcywh boxes: targets anywhere, predictions near them (most
    overlap, some do not), sides in [0.05, 0.5]."""
    tgt = torch.cat([torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.45 + 0.05], 1)  # [n, 4]
    src = (tgt + (torch.rand(n, 4) - 0.5) * 0.3).abs()  # [n, 4]: abs keeps w, h >= 0
    return src.to(device, dtype), tgt.to(device, dtype)


def run(fn, src, tgt, num_boxes, weights=(2.0, 3.0)):
    """Losses of ``fn`` and the gradients of ``w0 * loss_bbox + w1 * loss_giou`` wrt both inputs."""
    src = src.detach().clone().requires_grad_()
    tgt = tgt.detach().clone().requires_grad_()
    loss_bbox, loss_giou = fn(src, tgt, num_boxes)
    (weights[0] * loss_bbox + weights[1] * loss_giou).backward()
    return loss_bbox.detach(), loss_giou.detach(), src.grad, tgt.grad


def interpreter_truncates_bf16(device, backend, dtype):
    """The Triton interpreter (triton 3.8) converts float32 to bfloat16 by truncation, even
    with ``fp_downcast_rounding="rtne"``; compiled Triton rounds to nearest (``cvt.rn``)."""
    return device == "cpu" and backend == "triton" and dtype == torch.bfloat16


def check_against_reference(device, backend, src, tgt, num_boxes, dtype):
    got = run(lambda s, t, nb: box_loss(s, t, nb, backend=backend), src, tgt, num_boxes)
    hi = run(box_loss_ref, src.double().cpu(), tgt.double().cpu(), num_boxes)
    lowp = run(box_loss_ref, src.cpu(), tgt.cpu(), num_boxes)
    for name, g, h, lo in zip(("loss_bbox", "loss_giou", "grad_src", "grad_tgt"), got, hi, lowp):
        assert g.device.type == device
        if name.startswith("grad") and interpreter_truncates_bf16(device, backend, dtype):
            # Loosened by one bfloat16 ulp (|x| * 2**-7): the interpreter truncates the float32
            # gradient when storing it as bfloat16 (up to 1 ulp off) where the reference rounds
            # (half an ulp); the float32 values before the store are checked at float32 below.
            err = (g.double() - h).abs().max().item()
            ref_err = (lo.double() - h).abs().max().item()
            slack = h.abs().max().item() * 2**-7
            assert err <= 2 * ref_err + REF_ERROR_ATOL[dtype] + slack, f"{name}: {err:.3e}"
            continue
        assert_within_ref_error(g.cpu(), lo, h, dtype, msg=f"{backend} {dtype} {name}")
    return got


# ------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 37, 1029])  # 1029: more than one 1024-pair block
def test_random_pairs(device, backend, dtype, n):
    src, tgt = random_pairs(n, dtype, device)
    got = check_against_reference(device, backend, src, tgt, float(n), dtype)
    loss_bbox, loss_giou, grad_src, grad_tgt = got
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss_bbox.shape == () and loss_bbox.dtype == acc and loss_giou.dtype == acc
    assert grad_src.dtype == dtype and grad_src.shape == (n, 4) and grad_tgt.dtype == dtype


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_box_configurations(device, backend, dtype):
    """Ties and touching edges: gradients equal autograd's subgradients through the reference."""
    src = torch.tensor([s for s, _ in CASES.values()], dtype=dtype)
    tgt = torch.tensor([t for _, t in CASES.values()], dtype=dtype)
    for i, name in enumerate(CASES):  # one pair at a time (names the failing case), then all
        check_against_reference(device, backend, src[i:i + 1].to(device), tgt[i:i + 1].to(device), 1.0, dtype)
    got = run(lambda s, t, nb: box_loss(s, t, nb, backend=backend), src.to(device), tgt.to(device), 4.0)
    want = run(box_loss_ref, src.double(), tgt.double(), 4.0)
    for g, w in zip(got, want):
        assert_close_ref(g, w, dtype=dtype if dtype == torch.float64 else None)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_torchvision_and_l1(device, backend, dtype):
    """loss_giou * num_boxes = torchvision's generalized_box_iou_loss (sum) on xyxy boxes and
    loss_bbox * num_boxes = F.l1_loss (sum), gradients included."""
    n = 53
    src, tgt = random_pairs(n, dtype, device)
    got = run(lambda s, t, nb: box_loss(s, t, nb, backend=backend), src, tgt, 1.0)

    def peer(s, t, nb):
        l1 = F.l1_loss(s, t, reduction="sum")
        giou = torchvision.ops.generalized_box_iou_loss(box_cxcywh_to_xyxy(s), box_cxcywh_to_xyxy(t),
                                                        reduction="sum")
        return l1 / nb, giou / nb

    want = run(peer, src.double(), tgt.double(), 1.0)
    # Loosened: torchvision adds eps = 1e-7 to both denominators (union >= 0.0025 here), which
    # moves each pair's GIoU by up to ~1e-4 relative; DETR's formula has no eps.
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ awkward inputs
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_slice"])
def test_non_contiguous(device, backend, layout):
    n = 19
    src, tgt = random_pairs(n, torch.float32, device)
    if layout == "column_slice":  # stride (8, 2)
        src = torch.stack([src, src], -1).flatten(1)[:, ::2]
        tgt = torch.stack([tgt, tgt], -1).flatten(1)[:, ::2]
    elif layout == "transposed":  # stride (1, n)
        src, tgt = src.t().contiguous().t(), tgt.t().contiguous().t()
    else:  # every other row: stride (8, 1)
        src = torch.stack([src, src + 1], 1).flatten(0, 1)[::2]
        tgt = torch.stack([tgt, tgt + 1], 1).flatten(0, 1)[::2]
    assert not src.is_contiguous()
    check_against_reference(device, backend, src, tgt, 7.0, torch.float32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_empty(device, backend, monkeypatch):
    """No matched pairs: both losses 0 (DETR's loss with no targets), empty gradients, no launch."""

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for N = 0")

    monkeypatch.setattr(box_loss_triton, "_box_loss_fwd_kernel", no_launch)
    monkeypatch.setattr(box_loss_triton, "_box_loss_bwd_kernel", no_launch)
    src = torch.empty(0, 4, device=device, requires_grad=True)
    tgt = torch.empty(0, 4, device=device, requires_grad=True)
    loss_bbox, loss_giou = box_loss(src, tgt, 1.0, backend=backend)
    assert loss_bbox.item() == 0.0 and loss_giou.item() == 0.0
    (loss_bbox + loss_giou).backward()
    assert src.grad.shape == (0, 4) and tgt.grad.shape == (0, 4)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mixed_dtypes_and_target_without_grad(device, backend):
    """float16 predictions with float32 targets (autocast): computed in float32, each gradient
    in its input's dtype; targets that do not require grad get none (the kernel skips them)."""
    src, tgt = random_pairs(11, torch.float32, device)
    s = src.half().requires_grad_()
    loss_bbox, loss_giou = box_loss(s, tgt, 11.0, backend=backend)
    assert loss_bbox.dtype == torch.float32
    (loss_bbox + loss_giou).backward()
    assert s.grad.dtype == torch.float16 and tgt.grad is None
    s_hi = s.detach().double().requires_grad_()
    ref = box_loss_ref(s_hi, tgt.double(), 11.0)
    (ref[0] + ref[1]).backward()
    assert_close_ref(loss_bbox, ref[0], dtype=torch.float32)
    assert_close_ref(loss_giou, ref[1], dtype=torch.float32)
    assert_close_ref(s.grad, s_hi.grad)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_num_boxes_float_or_tensor(device, backend):
    src, tgt = random_pairs(9, torch.float32, device)
    by_float = box_loss(src, tgt, 6.0, backend=backend)
    for nb in (torch.tensor(6.0, device=device), torch.tensor(6, device=device), torch.tensor(6.0)):
        by_tensor = box_loss(src, tgt, nb, backend=backend)
        for a, b in zip(by_float, by_tensor):
            assert b.device == a.device
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ NaN and degenerate boxes
@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the interpreter's 0 / 0
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_degenerate_boxes(device, backend):
    """Two zero-area boxes have union 0: GIoU is 0 / 0 = NaN in DETR's formula, in both
    backends; a zero-area box against a proper box is finite.  Gradients match autograd's."""
    pairs = {
        "identical_points": ([0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]),
        "distinct_points": ([0.2, 0.2, 0.0, 0.0], [0.7, 0.6, 0.0, 0.0]),
        "identical_lines": ([0.5, 0.5, 0.0, 0.3], [0.5, 0.5, 0.0, 0.3]),
        "point_vs_box": ([0.5, 0.5, 0.0, 0.0], [0.4, 0.5, 0.3, 0.3]),
    }
    for name, (s, t) in pairs.items():
        src = torch.tensor([s], dtype=torch.float64, device=device)
        tgt = torch.tensor([t], dtype=torch.float64, device=device)
        got = run(lambda a, b, nb: box_loss(a, b, nb, backend=backend), src, tgt, 1.0)
        want = run(box_loss_ref, src.cpu(), tgt.cpu(), 1.0)
        assert torch.isfinite(got[0]), name
        assert torch.isnan(got[1]).item() == (name != "point_vs_box"), name
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, equal_nan=True, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_prediction_propagates(device, backend):
    src, tgt = random_pairs(5, torch.float32, device)
    src[2, 1] = float("nan")
    loss_bbox, loss_giou = box_loss(src, tgt, 5.0, backend=backend)
    assert torch.isnan(loss_bbox) and torch.isnan(loss_giou)


# ------------------------------------------------------------------ autograd and registration
@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=NO_EXT)])
def test_gradcheck(backend):
    src, tgt = random_pairs(3, torch.float64)
    src.requires_grad_()
    tgt.requires_grad_()

    def f(s, t):
        return box_loss(s, t, torch.tensor(3.0, dtype=torch.float64), backend=backend)

    assert torch.autograd.gradcheck(f, (src, tgt))
    assert torch.autograd.gradcheck(lambda s: f(s, tgt.detach()), (src,))  # target grad skipped


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=NO_EXT)])
def test_double_backward_raises(backend):
    src, tgt = random_pairs(3, torch.float64)
    src.requires_grad_()
    loss_bbox, loss_giou = box_loss(src, tgt, 3.0, backend=backend)
    (g,) = torch.autograd.grad(loss_bbox + loss_giou, src, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("device,backend", [c for c in DEVICE_BACKENDS if c[1] in ("triton", "cpp")
                                            or getattr(c, "id", "") == "cpu-cpp"])
def test_opcheck(device, backend):
    ops = torch.ops.unit_fast
    fwd, bwd = ((ops.box_loss_cpp, ops._box_loss_cpp_backward) if backend == "cpp"
                else (ops.box_loss, ops._box_loss_backward))
    src, tgt = random_pairs(6, torch.float32, device)
    torch.library.opcheck(fwd.default, (src.requires_grad_(), tgt))
    transposed = src.detach().t().contiguous().t()  # stride (1, 6)
    torch.library.opcheck(fwd.default, (transposed, tgt.half()))
    g1, g2 = torch.tensor(0.5, device=device), torch.tensor(2.0, device=device)
    for need_target_grad in (True, False):
        torch.library.opcheck(bwd.default, (g1, g2, src.detach(), tgt, need_target_grad))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=NO_EXT)])
def test_compile_fullgraph(backend):
    def f(s, t, nb):
        loss_bbox, loss_giou = box_loss(s, t, nb, backend=backend)
        return 5.0 * loss_bbox + 2.0 * loss_giou

    src, tgt = random_pairs(10, torch.float32)
    nb = torch.tensor(10.0)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    s = src.clone().requires_grad_()
    out = compiled(s, tgt, nb)
    out.backward()
    s_ref = src.double().requires_grad_()
    ref = box_loss_ref(s_ref, tgt.double(), nb)
    (5.0 * ref[0] + 2.0 * ref[1]).backward()
    assert_close_ref(out, 5.0 * ref[0] + 2.0 * ref[1], dtype=torch.float32)
    assert_close_ref(s.grad, s_ref.grad)


def test_default_backend_and_override(monkeypatch):
    assert _backend.select_backend("box_loss", "cpu") == ("cpp" if _ext.HAS_EXT else "reference")
    src, tgt = random_pairs(4)
    launches = []
    fwd = box_loss_triton.box_loss_fwd_triton
    monkeypatch.setattr(box_loss_triton, "box_loss_fwd_triton", lambda *a: launches.append(1) or fwd(*a))
    monkeypatch.setenv("UNIT_FAST_BACKEND", "triton")
    forced = box_loss(src, tgt, 4.0)
    assert launches == [1]
    ref = box_loss_ref(src.double(), tgt.double(), 4.0)
    for a, b in zip(forced, ref):
        assert_close_ref(a, b, dtype=torch.float32)


def test_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match=r"\(N, 4\)"):
        box_loss(torch.rand(3, 5), torch.rand(3, 5), 1.0, backend="triton")
    with pytest.raises(RuntimeError, match="target_boxes"):
        box_loss(torch.rand(3, 4), torch.rand(2, 4), 1.0, backend="triton")


BAD_ARGS = {
    "not_n_by_4": (torch.rand(3, 5), torch.rand(3, 5)),
    "one_dim": (torch.rand(4), torch.rand(4)),
    "shape_mismatch": (torch.rand(3, 4), torch.rand(2, 4)),
    "integer_boxes": (torch.rand(3, 4), torch.ones(3, 4, dtype=torch.long)),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_raise_as_reference(name):
    """Bad shapes and dtypes: the same exception and message on every backend and from the C++
    op called directly (which checks its own arguments)."""
    src, tgt = BAD_ARGS[name]
    with pytest.raises(RuntimeError) as ref_err:
        box_loss(src, tgt, 1.0, backend="reference")
    backends = ["triton"] + (["cpp"] if _ext.HAS_EXT else [])
    for backend in backends:
        with pytest.raises(RuntimeError) as err:
            box_loss(src, tgt, 1.0, backend=backend)
        assert str(err.value) == str(ref_err.value), backend
    if _ext.HAS_EXT:
        for op_call in (lambda: torch.ops.unit_fast.box_loss_cpp(src, tgt),
                        lambda: torch.ops.unit_fast._box_loss_cpp_backward(
                            torch.tensor(1.0), torch.tensor(1.0), src, tgt, True)):
            with pytest.raises(RuntimeError) as err:
                op_call()
            assert str(err.value).splitlines()[0] == str(ref_err.value)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="needs unit_fast._C")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["src", "tgt"])
def test_cpp_non_finite_like_reference(value, where):
    """A non-finite coordinate: nothing raises (as in the reference), the C++ losses are the
    reference's (NaN / inf alike), the other pairs' gradients are untouched, and the pair's own
    gradient is non-finite wherever autograd's is.  (Not bitwise there: with an infinite input
    autograd's graph multiplies inf by 0 in other places than the analytic formula does.)"""
    src, tgt = random_pairs(6, torch.float64)
    (src if where == "src" else tgt)[2, 3] = value
    got = run(lambda s, t, nb: box_loss(s, t, nb, backend="cpp"), src, tgt, 6.0)
    want = run(box_loss_ref, src, tgt, 6.0)
    for name, g, w in zip(("loss_bbox", "loss_giou"), got[:2], want[:2], strict=True):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-12, atol=1e-12, msg=name)
    others = torch.arange(6) != 2
    for name, g, w in zip(("grad_src", "grad_tgt"), got[2:], want[2:], strict=True):
        torch.testing.assert_close(g[others], w[others], rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.isfinite(g[2])[~torch.isfinite(w[2])].any(), name


@pytest.mark.skipif(not _ext.HAS_EXT, reason="needs unit_fast._C")
def test_cpp_thread_count_invariant():
    """Fixed blocks, partials added in block order: bitwise the same losses at 1 and 2 threads."""
    src, tgt = random_pairs(5000)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.unit_fast.box_loss_cpp(src, tgt)
        torch.set_num_threads(2)
        two = torch.ops.unit_fast.box_loss_cpp(src, tgt)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_module():
    module = BoxLoss(backend="triton")
    assert "triton" in repr(module)
    src, tgt = random_pairs(4)
    for a, b in zip(module(src, tgt, 4.0), box_loss_ref(src.double(), tgt.double(), 4.0)):
        assert_close_ref(a, b, dtype=torch.float32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_touching_edges_gradient(device, backend):
    # Top edge of the prediction on the target's bottom edge (y = 0.77734375, exact): overlap
    # height exactly 0, where autograd's clamp(min=0) passes no gradient.
    src = box_xyxy_to_cxcywh(torch.tensor([[-0.1181640625, 0.76171875, 0.38671875, 0.77734375]],
                                          dtype=torch.float64))
    tgt = box_xyxy_to_cxcywh(torch.tensor([[0.265625, 0.77734375, 0.33203125, 0.8125]], dtype=torch.float64))
    x, rx = src.clone().to(device).requires_grad_(), src.clone().requires_grad_()
    got = torch.autograd.grad(sum(box_loss(x, tgt.to(device), 1.0, backend=backend)), x)[0]
    want = torch.autograd.grad(sum(box_loss_ref(rx, tgt, 1.0)), rx)[0]
    torch.testing.assert_close(got.cpu(), want)
