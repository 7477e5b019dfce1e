"""Readers for the real annotation layouts: each parses one file into ``records.py`` records.

No reader decodes or opens an image: ``image_path`` is joined from the configured image folder
and the file name in the annotations, and a missing image is reported by the image pipeline when
it is decoded.  (The VQAv2 reader is the one exception: it checks whether one image exists, to
tell COCO-2014 file names from 2017 ones.)

Bad input
---------
Every reader takes ``on_error`` and ``report``:

- ``on_error="raise"`` (default): a malformed record raises ``ValueError`` naming the file and
  the record (annotation id, image id, question id or line number).
- ``on_error="skip"``: malformed records are left out and counted.  Pass a ``ReadReport`` as
  ``report=`` to get the count and the messages back; the reader also logs one warning per file
  with the count, so nothing is skipped silently.

Records left out *by design* (COCO crowd boxes and degenerate boxes, SNLI-VE/MNLI pairs without a
gold label) are not errors: they are counted in ``report.dropped`` under a reason.
"""

import gc
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Messages kept per report; the count stays exact beyond it (a corrupt file can have millions).
MAX_MESSAGES = 100


@dataclass
class ReadReport:
    """What readers left out.  One report may be passed to several reads; it accumulates.

    ``skipped``: malformed records skipped under ``on_error="skip"``;
    ``messages``: the first ``MAX_MESSAGES`` of their error messages (each names file and record);
    ``dropped``: records left out by design, by reason (e.g. ``{"crowd": 3, "degenerate": 1}``).
    """

    skipped: int = 0
    messages: list = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def bad(self, on_error, message):
        """Raise ``ValueError(message)`` under ``on_error="raise"``; else count it."""
        if on_error == "raise":
            raise ValueError(message)
        self.skipped += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)


def start_report(report, on_error):
    """Validate ``on_error``; return ``(report, skipped_before)`` for ``finish_report``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ReadReport() if report is None else report
    return report, report.skipped


def finish_report(report, skipped_before, path):
    skipped = report.skipped - skipped_before
    if skipped:
        logger.warning("%s: skipped %d malformed record(s) (see ReadReport.messages)", path, skipped)


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector (usable as a decorator).  Readers build millions of
    acyclic containers (parsed JSON, records); with the collector on, CPython re-scans the growing
    heap again and again, which about doubles the time to read COCO or VQAv2 train."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Imported after ReadReport: the reader modules import it from this package.
from .coco import read_coco_detection  # noqa: E402
from .glue import GLUE_TASKS, read_glue  # noqa: E402
from .snli_ve import read_snli_ve  # noqa: E402
from .vqa2 import (  # noqa: E402
    VOCAB_SIZE,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    read_vqa2,
    soft_score,
    soft_scores,
    vqa_accuracy,
)

__all__ = [
    "GLUE_TASKS",
    "VOCAB_SIZE",
    "ReadReport",
    "build_answer_vocab",
    "load_answer_vocab",
    "normalize_answer",
    "read_coco_detection",
    "read_glue",
    "read_snli_ve",
    "read_vqa2",
    "soft_score",
    "soft_scores",
    "vqa_accuracy",
]
