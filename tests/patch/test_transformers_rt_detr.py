"""``patch_transformers`` on RT-DETR, D-FINE and DEIMv2 losses: same losses, gradients, costs.

Rule (``assert_within_ref_error``): the patched fp32 result may differ from the unpatched fp64
one by at most twice what the unpatched fp32 one does (+ 1e-4).  Low reference: transformers in
fp32 (the dtype the patch runs in); high: transformers in fp64 (scipy solves in float64 anyway,
so the fp64 run is the most exact statement of the same losses).  Inputs are continuous random
values, so the matching has no ties.  RT-DETR is a whole tiny model (random init, no download);
D-FINE and DEIMv2 are their loss classes on random outputs (their tiny HGNetV2 backbones need a
hand-matched channel plan), without ``pred_corners`` so loss_local (not patched) is skipped; the
whole D-FINE / DEIMv2 models are in test_transformers_whole_models.py.
"""

import contextlib
import copy

import pytest
import torch
from transformers import DFineConfig, RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
from transformers.loss import loss_rt_detr
from transformers.loss.loss_d_fine import DFineLoss

from unit_fast.patch.hf.matching import blocks_to_padded
from unit_fast.patch.hf.rt_detr import rt_detr_cost
from unit_fast.patch.transformers import patch_transformers
from unit_fast.testing import assert_within_ref_error

try:
    from transformers import Deimv2Config
    from transformers.loss.loss_deimv2 import Deimv2Loss
except ImportError:  # older transformers
    Deimv2Config = Deimv2Loss = None


def _targets(sizes, num_classes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "class_labels": torch.randint(0, num_classes, (s,), generator=g),
            "boxes": (torch.rand(s, 4, generator=g) * 0.5 + 0.25).to(dtype),
        }
        for s in sizes
    ]


def _cast(targets, dtype):
    return [{**t, "boxes": t["boxes"].to(dtype)} for t in targets]


def _check(run, msg):
    """run(dtype, patched) -> dict name -> tensor; compares patched fp32 to the references."""
    lo, hi = run(torch.float32, False), run(torch.float64, False)
    with patch_transformers():
        out = run(torch.float32, True)
    assert out.keys() == lo.keys()
    for k in out:
        assert_within_ref_error(out[k], lo[k], hi[k], torch.float32, msg=f"{msg} {k}")


def _rt_detr(focal=True):
    bb = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 8, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    cfg = RTDetrConfig(
        backbone_config=bb,
        encoder_hidden_dim=16,
        encoder_in_channels=[8, 16, 16],
        encoder_ffn_dim=16,
        encoder_attention_heads=2,
        d_model=16,
        num_queries=20,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=16,
        decoder_layers=3,
        decoder_attention_heads=2,
        num_denoising=8,
        num_labels=5,
        use_focal_loss=focal,
    )
    torch.manual_seed(0)
    return RTDetrForObjectDetection(cfg).train()


