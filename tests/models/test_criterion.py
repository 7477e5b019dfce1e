"""SetCriterion / build_detection_loss: the fast path against the reference (MMF) path, and
both against hand-computed losses.

Losses are reductions: fast-vs-reference values and gradients follow the "2x the reference's
own error" rule (``assert_within_ref_error``): the reference path in fp64 is the truth, the
reference path in fp32 sets the error budget of the fast path in fp32.
"""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unit_fast import HungarianMatcher
from unit_fast.models import criterion as criterion_mod
from unit_fast.models.criterion import SetCriterion, build_detection_loss
from unit_fast.models.heads import AttributeHead
from unit_fast.testing import assert_within_ref_error

C, D, A, K = 5, 8, 7, 16  # classes, hidden width, attribute classes, attribute slots
MAIN_KEYS = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"}


def make_targets(sizes, attributes=True):
    """Targets with ``sizes[i]`` boxes: labels in [0, C), boxes cxcywh, attributes with
    1..3 valid slots then -1 (and one box with none at all)."""
    targets = []
    for T in sizes:
        t = {"labels": torch.randint(0, C, (T,)),
             "boxes": torch.cat([torch.rand(T, 2) * 0.6 + 0.2, torch.rand(T, 2) * 0.3 + 0.05], 1)}
        if attributes:
            attrs = torch.randint(0, A, (T, K))
            attrs[:, 3:] = -1
            attrs[: T // 2, 1:] = -1  # some boxes with a single attribute
            if T > 2:
                attrs[2] = -1  # a box without any attribute
            t["attributes"] = attrs
        targets.append(t)
    return targets


def make_leaves(L, B, Q, dtype=torch.float32):
    """Stacked per-layer predictions ``(L, B, Q, .)`` (last layer = main output)."""
    logits = torch.randn(L, B, Q, C + 1)
    boxes = torch.rand(L, B, Q, 4)
    boxes = torch.cat([boxes[..., :2] * 0.6 + 0.2, boxes[..., 2:] * 0.3 + 0.05], -1)
    hs = torch.randn(L, B, Q, D)
    return [x.to(dtype).requires_grad_() for x in (logits, boxes, hs)]


def as_outputs(logits, boxes, hs):
    layers = [{"pred_logits": lg, "pred_boxes": b, "hs_for_attr": h}
              for lg, b, h in zip(logits, boxes, hs, strict=True)]
    main = layers[-1]
    if len(layers) > 1:
        main["aux_outputs"] = layers[:-1]
    return main


def run(criterion, leaves, targets):
    """Losses and the gradients of the MMF-weighted total wrt the leaves and head parameters."""
    losses = criterion(as_outputs(*leaves), targets)
    total = sum(v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict)
    params = list(criterion.attribute_head.parameters()) if criterion.attribute_head is not None else []
    grads = torch.autograd.grad(total, leaves + params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves + params, strict=True)]
    return {k: v.detach() for k, v in losses.items()}, grads


def targets_as(targets, dtype):
    return [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()} for t in targets]


