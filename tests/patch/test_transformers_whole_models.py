"""``patch_transformers`` on whole tiny D-FINE, DEIMv2, LW-DETR and RF-DETR models (detection and
instance segmentation): the same losses and gradients over two SGD steps, one image without targets.

Rule as in test_transformers_rt_detr.py (``assert_within_ref_error``): the patched fp32 run may differ
from transformers' fp64 run by at most twice what transformers' fp32 run does (+ 1e-4).  Each model
is built from a small random config (no download; backbones configured in code, channel plans matched
by hand), 64x64 images, continuous random inputs (no ties).  Every run also checks that the patch was
in force: ``patch_transformers()`` replaced something, and the ``linear_sum_assignment`` (scipy) name of
the loss modules whose matcher the model uses is called by the unpatched runs and never by the patched.

D-FINE / DEIMv2 fp64 reference: transformers' ``loss_d_fine.translate_gt`` (the FGL/DDF targets of
``loss_local``, which the patch does not touch) fails in float64 ("Index put requires the source and
destination dtypes match": it builds its weights from ``indices.float()``).  For the fp64 run only, it
is swapped for ``_translate_gt``, the same function with those tensors in ``gt``'s dtype (for fp32
inputs it is the original, op for op).  RF-DETR segmentation fp64 reference: transformers' matcher and
mask loss draw their random points with ``torch.rand`` in float32 and ``grid_sample`` float64 masks with
them ("expected scalar type Double but found Float"); for the fp64 run only, ``loss_rf_detr.sample_point``
casts the points to the masks' dtype (exact: the same points).  The fp32 runs use transformers' own.
"""

import contextlib

import pytest
import torch
from transformers import (
    DFineConfig,
    DFineForObjectDetection,
    HGNetV2Config,
    LwDetrConfig,
    LwDetrForObjectDetection,
    LwDetrViTConfig,
    RfDetrConfig,
    RfDetrDinov2Config,
    RfDetrForInstanceSegmentation,
    RfDetrForObjectDetection,
)
from transformers.loss import loss_d_fine, loss_lw_detr, loss_rf_detr, loss_rt_detr

from tests.patch.test_transformers_rt_detr import _model_run, _targets
from unit_fast.patch.transformers import patch_transformers
from unit_fast.testing import assert_within_ref_error

try:
    from transformers import Deimv2Config, Deimv2ForObjectDetection
except ImportError:  # older transformers
    Deimv2Config = Deimv2ForObjectDetection = None

C = 5  # classes


def _translate_gt(gt, max_num_bins, reg_scale, up):
    """transformers' ``loss_d_fine.translate_gt`` (5.24, Apache-2.0) with ``indices`` in ``gt``'s
    dtype instead of ``.float()``, so that it runs in float64; otherwise verbatim."""
    gt = gt.reshape(-1)
    function_values = loss_d_fine.weighting_function(max_num_bins, up, reg_scale)
    diffs = function_values.unsqueeze(0) - gt.unsqueeze(1)
    mask = diffs <= 0
    closest_left_indices = torch.sum(mask, dim=1) - 1
    indices = closest_left_indices.to(gt.dtype)
    weight_right = torch.zeros_like(indices)
    weight_left = torch.zeros_like(indices)
    valid_idx_mask = (indices >= 0) & (indices < max_num_bins)
    valid_indices = indices[valid_idx_mask].long()
    left_values = function_values[valid_indices]
    right_values = function_values[valid_indices + 1]
    left_diffs = torch.abs(gt[valid_idx_mask] - left_values)
    right_diffs = torch.abs(right_values - gt[valid_idx_mask])
    weight_right[valid_idx_mask] = left_diffs / (left_diffs + right_diffs)
    weight_left[valid_idx_mask] = 1.0 - weight_right[valid_idx_mask]
    invalid_idx_mask_neg = indices < 0
    weight_right[invalid_idx_mask_neg] = 0.0
    weight_left[invalid_idx_mask_neg] = 1.0
    indices[invalid_idx_mask_neg] = 0.0
    invalid_idx_mask_pos = indices >= max_num_bins
    weight_right[invalid_idx_mask_pos] = 1.0
    weight_left[invalid_idx_mask_pos] = 0.0
    indices[invalid_idx_mask_pos] = max_num_bins - 0.1
    return indices, weight_right, weight_left


