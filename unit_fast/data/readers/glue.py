"""GLUE TSV files (the GLUE download: ``SST-2/``, ``QNLI/``, ``QQP/``, ``MNLI/``) -> ``TextRecord``.

Columns are found by name in each file's header row, so train/dev files (with labels) and test
files (without) read alike.  Fields are split on tabs with no quote handling (``csv.QUOTE_NONE``
semantics): GLUE text contains unbalanced ``"`` that a quoting reader would swallow across lines.

Label indices follow MMF, which reads GLUE through HF ``datasets`` (``load_dataset("glue", ...)``)
so that UniT checkpoints' GLUE heads keep their meaning:

- SST-2: ``label`` 0 negative, 1 positive;
- QNLI: entailment 0, not_entailment 1;
- QQP: ``is_duplicate`` 0 / 1;
- MNLI: entailment 0, neutral 1, contradiction 2 (HF ``datasets`` order, also
  ``ENTAILMENT_LABELS``; not the ``contradiction, entailment, neutral`` order of the old
  ``transformers`` GLUE processors).
"""

import os

from ..records import TextRecord
from . import finish_report, gc_paused, open_binary, start_report, utf8_message

_BINARY = {"0": 0, "1": 1}

# task -> (text_a column, text_b column or None, label column, label map)
GLUE_TASKS = {
    "sst2": ("sentence", None, "label", _BINARY),
    "qnli": ("question", "sentence", "label", {"entailment": 0, "not_entailment": 1}),
    "qqp": ("question1", "question2", "is_duplicate", _BINARY),
    "mnli": ("sentence1", "sentence2", "gold_label", {"entailment": 0, "neutral": 1, "contradiction": 2}),
}
_INDEX_COLUMNS = ("index", "id")


def _task_name(task):
    """A ``GLUE_TASKS`` key from e.g. "SST-2", "glue_sst2" or "mnli_mismatched"."""
    name = task.lower().replace("-", "").replace("_", "").removeprefix("glue")
    name = "mnli" if name.startswith("mnli") else name
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_TASKS)}")
    return name


def read_glue(task, tsv_path, *, on_error="raise", report=None):
    """Read one GLUE TSV file.

    Args:
        task: ``"sst2"``, ``"qnli"``, ``"qqp"`` or ``"mnli"`` (also accepted: ``"SST-2"``,
            ``"glue_qnli"``, ``"mnli_mismatched"``, ...).  MNLI files: ``train.tsv``,
            ``dev_matched.tsv``, ``dev_mismatched.tsv``, ``test_*.tsv``.
        tsv_path: the file; its first row is the header.
        on_error, report: see ``unit_fast.data.readers``.  Malformed: a row whose column count
            differs from the header's (the real QQP ``train.tsv`` has such rows), a row that is
            not UTF-8, or an unknown label.  MNLI rows with ``gold_label`` ``"-"`` are counted in
            ``report.dropped["no_gold_label"]``.

    Returns:
        ``list[TextRecord]`` in file order: ``text_a``, ``text_b`` (None for SST-2), ``label``
        int (module docstring; -1 when the file has no label column, i.e. test files) and
        ``index`` (the ``index``/``id`` column, else the 0-based data row number, as str).

    Raises:
        ValueError: missing columns or a header that is not UTF-8, or malformed rows under
            ``on_error="raise"``, naming the file and the 1-based line number.
    """
    col_a, col_b, col_label, label_map = GLUE_TASKS[_task_name(task)]
    columns = (col_a,) if col_b is None else (col_a, col_b)
    no_label = ("-",) if col_label == "gold_label" else ()  # MNLI: no annotator majority
    return read_text_tsv(tsv_path, columns, col_label, label_map, no_label=no_label, on_error=on_error,
                         report=report, what=f"GLUE task {task!r}")


def _header(f, path):
    raw = f.readline()
    try:
        return raw.decode("utf-8-sig").rstrip("\r\n").split("\t")
    except UnicodeDecodeError as exc:
        raise ValueError(utf8_message(path, raw, exc, line=1)) from None


def tsv_label_values(tsv_path, label_column):
    """The set of values (str) of column ``label_column`` in a TSV file with a header row: what
    a text-classification dataset's labels are when the config names none.  Rows that do not
    split into the header's column count are ignored here (``read_text_tsv`` reports them)."""
    path = os.fspath(tsv_path)
    with open_binary(path) as f:
        header = _header(f, path)
        if label_column not in header:
            raise ValueError(f"{path}: header has no label column {label_column!r}: {header}")
        i = header.index(label_column)
        values = set()
        for raw in f:
            fields = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
            if len(fields) == len(header):
                values.add(fields[i])
    return values


@gc_paused()
def read_text_tsv(tsv_path, text_columns, label_column, label_map, *, no_label=(), on_error="raise",
                  report=None, what="text classification"):
    """Read a TSV file with a header row into ``TextRecord``: the reader of every
    ``text_classification`` dataset (GLUE's four through ``read_glue``, and any other).

    Args:
        tsv_path: the file; its first row names the columns.
        text_columns: one column (a single sentence) or two (a sentence pair), by header name.
        label_column: the label's column; a file without it (a test split) gives label -1.
        label_map: ``{label string: class index}``; a value not in it is malformed.
        no_label: label values left out by design, counted in ``report.dropped["no_gold_label"]``.
        on_error, report: see ``unit_fast.data.readers``.
        what: how error messages name the task.

    Returns:
        ``list[TextRecord]`` in file order (see ``read_glue``).
    """
    if len(text_columns) not in (1, 2):
        raise ValueError(f"{what}: text_columns must name 1 or 2 columns, got {list(text_columns)}")
    col_a = text_columns[0]
    col_b = text_columns[1] if len(text_columns) == 2 else None
    path = os.fspath(tsv_path)
    report, skipped_before = start_report(report, on_error)
    records = []
    # Bytes, split on \n only (a stray \r inside a field must not start a new row) and decoded row
    # by row: a row that is not UTF-8 is one malformed record, named by its line number.
    with open_binary(path) as f:
        header = _header(f, path)
        columns = {name: i for i, name in enumerate(header)}
        missing = [c for c in (col_a, col_b) if c is not None and c not in columns]
        if missing:
            raise ValueError(f"{path}: header has no column(s) {missing} for {what}: {header}")
        i_a = columns[col_a]
        i_b = columns[col_b] if col_b is not None else None
        i_label = columns.get(label_column)  # None: a test file
        i_index = next((columns[c] for c in _INDEX_COLUMNS if c in columns), None)
        for row_number, raw in enumerate(f):
            lineno = row_number + 2  # 1-based, after the header
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                report.bad(on_error, utf8_message(path, raw, exc, line=lineno))
                continue
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                report.bad(on_error, f"{path}:{lineno}: {len(fields)} columns, header has {len(header)}")
                continue
            label = -1
            if i_label is not None:
                value = fields[i_label]
                if value in no_label:
                    report.dropped["no_gold_label"] += 1
                    continue
                if value not in label_map:
                    report.bad(on_error, f"{path}:{lineno}: unknown {label_column} {value!r}")
                    continue
                label = label_map[value]
            records.append(
                TextRecord(
                    text_a=fields[i_a],
                    text_b=fields[i_b] if i_b is not None else None,
                    label=label,
                    index=fields[i_index] if i_index is not None else str(row_number),
                )
            )
    finish_report(report, skipped_before, path)
    return records
