"""unit_fast::pairwise_giou: every backend against the fp64 reference and torchvision.ops."""

import pytest
import torch
import torchvision.ops as tvo

from unit_fast import _backend, _ext, box_ops
from unit_fast.ops.pairwise_giou import pairwise_giou, pairwise_giou_ref
from unit_fast.testing import assert_close_ref, assert_within_ref_error, devices

# On CPU the Triton kernels run through the interpreter (tests/conftest.py sets it).
NO_EXT = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"unit_fast._C not loaded: {_ext.EXT_ERROR}")
CPP = pytest.param("cpu", "cpp", marks=NO_EXT, id="cpu-cpp")
CASES = [(d, b) for d in devices() for b in (["reference", "triton"] if d == "cpu"
                                              else _backend.backends_for("pairwise_giou", d))] + [CPP]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Overlapping, disjoint, nested, identical and touching boxes (exact in binary).
SPECIAL = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0],
                        [0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0], [2.0, 0.0, 3.0, 2.0]],
                       dtype=torch.float64)


def random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.5, 0.5],
                                                                             dtype=torch.float64)
    return box_ops.box_cxcywh_to_xyxy(x + torch.tensor([0, 0, 0.01, 0.01], dtype=torch.float64))


def check(device, backend, b1, b2, dtype):
    """Values and gradients in ``dtype`` within twice the reference's own error in ``dtype``."""
    x1 = b1.to(device, dtype).requires_grad_()
    x2 = b2.to(device, dtype).requires_grad_()
    h1, h2 = b1.clone().requires_grad_(), b2.clone().requires_grad_()
    l1, l2 = b1.to(dtype).requires_grad_(), b2.to(dtype).requires_grad_()
    g = torch.rand(b1.shape[0], b2.shape[0], dtype=torch.float64)
    out = pairwise_giou(x1, x2, backend=backend)
    hi = pairwise_giou_ref(h1, h2)
    lo = pairwise_giou_ref(l1, l2)
    assert out.dtype == dtype and out.shape == (b1.shape[0], b2.shape[0])
    assert_within_ref_error(out.cpu(), lo, hi, dtype, "value")
    if backend in ("triton", "cpp"):
        # fp32 math rounded once to ``dtype``: against the fp64 reference on the same (rounded)
        # inputs, the elementwise table applies as it stands.
        assert_close_ref(out, pairwise_giou_ref(b1.to(dtype).double(), b2.to(dtype).double()), dtype, "value")
    if out.numel() == 0:
        return
    grads = torch.autograd.grad((out * g.to(device, dtype)).sum(), (x1, x2))
    hi_g = torch.autograd.grad((hi * g).sum(), (h1, h2))
    lo_g = torch.autograd.grad((lo * g.to(dtype)).sum(), (l1, l2))
    for got, want, low in zip(grads, hi_g, lo_g):
        assert_within_ref_error(got.cpu(), low, want, dtype, "gradient")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (33, 17), (0, 4), (4, 0)])
