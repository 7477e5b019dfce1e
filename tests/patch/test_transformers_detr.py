"""unit_fast/patch/hf/detr.py inside real ``transformers`` models: DETR, Conditional DETR, DAB-DETR,
Deformable DETR and Grounding DINO, tiny and random (nothing is downloaded).

Precision rule (``assert_within_ref_error``): the patched float32 run must sit within twice the
error of the unpatched float32 run, both measured against the unpatched float64 run.  The inputs
are continuous random values, so the assignments are tie-free and the three runs match the same
pairs; the indices are then compared exactly against transformers' own.
"""

import contextlib

import pytest
import torch
from transformers import (
    BertConfig,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DabDetrConfig,
    DabDetrForObjectDetection,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    ResNetConfig,
)
from transformers.loss import loss_deformable_detr, loss_for_object_detection, loss_grounding_dino

from unit_fast.patch.hf import detr as hf_detr
from unit_fast.patch.transformers import patch_transformers
from unit_fast.testing import assert_within_ref_error

NUM_LABELS = 3
SIZES = [3, 0, 4]  # targets per image: one image without any
_TINY = dict(use_timm_backbone=False, use_pretrained_backbone=False, encoder_layers=1, decoder_layers=2,
             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
             num_queries=8)
_DEFORMABLE = dict(num_feature_levels=2, encoder_n_points=2, decoder_n_points=2)
# Grounding DINO's prompt "[CLS] a . b c . d . [SEP] [PAD]": 1012 is ".", 101/102 CLS/SEP, 0 PAD,
# so three classes with 1, 2 and 1 tokens (its label maps come from these delimiters).
_PROMPT = [101, 200, 1012, 300, 301, 1012, 400, 1012, 102, 0]


def _backbone():
    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                        layer_type="basic", out_features=["stage3", "stage4"])


def _grounding_dino():
    text = BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
    return GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=_backbone(), text_config=text, d_model=32, max_text_len=16, fusion_dim=16,
        two_stage=True, auxiliary_loss=True, **_TINY, **_DEFORMABLE))


MODELS = {
    "detr": lambda: DetrForObjectDetection(DetrConfig(backbone_config=_backbone(), d_model=16, auxiliary_loss=True,
                                                      num_labels=NUM_LABELS, **_TINY)),
    "conditional_detr": lambda: ConditionalDetrForObjectDetection(ConditionalDetrConfig(
        backbone_config=_backbone(), d_model=16, auxiliary_loss=True, num_labels=NUM_LABELS, **_TINY)),
    "dab_detr": lambda: DabDetrForObjectDetection(DabDetrConfig(
        backbone_config=_backbone(), hidden_size=32, auxiliary_loss=True, num_labels=NUM_LABELS, **_TINY)),
    "deformable_detr": lambda: DeformableDetrForObjectDetection(DeformableDetrConfig(
        backbone_config=_backbone(), d_model=32, auxiliary_loss=True, num_labels=NUM_LABELS, **_TINY,
        **_DEFORMABLE)),
    "grounding_dino": _grounding_dino,
}