@contextlib.contextmanager
def _fp64_shims(dtype):
    """For float64 runs only: ``_translate_gt``, and RF-DETR's ``sample_point`` with the (float32)
    random points cast to the features' dtype (exactly, so the same points)."""
    orig_gt, orig_sample = loss_d_fine.translate_gt, loss_rf_detr.sample_point
    if dtype == torch.float64:
        loss_d_fine.translate_gt = _translate_gt
        loss_rf_detr.sample_point = lambda x, pts, **kw: orig_sample(x, pts.to(x.dtype), **kw)
    try:
        yield
    finally:
        loss_d_fine.translate_gt, loss_rf_detr.sample_point = orig_gt, orig_sample


@contextlib.contextmanager
def _count_scipy(modules, counts):
    """Counts calls of each module's ``linear_sum_assignment`` into ``counts`` (still solving)."""
    origs = {m: m.linear_sum_assignment for m in modules}

    def spy(orig):
        def call(c):
            counts.append(1)
            return orig(c)

        return call

    for m, orig in origs.items():
        m.linear_sum_assignment = spy(orig)
    try:
        yield
    finally:
        for m, orig in origs.items():
            m.linear_sum_assignment = orig


def _labels(sizes, dtype, masks):
    targets = _targets(sizes, C)
    g = torch.Generator().manual_seed(5)
    out = []
    for t, s in zip(targets, sizes, strict=True):
        t = {**t, "boxes": t["boxes"].to(dtype)}
        if masks:
            t["masks"] = (torch.rand(s, 64, 64, generator=g) > 0.5).to(dtype)
        out.append(t)
    return out


def _run_model(model, sizes, steps=2, masks=False):
    """``_model_run`` of test_transformers_rt_detr.py, with masks in the labels when asked and
    the fp64 shims around each forward."""
    return _model_run(model, sizes, steps, labels=lambda dtype: _labels(sizes, dtype, masks),
                      around=_fp64_shims)


def _check_active(run, msg, scipy_modules, patched_wheres):
    """``_check`` of test_transformers_rt_detr.py (same rule), plus: the patch was in force."""
    counts = {}

    def counted(dtype, patched):
        calls = counts.setdefault((dtype, patched), [])
        with _count_scipy(scipy_modules, calls):
            return run(dtype, patched)

    lo, hi = counted(torch.float32, False), counted(torch.float64, False)
    with patch_transformers() as report:
        assert report.replaced > 0, str(report)
        wheres = {w for w, _, _ in report.entries}
        assert set(patched_wheres) <= wheres, str(report)
        out = counted(torch.float32, True)
    assert len(counts[torch.float32, False]) > 0 and len(counts[torch.float64, False]) > 0, msg
    assert len(counts[torch.float32, True]) == 0, f"{msg}: scipy called while patched"
    assert out.keys() == lo.keys() == hi.keys()
    for k in out:
        assert_within_ref_error(out[k], lo[k], hi[k], torch.float32, msg=f"{msg} {k}")


_RT = [
    "transformers.loss.loss_rt_detr.RTDetrHungarianMatcher.forward",
    "transformers.loss.loss_rt_detr.RTDetrLoss.loss_boxes",
]
_LW = [
    "transformers.loss.loss_lw_detr.LwDetrHungarianMatcher.forward",
    "transformers.loss.loss_lw_detr.LwDetrImageLoss.loss_boxes",
]
_RF_SEG = [
    "transformers.loss.loss_rf_detr.RfDetrHungarianMatcher.forward",
    "transformers.loss.loss_lw_detr.LwDetrImageLoss.loss_boxes",
]


def _hgnet():
    """A tiny HGNetV2: stages 2-4 give 16 channels each at strides 8, 16, 32."""
    return HGNetV2Config(
        embedding_size=8,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 16, 16],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 8, 16, 16],
        stage_mid_channels=[8, 8, 8, 8],
        stage_out_channels=[8, 16, 16, 16],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_kernel_size=[3, 3, 3, 3],
        out_features=["stage2", "stage3", "stage4"],
    )


