"""unit_fast.HungarianMatcher against DETR's matcher semantics (hungarian_matcher_ref)."""

import pytest
import torch

from unit_fast import INVALID, HungarianMatcher
from unit_fast import _backend
from unit_fast.ops.hungarian_match import hungarian_matcher_ref
from unit_fast.ops.matching_cost import matching_cost_ref
from unit_fast.testing import devices

DEVICE_BACKENDS = [(d, b) for d in devices() for b in _backend.backends_for("hungarian_match", d)]
COSTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)  # DETR/UniT defaults


def make_batch(B=4, Q=12, C=7, sizes=(3, 0, 5, 1), device="cpu", aux=0):
    def layer():
        return {
            "pred_logits": torch.randn(B, Q, C + 1, device=device),
            "pred_boxes": torch.rand(B, Q, 4, device=device) * 0.5 + 0.1,
        }

    outputs = layer()
    if aux:
        outputs["aux_outputs"] = [layer() for _ in range(aux)]
    targets = [
        {"labels": torch.randint(0, C, (t,), device=device), "boxes": torch.rand(t, 4, device=device) * 0.5 + 0.1}
        for t in sizes
    ]
    return outputs, targets


def detr_cost_block(outputs, targets, b, logsoftmax=False):
    """Image b's [Q, T_b] block of the reference's cross-image cost, in float64."""
    o = {k: v[b : b + 1].double() for k, v in outputs.items() if k != "aux_outputs"}
    t = targets[b]
    num_targets = torch.tensor([len(t["labels"])], device=t["labels"].device)  # [1]
    c = matching_cost_ref(o["pred_logits"], o["pred_boxes"], t["labels"][None], t["boxes"][None].double(),
                          num_targets, logsoftmax=logsoftmax, **COSTS)
    return c[0]


def assert_same_total(outputs, targets, got, want, logsoftmax=False):
    assert len(got) == len(want) == len(targets)
    Q = outputs["pred_logits"].shape[1]
    for b, ((gi, gj), (wi, wj)) in enumerate(zip(got, want)):
        k = min(Q, len(targets[b]["labels"]))
        assert gi.dtype == gj.dtype == torch.int64
        assert len(gi) == len(gj) == k
        assert (gi[1:] > gi[:-1]).all(), "pred_idx must be ascending"
        assert len(set(gj.tolist())) == k
        block = detr_cost_block(outputs, targets, b, logsoftmax).cpu()
        total_got = block[gi.cpu(), gj.cpu()].sum().item()
        total_want = block[wi, wj].sum().item()
        assert total_got == pytest.approx(total_want, rel=1e-5, abs=1e-5), f"image {b}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("logsoftmax", [False, True])
@pytest.mark.parametrize("sizes,Q", [((3, 0, 5, 1), 12), ((20, 20), 100), ((0, 0), 5), ((9, 2), 4)])
def test_matcher_equals_detr(device, backend, logsoftmax, sizes, Q):
    outputs, targets = make_batch(B=len(sizes), Q=Q, sizes=sizes, device=device)
    matcher = HungarianMatcher(**COSTS, logsoftmax=logsoftmax, backend=backend)
    got = matcher(outputs, targets)
    want = hungarian_matcher_ref(outputs, targets, **COSTS, logsoftmax=logsoftmax)
    for i, j in got:
        assert i.device.type == "cpu" and j.device.type == "cpu"  # DETR returns CPU indices
    assert_same_total(outputs, targets, got, want, logsoftmax)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_match_all_layers_in_one_call(device, backend):
    outputs, targets = make_batch(device=device, aux=5)
    matcher = HungarianMatcher(**COSTS, backend=backend)
    per_layer = matcher.match_all(outputs, targets)
    assert len(per_layer) == 6
    layers = [outputs] + outputs["aux_outputs"]
    for layer, got in zip(layers, per_layer):
        want = hungarian_matcher_ref(layer, targets, **COSTS)
        assert_same_total(layer, targets, got, want)
    first = matcher(outputs, targets)
    for (a, b), (c, d) in zip(first, per_layer[0]):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("device", devices())
def test_keep_on_device(device):
    outputs, targets = make_batch(device=device)
    got = HungarianMatcher(**COSTS, keep_on_device=True)(outputs, targets)
    for i, j in got:
        assert i.device.type == torch.device(device).type and j.device == i.device
    want = hungarian_matcher_ref(outputs, targets, **COSTS)
    assert_same_total(outputs, targets, [(i.cpu(), j.cpu()) for i, j in got], want)


def test_nan_predictions():
    outputs, targets = make_batch()
    outputs["pred_boxes"][2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="invalid numeric"):
        hungarian_matcher_ref(outputs, targets, **COSTS)
    with pytest.raises(ValueError, match="image 2 .*invalid numeric"):
        HungarianMatcher(**COSTS)(outputs, targets)
    # On the device path nothing is checked; the image's target indices carry the code.
    got = HungarianMatcher(**COSTS, keep_on_device=True)(outputs, targets)
    assert (got[2][1] == INVALID).all()
    assert (got[0][1] >= 0).all()


def test_matcher_arguments():
    with pytest.raises(ValueError, match="all costs"):
        HungarianMatcher(0, 0, 0)
    m = HungarianMatcher(1, 5, 2, logsoftmax=True)
    assert isinstance(m.norm, torch.nn.LogSoftmax)
    assert "cost_bbox=5" in repr(m)
    outputs, targets = make_batch()
    with pytest.raises(ValueError, match="target dicts"):
        m(outputs, targets[:2])


def test_matcher_does_not_use_cdist(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.cdist called")

    monkeypatch.setattr(torch, "cdist", boom)
    outputs, targets = make_batch()
    HungarianMatcher(**COSTS)(outputs, targets)


def test_compile_matcher_fullgraph():
    outputs, targets = make_batch(aux=2)
    matcher = HungarianMatcher(**COSTS)
    compiled = torch.compile(matcher.match_all, fullgraph=True)
    got = compiled(outputs, targets)
    want = matcher.match_all(outputs, targets)
    for gl, wl in zip(got, want):
        for (a, b), (c, d) in zip(gl, wl):
            assert torch.equal(a, c) and torch.equal(b, d)
