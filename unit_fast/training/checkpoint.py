"""Training checkpoints: written atomically, the last ``keep`` kept, everything a resume needs.

A checkpoint holds the model (MMF's ``"model"`` layout), optimizer, scheduler, task sampler,
the step, and the RNG states of python, numpy and torch (CPU and CUDA) of the writing rank.
Everything in it is a tensor or a plain Python value (no class of ours or numpy's), so it loads
with ``torch.load(weights_only=True)`` (``unit_fast.checkpoint_io``).  It is written with
``atomic_write``: a run killed at any moment leaves the previous checkpoint or the new one,
never half a file.  A file that is torn anyway (a full disk, a copy cut short) is skipped by
``newest_loadable``, which a resume uses.
"""

import glob
import os
import random
import re
import warnings

import numpy as np
import torch

from unit_fast import checkpoint_io
from unit_fast.atomic import TEMP_MARK, atomic_write

PATTERN = "checkpoint_{step:08d}.pt"


def rng_state():
    """The RNG states as tensors and plain Python values.  numpy's legacy ``get_state()`` tuple
    holds an ndarray; it is stored as ``{"kind", "keys": uint32 values as an int64 tensor,
    "pos", "has_gauss", "cached_gaussian"}``."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": _plain_numpy(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_numpy(state):
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state(saved):
    if isinstance(saved, dict):
        return (saved["kind"], np.asarray(saved["keys"], dtype=np.int64).astype(np.uint32), saved["pos"],
                saved["has_gauss"], saved["cached_gaussian"])
    return saved  # numpy's own tuple: an older checkpoint not read through ``load``


def set_rng_state(state):
    python = state["python"]
    # weights_only loads give back the tuples it was saved as; older files may hold lists.
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory, step, payload, keep=3):
    """Write ``payload`` as ``directory/checkpoint_<step>.pt`` atomically; delete all but the
    newest ``keep``.  Returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = atomic_write(os.path.join(directory, PATTERN.format(step=step)), lambda f: torch.save(payload, f))
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def list_checkpoints(directory):
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    paths = glob.glob(os.path.join(directory, "checkpoint_*.pt"))
    return sorted(p for p in paths if re.fullmatch(r"checkpoint_\d{8}\.pt", os.path.basename(p)))


def remove_temporaries(directory):
    """Delete the temporary files of saves that never finished (a run killed while writing);
    returns their paths.  Call only when no save is under way in ``directory``."""
    stale = glob.glob(os.path.join(directory, f"checkpoint_*.pt{TEMP_MARK}*"))
    for path in stale:
        os.remove(path)
    return stale


def latest(directory):
    """The newest checkpoint file's path in ``directory`` (not opened), or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def convert_legacy(state, path):
    """``state`` with numpy's RNG state of a checkpoint written before the RNG states were stored
    as plain values (numpy's own tuple with an ndarray) converted, and a warning naming ``path``."""
    if isinstance(state, dict) and isinstance(state.get("rng", {}).get("numpy"), tuple):
        state["rng"]["numpy"] = _plain_numpy(state["rng"]["numpy"])
        warnings.warn(f"checkpoint {path!r} was written before unit_fast stored RNG states as plain values "
                      "(numpy's state as an ndarray): converted on read; new checkpoints use the current "
                      "format", stacklevel=3)
    return state


def load(path, trust=False):
    """A training checkpoint, read without running code from it (``checkpoint_io.load``); an older
    one is converted on read (``convert_legacy``).  Raises ``checkpoint_io.CheckpointError`` (a
    ValueError) for a torn, refused or foreign file, FileNotFoundError for a missing one."""
    state = convert_legacy(checkpoint_io.load(path, trust=trust), path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise checkpoint_io.CheckpointError(f"checkpoint {path!r} is not a unit_fast training checkpoint "
                                            "(no 'model' and 'step' entries)")
    return state


def checkpoint_folder(run):
    """Where a run folder keeps its checkpoints (``run/checkpoints``, or ``run`` itself when the
    checkpoint files are directly in it), or None when it has none."""
    for folder in (os.path.join(run, "checkpoints"), run):
        if list_checkpoints(folder):
            return folder
    return None


def run_folders(parent, prefix=""):
    """The run folders directly under ``parent`` whose names start with ``prefix`` and that hold
    checkpoints, oldest first by their newest checkpoint's modification time."""
    if not os.path.isdir(parent):
        return []
    runs = []
    for name in os.listdir(parent):
        run = os.path.join(parent, name)
        folder = checkpoint_folder(run) if name.startswith(prefix) and os.path.isdir(run) else None
        if folder is not None:
            runs.append((os.path.getmtime(latest(folder)), run))
    return [run for _, run in sorted(runs)]


def newest_loadable(directory, trust=False):
    """``(path, state, skipped)``: the newest checkpoint in ``directory`` that loads, its state,
    and ``[(path, reason), ...]`` of newer files that did not (torn, corrupt); ``(None, None,
    skipped)`` when none loads.  A refused (untrusted) file is not skipped: it raises."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load(path, trust=trust), skipped
        except checkpoint_io.UntrustedCheckpointError:
            raise
        except checkpoint_io.CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, None, skipped
