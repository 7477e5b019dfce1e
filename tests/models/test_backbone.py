"""NestedTensor, PositionEmbeddingSine, Backbone/Joiner and DETR checkpoint loading (CPU, resnet18)."""

import math

import pytest
import torch
import torchvision
from torch import nn

from unit_fast.models.backbone import Backbone, Joiner, build_backbone, load_detr_backbone
from unit_fast.models.misc import NestedTensor
from unit_fast.models.position_encoding import PositionEmbeddingSine
from unit_fast.testing import assert_close_ref, devices


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt to fetch pretrained weights fails the test (the backbone must never download)."""

    def _fail(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fail)


def _joiner(**kwargs):
    kwargs.setdefault("backbone", "resnet18")
    kwargs.setdefault("hidden_dim", 32)
    return build_backbone(**kwargs).eval()


def _randomize_buffers(module):
    """FrozenBN buffers start as ones/zeros; random values make buffer loading observable."""
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if not buf.is_floating_point():  # num_batches_tracked
                continue
            buf.copy_(torch.rand_like(buf) + 0.5 if "var" in name else torch.randn_like(buf))


# --------------------------------------------------------------------------- NestedTensor


def test_from_tensor_list_pads_and_masks():
    a = torch.arange(1, 1 + 2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)  # [C=2, H=2, W=3]
    b = -torch.arange(1, 1 + 2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # [C=2, H=4, W=1]
    nt = NestedTensor.from_tensor_list([a, b])
    tensors, mask = nt.decompose()
    assert tensors.shape == (2, 2, 4, 3) and mask.shape == (2, 4, 3) and mask.dtype == torch.bool
    expected = torch.zeros(2, 2, 4, 3)
    expected[0, :, :2, :3] = a
    expected[1, :, :4, :1] = b
    assert torch.equal(tensors, expected)
    expected_mask = torch.tensor(
        [
            [[False, False, False], [False, False, False], [True, True, True], [True, True, True]],
            [[False, True, True], [False, True, True], [False, True, True], [False, True, True]],
        ]
    )
    assert torch.equal(mask, expected_mask)


def test_from_tensor_list_size_divisibility():
    nt = NestedTensor.from_tensor_list([torch.ones(3, 5, 9), torch.ones(3, 7, 2)], size_divisibility=4)
    assert nt.tensors.shape == (2, 3, 8, 12)
    assert nt.mask[0, :5, :9].logical_not().all() and nt.mask[0, 5:].all() and nt.mask[0, :, 9:].all()
    assert nt.mask[1, :7, :2].logical_not().all() and nt.mask[1, 7:].all() and nt.mask[1, :, 2:].all()
    # Already divisible: unchanged size.
    exact = NestedTensor.from_tensor_list([torch.ones(1, 8, 4)], size_divisibility=4)
    assert exact.tensors.shape == (1, 1, 8, 4)


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "empty"),
        ([torch.ones(3, 4, 4), torch.ones(1, 4, 4)], "channels"),
        ([torch.ones(3, 4, 4), torch.ones(3, 4, 4, dtype=torch.float64)], "dtype"),
        ([torch.ones(4, 4)], r"\[C, H, W\]"),
    ],
)
def test_from_tensor_list_rejects(images, match):
    with pytest.raises(ValueError, match=match):
        NestedTensor.from_tensor_list(images)


@pytest.mark.parametrize("device", devices())
def test_nested_tensor_to_decompose_repr(device):
    half = torch.float16
    nt = NestedTensor.from_tensor_list([torch.ones(3, 2, 2, dtype=half), torch.ones(3, 1, 3, dtype=half)])
    moved = nt.to(device)
    tensors, mask = moved.decompose()
    assert tensors.device.type == device and mask.device.type == device
    assert tensors.dtype == torch.float16 and mask.dtype == torch.bool
    assert torch.equal(mask.cpu(), nt.mask)
    assert "(2, 3, 2, 3)" in repr(nt) and "mask=(2, 2, 3)" in repr(nt)
    assert NestedTensor(tensors, None).to("cpu").mask is None


# --------------------------------------------------------------------------- PositionEmbeddingSine


def _pos_by_hand(mask, num_pos_feats, temperature, normalize, scale):
    """Scalar loops over the DETR formula: independent of the module's vectorisation."""
    b_, h_, w_ = mask.shape
    out = torch.zeros(b_, 2 * num_pos_feats, h_, w_, dtype=torch.float64)
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                y = sum(not mask[b, k, j] for k in range(i + 1))
                x = sum(not mask[b, i, k] for k in range(j + 1))
                if normalize:
                    y = y / (sum(not mask[b, k, j] for k in range(h_)) + 1e-6) * scale
                    x = x / (sum(not mask[b, i, k] for k in range(w_)) + 1e-6) * scale
                for f in range(num_pos_feats):
                    freq = temperature ** (2 * (f // 2) / num_pos_feats)
                    trig = math.sin if f % 2 == 0 else math.cos
                    out[b, f, i, j] = trig(y / freq)  # y features first
                    out[b, num_pos_feats + f, i, j] = trig(x / freq)
    return out


def test_position_embedding_literal_values():
    # num_pos_feats=2: both frequencies are 1, so pixel (y, x) -> [sin y, cos y, sin x, cos x]
    # with 1-based counts of valid pixels.
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=2)(NestedTensor(torch.zeros(1, 1, 2, 3), mask))
    assert pos.shape == (1, 4, 2, 3) and pos.dtype == torch.float32
    y, x = 1.0, 2.0  # pixel (row 0, column 1)
    expected = torch.tensor([math.sin(y), math.cos(y), math.sin(x), math.cos(x)])
    torch.testing.assert_close(pos[0, :, 0, 1], expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("normalize, scale", [(False, None), (True, None), (True, 3.0)])
def test_position_embedding_matches_hand_computation(device, normalize, scale):
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[0, :, 4:] = True  # image 0 is 3 x 4
    mask[1, 2:, :] = True  # image 1 is 2 x 5
    module = PositionEmbeddingSine(num_pos_feats=4, temperature=20, normalize=normalize, scale=scale)
    pos = module(NestedTensor(torch.zeros(2, 1, 3, 5, device=device), mask.to(device)))
    assert pos.shape == (2, 8, 3, 5) and pos.device.type == device
    ref = _pos_by_hand(mask, 4, 20, normalize, 2 * math.pi if scale is None else scale)
    assert_close_ref(pos, ref, dtype=torch.float32)


def test_position_embedding_rejects_bad_arguments():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(scale=1.0)
    with pytest.raises(ValueError, match="even"):
        PositionEmbeddingSine(num_pos_feats=3)
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine()(NestedTensor(torch.zeros(1, 1, 2, 2), None))


@pytest.mark.parametrize("normalize", [False, True])
def test_position_embedding_padded_batch_equals_single_image(normalize):
    # With normalize, positions are divided by each image's own valid extent, so padding added
    # by other images in the batch must not change an image's encoding.
    images = [torch.randn(1, 5, 7), torch.randn(1, 3, 4), torch.randn(1, 6, 2)]
    module = PositionEmbeddingSine(num_pos_feats=8, normalize=normalize)
    batch = module(NestedTensor.from_tensor_list(images))  # (3, 16, 6, 7)
    for b, img in enumerate(images):
        alone = module(NestedTensor.from_tensor_list([img]))[0]
        h, w = img.shape[1:]
        assert_close_ref(batch[b, :, :h, :w], alone, dtype=torch.float32, msg=f"image {b}")


# --------------------------------------------------------------------------- Backbone / Joiner


def test_state_dict_keys_and_frozen_bn_buffers():
    joiner = _joiner()
    assert isinstance(joiner, Joiner) and isinstance(joiner, nn.Sequential)
    keys = set(joiner.state_dict())
    assert {"0.body.conv1.weight", "0.body.bn1.running_mean", "0.body.layer4.1.conv2.weight"} <= keys
    assert any(k.startswith("0.body.layer4.") for k in keys)
    assert all(k.startswith("0.body.") for k in keys)  # no position-embedding state, no extra prefix
    assert not any(".fc." in k or "avgpool" in k or "num_batches_tracked" in k for k in keys)
    params = dict(joiner.named_parameters())
    buffers = dict(joiner.named_buffers())
    for stat in ("weight", "bias", "running_mean", "running_var"):
        assert f"0.body.bn1.{stat}" in buffers and f"0.body.bn1.{stat}" not in params
    # Only convolutions carry parameters.
    assert all(".conv" in k or ".downsample.0." in k for k in params)
    # Inside UniTBaseModel the joiner is the ``backbone`` attribute: DETR checkpoint key layout.
    wrapper = nn.Module()
    wrapper.backbone = joiner
    assert "backbone.0.body.conv1.weight" in wrapper.state_dict()


def test_freezing_rules():
    frozen = _joiner(lr_backbone=0.0)
    assert not any(p.requires_grad for p in frozen.parameters())

    trained = _joiner(lr_backbone=1e-5)
    for name, p in trained.named_parameters():
        in_trained_stage = name.startswith(("0.body.layer2.", "0.body.layer3.", "0.body.layer4."))
        assert p.requires_grad == in_trained_stage, name
    assert not trained[0].body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in trained[0].body.layer1.parameters())
    assert all(p.requires_grad for p in trained[0].body.layer4.parameters())


def test_dilation_halves_layer4_stride():
    x = NestedTensor.from_tensor_list([torch.randn(3, 64, 96)])
    plain = Backbone("resnet50", False, False, dilation=False).eval()
    dc5 = Backbone("resnet50", False, False, dilation=True).eval()
    assert plain.num_channels == dc5.num_channels == 2048
    with torch.no_grad():
        out_plain, out_dc5 = plain(x)["0"], dc5(x)["0"]
    assert out_plain.tensors.shape == (1, 2048, 2, 3)  # stride 32
    assert out_dc5.tensors.shape == (1, 2048, 4, 6)  # stride 16
    assert out_dc5.mask.shape == (1, 4, 6) and not out_dc5.mask.any()


def test_backbone_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Bottleneck"):
        Backbone("resnet18", False, False, dilation=True)
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone("vgg16", False, False, dilation=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_backbone(backbone="resnet18", hidden_dim=30)


def test_intermediate_layers():
    body = Backbone("resnet18", True, return_interm_layers=True, dilation=False).eval()
    with torch.no_grad():
        out = body(NestedTensor.from_tensor_list([torch.randn(3, 64, 64)]))
    assert list(out) == ["0", "1", "2", "3"]
    shapes = [tuple(v.tensors.shape) for v in out.values()]
    assert shapes == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert [tuple(v.mask.shape) for v in out.values()] == [(1, 16, 16), (1, 8, 8), (1, 4, 4), (1, 2, 2)]


def test_mask_resized_by_nearest():
    # 100 x 100 padded input -> 4 x 4 layer4 map; nearest samples input rows/cols 0, 25, 50, 75.
    joiner = _joiner()
    images = [torch.randn(3, 70, 100), torch.randn(3, 100, 26), torch.randn(3, 100, 100)]
    nt = NestedTensor.from_tensor_list(images)
    with torch.no_grad():
        features, _ = joiner(nt)
    mask = features[0].mask
    assert features[0].tensors.shape == (3, 512, 4, 4) and mask.dtype == torch.bool
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, 3:, :] = True  # row 75 >= 70
    expected[1, :, 2:] = True  # columns 50, 75 >= 26
    assert torch.equal(mask, expected)


def test_joiner_padded_batch_positions_match_single_images():
    # Sizes are multiples of 32 so each image's valid region maps onto whole layer4 cells.
    joiner = _joiner()
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 32)]
    with torch.no_grad():
        features, pos = joiner(NestedTensor.from_tensor_list(images))
        assert len(features) == len(pos) == 1
        assert features[0].tensors.shape == (2, 512, 3, 3) and pos[0].shape == (2, 32, 3, 3)
        for b, img in enumerate(images):
            alone_features, alone_pos = joiner(NestedTensor.from_tensor_list([img]))
            h, w = alone_pos[0].shape[-2:]
            assert (h, w) == (img.shape[1] // 32, img.shape[2] // 32)
            assert not features[0].mask[b, :h, :w].any() and features[0].mask[b].sum() == 9 - h * w
            assert_close_ref(pos[0][b, :, :h, :w], alone_pos[0][0], dtype=torch.float32, msg=f"image {b}")


def test_joiner_pos_in_feature_dtype():
    # A bf16 model (not autocast: FrozenBN's fp32 buffers would promote the features back).
    joiner = _joiner().to(torch.bfloat16)
    nt = NestedTensor.from_tensor_list([torch.randn(3, 64, 64, dtype=torch.bfloat16)])
    with torch.no_grad():
        features, pos = joiner(nt)
    assert features[0].tensors.dtype == torch.bfloat16 and pos[0].dtype == torch.bfloat16
    assert joiner.num_channels == 512


# --------------------------------------------------------------------------- weights loading


def test_load_detr_backbone_round_trip():
    source = _joiner()
    _randomize_buffers(source)
    checkpoint = {f"backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    checkpoint["input_proj.weight"] = torch.randn(32, 512, 1, 1)  # non-backbone keys are ignored
    checkpoint["transformer.encoder.layers.0.linear1.weight"] = torch.randn(4, 4)

    torch.manual_seed(1)
    target = _joiner()
    assert not torch.equal(target[0].body.conv1.weight, source[0].body.conv1.weight)
    report = load_detr_backbone(target, checkpoint)
    assert report.missing_keys == [] and report.unexpected_keys == []
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    x = NestedTensor.from_tensor_list([torch.randn(3, 64, 64)])
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0][0].tensors, source(x)[0][0].tensors, rtol=0, atol=0)

    # UniT checkpoints nest the same keys under unit_base_model.
    unit = {f"unit_base_model.{k}": v for k, v in checkpoint.items()}
    assert load_detr_backbone(_joiner(), unit, prefix="unit_base_model.backbone.").missing_keys == []


