"""End to end: the synthetic generator's files, read by the real readers, turned into batches by
the datasets and the collator, accepted by UniT (every task type), plus bad-image handling."""

import pytest
import torch

import unit_fast
from unit_fast.data import decode
from unit_fast.data.datasets import (
    BatchCollator,
    DetectionDataset,
    EntailmentDataset,
    ImageSizes,
    TextDataset,
    VQADataset,
)
from unit_fast.data.readers.coco import read_coco_detection
from unit_fast.data.readers.glue import read_glue
from unit_fast.data.readers.snli_ve import read_snli_ve
from unit_fast.data.readers.vqa2 import read_vqa2
from unit_fast.data.synthetic import generate
from unit_fast.data.text import load_tokenizer

SIZES = ImageSizes(train_scales=(96, 112, 128), max_size=200, test_size=128, crop_scales=(96, 112),
                   crop_size=(64, 96))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    info = generate(root, seed=0, num_train=12, num_val=4, image_size=128)
    return root, info


def _datasets(root):
    tok = load_tokenizer(str(root / "vocab.txt"))
    det = read_coco_detection(root / "coco/annotations/instances_train2017.json", root / "coco/train2017")
    vqa, vocab = read_vqa2(root / "vqa2/v2_OpenEnded_mscoco_train2014_questions.json",
                           root / "vqa2/v2_mscoco_train2014_annotations.json", root / "coco/train2017",
                           dense_scores=False)
    ve = read_snli_ve(root / "snli_ve/snli_ve_train.jsonl", root / "snli_ve/images")
    sst2 = read_glue("SST-2", root / "glue/SST-2/train.tsv")
    qnli = read_glue("QNLI", root / "glue/QNLI/train.tsv")
    return tok, vocab, {
        "detection_coco": DetectionDataset(det, "detection_coco", train=True, sizes=SIZES),
        "vqa2": VQADataset(vqa, "vqa2", tok, max_length=20, answer_vocab=vocab, sizes=SIZES),
        "visual_entailment": EntailmentDataset(ve, "visual_entailment", tok, max_length=20, sizes=SIZES),
        "glue_sst2": TextDataset(sst2, "glue_sst2", tok, max_length=24),
        "glue_qnli": TextDataset(qnli, "glue_qnli", tok, max_length=24),
    }


def _model_for(tok, vocab):
    cfg = unit_fast.load_config("tiny", [
        "model.heads.detection.detection_coco.num_classes=7",
        f"model.heads.vl.vqa2.num_labels={len(vocab)}",
        f"model.bert.config.vocab_size={len(tok)}",
    ])
    torch.manual_seed(0)
    return unit_fast.build_model(cfg)


@pytest.mark.parametrize("decoder", decode.available_decoders("cpu"))
def test_generator_readers_datasets_and_model(synthetic, decoder):
    root, _ = synthetic
    tok, vocab, datasets = _datasets(root)
    model = _model_for(tok, vocab)
    for name, ds in datasets.items():
        assert len(ds) > 0, name
        batch = BatchCollator(name, decoder=decoder)([ds[i] for i in range(3)])
        assert batch["dataset_name"] == name and batch["skipped"] == 0
        if name in ("detection_coco", "vqa2", "visual_entailment"):
            images = batch["image"]
            assert images.tensors.shape[:2] == (3, 3) and images.mask.shape[0] == 3
            assert min(images.tensors.shape[-2:]) >= 64
        if name == "detection_coco":
            for t in batch["targets"]:
                assert t["boxes"].dtype == torch.float32 and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
                assert set(t["labels"].tolist()) <= {1, 3, 6}  # the raw, non-contiguous category ids
        else:
            assert batch["input_ids"].shape[0] == 3
        out = model(batch)
        assert out["losses"] and all(torch.isfinite(v) for v in out["losses"].values()), name


def test_train_plans_are_reproducible_per_epoch(synthetic):
    root, _ = synthetic
    _, _, datasets = _datasets(root)
    ds = datasets["detection_coco"]
    a = [ds[i]["plan"] for i in range(6)]
    assert a == [ds[i]["plan"] for i in range(6)]
    ds.set_epoch(1)
    assert a != [ds[i]["plan"] for i in range(6)]


