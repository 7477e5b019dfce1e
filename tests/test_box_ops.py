"""unit_fast.box_ops: a drop-in for DETR's/MMF's box_ops, checked against torchvision.ops."""

import pytest
import torch
import torchvision.ops as tvo

from unit_fast import _backend, box_ops
from unit_fast.testing import assert_close_ref, assert_within_ref_error, devices

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# On CPU the Triton kernels run through the interpreter (tests/conftest.py sets it).
CASES = [(d, b) for d in devices() for b in (["reference", "triton"] if d == "cpu"
                                              else _backend.backends_for("pairwise_giou", d))]


def random_xyxy(n, device="cpu", dtype=torch.float64):
    cxcywh = torch.rand(n, 4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.5, 0.5]) + torch.tensor(
        [0, 0, 0.01, 0.01], dtype=torch.float64)
    return box_ops.box_cxcywh_to_xyxy(cxcywh).to(device, dtype)


# Overlapping, disjoint, nested, identical and touching pairs (exact in binary).
SPECIAL_A = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0],
                          [1.0, 1.0, 3.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
SPECIAL_B = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0],
                          [1.0, 1.0, 3.0, 2.0], [1.0, 0.0, 2.0, 1.0]])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (0, 5), (5, 0)])
def test_pairwise_against_torchvision(monkeypatch, device, backend, dtype, n, m):
    monkeypatch.setenv("UNIT_FAST_BACKEND", backend)  # generalized_box_iou's backend
    b1, b2 = random_xyxy(n, device, dtype), random_xyxy(m, device, dtype)
    iou, union = box_ops.box_iou(b1, b2)
    assert union.shape == (n, m) and iou.dtype == dtype
    x1, x2 = b1.clone().requires_grad_(), b2.clone().requires_grad_()
    giou = box_ops.generalized_box_iou(x1, x2)
    assert giou.shape == (n, m) and giou.dtype == dtype
    # torchvision in fp64 on the same (rounded) inputs, and in this dtype for its own error.
    h1, h2 = b1.double().cpu().requires_grad_(), b2.double().cpu().requires_grad_()
    l1, l2 = b1.clone().requires_grad_(), b2.clone().requires_grad_()
    want, low = tvo.generalized_box_iou(h1, h2), tvo.generalized_box_iou(l1, l2)
    if dtype in (torch.float32, torch.float64):
        assert_close_ref(iou, tvo.box_iou(h1, h2), dtype)
        assert_close_ref(giou, want, dtype)
    else:
        # Several rounded steps: the house rule for composed arithmetic -- at most twice the
        # error of torchvision's own computation in this dtype, against fp64.
        assert_within_ref_error(iou.cpu(), tvo.box_iou(b1, b2).cpu(), tvo.box_iou(h1, h2), dtype)
        assert_within_ref_error(giou.detach().cpu(), low.detach().cpu(), want.detach(), dtype)
    if giou.numel() == 0:
        return
    w = torch.rand(n, m, dtype=torch.float64)
    got_g = torch.autograd.grad((giou * w.to(device, dtype)).sum(), (x1, x2))
    want_g = torch.autograd.grad((want * w).sum(), (h1, h2))
    low_g = torch.autograd.grad((low * w.to(device, dtype)).sum(), (l1, l2))
    for g, wg, lg in zip(got_g, want_g, low_g):  # sums over the other axis: the reduction rule
        assert_within_ref_error(g.cpu(), lg.cpu(), wg, dtype, "gradient")


def test_special_pairs():
    giou = box_ops.generalized_box_iou(SPECIAL_A, SPECIAL_B).diagonal()
    want = tvo.generalized_box_iou(SPECIAL_A, SPECIAL_B).diagonal()
    torch.testing.assert_close(giou, want)
    assert giou[3] == 1.0  # identical
    assert giou[2] == pytest.approx(1 / 16)  # nested: iou = 1/16, hull = union
    assert giou[4] == 0.0  # touching: no overlap, hull = union


