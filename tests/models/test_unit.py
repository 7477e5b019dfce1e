"""UniT: MMF's parameter layout, outputs and loss keys per task type, padded batches, and the
reference and fast paths agreeing on every output, loss and gradient (tiny config, CPU)."""

import copy

import pytest
import torch

import unit_fast
from unit_fast.config import config_names
from unit_fast.models.misc import NestedTensor

TINY = "tiny"


def _model(name=TINY, overrides=(), seed=0):
    torch.manual_seed(seed)
    # The reference implementation unless asked: these tests compare the fast path against it.
    return unit_fast.build_model(unit_fast.load_config(name, ["model.implementation=reference", *overrides]))


def _images(sizes=((64, 80), (48, 64))):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def _targets(with_attributes=False):
    targets = [
        {"labels": torch.tensor([1, 2, 4]), "boxes": torch.tensor([[.5, .5, .2, .2], [.3, .3, .1, .2], [.7, .6, .3, .4]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[.4, .5, .3, .2]])},
    ]
    if with_attributes:
        for t in targets:
            attrs = torch.full((len(t["labels"]), 16), -1)
            attrs[:, 0] = 2
            attrs[0, 1] = 5
            t["attributes"] = attrs
    return targets


def _text(B=2, L=7, vocab=100):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "input_mask": mask, "segment_ids": torch.zeros_like(ids)}


def _samples():
    """One batch per task type of the tiny config, each with targets."""
    return {
        "detection_coco": {"dataset_name": "detection_coco", "image": _images(), "targets": _targets()},
        "detection_visual_genome": {"dataset_name": "detection_visual_genome", "image": _images(),
                                    "targets": _targets(with_attributes=True)},
        "vqa2": {"dataset_name": "vqa2", "image": _images(), **_text(),
                 "targets": torch.rand(2, 11, generator=torch.Generator().manual_seed(3))},
        "visual_entailment": {"dataset_name": "visual_entailment", "image": _images(), **_text(),
                              "targets": torch.tensor([0, 2])},
        "glue_sst2": {"dataset_name": "glue_sst2", **_text(), "targets": torch.tensor([1, 0])},
    }


# ---------------------------------------------------------------------------------------------
# MMF's layout


def _meta_model(name, overrides=()):
    with torch.device("meta"):
        return unit_fast.build_model(unit_fast.load_config(name, ["model.bert.pretrained=null", *overrides]))


def test_all_8_datasets_shared_dec_parameter_count_and_keys():
    """~201.5M parameters with BERT-base (reference doc section 1.9, derived from MMF's code),
    and MMF's state-dict naming, duplicate aliases included."""
    model = _meta_model("all_8_datasets_shared_dec")
    n = sum(p.numel() for p in model.parameters())  # shared tensors counted once
    assert abs(n - 201.5e6) / 201.5e6 < 0.002, n
    keys = set(model.state_dict())
    expected = [
        "unit_base_model.backbone.0.body.conv1.weight",
        "unit_base_model.backbone.0.body.layer4.2.bn3.running_mean",
        "unit_base_model.input_proj.weight",
        "unit_base_model.query_embeds.detection.detection_coco.weight",
        "unit_base_model.query_embeds.glue.glue_qnli.weight",
        "unit_base_model.transformer.encoder.layers.5.self_attn.in_proj_weight",
        "unit_base_model.transformer.encoder.layers.0.norm2.bias",
        "unit_base_model.transformer.enc2dec_proj.weight",
        "unit_base_model.transformer.pos_embed_proj.bias",
        "unit_base_model.transformer.task_embeddings_enc.weight",
        "unit_base_model.transformer.decoder.layers.5.multihead_attn.out_proj.weight",
        "unit_base_model.transformer.decoder.norm.weight",
        "unit_base_model.transformer.decoders.detection.detection_coco.layers.0.self_attn.in_proj_bias",
        "unit_base_model.transformer.decoders.glue.glue_sst2.norm.bias",
        "bert_model.module.embeddings.word_embeddings.weight",
        "bert_model.module.encoder.layer.11.attention.self.query.weight",
        "bert_model.module.pooler.dense.weight",
        "bert_model.embeddings.word_embeddings.weight",  # MMF's alias
        "bert_projection.weight", "bert_pos_projection.bias", "task_embeddings_lang.weight",
        "classifiers.vl.vqa2.0.dense.weight", "classifiers.vl.visual_entailment.0.LayerNorm.bias",
        "classifiers.glue.glue_mnli_mismatched.1.weight",
        "class_embeds.detection_visual_genome.weight", "bbox_embeds.detection_coco.layers.2.bias",
        "det_losses.detection_coco.empty_weight",
        "det_losses.detection_visual_genome.attribute_head.cls_embed.weight",
        "det_losses.detection_visual_genome.attribute_head.attr_linear2.weight",
    ]
    assert not [k for k in expected if k not in keys]
    assert {k.split(".")[0] for k in keys} == {
        "unit_base_model", "bert_model", "bert_projection", "bert_pos_projection", "task_embeddings_lang",
        "classifiers", "class_embeds", "bbox_embeds", "det_losses"}
    # The shared decoder appears under transformer.decoder and under every dataset's key.
    n_dec = sum(1 for k in keys if k.startswith("unit_base_model.transformer.decoder."))
    for task, ds in (("detection", "detection_coco"), ("vl", "vqa2"), ("glue", "glue_qqp")):
        prefix = f"unit_base_model.transformer.decoders.{task}.{ds}."
        assert sum(1 for k in keys if k.startswith(prefix)) == n_dec
    # FrozenBatchNorm statistics are buffers, not parameters.
    params = {n for n, _ in model.named_parameters()}
    assert "unit_base_model.backbone.0.body.bn1.running_var" not in params


