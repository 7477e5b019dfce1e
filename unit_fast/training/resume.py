"""Where a resumed run starts: the checkpoint that ``--resume`` names, and the run it belongs to.

``--resume`` takes a run folder (its newest checkpoint that loads: a torn newer one is skipped
with a warning naming it) or a checkpoint file (which must load); alone, the newest run of the
config under ``runs/`` (``newest_run``).  Every problem is a one-line ``ResumeError``.
"""

import os
import warnings

from unit_fast import checkpoint_io
from unit_fast.training import checkpoint as ckpt

LATEST = "latest"  # --resume with no PATH
RUNS = "runs"  # where runs go without --output-dir / training.output_dir


class ResumeError(ValueError):
    """A ``--resume`` target that cannot be resumed from (one line)."""


def _one_line(exc):
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def run_folder_of(checkpoint_path):
    """The run folder a checkpoint belongs to (``RUN/checkpoints/checkpoint_*.pt`` -> ``RUN``)."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def find_resume(target, trust=False):
    """``(path, state)`` of the checkpoint a resume starts from.

    ``target``: a run folder (its newest checkpoint that loads; newer torn or corrupt ones are
    skipped with a warning naming them), or a checkpoint file, which must load.  Anything else
    is a one-line ``ResumeError``; a file that needs trust raises ``UntrustedCheckpointError``."""
    target = os.path.expanduser(str(target))
    if os.path.isdir(target):
        folder = ckpt.checkpoint_folder(target)
        if folder is None:
            raise ResumeError(f"--resume: no checkpoint in {target!r} or its checkpoints/ folder")
        path, state, skipped = ckpt.newest_loadable(folder, trust=trust)
        for bad, why in skipped:
            warnings.warn(f"--resume: skipped {bad}: {why}", stacklevel=2)
        if path is None:
            raise ResumeError(f"--resume: no checkpoint in {folder!r} loads ({skipped[0][1]})")
        return path, state
    if not os.path.isfile(target):
        raise ResumeError(f"--resume: {target!r} does not exist (pass a run folder or a checkpoint file)")
    try:
        return target, ckpt.load(target, trust=trust)
    except checkpoint_io.UntrustedCheckpointError:
        raise
    except ValueError as exc:
        raise ResumeError(f"--resume: {_one_line(exc)}") from None


def newest_run(config_name):
    """The newest run folder of ``config_name`` under ``runs/`` (``runs/<config>-<time>``)."""
    runs = ckpt.run_folders(RUNS, prefix=f"{config_name}-")
    if not runs:
        raise ResumeError(f"--resume: no run of config {config_name!r} with a checkpoint in {RUNS}/; pass "
                         "--resume RUN_FOLDER or --resume CHECKPOINT")
    return runs[-1]


def resume_command(out, world):
    """The command that continues the run in ``out`` (``world`` processes)."""
    launcher = "torchrun --nproc_per_node N" if world > 1 else "python"
    return f"{launcher} -m unit_fast.train --resume {out}"