def _targets(sizes, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        centre, size = torch.rand(s, 2, generator=g) * 0.6 + 0.2, torch.rand(s, 2, generator=g) * 0.3 + 0.05
        out.append({"class_labels": torch.randint(0, NUM_LABELS, (s,), generator=g),
                    "boxes": torch.cat([centre, size], 1).to(dtype)})
    return out


def _inputs(name, dtype, sizes=SIZES):
    pixels = torch.randn(len(sizes), 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    kwargs = {"pixel_values": pixels, "labels": _targets(sizes, dtype)}
    if name == "grounding_dino":
        ids = torch.tensor([_PROMPT] * len(sizes))
        kwargs.update(input_ids=ids, attention_mask=(ids != 0).long())
    return kwargs


@contextlib.contextmanager
def _precision(dtype):
    """Grounding DINO divides integer label maps: the quotient takes the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _model(name, dtype):
    torch.manual_seed(0)
    return MODELS[name]().to(dtype).train()


def _loss_and_grads(name, dtype, patched, sizes=SIZES):
    model = _model(name, dtype)
    with _precision(dtype), (patch_transformers() if patched else contextlib.nullcontext()):
        out = model(**_inputs(name, dtype, sizes))
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in out.loss_dict.items()}, grads


def _assert_runs_agree(name, sizes):
    ref64, ref32, ours = (_loss_and_grads(name, d, p, sizes) for d, p in
                          ((torch.float64, False), (torch.float32, False), (torch.float32, True)))
    assert_within_ref_error(ours[0], ref32[0], ref64[0], torch.float32, msg=f"{name} loss")
    assert ours[1].keys() == ref32[1].keys()
    for key in ref32[1]:
        assert_within_ref_error(ours[1][key], ref32[1][key], ref64[1][key], torch.float32, msg=f"{name} {key}")
    assert ours[2].keys() == ref32[2].keys()
    for key in ref32[2]:
        assert_within_ref_error(ours[2][key], ref32[2][key], ref64[2][key], torch.float32, msg=f"{name} grad {key}")


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_gradients_match_transformers(name):
    _assert_runs_agree(name, SIZES)


@pytest.mark.parametrize("name", ["detr", "deformable_detr", "grounding_dino"])
def test_batch_without_any_target(name):
    _assert_runs_agree(name, [0, 0])


@pytest.mark.parametrize("name", ["detr", "deformable_detr", "grounding_dino"])
def test_three_training_steps_match(name):
    def steps(dtype, patched):
        model = _model(name, dtype)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        losses = []
        with _precision(dtype), (patch_transformers() if patched else contextlib.nullcontext()):
            for _ in range(3):
                opt.zero_grad()
                loss = model(**_inputs(name, dtype)).loss
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return torch.stack(losses), torch.cat([p.detach().flatten() for p in model.parameters()])

    (l64, p64), (l32, p32), (lo, po) = steps(torch.float64, False), steps(torch.float32, False), steps(torch.float32, True)
    assert_within_ref_error(lo, l32, l64, torch.float32, msg=f"{name} losses")
    assert_within_ref_error(po, p32, p64, torch.float32, msg=f"{name} parameters")


# (matcher class, our forward, model whose outputs feed it)
MATCHERS = [
    (loss_for_object_detection.HungarianMatcher, hf_detr.hungarian_matcher_forward, "detr"),
    (loss_deformable_detr.DeformableDetrHungarianMatcher, hf_detr.deformable_detr_matcher_forward, "deformable_detr"),
    (loss_grounding_dino.GroundingDinoHungarianMatcher, hf_detr.grounding_dino_matcher_forward, "grounding_dino"),
]


def _matcher_outputs(name, seed):
    """A model's outputs (logits, boxes, label maps) for the matcher: as the untrained model gives
    them (seed 0: its queries nearly tie), or replaced by continuous random values of the same
    shapes (seed > 0: tie-free, so the optimal assignment is unique)."""
    model = _model(name, torch.float32).eval()
    kwargs = _inputs(name, torch.float32)
    captured = {}
    original = model.loss_function

    def spy(logits, labels, device, pred_boxes, config, *args, **kw):
        captured["outputs"] = {"logits": logits.detach(), "pred_boxes": pred_boxes.detach()}
        if name == "grounding_dino":
            captured["outputs"]["label_maps"] = args[0]
        return original(logits, labels, device, pred_boxes, config, *args, **kw)

    model.loss_function = spy
    with torch.no_grad():
        model(**kwargs)
    outputs = captured["outputs"]
    if seed:
        g = torch.Generator().manual_seed(seed)
        logits, boxes = outputs["logits"], outputs["pred_boxes"]
        outputs["logits"] = torch.randn(logits.shape, generator=g) * 3
        outputs["pred_boxes"] = torch.cat([torch.rand(*boxes.shape[:2], 2, generator=g) * 0.6 + 0.2,
                                           torch.rand(*boxes.shape[:2], 2, generator=g) * 0.3 + 0.05], -1)
    return outputs, kwargs["labels"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("cls", "ours", "name"), MATCHERS, ids=[m[2] for m in MATCHERS])
def test_matcher_indices_and_cost_equal_transformers(cls, ours, name, seed, monkeypatch):
    torch.manual_seed(seed)
    outputs, targets = _matcher_outputs(name, seed)
    matcher = cls(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    module = __import__(cls.__module__, fromlist=["linear_sum_assignment"])
    blocks, scipy_lsa = [], module.linear_sum_assignment

    def recording_lsa(cost):  # transformers' per-image cost block, as it hands it to scipy
        blocks.append(torch.as_tensor(cost, dtype=torch.float64))
        return scipy_lsa(cost)

    monkeypatch.setattr(module, "linear_sum_assignment", recording_lsa)
    want = cls.forward(matcher, outputs, targets)
    got = ours(matcher, outputs, targets)
    assert len(got) == len(want) == len(blocks)
    for (i, j), (wi, wj), block in zip(got, want, blocks, strict=True):
        assert i.dtype == j.dtype == torch.int64
        assert len(set(i.tolist())) == len(i) == len(j) == len(set(j.tolist())) == min(block.shape)
        torch.testing.assert_close(block[i, j].sum(), block[wi, wj].sum(), rtol=1e-6, atol=1e-6)
        if seed:  # tie-free: the optimum is unique, so the indices are scipy's
            assert i.tolist() == wi.tolist() and j.tolist() == wj.tolist()


class _HostCopySpy(torch.overrides.TorchFunctionMode):
    """Records tensor methods that copy to the host or read a value there (a sync on CUDA)."""

    HOST_READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist,
                  torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("cls", "ours", "name"), MATCHERS, ids=[m[2] for m in MATCHERS])
def test_patched_matcher_does_not_copy_the_cost_to_the_host(cls, ours, name, monkeypatch):
    outputs, targets = _matcher_outputs(name, 0)
    matcher = cls(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    with _HostCopySpy() as spy:  # the spy works: transformers' own matcher is caught
        cls.forward(matcher, outputs, targets)
    assert "cpu" in spy.calls
    module = __import__(cls.__module__, fromlist=["linear_sum_assignment"])

    def no_scipy(*args):
        raise AssertionError("scipy's linear_sum_assignment was called on the patched path")

    monkeypatch.setattr(module, "linear_sum_assignment", no_scipy)
    with patch_transformers(), _HostCopySpy() as spy:
        matcher(outputs, targets)  # through nn.Module.__call__: the installed forward
    assert spy.calls == []


def test_patch_reaches_the_model_path_and_skips_scipy(monkeypatch):
    """The whole DETR loss runs without scipy once patched (and needs it when not)."""
    calls = []
    monkeypatch.setattr(loss_for_object_detection, "linear_sum_assignment",
                        lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError("scipy called")))
    model = _model("detr", torch.float32)
    with patch_transformers(families=["DETR"]):
        model(**_inputs("detr", torch.float32))
    assert calls == []
    with pytest.raises(AssertionError, match="scipy called"):
        model(**_inputs("detr", torch.float32))


def test_report_lists_the_detr_methods_and_undo_restores_them():
    classes = [loss_for_object_detection.HungarianMatcher, loss_for_object_detection.ImageLoss,
               loss_deformable_detr.DeformableDetrHungarianMatcher, loss_deformable_detr.DeformableDetrImageLoss,
               loss_grounding_dino.GroundingDinoHungarianMatcher, loss_grounding_dino.GroundingDinoImageLoss]
    before = [(c.__dict__.get("forward"), c.__dict__.get("loss_boxes")) for c in classes]
    with patch_transformers() as report:
        text = str(report)
        for patch in hf_detr.PATCHES:
            assert patch.where in text
        assert loss_for_object_detection.HungarianMatcher.forward is hf_detr.hungarian_matcher_forward
        assert loss_grounding_dino.GroundingDinoImageLoss.loss_boxes is hf_detr.loss_boxes
    assert [(c.__dict__.get("forward"), c.__dict__.get("loss_boxes")) for c in classes] == before
    assert "loss_boxes" not in loss_deformable_detr.DeformableDetrImageLoss.__dict__  # inherited again