@pytest.mark.parametrize("with_attr", [True, False])
@pytest.mark.parametrize("sizes,box_backend", [
    ([3, 0, 7], None),  # an empty image, and one with more targets than queries
    ([2, 5], None),
    ([4, 1], "triton"),  # unit_fast.box_loss forced to Triton (the interpreter on CPU)
])
def test_fast_matches_reference(sizes, box_backend, with_attr):
    L, Q = 3, 6
    head = AttributeHead(C, A, D) if with_attr else None
    targets = make_targets(sizes, attributes=with_attr)
    leaves = make_leaves(L, len(sizes), Q)

    def criterion(backend, dtype):
        crit = build_detection_loss(C, dec_layers=L, attribute_head=copy.deepcopy(head),
                                    attribute_class_num=A, implementation=backend)
        crit.box_loss_backend = box_backend
        return crit.to(dtype)

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    hi, grads_hi = run(criterion("reference", torch.float64), leaves64, targets_as(targets, torch.float64))
    low, grads_low = run(criterion("reference", torch.float32), leaves, targets)
    out, grads_out = run(criterion("fast", torch.float32), leaves, targets)

    expected_keys = MAIN_KEYS | ({"loss_attr"} if with_attr else set())
    expected_keys |= {f"{k}_{i}" for k in expected_keys for i in range(L - 1)}
    assert set(out) == set(low) == expected_keys
    for k in expected_keys:
        assert out[k].dtype == torch.float32, k
        assert_within_ref_error(out[k], low[k], hi[k], torch.float32, msg=k)
    assert all(torch.isfinite(v) for v in out.values())
    names = ["pred_logits", "pred_boxes", "hs_for_attr"]
    names += [n for n, _ in head.named_parameters()] if head else []
    for name, g, g_low, g_hi in zip(names, grads_out, grads_low, grads_hi, strict=True):
        assert_within_ref_error(g, g_low, g_hi, torch.float32, msg=f"grad {name}")
    if with_attr:  # the attribute loss reaches every layer's hidden states
        assert all(grads_out[2][i].abs().sum() > 0 for i in range(L))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_keys_and_weight_dict(backend):
    crit = build_detection_loss(C, dec_layers=3, attribute_head=AttributeHead(C, A, D), implementation=backend)
    base = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_attr": 1}
    assert crit.weight_dict == {**base, **{f"{k}_{i}": v for i in range(2) for k, v in base.items()}}
    assert crit.losses == ["labels", "boxes", "cardinality"]
    assert torch.equal(crit.state_dict()["empty_weight"], torch.tensor([1.0] * C + [0.1]))
    assert {k.split(".")[0] for k in crit.state_dict()} == {"empty_weight", "attribute_head"}
    losses = crit(as_outputs(*make_leaves(3, 2, 4)), make_targets([2, 3]))
    assert set(losses) == {f"{k}{s}" for k in MAIN_KEYS | {"loss_attr"} for s in ("", "_0", "_1")}
    assert "class_error" not in losses
    assert not losses["cardinality_error"].requires_grad
    no_aux = build_detection_loss(C, aux_loss=False, implementation=backend)
    assert no_aux.weight_dict == {k: v for k, v in base.items()}
    assert set(no_aux(as_outputs(*make_leaves(1, 1, 4)), make_targets([2], attributes=False))) == MAIN_KEYS


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_hand_computed_loss_ce_and_cardinality(backend):
    # Q = 2 queries, 3 classes (no-object = 2); query 0 sits on the only target box: it is matched
    # to class 0, query 1 is unmatched (target class = no-object, weight eos_coef = 0.1).
    outputs = {"pred_logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    crit = build_detection_loss(2, aux_loss=False, implementation=backend)
    losses = crit(outputs, targets)
    nll0 = math.log(math.exp(2) + 2) - 2  # -log softmax([2, 0, 0])[0]
    nll1 = math.log(math.e + 2) - 1  # -log softmax([0, 0, 1])[2]
    assert losses["loss_ce"].item() == pytest.approx((1.0 * nll0 + 0.1 * nll1) / 1.1, rel=1e-6)
    # argmax: query 0 -> class 0 (counted), query 1 -> no-object: |1 - 1| = 0; then 2 targets: 1.
    assert losses["cardinality_error"].item() == 0.0
    targets[0] = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}
    assert crit(outputs, targets)["cardinality_error"].item() == 1.0


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_hand_computed_box_losses(backend):
    # Q = 1 per image, so each target is matched to the only query.  Image 0: L1 = 0.1 + 0.1,
    # xyxy [.4,.4,.6,.6] vs [.5,.45,.7,.55]: inter .01, union .05, hull .06, GIoU = .2 - 1/6.
    # Image 1: exact prediction (0 and 0).  num_boxes = 2.
    outputs = {"pred_logits": torch.zeros(2, 1, C + 1),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.3, 0.3, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}]
    losses = build_detection_loss(C, aux_loss=False, implementation=backend)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.2 / 2, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx((1 - (0.2 - 1 / 6)) / 2, rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("sizes", [[0, 0], [2, 0]])
def test_empty_targets(backend, sizes):
    head = AttributeHead(C, A, D)
    crit = build_detection_loss(C, dec_layers=2, attribute_head=head, implementation=backend)
    leaves = make_leaves(2, len(sizes), 4)
    losses, grads = run(crit, leaves, make_targets(sizes))
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(g).all() for g in grads)
    if sum(sizes) == 0:
        logits = leaves[0][-1].detach()  # every query's target is no-object: weighted mean = mean
        expected = F.cross_entropy(logits.flatten(0, 1), torch.full((logits.shape[0] * 4,), C))
        torch.testing.assert_close(losses["loss_ce"], expected)
        for k in ("loss_bbox", "loss_giou", "loss_attr", "loss_bbox_0", "loss_attr_0"):
            assert losses[k].item() == 0.0, k
        assert grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0


