"""``patch_transformers`` on LW-DETR / RF-DETR matchers (focal cost, ``group_detr`` groups, RF-DETR's
mask costs) and LW-DETR's loss on random outputs (loss level, not whole models: see the report).

Rule for losses as in test_transformers_rt_detr.py: patched fp32 vs transformers fp32 (low) and
fp64 (high) through ``assert_within_ref_error``.  Inputs are continuous random values (no ties).
"""

import pytest
import torch
from transformers import LwDetrConfig
from transformers.loss import loss_lw_detr, loss_rf_detr

from unit_fast.patch.hf.lw_detr import lw_detr_cost, rf_detr_mask_cost
from unit_fast.patch.transformers import patch_transformers
from unit_fast.testing import assert_within_ref_error


def _case(sizes, G=3, Qg=10, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    outputs = {
        "logits": torch.randn(B, Qg * G, C, generator=g),
        "pred_boxes": torch.rand(B, Qg * G, 4, generator=g) * 0.5 + 0.25,
        "pred_masks": torch.randn(B, Qg * G, 16, 16, generator=g),
    }
    targets = [
        {
            "class_labels": torch.randint(0, C, (s,), generator=g),
            "boxes": torch.rand(s, 4, generator=g) * 0.5 + 0.25,
            "masks": torch.rand(s, 32, 32, generator=g) > 0.5,
        }
        for s in sizes
    ]
    return outputs, targets


def _spy(module, call):
    blocks, orig = [], module.linear_sum_assignment

    def spy(c):
        blocks.append(torch.as_tensor(c))
        return orig(c)

    module.linear_sum_assignment = spy
    try:
        return call(), blocks
    finally:
        module.linear_sum_assignment = orig


@pytest.mark.parametrize("sizes", [[3, 0, 5, 12], [0, 0]])
def test_lw_detr_matcher_groups(sizes):
    G, Qg, B = 3, 10, len(sizes)
    outputs, targets = _case(sizes, G, Qg)
    matcher = loss_lw_detr.LwDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    ref, blocks = _spy(loss_lw_detr, lambda: matcher(outputs, targets, G))
    cost, _ = lw_detr_cost(matcher, outputs, targets)
    for g in range(G):  # transformers loops groups, then images
        for b, s in enumerate(sizes):
            assert torch.equal(cost[b, g * Qg : (g + 1) * Qg, :s], blocks[g * B + b]), (g, b)
    with patch_transformers():
        mine = matcher(outputs, targets, G)
    for b, ((i0, j0), (i1, j1)) in enumerate(zip(ref, mine, strict=True)):
        assert torch.equal(i0, i1) and torch.equal(j0, j1), b


@pytest.mark.parametrize("sizes", [[3, 0, 5, 12], [0, 0]])
def test_rf_detr_segmentation_matcher(sizes):
    G, Qg, B = 2, 10, len(sizes)
    outputs, targets = _case(sizes, G, Qg)
    matcher = loss_rf_detr.RfDetrHungarianMatcher(
        class_cost=2, bbox_cost=5, giou_cost=2, mask_point_sample_ratio=4
    )
    torch.manual_seed(1)
    ref, blocks = _spy(loss_rf_detr, lambda: matcher(outputs, targets, G))
    after_ref = torch.rand(1)
    torch.manual_seed(1)
    cost, _ = lw_detr_cost(matcher, outputs, targets, giou_in_float32=False)
    cost = cost + rf_detr_mask_cost(matcher, outputs, targets, sizes)
    assert torch.equal(torch.rand(1), after_ref)  # the same random points, the same RNG stream after
    for g in range(G):
        for b, s in enumerate(sizes):
            # the mask terms are batched matmuls: equal up to summation order
            torch.testing.assert_close(
                cost[b, g * Qg : (g + 1) * Qg, :s], blocks[g * B + b], rtol=1e-6, atol=1e-5
            )
    torch.manual_seed(1)
    with patch_transformers():
        mine = matcher(outputs, targets, G)
    for b, ((i0, j0), (i1, j1)) in enumerate(zip(ref, mine, strict=True)):
        assert torch.equal(i0, i1) and torch.equal(j0, j1), b


@pytest.mark.parametrize("sizes", [[4, 0, 6], [0, 0]])
def test_lw_detr_loss_and_grads_training_groups(sizes):
    cfg = LwDetrConfig(num_labels=5, group_detr=3, num_queries=8, decoder_layers=3)
    B, Q, L = len(sizes), 8 * 3, 3
    g = torch.Generator().manual_seed(5)
    raw = [
        torch.randn(L, B, Q, 5, generator=g, dtype=torch.float64),
        torch.rand(L, B, Q, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2,
        torch.randn(B, Q, 5, generator=g, dtype=torch.float64),
        torch.rand(B, Q, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2,
    ]
    gt = [
        {
            "class_labels": torch.randint(0, 5, (s,), generator=g),
            "boxes": torch.rand(s, 4, generator=g) * 0.5 + 0.25,
        }
        for s in sizes
    ]

    def run(dtype):
        cls, box, ecls, ebox = (t.detach().to(dtype, copy=True).requires_grad_() for t in raw)
        tg = [{**t, "boxes": t["boxes"].to(dtype)} for t in gt]
        loss, parts, _ = loss_lw_detr.LwDetrForObjectDetectionLoss(
            cls[-1],
            tg,
            "cpu",
            box[-1],
            cfg,
            outputs_class=cls,
            outputs_coord=box,
            enc_outputs_class=ecls,
            enc_outputs_coord=ebox,
        )
        loss.backward()
        return {**{k: v.detach() for k, v in parts.items()}, "gc": cls.grad, "gb": box.grad, "ge": ebox.grad}

    lo, hi = run(torch.float32), run(torch.float64)
    with patch_transformers():
        out = run(torch.float32)
    for k in out:
        assert_within_ref_error(out[k], lo[k], hi[k], torch.float32, msg=k)