def test_all_8_datasets_separate_dec_parameter_count():
    model = _meta_model("all_8_datasets_separate_dec")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 532.4e6) / 532.4e6 < 0.002, n
    assert "unit_base_model.transformer.decoder.norm.weight" not in model.state_dict()


@pytest.mark.parametrize("name", config_names())
def test_every_packaged_config_builds(name):
    model = _meta_model(name)
    assert model.unit_base_model.num_queries


# ---------------------------------------------------------------------------------------------
# Outputs and losses


@pytest.mark.parametrize("dataset", list(_samples()))
def test_outputs_and_loss_keys(dataset):
    model = _model()
    sample = _samples()[dataset]
    out = model(sample)
    if dataset.startswith("detection"):
        n_cls = {"detection_coco": 7, "detection_visual_genome": 6}[dataset]
        Q = {"detection_coco": 6, "detection_visual_genome": 5}[dataset]
        assert out["pred_logits"].shape == (2, Q, n_cls + 1)
        assert out["pred_boxes"].shape == (2, Q, 4) and ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
        assert out["hidden_states"].shape == (2, 2, Q, 48)  # (dec_layers, B, Q, d_dec)
        assert len(out["aux_outputs"]) == 1
        names = ["loss_ce", "loss_bbox", "loss_giou"] + (["loss_attr"] if dataset == "detection_visual_genome" else [])
        want = {f"train/{dataset}/{n}{s}" for n in names for s in ("", "_0")}
        assert set(out["losses"]) == want  # cardinality_error has no weight: dropped, as in MMF
    else:
        n_labels = {"vqa2": 11, "visual_entailment": 3, "glue_sst2": 2}[dataset]
        assert out["scores"].shape == (2, n_labels)
        assert set(out["losses"]) == {f"train/{dataset}/loss_0"}
    for v in out["losses"].values():
        assert v.dim() == 0 and torch.isfinite(v)


def test_vqa_loss_is_mean_bce_times_num_answers():
    model = _model()
    sample = _samples()["vqa2"]
    out = model(sample)
    want = torch.nn.functional.binary_cross_entropy_with_logits(out["scores"], sample["targets"]) * 11
    torch.testing.assert_close(out["losses"]["train/vqa2/loss_0"], want)


def test_test_split_has_no_aux_outputs_or_losses_and_predicts_attributes():
    model = _model(overrides=["model.predict_attributes=true"])
    sample = dict(_samples()["detection_visual_genome"], dataset_type="test")
    out = model(sample)
    assert "aux_outputs" not in out and "losses" not in out
    assert out["attr_logits"].shape == (2, 5, 12)  # tiny: attribute_class_num 12


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'glue_qqp'"):
        _model()({"dataset_name": "glue_qqp", **_text()})


# ---------------------------------------------------------------------------------------------
# Padded batches