def _model_run(model, sizes, steps=1, labels=None, around=contextlib.nullcontext):
    """``run(dtype, patched)`` for ``_check``: ``steps`` SGD steps of ``model`` (a copy in
    ``dtype``) on random 64 x 64 images; ``labels(dtype)`` (default: ``_targets(sizes, 5)``),
    each forward inside ``around(dtype)``."""
    pixels = torch.randn(len(sizes), 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = _targets(sizes, 5)
    labels = labels or (lambda dtype: _cast(targets, dtype))

    def run(dtype, patched):
        m = copy.deepcopy(model).to(dtype)
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        res = {}
        for step in range(steps):
            torch.manual_seed(10 + step)  # the denoising queries (and mask points) are random
            with around(dtype):
                out = m(pixel_values=pixels.to(dtype), labels=labels(dtype))
            opt.zero_grad()
            out.loss.backward()
            res.update({f"{k}@{step}": v.detach() for k, v in out.loss_dict.items()})
            res[f"grad@{step}"] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
            opt.step()
        return res

    return run


@pytest.mark.parametrize("focal", [True, False])
def test_rt_detr_model_loss_and_grads(focal):
    _check(_model_run(_rt_detr(focal), [3, 1, 5]), f"RT-DETR focal={focal}")


def test_rt_detr_three_training_steps():
    _check(_model_run(_rt_detr(), [2, 4], steps=3), "RT-DETR 3 steps")


@pytest.mark.parametrize("sizes", [[0, 3], [0, 0]])
def test_rt_detr_empty_targets(sizes):
    _check(_model_run(_rt_detr(), sizes), f"RT-DETR sizes={sizes}")


def _loss_run(make_loss, sizes, Q=20, C=5, layers=3):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(layers, len(sizes), Q, C, generator=g, dtype=torch.float64)
    boxes = torch.rand(layers, len(sizes), Q, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2
    targets = _targets(sizes, C)

    def run(dtype, patched):
        lg, bx = (t.detach().to(dtype, copy=True).requires_grad_() for t in (logits, boxes))
        outputs = {
            "logits": lg[-1],
            "pred_boxes": bx[-1],
            "auxiliary_outputs": [{"logits": lg[i], "pred_boxes": bx[i]} for i in range(layers - 1)],
        }
        losses = make_loss()(outputs, _cast(targets, dtype))
        sum(losses.values()).backward()
        return {**{k: v.detach() for k, v in losses.items()}, "grad_logits": lg.grad, "grad_boxes": bx.grad}

    return run


def test_d_fine_loss():
    cfg = DFineConfig(num_labels=5)
    _check(_loss_run(lambda: DFineLoss(cfg), [4, 0, 7]), "D-FINE")


@pytest.mark.skipif(Deimv2Loss is None, reason="transformers without DEIMv2")
@pytest.mark.parametrize("dense", [True, False])
def test_deimv2_loss(dense):
    cfg = Deimv2Config(num_labels=5, use_dense_one_to_one=dense)
    _check(_loss_run(lambda: Deimv2Loss(cfg), [4, 0, 7]), f"DEIMv2 dense={dense}")


def _capture_costs(matcher, outputs, targets):
    """The per-image cost blocks transformers hands to scipy, and its indices."""
    blocks, orig = [], loss_rt_detr.linear_sum_assignment

    def spy(c):
        blocks.append(torch.as_tensor(c))
        return orig(c)

    loss_rt_detr.linear_sum_assignment = spy
    try:
        indices = matcher(outputs, targets)
    finally:
        loss_rt_detr.linear_sum_assignment = orig
    return blocks, indices


@pytest.mark.parametrize("focal", [True, False])
def test_matcher_cost_and_indices(focal):
    cfg = RTDetrConfig(use_focal_loss=focal, num_labels=7)
    matcher = loss_rt_detr.RTDetrHungarianMatcher(cfg)
    sizes, g = [3, 0, 5, 12], torch.Generator().manual_seed(3)
    outputs = {
        "logits": torch.randn(4, 30, 7, generator=g),
        "pred_boxes": torch.rand(4, 30, 4, generator=g) * 0.5 + 0.25,
    }
    targets = _targets(sizes, 7)
    blocks, ref = _capture_costs(matcher, outputs, targets)
    cost, _ = rt_detr_cost(matcher, outputs, targets)
    # the same elementwise formulas in the same dtype: bit-equal to transformers' blocks
    for b, s in enumerate(sizes):
        assert torch.equal(cost[b, :, :s], blocks[b]), b
    full = torch.cat([c for c in blocks], dim=1) if blocks else None
    assert blocks_to_padded(full[None].expand(4, -1, -1), sizes)[1, :, :5].shape == (30, 5)
    with patch_transformers():
        mine = matcher(outputs, targets)
    for b, ((i0, j0), (i1, j1)) in enumerate(zip(ref, mine, strict=True)):
        # tie-free inputs: the optimum is unique, so the indices are equal, not only the totals
        assert torch.equal(i0, i1) and torch.equal(j0, j1), b
        assert torch.allclose(cost[b, i1, j1].sum(), blocks[b][i0, j0].sum())


def test_patch_report_and_undo():
    forward = loss_rt_detr.RTDetrHungarianMatcher.forward
    with patch_transformers() as report:
        wheres = [w for w, _, _ in report.entries]
        assert "transformers.loss.loss_rt_detr.RTDetrHungarianMatcher.forward" in wheres
        assert "transformers.loss.loss_rt_detr.RTDetrLoss.loss_boxes" in wheres
        assert loss_rt_detr.RTDetrHungarianMatcher.forward is not forward
    assert loss_rt_detr.RTDetrHungarianMatcher.forward is forward
