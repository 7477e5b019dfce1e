"""Fast by default: every packaged config builds the fast implementation with ``autocast_dtype:
auto`` (bf16 on CUDA devices that support it, none on CPU); ``reference`` means MMF's numerics end
to end (no unit_fast kernel: torch attention, the torch matching cost, scipy, no autocast); the
renamed keys (``model.backend``, ``data.decode_backend``) are errors naming the new key, and are
migrated, with a warning, from the config stored in an existing checkpoint."""

import warnings

import pytest
import torch

import unit_fast
from tests.test_train import small_config
from unit_fast.config import config_names, load_config, migrate_renamed
from unit_fast.train import Trainer
from unit_fast.train import main as train_main
from unit_fast.training import restore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", config_names())
def test_every_packaged_config_is_fast_with_autocast_auto(name):
    cfg = load_config(name)
    assert cfg["model"]["implementation"] == "fast" and cfg["model"]["autocast_dtype"] == "auto"
    assert "backend" not in cfg["model"] and "decode_backend" not in cfg["data"]


def test_autocast_auto_is_bf16_on_cuda_only(monkeypatch):
    model = unit_fast.build_model(load_config("tiny"))
    assert model.implementation == "fast" and model.autocast_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.autocast_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model.autocast_dtype("cuda") is None  # e.g. a V100: no bf16, so no autocast
    model.set_implementation("reference")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.autocast_dtype("cuda") is None  # the reference never autocasts


def test_reference_runs_no_unit_fast_kernel(monkeypatch):
    """Under ``reference`` the detection loss never calls a unit_fast kernel: the matching cost
    is the torch composition (it took the Triton kernel on CUDA before), scipy solves, the box
    loss is torch's; attention is torch's own class."""
    from unit_fast.ops.hungarian_match import matcher as matcher_module

    model = unit_fast.build_model(load_config("tiny", ["model.implementation=reference"]))
    assert type(model.unit_base_model.transformer.encoder.layers[0].self_attn) is torch.nn.MultiheadAttention
    chosen = []
    real = matcher_module.matching_cost

    def spy(*args, backend=None, **kwargs):
        chosen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(matcher_module, "matching_cost", spy)
    from tests.models.test_unit import _samples

    model(_samples()["detection_coco"])
    assert chosen and set(chosen) == {"reference"}
    model.set_implementation("fast")
    chosen.clear()
    model(_samples()["detection_coco"])
    assert chosen and set(chosen) == {None}  # the op's default backend for the device


@pytest.mark.parametrize("old,new", [("model.backend=fast", "model.implementation"),
                                     ("data.decode_backend=pil", "data.decoder")])
def test_a_renamed_key_names_the_new_one(old, new, train_cache, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"config key '{old.split('=')[0]}' was renamed: use '{new}'"):
        load_config("tiny", [old])
    path, _ = small_config(tmp_path, train_cache)
    assert train_main(["--config", path, "--output-dir", str(tmp_path / "run"), old]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"use '{new}'" in err and err.count("\n") == 1, err


def test_migrate_renamed_moves_the_old_keys():
    cfg = {"model": {"backend": "reference", "autocast_dtype": None}, "data": {"decode_backend": "pil"}}
    assert migrate_renamed(cfg) == [("model.backend", "model.implementation"), ("data.decode_backend", "data.decoder")]
    assert cfg == {"model": {"implementation": "reference", "autocast_dtype": None}, "data": {"decoder": "pil"}}
    assert migrate_renamed(cfg) == []


def test_a_checkpoint_with_the_old_keys_resumes_evaluates_and_keeps_its_numerics(train_cache, tmp_path):
    """A checkpoint written before the rename (``model.backend``, ``data.decode_backend``, no
    autocast): its config is migrated with a warning, it resumes and it restores, on the
    implementation it was trained with."""
    _, cfg = small_config(tmp_path, train_cache, "training.max_updates=1", "model.implementation=reference",
                          "model.autocast_dtype=null")
    run = Trainer(cfg, str(tmp_path / "run"))
    run.train(progress=False)
    path = str(tmp_path / "run" / "checkpoints" / "checkpoint_00000001.pt")
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["backend"] = state["config"]["model"].pop("implementation")
    state["config"]["data"]["decode_backend"] = state["config"]["data"].pop("decoder")
    old = tmp_path / "old.pt"
    torch.save(state, old)
    checkpoint = restore.read_checkpoint(str(old))
    with pytest.warns(UserWarning, match="migrated model.backend -> model.implementation, "
                                         "data.decode_backend -> data.decoder"):
        migrated = restore.checkpoint_config(checkpoint, overrides=["training.max_updates=2"])
    assert migrated["model"]["implementation"] == "reference" and migrated["data"]["decoder"] == "pil"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = restore.restore_model(checkpoint, migrated, "cpu")
        resumed = Trainer(migrated, str(tmp_path / "resumed"), resume=str(old))
    assert model.implementation == "reference" and resumed.model.implementation == "reference"
    resumed.train(progress=False)
    assert resumed.step == 2