def test_bad_image_raises_naming_the_file_or_is_skipped_and_counted(synthetic, tmp_path):
    root, _ = synthetic
    _, _, datasets = _datasets(root)
    ds = datasets["detection_coco"]
    items = [ds[i] for i in range(3)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(open(items[1]["image_path"], "rb").read()[:200])  # truncated JPEG
    items[1] = dict(items[1], image_path=str(bad))
    with pytest.raises(ValueError, match="broken.jpg"):
        BatchCollator("detection_coco")(items)
    batch = BatchCollator("detection_coco", on_error="skip")(items)
    assert batch["skipped"] == 1 and batch["image"].tensors.shape[0] == 2 and len(batch["targets"]) == 2
    items[1] = dict(items[1], image_path=str(tmp_path / "missing.jpg"))
    with pytest.raises((ValueError, FileNotFoundError), match="missing.jpg"):
        BatchCollator("detection_coco")(items)


@pytest.mark.parametrize("name", ["vqa2", "visual_entailment"])
def test_unreadable_header_is_raised_or_skipped_by_the_collator(synthetic, tmp_path, name, caplog):
    """VQAv2 / SNLI-VE items read the image header for their plan: a missing or broken file does
    not raise in ``__getitem__`` but travels to the collator, which raises it (naming the file) or
    skips, counts and logs it; a batch with no readable image is a clear ValueError."""
    import dataclasses

    root, _ = synthetic
    _, _, datasets = _datasets(root)
    ds = datasets[name]
    missing = str(tmp_path / "missing.jpg")
    ds.records[1] = dataclasses.replace(ds.records[1], image_path=missing)
    items = [ds[i] for i in range(3)]
    assert items[1]["plan"] is None and "image_error" in items[1]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        BatchCollator(name)(items)
    with caplog.at_level("WARNING", logger="unit_fast.data.datasets"):
        batch = BatchCollator(name, on_error="skip")(items)
    assert batch["skipped"] == 1 and batch["image"].tensors.shape[0] == 2 and len(batch["targets"]) == 2
    assert "missing.jpg" in caplog.text
    with pytest.raises(ValueError, match="every image of this batch is unreadable.*missing.jpg"):
        BatchCollator(name, on_error="skip")([items[1]])


def _file_sizes(ds):
    from PIL import Image

    sizes = []
    for r in ds.records:
        with Image.open(r.image_path) as im:
            sizes.append(im.size)  # (width, height)
    return sizes


def test_detection_aspect_ratios_are_width_over_height_of_the_files(synthetic):
    root, _ = synthetic
    ds = _datasets(root)[2]["detection_coco"]
    sizes = _file_sizes(ds)
    assert {w < h for w, h in sizes} == {True, False}  # portrait and square / landscape images
    assert ds.aspect_ratios() == pytest.approx([w / h for w, h in sizes])


def test_training_stream_batches_portrait_images_apart(synthetic):
    """The trainer's stream with the default bins [1.0] over the detection images: a batch is all
    portrait or all square / landscape, judged by the files' own sizes (height / width ratios
    put portrait with square)."""
    from unit_fast.training.streams import BatchStream

    root, _ = synthetic
    ds = _datasets(root)[2]["detection_coco"]
    portrait = [w < h for w, h in _file_sizes(ds)]
    stream = BatchStream(ds, "detection_coco", 2, aspect_ratio_bins=[1.0])
    batches = [stream.next_indices() for _ in range(20)]
    assert all(len({portrait[i] for i in b}) == 1 for b in batches)
    assert {portrait[b[0]] for b in batches} == {True, False}


def test_items_carry_their_index_and_batches_the_indices_in_batch_order(synthetic):
    from unit_fast.training.batches import to_device

    root, _ = synthetic
    for name, ds in _datasets(root)[2].items():
        assert [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3], name
        batch = BatchCollator(name, decoder="pil")([ds[i] for i in (3, 0, 2)])
        assert batch["indices"] == [3, 0, 2] and all(type(i) is int for i in batch["indices"]), name
        assert to_device(batch, torch.device("cpu"))["indices"] == [3, 0, 2]  # a list of ints passes through


@pytest.mark.parametrize("name", ["detection_coco", "vqa2"])
def test_val_batch_skipping_an_unreadable_image_keeps_indices_aligned(synthetic, tmp_path, name):
    """Under ``on_error="skip"`` a val batch loses the unreadable item (detection: a truncated JPEG
    failing to decode; VQA: a missing file failing its header read) and ``indices`` names the
    items whose rows remain: row ``k`` of the image, the tokens and the targets is item
    ``indices[k]``, what the evaluator must match records by."""
    import dataclasses

    root, _ = synthetic
    ds = _datasets(root)[2][name]
    if name == "detection_coco":
        ds = DetectionDataset(ds.records, name, train=False, sizes=SIZES)
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(open(ds.records[1].image_path, "rb").read()[:200])
    else:
        bad = tmp_path / "missing.jpg"
    ds.records[1] = dataclasses.replace(ds.records[1], image_path=str(bad))
    collate = BatchCollator(name, decoder="pil", dataset_type="val", on_error="skip")
    batch = collate([ds[i] for i in range(4)])
    assert batch["skipped"] == 1 and batch["indices"] == [0, 2, 3]
    for row, i in enumerate(batch["indices"]):
        alone = BatchCollator(name, decoder="pil", dataset_type="val")([ds[i]])
        image = alone["image"].tensors[0]  # (3, h, w)
        h, w = image.shape[-2:]
        assert torch.equal(batch["image"].tensors[row, :, :h, :w], image)
        assert not batch["image"].mask[row, :h, :w].any()
        if name == "detection_coco":
            assert int(batch["targets"][row]["image_id"]) == ds.records[i].image_id
            assert torch.equal(batch["targets"][row]["boxes"], alone["targets"][0]["boxes"])
        else:
            assert torch.equal(batch["input_ids"][row], alone["input_ids"][0])
            assert torch.equal(batch["targets"][row], alone["targets"][0])
