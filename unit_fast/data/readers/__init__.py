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

A malformed *file* (not UTF-8, truncated or otherwise unparsable JSON, a missing top-level key)
raises ``ValueError`` whatever ``on_error`` says.  Every message is one line that starts with the
file's path, so the trainer CLI can print it as its one ``error:`` line.  What counts as malformed,
besides wrong types: numbers a record's array cannot hold (an int64 id, a float32 box), and an
image file name that is absolute or leaves the image folder (``name_problem``): such a name is
refused, never opened or stat-ed.

Records left out *by design* (COCO crowd boxes and degenerate boxes, SNLI-VE/MNLI pairs without a
gold label) are not errors: they are counted in ``report.dropped`` under a reason.
"""

import gc
import json
import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Messages kept per report; the count stays exact beyond it (a corrupt file can have millions).
MAX_MESSAGES = 100
# Ids become int64 tensors (a detection target's image_id, a label): a larger JSON int is malformed.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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

    @classmethod
    def total(cls, reports):
        """One report summing ``reports`` (an iterable of ``ReadReport``); messages concatenated,
        capped at ``MAX_MESSAGES``."""
        out = cls()
        for r in reports:
            out.skipped += r.skipped
            out.messages.extend(r.messages[: MAX_MESSAGES - len(out.messages)])
            out.dropped.update(r.dropped)
        return out


def start_report(report, on_error):
    """Validate ``on_error``; return ``(report, skipped_before)`` for ``finish_report``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ReadReport() if report is None else report
    return report, report.skipped


def finish_report(report, skipped_before, path):
    """Log one warning for ``path`` if this read skipped records."""
    skipped = report.skipped - skipped_before
    if skipped:
        logger.warning("%s: skipped %d malformed record(s) (see ReadReport.messages)", path, skipped)


def short(value, limit=80):
    """``repr(value)`` cut to ``limit`` characters: a message quotes file content, which may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int64(v):
    """``v`` is a JSON integer (not a bool) that fits in int64."""
    return type(v) is int and INT64_MIN <= v <= INT64_MAX


def name_problem(name):
    """Why the image file name ``name`` (str) may not be joined to the image folder, or None.

    Refused: empty, a NUL byte, absolute, or leaving the folder once normalised (``a/../../b``).
    The check is lexical (``os.path.normpath``), so it never touches the file system: a symlink
    inside the image folder is the folder owner's choice and is followed when the image is read.
    Cheap for the common name: ``normpath`` runs only when ``..`` occurs in it.
    """
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL byte"
    if os.path.isabs(name):
        return "is absolute; refused (it must be relative to the image folder)"
    if ".." in name:
        norm = os.path.normpath(name)
        if norm == os.pardir or norm.startswith(os.pardir + os.sep):
            return "leaves the image folder; refused"
    return None


def open_binary(path):
    """``open(path, "rb")``; a folder or an unreadable file is a ``ValueError`` naming it (a
    missing file stays ``FileNotFoundError``)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def utf8_message(path, data, exc, line=None):
    """The one-line message of a ``UnicodeDecodeError`` ``exc`` raised decoding ``data`` (bytes),
    naming the file and the line (``line`` if given, else counted up to the bad byte)."""
    where = f"offset {exc.start} of the line" if line is not None else f"file offset {exc.start}"
    line = data.count(b"\n", 0, exc.start) + 1 if line is None else line
    return f"{path}:{line}: not valid UTF-8 (byte {data[exc.start:exc.start + 1]!r} at {where})"


def load_json(path):
    """The parsed JSON file ``path``.  Raises ``ValueError`` naming the file (and the line) when it is
    not UTF-8 or not JSON (truncated, an integer of more than 4300 digits, nested too deep)."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        return json.loads(raw)  # bytes: json detects UTF-8 (with or without BOM), -16, -32
    except UnicodeDecodeError as exc:
        raise ValueError(utf8_message(path, raw, exc)) from None
    except json.JSONDecodeError as exc:  # truncated files end up here
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # int() digit limit; nesting deeper than the stack
        raise ValueError(f"{path}: malformed JSON ({str(exc).splitlines()[0]})") from None


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
