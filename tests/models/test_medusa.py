"""``model.medusa`` (Medusa's shared feature attention and multi-scale attention,
``unit_fast/models/medusa.py``): UniT's outputs at initialisation (close; exactly with saturated
init values), one dataset's modules per batch, the backbone's stages and their resize, the
registration of every per-dataset parameter (``training.freeze: shared`` after ``add_task``), the
default building nothing, parameter counts and config errors (tiny config, CPU)."""

import pytest
import torch
import torch.nn.functional as F

import unit_fast
from tests.models.test_conditioning import _outputs
from tests.models.test_unit import _samples
from unit_fast.models.backbone import build_backbone
from unit_fast.models.medusa import medusa_options, parameter_count
from unit_fast.models.misc import NestedTensor
from unit_fast.training.freeze import freeze

OPTIONS = {
    "channel": {"feature_attention": "channel"},
    "token": {"feature_attention": "token"},
    "backbone": {"multiscale": "backbone"},
    "backbone_layer3": {"multiscale": "backbone"},
    "encoder": {"multiscale": "encoder"},
    "channel_backbone": {"feature_attention": "channel", "multiscale": "backbone"},
    "token_encoder": {"feature_attention": "token", "multiscale": "encoder"},
}
LAYER3 = ["model.base_args.backbone_last_layer=layer3"]


def _med(**options):
    return [f"model.medusa.{k}={v}" for k, v in options.items()]


def _build(overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = unit_fast.load_config("tiny", ["model.implementation=reference", *overrides])
    return unit_fast.build_model(cfg)


def _pair(name, **extra):
    """UniT and the same seed's UniT with the option on (Medusa is built last: the other weights agree)."""
    base = LAYER3 if name.endswith("layer3") else []
    plain, med = _build(base), _build([*base, *_med(**OPTIONS[name], **extra)])
    on = med.state_dict()
    assert all(torch.equal(on[k], v) for k, v in plain.state_dict().items())
    assert {k for k in on if k not in plain.state_dict()} == {k for k in on if k.startswith("medusa.")}
    return plain, med


def _perturb(model, seed=5):
    """Random values in every Medusa parameter: modules that have trained (each dataset's differ)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.medusa.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# 1. UniT at initialisation


@pytest.mark.parametrize("name", list(OPTIONS))
def test_init_is_close_to_unit(name):
    """Default init: the gate is ``sigmoid(6) = 0.9975`` everywhere and the last scale has weight
    ``e^8 / (e^8 + n - 1)`` (>= 0.9993), so every output (predictions, auxiliary outputs, losses) is
    UniT's to within 1% (relative, atol 1e-2: the memory moves by 0.25%; observed <= 3e-3)."""
    plain, med = _pair(name)
    expected, got = _outputs(plain), _outputs(med)
    for ds in expected:
        assert expected[ds].keys() == got[ds].keys()
        for k in expected[ds]:
            torch.testing.assert_close(got[ds][k], expected[ds][k], rtol=1e-2, atol=1e-2, msg=f"{ds} {k}")


@pytest.mark.parametrize("name", ["channel_backbone", "token_encoder", "backbone_layer3"])
def test_saturated_init_is_exactly_unit(name):
    """``gate_bias: 30``, ``scale_logit: 200``: ``sigmoid(30)`` and ``softmax`` round to exactly 1 and
    0 in float32, and the mixes add the last scale first, so every output is UniT's bitwise."""
    plain, med = _pair(name, gate_bias=30, scale_logit=200)
    expected, got = _outputs(plain), _outputs(med)
    for ds in expected:
        different = [k for k in expected[ds] if not torch.equal(expected[ds][k], got[ds][k])]
        assert not different, (ds, different[:5])


# ---------------------------------------------------------------------------------------------
# 2. one dataset's modules per batch


def test_each_batch_uses_its_datasets_modules():
    """With trained (random) modules: the transformer of a detection batch computes exactly what it
    computes with that dataset's context, another dataset's gives other outputs; a text-only task's
    memory is gated too (its gate changes its scores)."""
    model = _build(_med(feature_attention="channel", multiscale="encoder"))
    _perturb(model)
    model.eval()
    samples = _samples()
    calls = []
    model.unit_base_model.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((a, kw, out)), with_kwargs=True)
    with torch.no_grad():
        scores = model(samples["glue_sst2"])["scores"]
        model(samples["detection_coco"])
        args, kwargs, (hs, _) = calls[-1]
        assert kwargs["medusa"].dataset == "detection_coco"
        transformer, ctx = model.unit_base_model.transformer, model.medusa.context
        assert torch.equal(transformer(*args, **{**kwargs, "medusa": ctx("detection_coco")})[0], hs)
        other = transformer(*args, **{**kwargs, "medusa": ctx("detection_visual_genome")})[0]
        assert not torch.allclose(other, hs)
        memory = torch.randn(5, 2, 48)
        assert not torch.allclose(ctx("glue_sst2").gate_memory(memory), ctx("glue_qnli").gate_memory(memory))
        model.medusa.feature_attention["glue_sst2"].load_state_dict(
            model.medusa.feature_attention["glue_qnli"].state_dict())
        assert not torch.allclose(model(samples["glue_sst2"])["scores"], scores)


