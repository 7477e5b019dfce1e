"""A trained model back from a checkpoint: shared by ``python -m unit_fast.evaluate`` and
``python -m unit_fast.predict``.

Two kinds of checkpoint are read:

- **trainer** (``python -m unit_fast.train``): ``{"model", "config", "meta", "step", ...}``.  The
  config is the run's resolved config; ``overrides`` apply on top of it (e.g. real dataset paths
  on another machine), or ``--config`` replaces it.  Weights load strictly.
- **MMF** (``{"model": state_dict, ...}``, or a bare state dict): no unit_fast config (an MMF
  ``"config"`` is MMF's own layout and is ignored), so ``--config`` is required; weights load
  through ``load_mmf_checkpoint`` (``detr_model.*`` renames, DDP prefixes).

Weights come from the checkpoint alone: ``model.base_ckpt_path`` and ``backbone_weights`` (which
only initialise a training run) are not read when the model is built here.  A problem with the
files or the config raises ``ValueError`` / ``FileNotFoundError`` with a one-line message.  The
small command-line helpers both commands share (device, output folder, one-line errors) are here too.
"""

import copy
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch
import yaml

from unit_fast import checkpoint_io
from unit_fast.config import load_config, migrate_renamed
from unit_fast.training import checkpoint as ckpt


@dataclass
class Checkpoint:
    """A checkpoint file read into memory.  ``kind``: ``"trainer"`` or ``"mmf"``; ``state``: the
    loaded object; ``meta``: the run metadata (``training/metadata.py``) or None."""

    path: str
    kind: str
    state: dict
    meta: dict | None
    step: int | None


def one_line(exc):
    """An exception's message on one line (multi-line messages joined with ``; ``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or exc.__class__.__name__


TRUST_HELP = ("fully unpickle the checkpoint, which can run code stored in it: only for a file whose source "
              "you trust (default: weights only; a file that needs more is refused)")


def add_checkpoint_arguments(parser):
    """``--checkpoint`` and ``--trust-checkpoint``: every command that reads a checkpoint has them."""
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint file (.pt, MMF / DETR .pth, .safetensors), a run folder (its "
                             "newest checkpoint that loads), or a folder of runs such as runs (its newest "
                             "run)")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)


def check_output_folder(path, option):
    """FileNotFoundError naming ``option`` when the folder ``path`` would be written into is missing
    (checked before any work, not after it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option}: folder {folder!r} does not exist")


def _is_unit_fast_config(cfg):
    # unit_fast's config has a "model" section and a "data" section; MMF's has "model": "unit".
    return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict)


def resolve_run(path):
    """The checkpoint folder ``path`` names: a run folder (its ``checkpoints/``), a folder of
    checkpoint files, or a folder of run folders such as ``runs`` (the newest run in it, by its
    newest checkpoint; said on stderr).  FileNotFoundError when there is none."""
    folder = ckpt.checkpoint_folder(path)
    if folder is not None:
        return folder
    runs = ckpt.run_folders(path)
    if not runs:
        raise FileNotFoundError(f"checkpoint: no checkpoint_*.pt in {path!r}, its checkpoints/ folder, or "
                                "any run folder in it")
    print(f"checkpoint: using the newest run in {path}: {runs[-1]}", file=sys.stderr)
    return ckpt.checkpoint_folder(runs[-1])