def test_load_detr_backbone_reports_and_rejects():
    checkpoint = {f"backbone.{k}": v for k, v in _joiner().state_dict().items()}
    del checkpoint["backbone.0.body.bn1.running_mean"]
    checkpoint["backbone.0.body.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="bn1.running_mean"):
        load_detr_backbone(_joiner(), checkpoint)
    report = load_detr_backbone(_joiner(), checkpoint, strict=False)
    assert report.missing_keys == ["0.body.bn1.running_mean"]
    assert report.unexpected_keys == ["0.body.extra"]
    with pytest.raises(ValueError, match="checkpoint\\['model'\\]"):
        load_detr_backbone(_joiner(), {"model": checkpoint, "epoch": 3})


def test_local_torchvision_weights(tmp_path):
    # A torchvision-format file: plain BatchNorm2d (with num_batches_tracked) and the fc head.
    resnet = torchvision.models.resnet18(weights=None)
    _randomize_buffers(resnet)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)

    body = Backbone("resnet18", True, False, dilation=False, weights=path)
    loaded = body.body.state_dict()
    for k, v in resnet.state_dict().items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[k], v), k

    broken = dict(resnet.state_dict())
    del broken["layer1.0.conv1.weight"]
    torch.save(broken, path)
    with pytest.raises(ValueError, match="do not fit a torchvision resnet18: Missing key.*layer1.0.conv1.weight"):
        Backbone("resnet18", True, False, dilation=False, weights=path)


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_backbone(backbone="resnet18", weights=path)


