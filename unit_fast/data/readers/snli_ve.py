"""SNLI-VE JSONL (``snli_ve_{train,dev,test}.jsonl``) -> ``EntailmentRecord``.

Each line is one JSON object; the fields used are ``Flikr30kID`` (sic: the real field name, e.g.
``"2248275918.jpg"``), ``sentence2`` (the hypothesis) and ``gold_label``.  The premise is the
Flickr30k image; ``sentence1`` (its caption) is not used, as in MMF's visual entailment dataset.
"""

import json
import os

from ..records import ENTAILMENT_LABELS, EntailmentRecord
from . import finish_report, gc_paused, name_problem, open_binary, short, start_report, utf8_message

_LABELS = {name: i for i, name in enumerate(ENTAILMENT_LABELS)}  # entailment 0, neutral 1, contradiction 2


@gc_paused()
def jsonl_label_values(jsonl_path, label_field="gold_label"):
    """The set of string values of ``label_field`` over a JSONL file's lines (unparsable lines
    ignored: ``read_snli_ve`` reports them): an image-text dataset's labels when the config
    names none."""
    values = set()
    with open_binary(os.fspath(jsonl_path)) as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict) and isinstance(obj.get(label_field), str):
                values.add(obj[label_field])
    return values


def read_snli_ve(jsonl_path, image_dir, *, label_map=None, fields=("Flikr30kID", "sentence2", "gold_label"),
                 on_error="raise", report=None):
    """Read an SNLI-VE split.

    Args:
        jsonl_path: the JSONL file.
        image_dir: the Flickr30k image folder; ``image_path`` = ``image_dir/Flikr30kID`` (not opened).
        on_error, report: see ``unit_fast.data.readers``.  Malformed: a line that is not UTF-8 or
            not a JSON object (a truncated last line included), or lacks a string ``Flikr30kID``
            / ``sentence2`` / ``gold_label``, or whose ``Flikr30kID`` is absolute or leaves
            ``image_dir`` (``readers.name_problem``).

        label_map: ``{label string: class index}`` for another image-text classification set
            (then a label outside it is malformed, except ``"-"``, dropped as SNLI's); None:
            SNLI-VE's ``ENTAILMENT_LABELS``.
        fields: the names of the image file, text and label fields (SNLI-VE's by default).

    Returns:
        ``list[EntailmentRecord]`` in file order; ``image_id`` = the file name without extension
        (str); ``label`` int per ``ENTAILMENT_LABELS``.  Lines whose ``gold_label`` is none of
        the three (SNLI's ``"-"``: no annotator majority) are left out and counted in
        ``report.dropped["no_gold_label"]``.  Blank lines are ignored.

    Raises:
        ValueError: under ``on_error="raise"``, naming the file and the 1-based line number.
    """
    path, image_dir = os.fspath(jsonl_path), os.fspath(image_dir)
    report, skipped_before = start_report(report, on_error)
    labels = _LABELS if label_map is None else label_map
    image_key, text_key, label_key = fields
    records = []
    # Bytes, decoded line by line: a line that is not UTF-8 is one malformed record, named by number.
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.bad(on_error, utf8_message(path, raw, exc, line=lineno))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, the int() digit limit
                report.bad(on_error, f"{path}:{lineno}: malformed JSON ({str(exc).splitlines()[0]})")
                continue
            missing = [k for k in fields if not isinstance(obj, dict) or not isinstance(obj.get(k), str)]
            if missing:
                report.bad(on_error, f"{path}:{lineno}: missing or non-string field(s) {missing}")
                continue
            label = labels.get(obj[label_key])
            if label is None:
                if label_map is not None and obj[label_key] != "-":
                    report.bad(on_error, f"{path}:{lineno}: unknown {label_key} {short(obj[label_key])}")
                    continue
                report.dropped["no_gold_label"] += 1
                continue
            file_name = obj[image_key]
            problem = name_problem(file_name)
            if problem:
                report.bad(on_error, f"{path}:{lineno}: {image_key} {short(file_name)} {problem}")
                continue
            records.append(
                EntailmentRecord(
                    image_path=os.path.join(image_dir, file_name),
                    image_id=os.path.splitext(file_name)[0],
                    hypothesis=obj[text_key],
                    label=label,
                )
            )
    finish_report(report, skipped_before, path)
    return records
