"""2-process DDP on CPU (gloo, ``torchrun``) equals 1 process with the same global batch.

Run as ``torchrun -m tests.test_train_ddp ARGS`` this module is one rank of
``python -m unit_fast.train ARGS`` that also writes the micro-batches it trained on to
``$UNIT_FAST_TEST_CONSUMED/rank<RANK>.json``: equal weights alone would not show that each rank
took only its share (DETR's ``num_boxes / world`` makes N ranks that each train on the whole
global batch end where one process ends)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from tests.test_train import SMALL_CONFIG, child_env, params
from unit_fast.config import load_config
from unit_fast.train import Trainer
from unit_fast.training import checkpoint as ckpt
from unit_fast.training import loader
from unit_fast.training.data import synthetic_paths, synthetic_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recording(consumed):
    """A ``_Collate.__call__`` that also appends ``[dataset, epoch, indices]`` of every micro-batch
    it collates to ``consumed``: the items the process trained on, in order."""
    collate = loader._Collate.__call__

    def record(self, keyed):
        out = collate(self, keyed)
        consumed.append(list(out[0]))
        return out

    return record


def _square_detection(src, dst):
    """COCO detection files ``src`` (``annotations``, ``images``) copied to ``dst`` with every image
    padded (bottom and right, so the pixel boxes stay) to one square size."""
    with open(src["annotations"]) as f:
        ann = json.load(f)
    side = max(max(im["width"], im["height"]) for im in ann["images"])
    os.makedirs(os.path.join(dst, "images"))
    for im in ann["images"]:
        with Image.open(os.path.join(src["images"], im["file_name"])) as img:
            canvas = Image.new("RGB", (side, side))
            canvas.paste(img.convert("RGB"), (0, 0))
        canvas.save(os.path.join(dst, "images", im["file_name"]))
        im["width"] = im["height"] = side
    with open(os.path.join(dst, "annotations.json"), "w") as f:
        json.dump(ann, f)
    return {"annotations": os.path.join(dst, "annotations.json"), "images": os.path.join(dst, "images")}


@pytest.fixture(scope="module")
def square_config(train_cache, tmp_path_factory):
    """``SMALL_CONFIG`` on images of one size.  DETR pads a batch to its largest image and the
    padding changes the backbone's features near the borders, so a batch split over ranks only
    equals the whole batch when no image is padded.  Also ``eos_coef: 1``: the class loss is a
    weighted mean over the local batch, which averages over ranks to the global mean only when
    every weight is the same (the box losses are normalised by the all-reduced box count)."""
    cfg = yaml.safe_load(SMALL_CONFIG)
    synthetic = synthetic_root({"cache_dir": train_cache, "synthetic": cfg["data"]["synthetic"]})
    paths = synthetic_paths(synthetic)
    root = tmp_path_factory.mktemp("square")
    square = {split: _square_detection(paths["detection_coco"][split], root / split)
              for split in ("train", "val")}
    cfg["model"]["base_args"]["eos_coef"] = 1.0
    cfg["data"].update(root=str(root), tokenizer=os.path.join(synthetic, "vocab.txt"),
                       datasets={"detection_coco": square, "glue_sst2": paths["glue_sst2"]})
    # One image size after the train transform too: the crop branch crops the whole 64 px square.
    cfg["data"]["image_sizes"].update(train_scales=[64], crop_scales=[64], crop_size=[64, 64], max_size=64,
                                      test_size=64)
    path = root / "square.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def torchrun_train(config, out, overrides, timeout=300):
    """``torchrun --nproc_per_node=2 -m unit_fast.train --config config --output-dir out overrides``
    against 2 gloo ranks on this CPU; asserts it exits 0 (the stderr tail otherwise)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "unit_fast.train", "--config", config, "--output-dir", str(out), *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_process_ddp_equals_one_process(square_config, tmp_path):
    """``torchrun --nproc_per_node=2``: both ranks draw the same tasks, each trains on its half
    of the 1-process run's global batch of 4 (rows ``r::2``, as each rank records), DDP averages
    the gradients (``no_sync`` for the first of the update's two task micro-batches), only rank 0
    writes, and evaluation merges both ranks' shares.  The weights after 3 updates equal a
    1-process run's within fp32 summation-order noise."""
    overrides = ["training.max_updates=3", "training.tasks_per_step=2", "training.checkpoint_every=3",
                 "training.sampling_mode=ratios", "training.sampling={detection_coco: 0.5, glue_sst2: 0.5}",
                 # A large eps keeps Adam's update linear in the gradient: with 1e-8 a gradient
                 # element that is zero up to rounding becomes a +-lr step whose sign is noise.
                 "training.eps=1.0e-3"]
    out, consumed = tmp_path / "ddp", tmp_path / "consumed"
    consumed.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "tests.test_train_ddp", "--config", square_config, "--output-dir", str(out),
               *overrides]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**child_env(), "UNIT_FAST_TEST_CONSUMED": str(consumed)})
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = Trainer(load_config(square_config, overrides), str(tmp_path / "single"))
    before = params(single.model)
    whole = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loader._Collate, "__call__", _recording(whole))
        single.train(progress=False)

    # Each rank trained on its share of the 1-process run's global batches and on nothing else:
    # rank r on rows r, r + 2, ... of every micro-batch; the shares are disjoint and together the batch.
    shares = [json.loads((consumed / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(whole) == 3 * 2 and all(len(s) == len(whole) for s in shares)  # 3 updates x 2 tasks
    for j, (ds, epoch, batch) in enumerate(whole):
        assert len(batch) == 4, whole
        mine = [s[j][2] for s in shares]
        assert all(s[j][:2] == [ds, epoch] for s in shares), (j, [s[j] for s in shares], whole[j])
        assert not set(mine[0]) & set(mine[1]), f"micro-batch {j}: ranks share items {mine}"
        assert sorted(mine[0] + mine[1]) == sorted(batch), f"micro-batch {j}: {mine} is not {batch}"
        assert mine == [batch[0::2], batch[1::2]], (
            f"micro-batch {j}: {mine} are not the r::2 shares of {batch}")

    ddp = ckpt.load(str(out / "checkpoints" / "checkpoint_00000003.pt"))["model"]
    ref = params(single.model)
    assert ddp.keys() == ref.keys()
    assert sum(not torch.equal(ref[k], before[k]) for k in ref) > 50  # training moved the weights
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

    # Rank 0 alone wrote the log: one train record per step, with the 1-process run's tasks.
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["tasks"] for r in train] == [r["tasks"] for r in ours if r["event"] == "train"]
    assert any(set(r["tasks"]) == {"detection_coco", "glue_sst2"} for r in train)  # a mixed update
    for r, s in zip(train, [r for r in ours if r["event"] == "train"], strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)  # the logged loss is the global mean
    assert len(os.listdir(out / "tensorboard")) == 1

    # Evaluation: each rank scored half of the val set; rank 0 merged them.
    final = json.loads((out / "final_metrics.json").read_text())["metrics"]
    expected = single.evaluate()
    assert final.keys() == expected.keys()
    for ds in expected:
        assert final[ds] == pytest.approx(expected[ds], abs=1e-6), ds


if __name__ == "__main__":
    from unit_fast.train import main

    taken = []
    loader._Collate.__call__ = _recording(taken)
    status = main(sys.argv[1:])
    rank_file = os.path.join(os.environ["UNIT_FAST_TEST_CONSUMED"], f"rank{os.environ['RANK']}.json")
    with open(rank_file, "w") as f:
        json.dump(taken, f)
    sys.exit(status)