def test_padded_image_batch_gives_each_image_its_own_output():
    """Masks used everywhere after the backbone: per-image outputs of a padded batch equal the
    image run alone.  The backbone's features are computed per image and padded with large
    garbage, which only masking can hide (conv features at padded borders legitimately differ
    in a padded batch, in DETR as here, so the backbone itself is not part of this check)."""
    model = _model().eval()
    base = model.unit_base_model
    images = _images(((64, 96), (32, 64)))
    feats = [base.backbone[0](NestedTensor.from_tensor_list([im]))["0"].tensors[0] for im in images]
    H = max(f.shape[1] for f in feats)
    W = max(f.shape[2] for f in feats)
    padded = torch.full((2, feats[0].shape[0], H, W), 1e3)
    mask = torch.ones(2, H, W, dtype=torch.bool)
    for i, f in enumerate(feats):
        padded[i, :, : f.shape[1], : f.shape[2]] = f
        mask[i, : f.shape[1], : f.shape[2]] = False

    def run(features, m, task="detection", ds="detection_coco", text=None):
        nt = NestedTensor(features, m)
        pos = base.backbone[1](nt).to(features.dtype)
        kw = {} if text is None else text
        hs, _ = base.transformer(base.input_proj(features), m, pos, query_embed=base.query_embeds[task][ds].weight,
                                 task_type=task, dataset_name=ds, task_idx=0, **kw)
        return hs

    with torch.no_grad():
        batched = run(padded, mask)
        for i, f in enumerate(feats):
            alone = run(f[None], torch.zeros(1, *f.shape[1:], dtype=torch.bool))
            torch.testing.assert_close(batched[:, i], alone[:, 0], atol=1e-5, rtol=1e-4)