def read_checkpoint(path, trust=False):
    """Read ``path``: a checkpoint file (trainer, MMF/DETR ``.pth``, or ``.safetensors``), or a
    folder (``resolve_run``: its newest checkpoint that loads; newer torn ones are skipped with a
    warning naming them).  Never runs code from the file unless ``trust`` (``checkpoint_io``);
    a refused, torn or foreign file raises ValueError with one line naming it."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        found, state, skipped = ckpt.newest_loadable(resolve_run(path), trust=trust)
        for bad, why in skipped:
            warnings.warn(f"skipped {bad}: {why}", stacklevel=2)
        if found is None:
            raise ValueError(f"checkpoint: no checkpoint in {path!r} loads ({skipped[0][1]})")
        path = found
    else:
        state = ckpt.convert_legacy(checkpoint_io.load(path, trust=trust), path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a dict")
    if "model" in state and _is_unit_fast_config(state.get("config")):
        return Checkpoint(path, "trainer", state, state.get("meta"), state.get("step"))
    if "model" in state or all(isinstance(v, torch.Tensor) for v in state.values()):
        return Checkpoint(path, "mmf", state, None, state.get("num_updates"))
    raise ValueError(f"checkpoint {path!r} has no 'model' entry and is not a state dict")


def plain_config(x):
    """YAML-safe copy: tuples as lists (``yaml.safe_dump`` refuses tuples)."""
    if isinstance(x, dict):
        return {k: plain_config(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_config(v) for v in x]
    return x


def checkpoint_config(checkpoint, config=None, overrides=()):
    """The config to rebuild the model with: ``load_config(config, overrides)`` when ``config``
    is given, else the trainer checkpoint's own config with ``overrides`` on top (validated by
    ``load_config`` exactly as a config file: unknown keys and bad overrides raise ValueError)."""
    if config is not None:  # a fresh config: fitted to the datasets it serves, as a new run's
        from unit_fast.tasks import resolve_run_config

        cfg = load_config(config, overrides)
        resolve_run_config(cfg)
        return cfg
    if checkpoint.kind != "trainer":
        raise ValueError(f"checkpoint {checkpoint.path!r} holds no unit_fast config (an MMF checkpoint?): "
                         "pass --config NAME|PATH with the model's config")
    saved = plain_config(checkpoint.state["config"])
    moved = migrate_renamed(saved)
    if moved:
        warnings.warn(f"checkpoint {checkpoint.path!r}: its config uses keys renamed since it was written; "
                      f"migrated {', '.join(f'{old} -> {new}' for old, new in moved)}", stacklevel=2)
    name = saved.pop("config_name", "checkpoint")
    # Through a temporary YAML file, so the saved config is merged onto defaults.yaml and the
    # overrides are checked by the one loader every other entry point uses.
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="unit_fast-checkpoint-config-")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(saved, f, sort_keys=False)  # key order is meaningful (dataset order)
        try:
            cfg = load_config(tmp, overrides)
        except ValueError as exc:
            raise ValueError(str(exc).replace(repr(tmp), f"of checkpoint {checkpoint.path!r}")) from None
    finally:
        os.remove(tmp)
    cfg["config_name"] = name
    return cfg


def model_datasets(cfg):
    """``{dataset: task type}`` of the datasets the configured model serves."""
    return {ds: task for task, qs in cfg["model"]["base_args"]["num_queries"].items() for ds in qs}


def build_eval_data(cfg, datasets):
    """``build_data(cfg, datasets)`` with the model config fitted to it as the trainer fits it
    (vocabulary size, VQA answers)."""
    from unit_fast.training.data import build_data, configure_model

    data = build_data(cfg, datasets)
    configure_model(cfg, data)
    return data


def restore_model(checkpoint, cfg, device):
    """``UniT`` built from ``cfg`` with the checkpoint's weights, on ``device``, in eval mode.
    A checkpoint that does not fit the config raises ValueError naming the first keys."""
    from unit_fast.models.checkpoint import load_mmf_checkpoint
    from unit_fast.models.unit import build_model

    build_cfg = copy.deepcopy(cfg)
    build_cfg["model"]["base_ckpt_path"] = None
    build_cfg["model"]["base_args"]["backbone_weights"] = None
    model = build_model(build_cfg)
    try:
        if checkpoint.kind == "trainer":
            model.load_state_dict(checkpoint.state["model"])
        else:
            load_mmf_checkpoint(checkpoint.path, model, loaded=checkpoint.state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {checkpoint.path!r} does not fit the model of config "
                         f"{cfg.get('config_name')!r}: {one_line(exc)[:600]}") from None
    return model.to(device).eval()
