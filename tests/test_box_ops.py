"""unit_fast.box_ops: a drop-in for DETR's/MMF's box_ops, checked against torchvision.ops."""

import pytest
import torch
import torchvision.ops as tvo

from unit_fast import box_ops
from unit_fast.testing import assert_close_ref, assert_within_ref_error, devices

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_xyxy(n, device="cpu", dtype=torch.float64):
    cxcywh = torch.rand(n, 4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.5, 0.5]) + torch.tensor(
        [0, 0, 0.01, 0.01], dtype=torch.float64)
    return box_ops.box_cxcywh_to_xyxy(cxcywh).to(device, dtype)


# Overlapping, disjoint, nested, identical and touching pairs (exact in binary).
SPECIAL_A = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0],
                          [1.0, 1.0, 3.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
SPECIAL_B = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0],
                          [1.0, 1.0, 3.0, 2.0], [1.0, 0.0, 2.0, 1.0]])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (0, 5), (5, 0)])
def test_pairwise_against_torchvision(device, dtype, n, m):
    b1, b2 = random_xyxy(n, device, dtype), random_xyxy(m, device, dtype)
    iou, union = box_ops.box_iou(b1, b2)
    assert union.shape == (n, m) and iou.dtype == dtype
    giou = box_ops.generalized_box_iou(b1, b2)
    if dtype in (torch.float32, torch.float64):
        assert_close_ref(iou, tvo.box_iou(b1.double(), b2.double()), dtype)
        assert_close_ref(giou, tvo.generalized_box_iou(b1.double(), b2.double()), dtype)
    else:
        # Several rounded steps: the house rule for composed arithmetic -- at most twice the
        # error of torchvision's own computation in this dtype, against fp64.
        assert_within_ref_error(iou, tvo.box_iou(b1, b2), tvo.box_iou(b1.double(), b2.double()), dtype)
        assert_within_ref_error(giou, tvo.generalized_box_iou(b1, b2),
                                tvo.generalized_box_iou(b1.double(), b2.double()), dtype)


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


def test_matching_cost_is_exported():
    assert callable(box_ops.matching_cost)