def test_from_scratch_options_batch_norm_and_layer3():
    """``norm="batch_norm"``: real BatchNorm2d layers and every parameter trains (stem and layer1
    too); ``last_layer="layer3"``: stride 16, 256 channels for resnet18, no layer4 weights."""
    j = build_backbone(backbone="resnet18", lr_backbone=1e-4, hidden_dim=64, norm="batch_norm", last_layer="layer3")
    body = j[0].body
    assert not any(isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d) for m in body.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in j.parameters())
    assert not any(k.startswith("layer4") for k in body.state_dict())
    assert j.num_channels == 256
    x = NestedTensor(torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    features, pos = j(x)
    assert features[0].tensors.shape == (2, 256, 4, 6)
    assert pos[0].shape == (2, 64, 4, 6)
    # lr_backbone <= 0 still freezes everything
    frozen = build_backbone(backbone="resnet18", lr_backbone=0.0, hidden_dim=64, norm="batch_norm")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_default_options_keep_detr_layout():
    j = build_backbone(backbone="resnet18", lr_backbone=1e-4, hidden_dim=64)
    assert j[0].body.layer4 is not None and j.num_channels == 512
    assert any(isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d) for m in j.modules())


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "group_norm"}, "norm must be one of"),
    ({"last_layer": "layer2"}, "last_layer must be one of"),
    ({"backbone": "resnet50", "dilation": True, "last_layer": "layer3"}, "needs last_layer='layer4'"),
])
def test_backbone_option_errors(kwargs, match):
    args = {"backbone": "resnet18", "lr_backbone": 1e-4, "hidden_dim": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_backbone(**args)
