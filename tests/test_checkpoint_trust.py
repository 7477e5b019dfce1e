"""No checkpoint runs code when it is loaded: a payload checkpoint through every channel that reads
one (evaluate, predict on a file and on a run folder, ``--resume``, ``training.init_from``,
``model.base_ckpt_path``, ``load_mmf_checkpoint``, backbone weights) is refused in one line and its
payload never runs; ``--trust-checkpoint`` / ``trust=True`` is the one way it does.  The project's
own checkpoints load with plain ``torch.load(weights_only=True)``; MMF (omegaconf config) and DETR
(argparse Namespace) checkpoints load without trust; older checkpoints convert on read;
safetensors export and load."""

import argparse
import datetime
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.test_train import params, small_config
from unit_fast import checkpoint_io, evaluate, export, predict
from unit_fast.models.checkpoint import load_mmf_checkpoint, mmf_state_dict, save_mmf_checkpoint
from unit_fast.models.unit import build_model
from unit_fast.train import Trainer
from unit_fast.train import main as train_main
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.restore import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class Payload:
    """Unpickling this runs ``exec``: it creates the file ``marker`` (and does nothing else)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def run(train_cache, tmp_path_factory):
    """A 2-step run of the small config (checkpoints at steps 1 and 2)."""
    root = tmp_path_factory.mktemp("trust")
    overrides = ["training.max_updates=2", "training.checkpoint_every=1"]
    path, cfg = small_config(root, train_cache, *overrides)
    trainer = Trainer(cfg, str(root / "run"))
    trainer.train(progress=False)
    return SimpleNamespace(root=root, config=path, overrides=[f"data.cache_dir={train_cache}", *overrides],
                           out=root / "run",
                           ckpt=str(root / "run" / "checkpoints" / "checkpoint_00000002.pt"),
                           model=trainer.model, cfg=cfg)


@pytest.fixture
def payload(run, tmp_path):
    """``(path, marker)``: the run's newest checkpoint, complete and valid, plus a payload entry."""
    state = torch.load(run.ckpt, weights_only=True)
    marker = tmp_path / "PAYLOAD_RAN"
    state["extra"] = Payload(marker)
    path = tmp_path / "payload.pt"
    torch.save(state, path)
    return str(path), marker


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[-1], err


def test_the_payload_is_live(payload):
    """The fixture's payload does run when the file is fully unpickled: the tests below could fail."""
    path, marker = payload
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("channel", ["evaluate", "predict", "predict_run_folder", "export"])
def test_evaluate_predict_export_refuse_a_payload(channel, payload, tmp_path, capsys):
    path, marker = payload
    if channel == "predict_run_folder":
        folder = tmp_path / "run" / "checkpoints"
        folder.mkdir(parents=True)
        os.replace(path, folder / "checkpoint_00000009.pt")
        path = str(tmp_path / "run")
    if channel == "evaluate":
        code = evaluate.main(["--checkpoint", path])
    elif channel == "export":
        code = export.main(["--checkpoint", path, "--output", str(tmp_path / "w.safetensors")])
    else:
        code = predict.main(["--checkpoint", path, "--text", "a fine film"])
    assert code == 2
    _one_line_error(capsys, "builtins.exec", "--trust-checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("channel", ["resume_file", "resume_run_folder", "init_from", "base_ckpt_path",
                                     "backbone_weights"])
def test_train_refuses_a_payload(channel, run, payload, tmp_path, capsys):
    path, marker = payload
    args = ["--config", run.config, "--output-dir", str(tmp_path / "out"), *run.overrides]
    if channel == "resume_file":
        args += ["--resume", path]
    elif channel == "resume_run_folder":
        folder = tmp_path / "out" / "checkpoints"
        folder.mkdir(parents=True)
        os.replace(path, folder / "checkpoint_00000002.pt")
        args += ["--resume"]
    elif channel == "init_from":
        args += [f"training.init_from={path}"]
    elif channel == "base_ckpt_path":
        args += [f"model.base_ckpt_path={path}"]
    else:
        args += [f"model.base_args.backbone_weights={path}"]
    assert train_main(args) == 2
    _one_line_error(capsys, "builtins.exec")
    assert not marker.exists()