class _LogitsAreHidden(nn.Module):
    """Attribute 'head' returning ``hs_for_attr`` as the logits; records the labels it gets."""

    def forward(self, hidden_states, labels):
        self.labels = labels
        return hidden_states


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_attribute_loss_quirks(backend):
    # Three targets, one per query at the same place (identity matching): box a has 2 valid
    # slots, box b one, box c none; image 1 has an unmatched query.  Per box 0.5 * sum CE /
    # valid count, summed, divided by the number of boxes with a non-zero loss (2, not 3 or 4).
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2],
                          [0.3, 0.7, 0.1, 0.2], [0.8, 0.2, 0.1, 0.1]])
    attrs = torch.full((3, K), -1)
    attrs[0, :2] = torch.tensor([2, 0])
    attrs[1, 0] = 1
    targets = [{"labels": torch.tensor([1, 3]), "boxes": boxes[:2], "attributes": attrs[:2]},
               {"labels": torch.tensor([4]), "boxes": boxes[2:3], "attributes": attrs[2:]}]
    hs = torch.randn(2, 2, A, requires_grad=True)
    outputs = {"pred_logits": torch.zeros(2, 2, C + 1), "pred_boxes": boxes.view(2, 2, 4), "hs_for_attr": hs}
    head = _LogitsAreHidden()
    crit = build_detection_loss(C, aux_loss=False, attribute_head=head, implementation=backend)
    loss = crit(outputs, targets)["loss_attr"]
    nll = -hs.detach().log_softmax(-1)  # [2, 2, A]
    box_a = 0.5 * (nll[0, 0, 2] + nll[0, 0, 0]) / 2
    box_b = 0.5 * nll[0, 1, 1]
    torch.testing.assert_close(loss.detach(), (box_a + box_b) / 2)
    loss.backward()  # boxes c (no attribute) and the unmatched query get no gradient
    assert hs.grad[1].abs().sum() == 0 and hs.grad[0].abs().sum() > 0
    # The head is fed the ground-truth classes: no-object (C) for the unmatched query.
    if backend == "reference":
        assert head.labels.tolist() == [[1, 3], [4, C]]
    else:  # only the matched queries are evaluated
        assert head.labels.tolist() == [1, 3, 4]


def test_attribute_loss_nothing_valid_is_zero():
    hs = torch.randn(1, 2, A, requires_grad=True)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                "attributes": torch.full((1, K), -1)}]
    outputs = {"pred_logits": torch.zeros(1, 2, C + 1), "pred_boxes": torch.rand(1, 2, 4) * 0.3 + 0.2,
               "hs_for_attr": hs}
    for backend in ("reference", "fast"):
        crit = build_detection_loss(C, aux_loss=False, attribute_head=_LogitsAreHidden(), implementation=backend)
        assert crit(outputs, targets)["loss_attr"].item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_num_boxes_distributed_mean(backend, monkeypatch):
    # Simulate 2 ranks, the other one holding 4 boxes: num_boxes = (1 + 4) / 2 = 2.5.
    monkeypatch.setattr(criterion_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_mod.dist, "all_reduce", lambda t: t.add_(4))
    outputs = {"pred_logits": torch.zeros(1, 1, C + 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    losses = build_detection_loss(C, aux_loss=False, implementation=backend)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.1 / 2.5, rel=1e-5)
    monkeypatch.setattr(criterion_mod.dist, "all_reduce", lambda t: t.zero_())  # clamp to 1
    assert criterion_mod._num_boxes(targets, "cpu").item() == 1.0


_SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__len__")


def _forbid_syncs_in_criterion(monkeypatch):
    """Tensor reads to the host raise when called from criterion.py itself (the matcher and
    the ops have their own tests; on CPU the matcher legitimately checks its CPU results)."""
    def forbidden(name, original):
        def f(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == criterion_mod.__file__:
                raise AssertionError(f"host sync in criterion.py: Tensor.{name}")
            return original(self, *args, **kwargs)
        return f
    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name, getattr(torch.Tensor, name)))


