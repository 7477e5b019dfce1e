"""Every packaged config trains by name: on the synthetic data when it has the config's datasets
(architecture shrunk for the CPU, the config's tasks, heads, sampling and losses kept), and with a
one-line error naming what is missing when it does not."""

import json

import pytest

from tests.test_train import TINY_RUN
from unit_fast.config import config_names, load_config
from unit_fast.tasks import BUILTIN_DATASETS
from unit_fast.train import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The synthetic default has all 8 of UniT's datasets, so every packaged config trains on it.
SYNTHETIC = set(BUILTIN_DATASETS)

# The CPU-sized architecture: what a config says about tasks stays, its sizes shrink.
SHRINK = [
    "model.bert.pretrained=null",
    "model.bert.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,"
    " max_position_embeddings: 64}",
    "model.base_args.backbone=resnet18", "model.base_args.dilation=false", "model.base_args.enc_layers=1",
    "model.base_args.dec_layers=1", "model.base_args.encoder_hidden_dim=32",
    "model.base_args.decoder_hidden_dim=32",
    "model.base_args.nheads=2", "model.base_args.dim_feedforward=64", "model.base_ckpt_path=null",
    "training.max_updates=2", "training.eval_every=0", "training.checkpoint_every=2",
]


def _datasets(name):
    cfg = load_config(name)
    return {ds for qs in cfg["model"]["base_args"]["num_queries"].values() for ds in qs}


def test_every_packaged_config_is_on_the_synthetic_data():
    assert len(SYNTHETIC) == 8
    for name in config_names():
        assert _datasets(name) <= SYNTHETIC, name
    assert {"vg_single_task", "all_8_datasets_shared_dec", "all_8_datasets_separate_dec",
            "all_8_datasets_shared_dec_without_task_embedding", "tiny"} <= set(config_names())


@pytest.mark.parametrize("name", config_names())
def test_packaged_config_trains_by_name(name, train_cache, tmp_path, capsys):
    assert main(["--config", name, "--output-dir", str(tmp_path), f"data.cache_dir={train_cache}",
                 *TINY_RUN, *SHRINK]) == 0
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 2 and set(final["metrics"]) == _datasets(name)
    assert (tmp_path / "checkpoints" / "checkpoint_00000002.pt").exists()
    out = capsys.readouterr().out
    assert all(ds in out for ds in _datasets(name))


@pytest.mark.parametrize("name", config_names())
def test_real_data_config_without_paths_is_one_line_error(name, tmp_path, capsys):
    """``data.root`` set (real data) but no ``data.datasets`` paths: the datasets are named."""
    assert main(["--config", name, "--output-dir", str(tmp_path), "data.root=/data/not/here"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no data configured for") and "Traceback" not in err
    assert all(ds in err for ds in _datasets(name))


def test_real_data_config_missing_file_names_the_key(tmp_path, capsys):
    """One dataset path set to a missing file: the error names the key and the path."""
    from unit_fast.data.text import write_vocab

    missing = str(tmp_path / "nope.json")
    write_vocab(["shape"], tmp_path / "vocab.txt")
    args = ["--config", "coco_single_task", "--output-dir", str(tmp_path), f"data.root={tmp_path}",
            "model.bert.pretrained=null", f"data.tokenizer={tmp_path / 'vocab.txt'}",
            f"data.datasets={{detection_coco: {{train: {{annotations: {missing}, images: {tmp_path}}},"
            f" val: {{annotations: {missing}, images: {tmp_path}}}}}}}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.datasets.detection_coco.train.annotations") and missing in err
