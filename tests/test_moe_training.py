"""``model.moe`` in the trainer: the auxiliary losses train with the task loss, and each train
record carries every dataset's expert usage, which TensorBoard and ``plots/expert_usage.png`` get."""

import os

import pytest

from tests.test_train import small_config
from unit_fast.train import Trainer
from unit_fast.training.report import plot_log, read_log, tensorboard_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MOE = ("model.moe.layers=[0, 1]", "model.moe.num_experts=4", "model.moe.k=2", "model.moe.expert_ff=16",
       "training.tasks_per_step=2", "training.sampling_mode=round_robin", "training.max_updates=3")


def test_expert_usage_is_logged_per_dataset_and_plotted(train_cache, tmp_path):
    _, cfg = small_config(tmp_path, train_cache, *MOE)
    run = Trainer(cfg, str(tmp_path / "run"))
    run.train(progress=False)
    records = [r for r in read_log(str(tmp_path / "run" / "log.jsonl")) if r["event"] == "train"]
    assert len(records) == 3
    for r in records:
        assert any(k.endswith("/loss_moe_importance") for k in r["losses"]), r["losses"]
        assert set(r["expert_usage"]) == {"detection_coco", "glue_sst2"}
        for layers in r["expert_usage"].values():
            assert len(layers) == 2  # the shared decoder's two MoE layers
            for shares in layers.values():
                assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    tags = [tag for tag, _ in tensorboard_scalars(records[0])]
    assert sum(t.startswith("experts/glue_sst2/") for t in tags) == 8  # 2 layers x 4 experts
    plot_log(str(tmp_path / "run" / "log.jsonl"), str(tmp_path / "plots"))
    assert os.path.getsize(tmp_path / "plots" / "expert_usage.png") > 1000


def test_a_dense_run_logs_no_expert_usage(train_cache, tmp_path):
    _, cfg = small_config(tmp_path, train_cache, "training.max_updates=1")
    Trainer(cfg, str(tmp_path / "run")).train(progress=False)
    (record,) = [r for r in read_log(str(tmp_path / "run" / "log.jsonl")) if r["event"] == "train"]
    assert "expert_usage" not in record
    plot_log(str(tmp_path / "run" / "log.jsonl"), str(tmp_path / "plots"))
    assert not (tmp_path / "plots" / "expert_usage.png").exists()