def test_apis_refuse_a_payload_and_trust_is_the_only_way_in(run, payload):
    path, marker = payload
    with pytest.raises(checkpoint_io.UntrustedCheckpointError, match="builtins.exec"):
        load_mmf_checkpoint(path, run.model)
    with pytest.raises(checkpoint_io.UntrustedCheckpointError, match="builtins.exec"):
        read_checkpoint(path)
    with pytest.raises(checkpoint_io.UntrustedCheckpointError, match="builtins.exec"):
        ckpt.load(path)
    cfg = {**run.cfg, "model": {**run.cfg["model"], "base_ckpt_path": path}}
    with pytest.raises(checkpoint_io.UntrustedCheckpointError):
        build_model(cfg)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = load_mmf_checkpoint(path, run.model, strict=False, trust=True)
    assert marker.exists() and report.unexpected == []  # trusted: unpickled in full, weights loaded


def test_trust_checkpoint_flag_unpickles(payload, capsys):
    path, marker = payload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = predict.main(["--checkpoint", path, "--trust-checkpoint", "--text", "a fine film", "--json"])
    assert code == 0
    assert marker.exists()


def test_own_checkpoints_load_with_plain_weights_only(run):
    """No allowlist at all: torch's default weights-only unpickler reads a trainer checkpoint."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run.ckpt) == []
    state = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    resumed = Trainer(run.cfg, str(run.out), resume=run.ckpt)
    assert resumed.step == 2 and np.random.get_state()[1].tolist() == state["rng"]["numpy"]["keys"].tolist()


def test_older_checkpoint_converts_on_read(run, tmp_path):
    """A checkpoint written before the RNG states were plain values (numpy's tuple with an
    ndarray) still resumes, with a warning saying it was converted."""
    state = torch.load(run.ckpt, weights_only=True)
    np.random.seed(123)
    old_numpy = np.random.get_state()
    state["rng"]["numpy"] = old_numpy
    path = tmp_path / "old.pt"
    torch.save(state, path)
    np.random.seed(0)
    with pytest.warns(UserWarning, match="converted on read"):
        resumed = Trainer(run.cfg, str(tmp_path / "out"), resume=str(path))
    assert resumed.step == 2
    assert np.array_equal(np.random.get_state()[1], old_numpy[1])  # numpy's RNG continues where it was


def test_mmf_omegaconf_checkpoint_loads_without_trust():
    """A real omegaconf pickle (tests/fixtures/README.md), with omegaconf not installed."""
    path = os.path.join(FIXTURES, "mmf_omegaconf_checkpoint.pth")
    with pytest.raises(ImportError):
        __import__("omegaconf")
    state, report = mmf_state_dict(path)
    assert sorted(state) == ["unit_base_model.input_proj.bias",
                             "unit_base_model.query_embeds.detection.detection_coco.weight"]
    assert report.renamed == 2 and state["unit_base_model.input_proj.bias"].shape == (8,)
    checkpoint = read_checkpoint(path)
    assert checkpoint.kind == "mmf" and checkpoint.step == 7
    config = checkpoint.state["config"]  # made plain: dicts and values, no omegaconf objects
    assert config["model"] == "unit" and config["training"]["batch_size"] == 64
    assert config["env"]["data_dir"] == "${env.save_dir}/data"  # interpolations are not resolved


def test_detr_namespace_checkpoint_loads_without_trust(run, tmp_path):
    args = argparse.Namespace(lr=1e-4, backbone="resnet18", dilation=False, num_queries=100)
    body = run.model.unit_base_model.backbone[0].body
    weights = {f"backbone.0.body.{k}": v for k, v in body.state_dict().items()}
    path = tmp_path / "detr.pth"
    torch.save({"model": weights, "optimizer": {}, "epoch": 299, "args": args}, path)
    checkpoint = checkpoint_io.load(path)
    assert checkpoint["args"] == {"lr": 1e-4, "backbone": "resnet18", "dilation": False, "num_queries": 100}
    model = build_model({**run.cfg, "model": {**run.cfg["model"], "base_ckpt_path": str(path),
                                              "base_ckpt_load_backbone_only": True}})
    assert torch.equal(model.unit_base_model.backbone[0].body.conv1.weight,
                       run.model.unit_base_model.backbone[0].body.conv1.weight)


def test_a_class_off_the_allowlist_is_named(tmp_path):
    path = tmp_path / "timedelta.pth"
    torch.save({"model": {}, "elapsed": datetime.timedelta(seconds=3)}, path)
    with pytest.raises(checkpoint_io.UntrustedCheckpointError) as err:
        checkpoint_io.load(path)
    message = str(err.value)
    assert "datetime.timedelta" in message and "\n" not in message and str(path) in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncate"])
def test_torn_or_foreign_files_are_one_line_errors(run, tmp_path, content):
    path = tmp_path / "bad.pt"
    data = open(run.ckpt, "rb").read()
    path.write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    with pytest.raises(checkpoint_io.CheckpointError) as err:
        checkpoint_io.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_safetensors_weights_round_trip(run, tmp_path):
    path = str(tmp_path / "unit.safetensors")
    save_mmf_checkpoint(run.model, path, format="safetensors", num_updates=2)
    with open(path, "rb") as f:
        assert b"\x80\x02" not in f.read(64)  # a JSON header, not a pickle protocol opcode
    other = build_model(run.cfg)
    report = load_mmf_checkpoint(path, other)
    assert report.ok and read_checkpoint(path).step == 2  # extra entries travel as JSON metadata
    a, b = params(run.model), params(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="format"):
        save_mmf_checkpoint(run.model, path, format="pickle")


def test_export_then_evaluate_and_predict_the_safetensors_file(run, tmp_path, capsys):
    out = str(tmp_path / "exported.safetensors")
    assert export.main(["--checkpoint", str(run.out), "--output", out]) == 0
    capsys.readouterr()
    checkpoint = read_checkpoint(out)
    assert checkpoint.kind == "trainer" and checkpoint.step == 2 and checkpoint.meta is not None
    args = ["--text", "a fine film", "--json"]
    assert predict.main(["--checkpoint", out, *args]) == 0
    from_export = capsys.readouterr().out
    assert predict.main(["--checkpoint", run.ckpt, *args]) == 0
    assert from_export == capsys.readouterr().out
    assert evaluate.main(["--checkpoint", out, "--datasets", "glue_sst2"]) == 0
    assert export.main(["--checkpoint", run.ckpt, "--output", str(tmp_path / "x.pt")]) == 2
    _one_line_error(capsys, "must end in .safetensors")


def test_backbone_weights_from_safetensors(run, tmp_path):
    body = run.model.unit_base_model.backbone[0].body
    import torchvision

    resnet = torchvision.models.resnet18(weights=None).state_dict()
    mine = body.state_dict()
    state = {k: (mine[k] if k in mine else v) for k, v in resnet.items() if "num_batches_tracked" not in k}
    path = str(tmp_path / "resnet18.safetensors")
    checkpoint_io.save_safetensors(path, state)
    cfg = {**run.cfg, "model": {**run.cfg["model"], "base_args": {**run.cfg["model"]["base_args"],
                                                                  "backbone_weights": path}}}
    model = build_model(cfg)
    assert torch.equal(model.unit_base_model.backbone[0].body.conv1.weight, body.conv1.weight)


@pytest.mark.parametrize("key", ["model.base_args.backbone_weights", "model.base_ckpt_path"])
def test_weights_that_do_not_fit_are_one_line(key, run, tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.0.body.not_a_layer.weight": torch.zeros(1)}}, path)
    assert train_main(["--config", run.config, "--output-dir", str(tmp_path / "out"), *run.overrides,
                       f"{key}={path}"]) == 2
    expected = "not_a_layer" if key.endswith("ckpt_path") else "do not fit a torchvision resnet18"
    _one_line_error(capsys, expected)
    assert not (tmp_path / "out").exists()