def test_fast_path_never_reads_the_device(monkeypatch):
    head = AttributeHead(C, A, D)
    crit_fast = build_detection_loss(C, dec_layers=2, attribute_head=head, implementation="fast")
    crit_ref = build_detection_loss(C, dec_layers=2, attribute_head=head, implementation="reference")
    leaves, targets = make_leaves(2, 2, 5), make_targets([3, 1])
    _forbid_syncs_in_criterion(monkeypatch)
    run(crit_fast, leaves, targets)
    with pytest.raises(AssertionError, match="host sync"):  # the check can fail: MMF's path syncs
        run(crit_ref, leaves, targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_no_cuda_sync():
    crit = build_detection_loss(C, dec_layers=2, attribute_head=AttributeHead(C, A, D), implementation="fast").cuda()
    leaves = [x.detach().cuda().requires_grad_() for x in make_leaves(2, 2, 5)]
    targets = [{k: v.cuda() for k, v in t.items()} for t in make_targets([3, 0])]
    run(crit, leaves, targets)  # warm-up: first launches may allocate / compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses, grads = run(crit, leaves, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = build_detection_loss(C, dec_layers=2, attribute_head=copy.deepcopy(crit.attribute_head).cpu())
    ref_losses, _ = run(ref, [x.detach().cpu().requires_grad_() for x in leaves],
                        [{k: v.cpu() for k, v in t.items()} for t in targets])
    for k, v in ref_losses.items():
        torch.testing.assert_close(losses[k].cpu(), v, rtol=1e-5, atol=1e-5, msg=k)


def test_matcher_and_argument_checks():
    matcher = HungarianMatcher(1, 5, 2)
    crit = SetCriterion(C, matcher, {}, 0.1, ["labels"], implementation="fast")
    assert crit.matcher.keep_on_device and not matcher.keep_on_device
    assert SetCriterion(C, matcher, {}, 0.1, ["labels"]).matcher is matcher

    class NoMatchAll(nn.Module):
        def forward(self, outputs, targets):
            return []

    with pytest.raises(TypeError, match="match_all"):
        SetCriterion(C, NoMatchAll(), {}, 0.1, ["labels"], implementation="fast")
    with pytest.raises(NotImplementedError, match="labels_balanced"):
        build_detection_loss(C, use_bcl=True)
    with pytest.raises(ValueError, match="implementation"):
        SetCriterion(C, matcher, {}, 0.1, ["labels"], implementation="cuda")
    with pytest.raises(ValueError, match="unknown loss"):
        SetCriterion(C, matcher, {}, 0.1, ["masks"])
    crit = build_detection_loss(C, attribute_head=AttributeHead(C, A, D), max_attribute_num=8, aux_loss=False)
    with pytest.raises(ValueError, match="attribute slots"):
        crit(as_outputs(*make_leaves(1, 1, 3)), make_targets([2]))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_get_loss_with_detr_indices(backend):
    crit = build_detection_loss(C, aux_loss=False, implementation=backend)
    outputs, targets = as_outputs(*make_leaves(1, 2, 4)), make_targets([2, 3], attributes=False)
    indices = crit.matcher(outputs, targets)
    losses = crit(outputs, targets)
    num_boxes = 5.0
    for name, keys in (("labels", ["loss_ce"]), ("boxes", ["loss_bbox", "loss_giou"])):
        got = crit.get_loss(name, outputs, targets, indices, num_boxes)
        for k in keys:
            torch.testing.assert_close(got[k], losses[k])


def test_gradcheck_fast_fp64():
    head = AttributeHead(C, A, D).double()
    crit = build_detection_loss(C, dec_layers=2, attribute_head=head, implementation="fast").double()
    targets = targets_as(make_targets([2, 1]), torch.float64)
    leaves = [x.detach().requires_grad_() for x in make_leaves(2, 2, 3, torch.float64)]

    def f(logits, boxes, hs):
        losses = crit(as_outputs(logits, boxes, hs), targets)
        return tuple(v for k, v in losses.items() if not k.startswith("cardinality"))

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
