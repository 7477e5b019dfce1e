"""Training checkpoints: written atomically, the last ``keep`` kept, everything a resume needs.

A checkpoint holds the model (MMF's ``"model"`` layout), optimizer, scheduler, task sampler,
the step, and the RNG states of python, numpy and torch (CPU and CUDA) of the writing rank.
It is written to a temporary file in the same folder, flushed and ``fsync``ed, then renamed: a
run killed at any moment leaves either the previous checkpoint or the new one, never half a file.
"""

import glob
import os
import random
import re

import numpy as np
import torch

PATTERN = "checkpoint_{step:08d}.pt"


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory, step, payload, keep=3):
    """Write ``payload`` as ``directory/checkpoint_<step>.pt`` atomically; delete all but the
    newest ``keep``.  Returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PATTERN.format(step=step))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    stale = glob.glob(os.path.join(directory, "checkpoint_*.pt.tmp-*"))
    for path in stale:
        os.remove(path)
    return stale


def latest(directory):
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)