def test_against_reference(device, backend, dtype, n, m):
    check(device, backend, random_boxes(n, n), random_boxes(m, 100 + m), dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_special_boxes_and_torchvision(device, backend):
    check(device, backend, SPECIAL, SPECIAL, torch.float64)
    out = pairwise_giou(SPECIAL.to(device), SPECIAL.to(device), backend=backend).cpu()
    torch.testing.assert_close(out, tvo.generalized_box_iou(SPECIAL, SPECIAL))
    assert (out.diagonal() == 1).all()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous(device, backend, dtype):
    base = random_boxes(12, 3)
    b1 = base.to(device, dtype).t().contiguous().t().requires_grad_()  # [12, 4] column-major
    b2 = base.to(device, dtype)[::2].requires_grad_()  # [6, 4], row stride 8
    g = torch.rand(6, 12, dtype=torch.float64).t()  # [12, 6] transposed incoming gradient
    assert not b1.is_contiguous() and not b2.is_contiguous() and not g.is_contiguous()
    out = pairwise_giou(b1, b2, backend=backend)
    grads = torch.autograd.grad(out, (b1, b2), g.to(device, dtype))
    h1, h2 = base.clone().requires_grad_(), base[::2].clone().requires_grad_()
    hi = pairwise_giou_ref(h1, h2)
    hi_g = torch.autograd.grad(hi, (h1, h2), g)
    l1, l2 = base.to(dtype).requires_grad_(), base.to(dtype)[::2].detach().requires_grad_()
    lo = pairwise_giou_ref(l1, l2)
    lo_g = torch.autograd.grad(lo, (l1, l2), g.to(dtype))
    assert_within_ref_error(out.detach().cpu(), lo.detach(), hi.detach(), dtype, "value")
    for got, want, low in zip(grads, hi_g, lo_g):
        assert_within_ref_error(got.cpu(), low, want, dtype, "gradient")


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck(device, backend):
    b1 = random_boxes(3, 7).to(device).requires_grad_()
    b2 = random_boxes(2, 8).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: pairwise_giou(x, y, backend=backend), (b1, b2))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        pairwise_giou(torch.rand(3, 3), torch.rand(2, 4))
    with pytest.raises(TypeError, match="floating"):
        pairwise_giou(torch.ones(3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="share dtype"):
        pairwise_giou(torch.rand(3, 4), torch.rand(2, 4, dtype=torch.float64))


OP_CASES = [(d, "triton") for d in devices()] + [CPP]


@pytest.mark.parametrize("device,backend", OP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "empty"])
def test_opcheck(device, backend, layout):
    n, m = (0, 3) if layout == "empty" else (5, 3)
    b1, b2 = random_boxes(n, 1).to(device).float(), random_boxes(m, 2).to(device).float()
    g = torch.rand(n, m, device=device)
    if layout == "strided":
        b1, g = b1.t().contiguous().t(), g.t().contiguous().t()
    ops = torch.ops.unit_fast
    fwd, bwd = ((ops.pairwise_giou_cpp, ops._pairwise_giou_cpp_backward) if backend == "cpp"
                else (ops.pairwise_giou, ops._pairwise_giou_backward))
    torch.library.opcheck(fwd.default, (b1.requires_grad_(), b2))
    torch.library.opcheck(bwd.default, (g, b1.detach(), b2))


@pytest.mark.parametrize("device,backend", OP_CASES)
def test_double_backward_raises(device, backend):
    b1 = random_boxes(3, 1).to(device).requires_grad_()
    b2 = random_boxes(2, 2).to(device).requires_grad_()
    g1, _ = torch.autograd.grad(pairwise_giou(b1, b2, backend=backend).sum(), (b1, b2), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g1.sum().backward()


@pytest.mark.parametrize("backend", ["triton", pytest.param("cpp", marks=NO_EXT)])
def test_compile_fullgraph(backend):
    b1 = random_boxes(5, 1).float().requires_grad_()
    b2 = random_boxes(3, 2).float().requires_grad_()
    f = torch.compile(lambda x, y: pairwise_giou(x, y, backend=backend), fullgraph=True, backend="aot_eager")
    w = torch.rand(5, 3)
    out = f(b1, b2)  # [5, 3]
    grads = torch.autograd.grad((out * w).sum(), (b1, b2))
    r1, r2 = b1.detach().double().requires_grad_(), b2.detach().double().requires_grad_()
    ref = pairwise_giou_ref(r1, r2)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (r1, r2))
    l1, l2 = b1.detach().clone().requires_grad_(), b2.detach().clone().requires_grad_()
    low_grads = torch.autograd.grad((pairwise_giou_ref(l1, l2) * w).sum(), (l1, l2))
    assert_close_ref(out, ref)
    for g, lg, rg in zip(grads, low_grads, ref_grads):
        assert_within_ref_error(g, lg, rg, torch.float32, "gradient")


