"""unit_fast/patch/transformers.py, the installer: undo, the ``with`` form, the families filter,
patching twice, and families the installed transformers lacks (skipped with the reason)."""

import pytest
from transformers.loss import loss_deformable_detr, loss_for_object_detection

from unit_fast.patch.hf import detr as hf_detr
from unit_fast.patch.transformers import Patch, patch_transformers

HM, IL = loss_for_object_detection.HungarianMatcher, loss_for_object_detection.ImageLoss
DEF_HM = loss_deformable_detr.DeformableDetrHungarianMatcher


def _originals():
    return HM.__dict__["forward"], IL.__dict__["loss_boxes"], DEF_HM.__dict__["forward"]


def test_undo_restores_the_originals_exactly():
    before = _originals()
    report = patch_transformers()
    assert HM.forward is hf_detr.hungarian_matcher_forward and IL.loss_boxes is hf_detr.loss_boxes
    assert report.replaced >= len(hf_detr.PATCHES)
    report.undo()
    assert all(a is b for a, b in zip(_originals(), before, strict=True))
    report.undo()  # a second undo changes nothing
    assert all(a is b for a, b in zip(_originals(), before, strict=True))


def test_with_form_undoes_on_exit_and_on_error():
    before = _originals()
    with patch_transformers() as report:
        assert DEF_HM.forward is hf_detr.deformable_detr_matcher_forward
        assert any(where.endswith("DeformableDetrHungarianMatcher.forward") for where, *_ in report.entries)
    assert all(a is b for a, b in zip(_originals(), before, strict=True))
    with pytest.raises(RuntimeError, match="boom"):  # the with-form undoes and does not swallow the error
        with patch_transformers():
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(_originals(), before, strict=True))


def test_families_filter():
    with patch_transformers(families=["grounding dino"]) as report:
        assert HM.forward is not hf_detr.hungarian_matcher_forward
        assert {where.rsplit(".", 2)[1] for where, *_ in report.entries} == {
            "GroundingDinoHungarianMatcher", "GroundingDinoImageLoss"}


def test_patching_twice_is_harmless():
    before = _originals()
    with patch_transformers() as first:
        with patch_transformers() as second:
            assert second.replaced == 0
            assert {where for where, _ in second.skipped} >= {p.where for p in hf_detr.PATCHES}
            assert all(reason == "already patched" for _, reason in second.skipped)
        assert HM.forward is hf_detr.hungarian_matcher_forward  # the inner undo left ours in place
        assert first.replaced >= len(hf_detr.PATCHES)
    assert all(a is b for a, b in zip(_originals(), before, strict=True))


def test_missing_module_and_class_are_skipped_with_the_reason(monkeypatch):
    fake = [
        Patch("Fake DETR", "transformers.loss.loss_not_a_module", "Matcher", "forward", lambda *a: None),
        Patch("Fake DETR", "transformers.loss.loss_for_object_detection", "NoSuchMatcher", "forward",
              lambda *a: None),
        Patch("Fake DETR", "transformers.loss.loss_for_object_detection", "HungarianMatcher", "no_such_method",
              lambda *a: None),
    ]
    monkeypatch.setattr(hf_detr, "PATCHES", fake)
    with patch_transformers(families=["fake detr"]) as report:
        assert report.replaced == 0
        reasons = dict(report.skipped)
        assert "not in the installed transformers" in reasons[fake[0].where]
        assert "has no NoSuchMatcher.forward" in reasons[fake[1].where]
        assert "has no HungarianMatcher.no_such_method" in reasons[fake[2].where]
        assert "left as they were (3)" in str(report)
    assert not hasattr(HM, "no_such_method")


def test_families_filter_matches_whole_names():
    """``"DETR"`` is DETR's own loss, not every family whose name contains it (RT-DETR, ...)."""
    with patch_transformers(families=["DETR"]) as report:
        owners = {where.rsplit(".", 2)[1] for where, *_ in report.entries}
    assert owners == {"HungarianMatcher", "ImageLoss"}
    with patch_transformers(families=["rt-detr", "LW-DETR"]) as report:
        owners = {where.rsplit(".", 2)[1] for where, *_ in report.entries}
    assert owners == {"RTDetrHungarianMatcher", "RTDetrLoss", "LwDetrHungarianMatcher", "LwDetrImageLoss"}