def _d_fine_kwargs():
    return dict(
        backbone_config=_hgnet(),
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 16, 16],  # = the backbone's stage2-4 out channels
        encoder_ffn_dim=16,
        encoder_attention_heads=2,
        hidden_expansion=0.5,
        depth_mult=0.34,
        d_model=16,
        num_queries=20,
        decoder_in_channels=[16, 16, 16],  # = encoder_hidden_dim per level
        decoder_ffn_dim=16,
        decoder_layers=3,
        decoder_attention_heads=2,
        lqe_hidden_dim=8,
        num_denoising=8,
        num_labels=C,
    )


@pytest.mark.parametrize("sizes", [[4, 0, 3], [0, 0]])
def test_d_fine_model(sizes):
    torch.manual_seed(0)
    model = DFineForObjectDetection(DFineConfig(**_d_fine_kwargs())).train()
    _check_active(_run_model(model, sizes), f"D-FINE sizes={sizes}", [loss_rt_detr], _RT)


@pytest.mark.skipif(Deimv2ForObjectDetection is None, reason="transformers without DEIMv2")
@pytest.mark.parametrize("dense", [True, False])
def test_deimv2_model(dense):
    torch.manual_seed(0)
    cfg = Deimv2Config(**_d_fine_kwargs(), use_dense_one_to_one=dense)
    model = Deimv2ForObjectDetection(cfg).train()
    _check_active(_run_model(model, [4, 0, 3]), f"DEIMv2 dense={dense}", [loss_rt_detr], _RT)


_LW_KW = dict(
    projector_scale_factors=[1.0],
    d_model=16,
    decoder_ffn_dim=16,
    decoder_layers=2,
    decoder_self_attention_heads=2,
    decoder_cross_attention_heads=2,
    num_queries=10,
    group_detr=3,  # training: 3 groups of 10 queries, each matched on its own
    num_labels=C,
    c2f_num_blocks=1,
)


@pytest.mark.parametrize("sizes", [[4, 0, 3], [3, 0, 2], [0, 0]])  # [3, 0, 2] catches a wrong focal alpha
def test_lw_detr_model_groups(sizes):
    bb = LwDetrViTConfig(
        image_size=64,
        pretrain_image_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=8,
        window_block_indices=[0],
        num_windows=4,
        out_indices=[1, 2],
    )
    torch.manual_seed(0)
    model = LwDetrForObjectDetection(LwDetrConfig(backbone_config=bb, **_LW_KW)).train()
    assert model.config.group_detr == 3
    _check_active(_run_model(model, sizes), f"LW-DETR sizes={sizes}", [loss_lw_detr], _LW)


def _rf_detr_config():
    bb = RfDetrDinov2Config(
        image_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=8,
        num_windows=2,
        num_register_tokens=0,
        out_features=["stage1", "stage2"],
    )
    return RfDetrConfig(backbone_config=bb, dropout=0.0, intermediate_size=16, **_LW_KW)


@pytest.mark.parametrize("sizes", [[4, 0, 3], [0, 0]])
def test_rf_detr_detection_model(sizes):
    torch.manual_seed(0)
    model = RfDetrForObjectDetection(_rf_detr_config()).train()
    _check_active(_run_model(model, sizes), f"RF-DETR sizes={sizes}", [loss_lw_detr, loss_rf_detr], _LW)


# Not [0, 0]: with no target in the batch, transformers' own (unpatched) RF-DETR loss_masks returns
# empty (0, 16, 16) tensors, so the model's loss is not a scalar and cannot be backpropagated.
@pytest.mark.parametrize("sizes", [[4, 0, 3], [0, 5, 2]])
def test_rf_detr_segmentation_model(sizes):
    torch.manual_seed(0)
    model = RfDetrForInstanceSegmentation(_rf_detr_config()).train()
    _check_active(
        _run_model(model, sizes, masks=True),
        f"RF-DETR seg sizes={sizes}",
        [loss_lw_detr, loss_rf_detr],
        _RF_SEG,
    )