@pytest.mark.parametrize("device,backend", CASES)
def test_touching_edges_gradient(device, backend):
    # a's top edge touches b's bottom edge (y = 0.77734375, exact in binary): the overlap
    # height is exactly 0, where autograd's clamp(min=0) passes no gradient.
    a = torch.tensor([[-0.1181640625, 0.76171875, 0.38671875, 0.77734375]], dtype=torch.float64)
    b = torch.tensor([[0.265625, 0.77734375, 0.33203125, 0.8125]], dtype=torch.float64)
    x, y = a.clone().to(device).requires_grad_(), b.clone().to(device).requires_grad_()
    rx, ry = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = torch.autograd.grad(pairwise_giou(x, y, backend=backend).sum(), (x, y))
    want = torch.autograd.grad(pairwise_giou_ref(rx, ry).sum(), (rx, ry))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w)


@pytest.mark.parametrize("device,backend", CASES)
def test_tied_coordinates_gradient(device, backend):
    """Boxes that share an edge coordinate with another (identical boxes, a common x0, x1, y0 or
    y1): each min / max in the intersection and hull is a tie, whose gradient autograd splits
    half and half."""
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.5, 0.25, 1.5, 3.0], [1.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.5, 1.0, 3.0, 2.0], [0.25, 0.25, 2.0, 4.0],
                      [1.0, 0.5, 1.75, 2.0]], dtype=torch.float64)
    w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).view(3, 4)
    x, y = a.clone().to(device).requires_grad_(), b.clone().to(device).requires_grad_()
    rx, ry = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = torch.autograd.grad((pairwise_giou(x, y, backend=backend) * w.to(device)).sum(), (x, y))
    want = torch.autograd.grad((pairwise_giou_ref(rx, ry) * w).sum(), (rx, ry))
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), ref)


BAD = {
    "not_n_by_4": ((torch.rand(3, 3), torch.rand(2, 4)), ValueError),
    "one_dim": ((torch.rand(4), torch.rand(2, 4)), ValueError),
    "second_bad": ((torch.rand(3, 4), torch.rand(2, 5)), ValueError),
    "integer": ((torch.ones(3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)), TypeError),
    "dtype_mismatch": ((torch.rand(3, 4), torch.rand(2, 4, dtype=torch.float64)), ValueError),
}


@NO_EXT
@pytest.mark.parametrize("name", list(BAD))
def test_cpp_bad_arguments_raise_as_reference(name):
    """Bad shapes / dtypes: the reference path's exception and message, also from the C++ ops
    called directly (their own checks, worded alike)."""
    (b1, b2), exc = BAD[name]
    with pytest.raises(exc) as ref_err:
        pairwise_giou(b1, b2, backend="reference")
    with pytest.raises(exc) as err:
        pairwise_giou(b1, b2, backend="cpp")
    assert str(err.value) == str(ref_err.value)
    for call in (lambda: torch.ops.unit_fast.pairwise_giou_cpp(b1, b2),
                 lambda: torch.ops.unit_fast._pairwise_giou_cpp_backward(torch.rand(3, 2), b1, b2)):
        with pytest.raises(exc) as err:
            call()
        assert str(err.value).splitlines()[0] == str(ref_err.value)


@NO_EXT
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_cpp_non_finite_like_reference(value):
    """A non-finite coordinate: the C++ GIoU is NaN / inf exactly where the reference's is."""
    b1, b2 = random_boxes(5, 1).float(), random_boxes(4, 2).float()
    b1[1, 2] = value
    b2[3, 0] = value
    got = pairwise_giou(b1, b2, backend="cpp")
    want = pairwise_giou_ref(b1.double(), b2.double())
    torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1.3e-6, atol=1e-5)


@NO_EXT
def test_cpp_thread_count_invariant():
    b1, b2 = random_boxes(200, 1).float().requires_grad_(), random_boxes(50, 2).float().requires_grad_()
    g = torch.rand(200, 50)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = pairwise_giou(b1, b2, backend="cpp")
            results.append((out, *torch.autograd.grad(out, (b1, b2), g)))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