def test_token_gate_is_one_per_token():
    model = _build(_med(feature_attention="token"))
    _perturb(model)
    gate = model.medusa.feature_attention["vqa2"]
    memory = torch.randn(7, 2, 48)
    g = gate(memory)
    assert g.shape == (7, 2, 1)
    torch.testing.assert_close(model.medusa.context("vqa2").gate_memory(memory), memory * g)


# ---------------------------------------------------------------------------------------------
# 3. backbone stages and the multi-scale mix


@pytest.mark.parametrize("last_layer,channels", [("layer4", [128, 256, 512]), ("layer3", [128, 256])])
def test_backbone_stages_shapes_masks_and_resize(last_layer, channels):
    """``return_stages``: ``layer2`` .. the last, strides 8, 16, 32 with their masks, from the same run
    as the unchanged default return; the mix pools each stage to the last grid (pooling first equals
    projecting first: a 1x1 conv commutes with averaging) and weighs it by its softmax weight."""
    torch.manual_seed(0)
    joiner = build_backbone(backbone="resnet18", hidden_dim=32, norm="batch_norm", last_layer=last_layer)
    joiner.eval()
    assert list(joiner.stage_channels.values()) == channels
    gen = torch.Generator().manual_seed(0)
    images = NestedTensor.from_tensor_list([torch.randn(3, 70, 90, generator=gen),
                                            torch.randn(3, 40, 50, generator=gen)])
    with torch.no_grad():
        features, pos = joiner(images)
        features2, pos2, stages = joiner(images, return_stages=True)
    assert torch.equal(features[-1].tensors, features2[-1].tensors) and torch.equal(pos[-1], pos2[-1])
    assert torch.equal(stages[-1].tensors, features2[-1].tensors) and len(stages) == len(channels)
    for s, (stage, c) in enumerate(zip(stages, channels, strict=True)):
        stride = 8 * 2 ** s
        assert stage.tensors.shape == (2, c, -(-70 // stride), -(-90 // stride))
        want_mask = F.interpolate(images.mask[None].float(), size=stage.tensors.shape[-2:]).bool()[0]
        assert torch.equal(stage.mask, want_mask) and stage.mask.any() and not stage.mask.all()

    model = _build([*(LAYER3 if last_layer == "layer3" else []), *_med(multiscale="backbone")])
    medusa, proj = model.medusa, model.unit_base_model.input_proj
    xs = [s.tensors for s in stages]
    grid = xs[-1].shape[-2:]
    with torch.no_grad():
        medusa.scale_logits["vqa2"].copy_(torch.tensor([200.0] + [0.0] * (len(xs) - 1)))  # all on layer2
        mixed = medusa.context("vqa2").mix_stages(xs, proj)
        assert mixed.shape == (2, 32, *grid)
        torch.testing.assert_close(mixed, medusa.stage_projs["layer2"](F.adaptive_avg_pool2d(xs[0], grid)))
        torch.testing.assert_close(mixed, F.adaptive_avg_pool2d(medusa.stage_projs["layer2"](xs[0]), grid),
                                   rtol=1e-5, atol=1e-5)
        logits = torch.randn(len(xs))
        medusa.scale_logits["vqa2"].copy_(logits)
        w = logits.softmax(0)
        want = w[-1] * proj(xs[-1]) + sum(w[s] * medusa.stage_projs[n](F.adaptive_avg_pool2d(xs[s], grid))
                                          for s, n in enumerate(medusa.stages[:-1]))
        torch.testing.assert_close(medusa.context("vqa2").mix_stages(xs, proj), want)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_returns_every_layer_and_the_mix_weighs_them(pre_norm):
    """``return_all``: every layer's output, each through the final norm (pre-norm), the last equal
    to the default return; the mix is the softmax-weighted sum."""
    model = _build([*_med(multiscale="encoder"), f"model.base_args.pre_norm={str(pre_norm).lower()}"])
    encoder = model.unit_base_model.transformer.encoder
    src, pos = torch.randn(6, 2, 32), torch.randn(6, 2, 32)
    with torch.no_grad():
        outs = encoder(src, pos=pos, return_all=True)
        assert len(outs) == 2 and torch.equal(outs[-1], encoder(src, pos=pos))
        model.medusa.layer_logits["vqa2"].copy_(torch.tensor([0.3, -0.2]))
        w = torch.tensor([0.3, -0.2]).softmax(0)
        mixed = model.medusa.context("vqa2").mix_layers(outs)
        torch.testing.assert_close(mixed, w[0] * outs[0] + w[1] * outs[1])


# ---------------------------------------------------------------------------------------------
# 4. per-dataset parameters and training.freeze: shared


DETECTION = {"num_classes": 3, "num_queries": 4}


@pytest.mark.parametrize("options,kind,head", [
    ({"feature_attention": "channel", "multiscale": "backbone"}, "detection", DETECTION),
    ({"feature_attention": "token", "multiscale": "encoder"}, "detection", DETECTION),
    ({"feature_attention": "channel"}, "text_classification", {"num_labels": 3}),
])
def test_freeze_shared_trains_exactly_the_new_datasets_modules(options, kind, head):
    """Each dataset's gate and logits are registered with it (a text-only dataset has no scale
    logits); after ``add_task`` and ``freeze: [shared]`` exactly the new dataset's parameters train
    (Medusa's, head, queries, task token), a few steps move every new Medusa parameter, and the old
    tasks' outputs stay bitwise as they were."""
    model = _build(_med(**options))
    _perturb(model)
    own = {n for n, _ in model.dataset_parameters()["vqa2"] if n.startswith("medusa.")}
    want = set()
    if "feature_attention" in options:
        want |= {f"medusa.feature_attention.vqa2.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")}
    want |= {"backbone": {"medusa.scale_logits.vqa2"}, "encoder": {"medusa.layer_logits.vqa2"}}.get(
        options.get("multiscale"), set())
    assert own == want
    glue = [n for n, _ in model.dataset_parameters()["glue_sst2"] if n.startswith("medusa.")]
    assert glue and all(".glue_sst2." in n for n in glue)
    assert "medusa.scale_logits.glue_sst2" not in dict(model.named_parameters())  # no image, no scales
    before = _outputs(model, ("glue_sst2", "vqa2", "detection_coco"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    new = unit_fast.add_task(model, "my_task", kind, **head)
    new_medusa = {n for n in new if n.startswith("medusa.")}
    assert new_medusa == {n.replace(".vqa2", ".my_task") for n in want
                          if kind == "detection" or n.startswith("medusa.feature_attention.")}
    freeze(model, ["shared"], ["my_task"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(new)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in new_medusa}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    samples = _samples()
    if kind == "detection":
        targets = [{"labels": t["labels"] % 3, "boxes": t["boxes"]}  # 3 classes
                   for t in samples["detection_coco"]["targets"]]
        sample = {**samples["detection_coco"], "dataset_name": "my_task", "targets": targets}
    else:
        sample = {**samples["glue_sst2"], "dataset_name": "my_task", "targets": torch.tensor([2, 0])}
    model.train()
    for _ in range(3):
        sum(model(sample)["losses"].values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    assert all(not torch.equal(start[n], params[n]) for n in new_medusa)
    for n, p in model.named_parameters():  # the old flags (tests/test_add_task.py says why)
        p.requires_grad_(flags.get(n, True))
    after = _outputs(model, ("glue_sst2", "vqa2", "detection_coco"))
    for ds in before:
        assert all(torch.equal(before[ds][k], after[ds][k]) for k in before[ds]), ds


def test_whole_unit_under_bf16_autocast():
    """The fast path under ``model.autocast_dtype: bfloat16`` (CPU autocast): gate and scale mix,
    forward and backward into the dataset's Medusa parameters, finite."""
    model = _build([*_med(feature_attention="channel", multiscale="backbone"), "model.implementation=fast",
                    "model.autocast_dtype=bfloat16"])
    out = model(_samples()["detection_coco"])
    loss = sum(out["losses"].values())
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("feature_attention.detection_coco.fc2.weight", "scale_logits.detection_coco"):
        grad = model.medusa.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# 5. off by default, counts, config errors


def test_default_builds_no_medusa():
    plain = _build()
    assert plain.medusa is None and not any("medusa" in k for k in plain.state_dict())
    other = _build(_med(attention_hidden=8, gate_bias=1.0, scale_logit=2.0))  # nothing turned on
    assert other.medusa is None and other.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("name", ["channel_backbone", "token_encoder", "backbone_layer3"])
def test_parameter_count(name):
    _, model = _pair(name)
    images = sum(t in ("vl", "detection") for t, h in model.heads.items() for _ in h)
    n = parameter_count(OPTIONS[name], 48, len(model.medusa.feature_attention or model.kinds), images,
                        stage_channels=model.unit_base_model.backbone.stage_channels.values(), d_enc=32,
                        enc_layers=2)
    assert n == sum(p.numel() for p in model.medusa.parameters())


@pytest.mark.parametrize("key,value,message", [
    ("feature_attention", "spatial",
     "^model.medusa.feature_attention must be one of none, channel, token; got 'spatial'$"),
    ("multiscale", "fpn", "model.medusa.multiscale must be one of none, backbone, encoder"),
    ("attention_hidden", 0, "model.medusa.attention_hidden must be an integer >= 1"),
    ("gate_bias", ".inf", "model.medusa.gate_bias must be a finite number"),
    ("scale_logit", "high", "model.medusa.scale_logit must be a finite number"),
])
def test_bad_value_names_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        _build(_med(**{key: value}))
    with pytest.raises(ValueError, match=r"model.medusa: unknown key\(s\) \['heads'\]"):
        medusa_options({"heads": 2})
