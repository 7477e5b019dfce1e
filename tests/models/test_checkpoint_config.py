"""MMF checkpoints (layout, rename, strict loading, report, round trip), DETR backbone
initialisation, and the config loader (packaged names, overrides, unknown keys)."""

import pytest
import torch

import unit_fast
from unit_fast.config import load_config, parse_override
from unit_fast.models.checkpoint import load_mmf_checkpoint, save_mmf_checkpoint


def _tiny(seed=0, overrides=()):
    torch.manual_seed(seed)
    return unit_fast.build_model(load_config("tiny", list(overrides)))


def test_round_trip_in_mmf_layout_is_lossless(tmp_path):
    a, b = _tiny(0), _tiny(1)
    path = tmp_path / "unit.ckpt"
    save_mmf_checkpoint(a, str(path), optimizer={}, num_updates=3)
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "num_updates"}
    assert "bert_model.embeddings.word_embeddings.weight" in ckpt["model"]  # MMF's alias is saved
    report = load_mmf_checkpoint(str(path), b)
    assert report.ok, str(report)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert not list(tmp_path.glob("*.tmp-*"))  # the atomic write left nothing behind


def test_old_detr_model_prefix_and_benign_buffers(tmp_path):
    a, b = _tiny(0), _tiny(1)
    state = {k.replace("unit_base_model.", "detr_model.", 1): v for k, v in a.state_dict().items()}
    state["bert_model.module.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers
    state = {f"module.{k}": v for k, v in state.items()}  # saved from DDP
    torch.save({"model": state}, tmp_path / "old.pth")
    report = load_mmf_checkpoint(str(tmp_path / "old.pth"), b)
    assert report.ok and report.renamed > 100 and report.dropped == ["bert_model.module.embeddings.position_ids"]
    assert "renamed detr_model.*" in str(report)
    torch.testing.assert_close(b.unit_base_model.input_proj.weight, a.unit_base_model.input_proj.weight)


def test_strict_loading_reports_missing_and_unexpected(tmp_path):
    a, b = _tiny(0), _tiny(1)
    state = a.state_dict()
    state.pop("bert_projection.weight")
    state["not_a_module.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"missing \(1\): bert_projection.weight"):
        load_mmf_checkpoint(str(tmp_path / "bad.pth"), b)
    report = load_mmf_checkpoint(str(tmp_path / "bad.pth"), b, strict=False)
    assert report.missing == ["bert_projection.weight"] and report.unexpected == ["not_a_module.weight"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmf_checkpoint(str(tmp_path / "nope.pth"), b)


def test_shape_mismatch_names_the_key(tmp_path):
    a = _tiny(0)
    b = _tiny(1, ["model.base_args.num_queries.detection.detection_coco=9"])
    save_mmf_checkpoint(a, str(tmp_path / "a.pth"))
    with pytest.raises(RuntimeError, match="query_embeds.detection.detection_coco.weight"):
        load_mmf_checkpoint(str(tmp_path / "a.pth"), b)


def test_detr_checkpoint_initialises_only_the_backbone(tmp_path):
    donor = _tiny(0)
    detr = {f"backbone.0.body.{k}": v for k, v in donor.unit_base_model.backbone[0].body.state_dict().items()}
    detr["transformer.encoder.layers.0.linear1.weight"] = torch.zeros(3)  # DETR's own, not ours: skipped
    detr["class_embed.weight"] = torch.zeros(92, 256)
    torch.save({"model": detr}, tmp_path / "detr.pth")
    model = _tiny(1, [f"model.base_ckpt_path={tmp_path / 'detr.pth'}", "model.base_ckpt_load_backbone_only=true"])
    for k, v in donor.unit_base_model.backbone.state_dict().items():
        assert torch.equal(model.unit_base_model.backbone.state_dict()[k], v), k
    assert not torch.equal(model.unit_base_model.input_proj.weight, donor.unit_base_model.input_proj.weight)


def test_missing_bert_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _tiny(0, ["model.bert.pretrained=/nonexistent/bert"])
    with pytest.raises(FileNotFoundError, match="never downloads"):
        _tiny(0, ["model.bert.pretrained=some-model-not-in-the-cache-xyz"])


def test_config_loader():
    cfg = load_config("all_8_datasets_separate_dec", ["model.base_args.dec_layers=2", "training.lr=1e-4"])
    assert cfg["model"]["base_args"]["share_decoders"] is False  # from the file, over its base
    assert cfg["model"]["base_args"]["dilation"] is True  # inherited from the base file
    assert cfg["model"]["base_args"]["dec_layers"] == 2 and cfg["training"]["lr"] == 1e-4
    assert cfg["training"]["sampling"]["vqa2"] == 0.26
    assert load_config("coco_single_task")["model"]["base_args"]["decoder_hidden_dim"] == 768
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="unknown config key 'model.base_args.nope'"):
        load_config("tiny", ["model.base_args.nope=1"])
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        load_config("tiny", ["model.base_args.dec_layers"])
    with pytest.raises(ValueError, match="unknown config 'nonexistent'"):
        load_config("nonexistent")
    with pytest.raises(FileNotFoundError):
        load_config("/no/such/config.yaml")


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\nmodel:\n  base_args:\n    enc_layerz: 3\n")
    with pytest.raises(ValueError, match="enc_layerz"):
        load_config(str(path))
    path.write_text("base: tiny\nmodel:\n  base_args:\n    enc_layers: 1\n")
    assert load_config(str(path))["model"]["base_args"]["enc_layers"] == 1


def test_open_maps_stay_open_after_a_config_fills_them():
    """``model.bert.config`` defaults to ``{}`` (any BertConfig field): the default config fills
    it, and an override may still add a field; closed sections still reject unknown keys."""
    cfg = load_config("default", ["model.bert.config.hidden_act=gelu", "training.sampling.glue_qnli=0.5"])
    assert cfg["model"]["bert"]["config"]["hidden_act"] == "gelu"
    assert cfg["model"]["bert"]["config"]["hidden_size"] == 96  # the config's own fields kept
    assert cfg["training"]["sampling"]["glue_qnli"] == 0.5
    for bad in ("model.bert.hidden_act=gelu", "model.base_args.nope=1"):
        with pytest.raises(ValueError, match="unknown config key"):
            load_config("default", [bad])