def test_conversions_round_trip_and_match_torchvision():
    x = torch.rand(6, 4, dtype=torch.float64)
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(x), tvo.box_convert(x, "cxcywh", "xyxy"))
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(x)), x)
    assert box_ops.box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.2, 1.0]]), r"boxes1\[1\] = \[0.5, 0.0, 0.2.*x1 >= x0"),
    (torch.tensor([[0.0, 0.0, 1.0, float("nan")]]), r"boxes1\[0\].*finite"),
    (torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 0.25]]),
     r"boxes1\[2\] = \[0.0, 0.5, 1.0, 0.25\].*y1 >= y0"),
    (torch.tensor([[0.0, 0.0, float("inf"), 1.0]]), r"boxes1\[0\] = \[0.0, 0.0, inf, 1.0\].*finite"),
])
def test_bad_boxes_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        box_ops.generalized_box_iou(bad, SPECIAL_B)
    with pytest.raises(ValueError, match=message.replace("boxes1", "boxes2")):
        box_ops.generalized_box_iou(SPECIAL_A, bad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_giou_loss_against_torchvision(reduction, n):
    b1 = random_xyxy(n).requires_grad_()
    b2 = random_xyxy(n)
    ours = box_ops.generalized_box_iou_loss(b1, b2, reduction)
    ref = tvo.generalized_box_iou_loss(b1, b2, reduction)
    torch.testing.assert_close(ours, ref)
    if n:
        g_ours, = torch.autograd.grad(ours.sum(), b1)
        g_ref, = torch.autograd.grad(ref.sum(), b1)
        torch.testing.assert_close(g_ours, g_ref)
    special = box_ops.generalized_box_iou_loss(SPECIAL_A, SPECIAL_B, reduction)
    torch.testing.assert_close(special, tvo.generalized_box_iou_loss(SPECIAL_A, SPECIAL_B, reduction))
    with pytest.raises(ValueError, match="reduction"):
        box_ops.generalized_box_iou_loss(b1, b2, "max")


def test_generalized_box_iou_gradcheck():
    b1, b2 = random_xyxy(3).requires_grad_(), random_xyxy(2).requires_grad_()
    assert torch.autograd.gradcheck(box_ops.generalized_box_iou, (b1, b2))


@pytest.mark.parametrize("device,backend", CASES)
def test_generalized_box_iou_backends_and_gradients(monkeypatch, device, backend):
    # The drop-in takes no backend argument: force each through the environment override.
    monkeypatch.setenv("UNIT_FAST_BACKEND", backend)
    b1 = torch.cat([random_xyxy(6), SPECIAL_A]).to(device).requires_grad_()  # [11, 4]
    b2 = torch.cat([random_xyxy(4), SPECIAL_B]).to(device).requires_grad_()  # [9, 4]
    r1, r2 = b1.detach().cpu().requires_grad_(), b2.detach().cpu().requires_grad_()
    w = torch.rand(11, 9, dtype=torch.float64)
    out = box_ops.generalized_box_iou(b1, b2)
    want = tvo.generalized_box_iou(r1, r2)
    assert_close_ref(out, want)
    got_g = torch.autograd.grad((out * w.to(device)).sum(), (b1, b2))
    want_g = torch.autograd.grad((want * w).sum(), (r1, r2))
    for g, wg in zip(got_g, want_g):
        assert_close_ref(g, wg)


def test_matching_cost_is_exported():
    from unit_fast.ops.matching_cost import matching_cost

    assert box_ops.matching_cost is matching_cost


def _detr_masks_to_boxes(masks):
    """DETR's ``util/box_ops.masks_to_boxes`` formula (coordinate grid, masked min / max)."""
    h, w = masks.shape[-2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
    inside = masks.bool()
    x_max = (masks * x).flatten(1).max(-1)[0]
    x_min = x.expand_as(masks).masked_fill(~inside, 1e8).flatten(1).min(-1)[0]
    y_max = (masks * y).flatten(1).max(-1)[0]
    y_min = y.expand_as(masks).masked_fill(~inside, 1e8).flatten(1).min(-1)[0]
    return torch.stack([x_min, y_min, x_max, y_max], 1)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_masks_to_boxes_matches_detr_and_torchvision(dtype):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 13, 17)
    for i in range(6):  # a random rectangle plus a stray pixel per mask: no empty mask
        y0, x0 = torch.randint(0, 10, (2,), generator=g).tolist()
        masks[i, y0:y0 + 1 + i % 3, x0:x0 + 2 + i % 4] = 1
        masks[i, int(torch.randint(0, 13, (1,), generator=g)), int(torch.randint(0, 17, (1,), generator=g))] = 1
    masks = masks.to(dtype)
    got = box_ops.masks_to_boxes(masks)
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    torch.testing.assert_close(got, _detr_masks_to_boxes(masks.float()), rtol=0, atol=0)
    torch.testing.assert_close(got, tvo.masks_to_boxes(masks), rtol=0, atol=0)


def test_masks_to_boxes_empty_and_bad_input():
    assert box_ops.masks_to_boxes(torch.zeros(0, 5, 5)).shape == (0, 4)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert box_ops.masks_to_boxes(empty).tolist() == [[0.0, 0.0, 0.0, 0.0]]  # torchvision's, documented
    with pytest.raises(ValueError, match=r"\(N, H, W\).*\(4, 4\)"):
        box_ops.masks_to_boxes(torch.ones(4, 4))