def test_same_images_batched_or_alone_through_the_whole_model():
    model = _model().eval()
    im = _images(((64, 80),))[0]
    with torch.no_grad():
        alone = model({"dataset_name": "detection_coco", "image": [im], "dataset_type": "test"})
        both = model({"dataset_name": "detection_coco", "image": [im, im.flip(-1)], "dataset_type": "test"})
    torch.testing.assert_close(both["pred_logits"][:1], alone["pred_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both["pred_boxes"][:1], alone["pred_boxes"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reference and fast paths


def _run_with_grads(model, sample):
    model.zero_grad(set_to_none=True)
    out = model(sample)
    total = sum(out["losses"].values())
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("dataset", list(_samples()))
def test_reference_and_fast_paths_agree(dataset):
    """Same parameters, both paths: outputs, every loss and the gradient of every parameter agree
    (fp32, house tolerance for reductions: rtol 1e-4 / atol 1e-5 after a deep network).  The fast
    path runs the Triton attention and box-loss kernels through the interpreter."""
    ref = _model().train()
    fast = copy.deepcopy(ref).set_implementation("fast", kernel_backend="triton")
    assert type(fast.unit_base_model.transformer.encoder.layers[0].self_attn) is unit_fast.MultiheadAttention
    sample = _samples()[dataset]
    r_out, r_grads = _run_with_grads(ref, sample)
    f_out, f_grads = _run_with_grads(fast, sample)
    assert r_out["losses"].keys() == f_out["losses"].keys()
    for k in r_out["losses"]:
        torch.testing.assert_close(f_out["losses"][k], r_out["losses"][k], atol=1e-5, rtol=1e-4, msg=k)
    key = "pred_logits" if dataset.startswith("detection") else "scores"
    torch.testing.assert_close(f_out[key], r_out[key], atol=1e-5, rtol=1e-4)
    assert r_grads.keys() == f_grads.keys() and len(r_grads) > 10
    for n in r_grads:
        torch.testing.assert_close(f_grads[n], r_grads[n], atol=1e-5, rtol=2e-3, msg=n)


def test_set_implementation_round_trip_keeps_parameters():
    model = _model()
    params = dict(model.named_parameters())
    model.set_implementation("fast")
    model.set_implementation("reference")
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(model.unit_base_model.transformer.encoder.layers[0].self_attn) is torch.nn.MultiheadAttention
    with pytest.raises(ValueError, match="implementation must be one of"):
        model.set_implementation("turbo")


def test_fast_path_under_bf16_autocast():
    """``model.autocast_dtype=bfloat16``: the fast path runs in bf16 (CPU autocast here), its
    losses stay finite and close to the fp32 reference's (bf16 has 8 bits: 5% relative)."""
    ref = _model(overrides=["model.autocast_dtype=bfloat16"])
    fast = copy.deepcopy(ref).set_implementation("fast")
    for name in ("detection_coco", "vqa2"):
        sample = _samples()[name]
        r = ref(sample)["losses"]  # the reference path ignores autocast_dtype
        out = fast(sample)
        assert out["pred_logits" if name.startswith("detection") else "scores"].dtype == torch.bfloat16
        f = out["losses"]
        for k in r:
            assert torch.isfinite(f[k]) and f[k].dtype == torch.float32
            torch.testing.assert_close(f[k], r[k], rtol=5e-2, atol=5e-2, msg=k)


def test_bert_path_equals_hf_bert_and_padding_does_not_leak():
    """Without the language task token, MMF's embeddings-then-encoder path with its additive
    mask gives HF ``BertModel``'s own output on every real token, and a padded token's id never
    changes the others."""
    model = _model(overrides=["model.use_task_embedding_in_lang_encoder=false"]).eval()
    text = _text()
    with torch.no_grad():
        ours, pos = model.forward_bert_with_task_idx(text, 0)
        hf = model.bert_model.module(input_ids=text["input_ids"], attention_mask=text["input_mask"],
                                     token_type_ids=text["segment_ids"]).last_hidden_state
        changed = dict(text, input_ids=text["input_ids"].clone())
        changed["input_ids"][1, 6] = 3  # a padding position of sequence 1
        ours2, _ = model.forward_bert_with_task_idx(changed, 0)
    real = text["input_mask"].bool()
    torch.testing.assert_close(ours[real], hf[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours2[real], ours[real])
    assert pos.shape == (7, 32)


class _NoLookups(dict):
    """A config that fails every lookup: forward must not read the model's config."""

    def __getitem__(self, key):
        raise AssertionError(f"forward read model.cfg[{key!r}]")

    get = __getitem__


def test_forward_reads_no_config():
    model = _model()
    want = {ds: model(s) for ds, s in _samples().items()}
    model.cfg = _NoLookups()
    for ds, sample in _samples().items():
        got = model(sample)
        assert torch.equal(sum(got["losses"].values()), sum(want[ds]["losses"].values())), ds


@pytest.mark.parametrize("share", [True, False])
def test_every_parameter_is_shared_or_registered_to_one_dataset(share):
    model = _model(overrides=[f"model.base_args.share_decoders={str(share).lower()}"])
    per_ds = model.dataset_parameters()
    assert set(per_ds) == {ds for qs in model.unit_base_model.num_queries.values() for ds in qs}
    whole = {}
    for ds, entries in per_ds.items():
        for name, row in entries:
            if row is None:
                assert name not in whole, f"{name} registered to {whole.get(name)} and {ds}"
                whole[name] = ds
    names = {n for n, _ in model.named_parameters()}
    # Heads, queries and (separate) decoders are per dataset; the task tokens are rows of MMF's tables.
    for ds in per_ds:
        assert any(n.startswith("unit_base_model.query_embeds.") and n.endswith(f".{ds}.weight") for n in whole)
        assert any(ds in n and ("class_embeds" in n or "classifiers" in n) for n in whole if whole[n] == ds)
    rows = {(n, r) for e in per_ds.values() for n, r in e if r is not None}
    assert ("task_embeddings_lang.weight", model.heads["glue"]["glue_sst2"]["task_idx"]) in rows
    assert {n for n, _ in rows} <= {"task_embeddings_lang.weight",
                                    "unit_base_model.transformer.task_embeddings_enc.weight"}
    decoder = {n for n in whole if ".decoders." in n}
    assert bool(decoder) == (not share)  # a shared decoder belongs to no dataset
    assert not any(n.startswith(("unit_base_model.backbone.", "bert_model.", "unit_base_model.transformer.encoder."))
                   for n in whole)
    assert set(whole) <= names


def test_own_task_token_replaces_the_table_row():
    model = _model()
    sample = _samples()["glue_sst2"]
    model.eval()
    with torch.no_grad():
        before = model(sample)["scores"]
        model.heads["glue"]["glue_sst2"]["task_idx"] = 11  # another table row: other scores
        other = model(sample)["scores"]
    assert not torch.equal(before, other)
    new = model.add_dataset("reviews", {"kind": "text_classification", "num_labels": 2, "task_token": "own"},
                            num_queries=3)
    assert "task_tokens_lang.reviews.weight" in new and "classifiers.glue.reviews.1.weight" in new
    assert not any(n.startswith("task_embeddings_lang") for n in new)
    with torch.no_grad():
        model.task_tokens_lang["reviews"].weight.copy_(model.task_embeddings_lang.weight[11])
        model.classifiers["glue"]["reviews"].load_state_dict(model.classifiers["glue"]["glue_sst2"].state_dict())
        model.unit_base_model.query_embeds["glue"]["reviews"].weight.copy_(
            model.unit_base_model.query_embeds["glue"]["glue_sst2"].weight)
        got = model({**sample, "dataset_name": "reviews"})["scores"]
    assert torch.equal(got, other)  # the own token is used exactly where the row was
    assert {n for n, _ in model.dataset_parameters()["reviews"]} == set(new)
