"""What a training run reports: log.jsonl, TensorBoard scalars, PNG plots, periodic evaluation,
skipped images per dataset; the progress bar; bf16 autocast in the training step."""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_train import small_config
from unit_fast.testing import devices
from unit_fast.train import Trainer, main
from unit_fast.training.data import synthetic_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache_with_a_bad_image(cfg, tmp_path):
    """A copy of the synthetic dataset of ``cfg`` in which one detection training image is not an
    image (its size is in the annotations, so only the collator's decode meets it)."""
    src = synthetic_root(cfg["data"])
    dst = tmp_path / "bad_cache" / os.path.basename(src)
    shutil.copytree(src, dst)
    ann = json.loads((dst / "coco/annotations/instances_train2017.json").read_text())
    (dst / "coco/train2017" / ann["images"][0]["file_name"]).write_bytes(b"not an image")
    return str(tmp_path / "bad_cache")


def test_run_reports_log_tensorboard_plots_evals_and_skipped_images(train_cache, tmp_path):
    """One CLI run (in-process): 4 updates of 2 tasks each, evaluation every 2 steps, one
    unreadable detection image skipped.  Seed 0 draws detection 5 times out of 8: its stream
    (16 images, batches of 4) finishes epoch 0, which saw the bad image once."""
    path, cfg = small_config(tmp_path, train_cache)
    bad_cache = _cache_with_a_bad_image(cfg, tmp_path)
    out = tmp_path / "run"
    rc = main(["--config", path, "--output-dir", str(out), f"data.cache_dir={bad_cache}",
               "data.on_error=skip", "training.max_updates=4", "training.eval_every=2",
               "training.tasks_per_step=2",
               "training.sampling_mode=ratios", "training.sampling={detection_coco: 0.7, glue_sst2: 0.3}"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = json.loads((out / "final_metrics.json").read_text())

    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(len(r["tasks"]) == 2 and set(r["task_loss"]) == set(r["tasks"]) for r in train)
    assert all(r["samples_per_s"] > 0 and r["lr"] >= 0 and r["loss"] > 0 for r in train)
    drawn = [ds for r in train for ds in r["tasks"]]
    assert drawn.count("detection_coco") == 5, drawn  # the premise of the epoch check below

    # Periodic evaluation at steps 2 and 4; the final metrics are step 4's, not a second evaluation.
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert final["metrics"] == evals[-1]["metrics"]
    assert set(final["metrics"]) == {"detection_coco", "glue_sst2"}

    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(r["dataset"], r["epoch"], r["skipped_images"]) for r in epochs] == [("detection_coco", 0, 1)]
    assert final["skipped_images"] == {"detection_coco": 1, "glue_sst2": 0}
    assert records[-1]["event"] == "final" and records[-1]["skipped_images"] == final["skipped_images"]

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/detection_coco", "loss/glue_sst2", "lr", "samples_per_s",
                "train/detection_coco/loss_giou", "train/glue_sst2/loss_0", "eval/detection_coco/AP50",
                "eval/glue_sst2/accuracy", "skipped_images/detection_coco"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/glue_sst2/accuracy")] == [2, 4]

    for name in ("loss_per_task.png", "metrics.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            im.verify()


@pytest.mark.parametrize("device", devices())
def test_train_step_autocasts_and_the_bar_shows_loss_lr_rate_eta(train_cache, tmp_path, device, capsys):
    """``model.autocast_dtype: bfloat16`` (fast path): the model runs under ``torch.autocast``
    in the trainer's step (on CUDA as on CPU) and the losses stay float32; the progress bar
    shows loss, lr, samples/s and tqdm's ETA."""
    _, cfg = small_config(tmp_path, train_cache, "model.autocast_dtype=bfloat16", f"training.device={device}")
    run = Trainer(cfg, str(tmp_path / "run"))
    seen = []
    run.model.unit_base_model.transformer.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))))
    tasks, stats = run.train_step()
    assert seen == [(True, torch.bfloat16)]
    assert stats["loss"].dtype == torch.float32 and torch.isfinite(stats["loss"])
    run.train(max_updates=2, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert all(f"{key}=" in bar for key in ("loss", "lr", "samples_s")), bar
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", bar), bar  # elapsed<remaining


def test_autocast_needs_the_fast_path(train_cache, tmp_path, capsys):
    path, _ = small_config(tmp_path, train_cache)
    rc = main(["--config", path, "--output-dir", str(tmp_path / "run"), f"data.cache_dir={train_cache}",
               "model.autocast_dtype=bfloat16", "model.implementation=reference"])
    assert rc == 2
    assert "model.autocast_dtype=bfloat16 needs model.implementation=fast" in capsys.readouterr().err
