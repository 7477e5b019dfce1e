"""VQAv2 official JSON -> ``VQARecord``; the answer vocabulary; the standard VQA accuracy.

Files: ``v2_OpenEnded_mscoco_{split}_questions.json`` (``{"data_subtype": "train2014",
"questions": [{image_id, question, question_id}]}``) and ``v2_mscoco_{split}_annotations.json``
(``{"annotations": [{question_id, image_id, multiple_choice_answer, answers: [{answer,
answer_confidence, answer_id}] x 10, ...}]}``).

Answers are normalised as the official VQA evaluation (``vqaEval.py``) does:
``processPunctuation`` then ``processDigitArticle`` (lower-case, punctuation, number words,
articles, contractions).  An answer's soft score is the official accuracy: the mean over the 10
leave-one-out subsets of the humans' answers of ``min(1, #matches / 3)``.
"""

import itertools
import os
import re
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from ..records import VQARecord
from . import (
    finish_report,
    gc_paused,
    is_int64,
    load_json,
    name_problem,
    open_binary,
    short,
    start_report,
    utf8_message,
)

VOCAB_SIZE = 3129  # MMF's answers_vqa.txt: answers given by >= 9 humans in train+val

# --- answer normalisation ------------------------------------------------------------------

_STR = frozenset((str,))
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official regex is "(?!<=\d)(\.)(?!\d)": its first group is a mistyped look-behind that never
# matches anything, so what it does is drop every period not followed by a digit ("1.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate(_NUMBER_WORDS)}}
_ARTICLES = {"a", "an", "the"}
# The official table maps each contraction written without some or all of its apostrophes to the
# full form; it is generated here from the full forms.  Left out on purpose, as the official table
# does: forms whose apostrophe-less spelling is a word ("she'd", "we'll", "it's", ...), and "I'm",
# "I've", "I'd've", whose official keys are capitalised and so never match lower-cased text.
_FULL_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've
""".split()


def _contraction_table():
    table = {}
    for full in _FULL_FORMS:
        head, *rest = full.split("'")
        for marks in itertools.product(("'", ""), repeat=len(rest)):  # keep or drop each apostrophe
            form = head + "".join(mark + part for mark, part in zip(marks, rest, strict=True))
            if form != full:
                table[form] = full
    return table


_CONTRACTIONS = _contraction_table()


@lru_cache(maxsize=1 << 18)  # answers repeat heavily: 4.4M train answers, ~200k distinct strings
def normalize_answer(answer):
    """The official VQA answer normalisation of one answer string -> str."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    # Punctuation: dropped where it touches a space (or anywhere, when the text holds a number
    # written with a thousands comma), else replaced by a space -- decided on the input text.
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


# --- scores and accuracy -------------------------------------------------------------------


def soft_score(matches, n=10):
    """Official VQA accuracy of an answer that ``matches`` of the ``n`` humans gave (float).

    Leaving out one of the ``matches`` humans leaves ``matches - 1`` matches, leaving out one of
    the others leaves ``matches``; so the mean over the n leave-one-out subsets of
    ``min(1, matches_left / 3)`` is the closed form below (n=10: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1).
    """
    if n == 0:
        return 0.0
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


def soft_scores(answers, vocab_index):
    """``(len(vocab_index),)`` float32 soft scores of the raw human ``answers`` (list of str) over
    the vocabulary (``{answer: index}``); answers outside the vocabulary score nowhere."""
    scores = np.zeros(len(vocab_index), dtype=np.float32)
    for answer, k in Counter(normalize_answer(a) for a in answers).items():
        if answer in vocab_index:
            scores[vocab_index[answer]] = soft_score(k, len(answers))
    return scores


def vqa_accuracy(pred_answers, records):
    """Official VQA accuracy (a fraction in [0, 1], not a percentage) of predicted answers.

    Args:
        pred_answers: a ``{question_id: answer}`` mapping, or a sequence aligned with ``records``.
        records: ``VQARecord``s with their human ``answers``.

    Predictions and human answers are both normalised with ``normalize_answer``.  (The official
    script normalises them only when the humans disagree; normalising always differs only for
    un-normalised predictions such as "Yes" against ten "yes".)
    """
    records = list(records)
    if not records:
        raise ValueError("vqa_accuracy: no records")
    if isinstance(pred_answers, Mapping):
        missing = [r.question_id for r in records if r.question_id not in pred_answers]
        if missing:
            raise ValueError(f"vqa_accuracy: no prediction for question_id(s) {missing[:10]}")
        preds = [pred_answers[r.question_id] for r in records]
    else:
        preds = list(pred_answers)
        if len(preds) != len(records):
            raise ValueError(f"vqa_accuracy: {len(preds)} predictions for {len(records)} records")
    total = 0.0
    for pred, r in zip(preds, records, strict=True):
        if not r.answers:
            raise ValueError(f"vqa_accuracy: question_id={r.question_id} has no human answers")
        humans = [normalize_answer(a) for a in r.answers]
        total += soft_score(humans.count(normalize_answer(pred)), len(humans))
    return total / len(records)


# --- vocabulary ----------------------------------------------------------------------------


def build_answer_vocab(answers, size=VOCAB_SIZE):
    """The ``size`` most frequent normalised answers of ``answers`` (iterable of str, e.g. every
    training annotation's ``multiple_choice_answer``), most frequent first; ties in alphabetical
    order, so the vocabulary is deterministic.  -> list[str]"""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)  # an answer of only punctuation/articles is no class
    return sorted(counts, key=lambda a: (-counts[a], a))[:size]


def load_answer_vocab(vocab):
    """A vocabulary as a list of str: ``vocab`` is a file (one answer per line, blank lines
    ignored, taken as written: files such as MMF's ``answers_vqa.txt`` are normalised already)
    or a sequence of answers.  Raises ValueError on duplicates."""
    if isinstance(vocab, (str, os.PathLike)):
        path = os.fspath(vocab)
        with open_binary(path) as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(utf8_message(path, raw, exc)) from None
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines
        vocab = [line.strip() for line in lines if line.strip()]
    vocab = list(vocab)
    dup = [a for a, k in Counter(vocab).items() if k > 1]
    if dup:
        raise ValueError(f"answer vocabulary has duplicates: {dup[:10]}")
    return vocab


# --- reader --------------------------------------------------------------------------------


def _resolve_file_pattern(file_pattern, image_dir, split, image_id):
    """COCO-2014 names (``COCO_{split}_{id:012d}.jpg``, split from the questions' ``data_subtype``)
    or COCO-2017 ones (``{id:012d}.jpg``): the first whose file exists for ``image_id``, else the
    first candidate."""
    if file_pattern is not None:
        if "{split" in file_pattern and not split:
            raise ValueError(
                f"file_pattern {file_pattern!r} needs {{split}}: the questions have no data_subtype"
            )
        return file_pattern
    candidates = (["COCO_{split}_{image_id:012d}.jpg"] if split else []) + ["{image_id:012d}.jpg"]
    for pattern in candidates:
        name = None if image_id is None else pattern.format(image_id=image_id, split=split)
        # A name leaving image_dir (data_subtype "../x") is never stat-ed; its questions are refused.
        if name is not None and name_problem(name) is None and os.path.exists(os.path.join(image_dir, name)):
            return pattern
    return candidates[0]


def _load(path, key):
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: not a VQAv2 {key} file (no '{key}' list)")
    return data


def _parse_annotation(ann, i):
    """``(problem, (answers, multiple_choice_answer, image_id or None, i))`` for annotation #``i``:
    problem None when ``ann`` is usable.  (Exact type checks, one pass: train2014 has 443k
    annotations of 10 answers.)"""
    if type(ann) is not dict:
        return "not a JSON object", None
    if not is_int64(ann.get("question_id")):
        return f"question_id must be a 64-bit integer, got {short(ann.get('question_id'))}", None
    image_id = ann.get("image_id")  # optional here: the question's image_id is the one used
    if image_id is not None and not is_int64(image_id):
        return f"image_id must be a 64-bit integer, got {short(image_id)}", None
    try:
        answers = [a["answer"] for a in ann["answers"]]
    except (KeyError, TypeError):
        answers = None
    if answers is None or type(ann["answers"]) is not list or not _STR.issuperset(map(type, answers)):
        return "answers must be a list of {'answer': str, ...}", None
    if not answers:  # no human answer: no target, and no accuracy to score against
        return "no answers", None
    if type(ann.get("multiple_choice_answer")) is not str:
        return "missing multiple_choice_answer", None
    return None, (answers, ann["multiple_choice_answer"], image_id, i)


def _question_problem(q):
    if type(q) is not dict:
        return "not a JSON object"
    for key in ("question_id", "image_id"):
        if not is_int64(q.get(key)):
            return f"{key} must be a 64-bit integer, got {short(q.get(key))}"
    if type(q.get("question")) is not str:
        return f"question must be str, got {short(q.get('question'))}"
    return None


def _pairing_problem(q, by_question, seen, a_path):
    """Why the well-typed question ``q`` does not pair with the annotations (``{question_id:
    parsed}`` of ``a_path``, or None for a test split), or None.  ``seen``: question ids so far."""
    qid = q["question_id"]
    if qid in seen:
        return "duplicate question_id"
    if by_question is None:
        return None
    parsed = by_question.get(qid)
    if parsed is None:
        return "no annotation for this question"
    if parsed[2] is not None and parsed[2] != q["image_id"]:
        return f"image_id={q['image_id']} but its annotation in {a_path} has image_id={parsed[2]}"
    return None


@gc_paused()
def read_vqa2(
    questions_json,
    annotations_json,
    image_dir,
    answer_vocab=None,
    *,
    file_pattern=None,
    dense_scores=True,
    on_error="raise",
    report=None,
):
    """Read a VQAv2 split.

    Args:
        questions_json: the official questions file.
        annotations_json: the official annotations file, or None (test splits): then records have
            no ``answers`` and ``scores`` is None.
        image_dir: folder of the COCO images.  Only one file name is checked for existence.
        answer_vocab: a vocabulary file (one answer per line), a list of answers, or None: then
            built from ``annotations_json`` (top ``VOCAB_SIZE`` = 3129 ``multiple_choice_answer``s).
            Build it from the *training* annotations and pass the returned list for other splits.
        file_pattern: image file name as a ``str.format`` pattern with ``{image_id}`` (and
            optionally ``{split}``, the questions file's ``data_subtype``), e.g.
            ``"COCO_val2014_{image_id:012d}.jpg"``.  None: ``COCO_{split}_{image_id:012d}.jpg``
            if that file exists for the first question, else ``{image_id:012d}.jpg`` (COCO 2017
            layout, as MMF's ``split_by_coco_2017``) if it exists, else the first of the two.
        dense_scores: fill each record's ``scores`` as a dense ``(len(vocab),)`` float32 array.
            That is ~12.5 KB per question (5.5 GB for the 443k train2014 questions); for the full
            dataset pass False and compute targets per item with ``soft_scores(record.answers,
            vocab_index)``.
        on_error, report: see ``unit_fast.data.readers``.  The malformed records: malformed
            questions or annotations (ids beyond int64, an annotation with no answers), a question
            without an annotation, an annotation whose ``image_id`` differs from its question's,
            a second question or annotation with an earlier one's ``question_id`` (the first is
            kept), and a question whose image file name is absolute or leaves ``image_dir``
            (``readers.name_problem``; such a name is never stat-ed).

    Returns:
        ``(records, answer_vocab)``: ``list[VQARecord]`` in question order (``answers`` = the raw
        human answers; ``scores (len(answer_vocab),)`` float32 or None) and the ``list[str]``
        vocabulary used.

    Raises:
        ValueError: malformed files (not UTF-8 or not JSON, no ``questions``/``annotations``
            list) or records (one line naming the file and the question id), or no vocabulary
            source.
    """
    q_path, image_dir = os.fspath(questions_json), os.fspath(image_dir)
    report, skipped_before = start_report(report, on_error)
    q_data = _load(q_path, "questions")

    by_question, a_path = None, None
    if annotations_json is not None:
        a_path = os.fspath(annotations_json)
        by_question = {}
        for i, ann in enumerate(_load(a_path, "annotations")["annotations"]):
            problem, parsed = _parse_annotation(ann, i)
            qid = ann.get("question_id") if isinstance(ann, dict) else None
            if problem is None and qid in by_question:
                problem = f"duplicate question_id (first at annotation #{by_question[qid][3]})"
            if problem:
                report.bad(on_error, f"{a_path}: annotation #{i} (question_id={short(qid)}): {problem}")
                continue
            by_question[qid] = parsed

    if answer_vocab is not None:
        vocab = load_answer_vocab(answer_vocab)
    elif by_question is not None:
        vocab = build_answer_vocab(parsed[1] for parsed in by_question.values())
    else:
        raise ValueError(f"{q_path}: no answer_vocab given and no annotations to build one from")
    vocab_index = {a: i for i, a in enumerate(vocab)}

    questions = q_data["questions"]
    split = q_data.get("data_subtype") if isinstance(q_data.get("data_subtype"), str) else None
    first = questions[0].get("image_id") if questions and isinstance(questions[0], dict) else None
    first = first if type(first) is int else None
    pattern = _resolve_file_pattern(file_pattern, image_dir, split, first)

    prefix = os.path.join(image_dir, "")
    records, seen = [], set()
    for i, q in enumerate(questions):
        problem = _question_problem(q)
        qid = q.get("question_id") if isinstance(q, dict) else None
        if problem is None:
            problem = _pairing_problem(q, by_question, seen, a_path)
        if problem is None:
            name = pattern.format(image_id=q["image_id"], split=split)
            name_bad = name_problem(name)
            problem = None if name_bad is None else f"image file name {short(name)} {name_bad}"
        if problem:
            report.bad(on_error, f"{q_path}: question #{i} (question_id={short(qid)}): {problem}")
            continue
        seen.add(qid)
        answers = [] if by_question is None else by_question[qid][0]
        scores = soft_scores(answers, vocab_index) if answers and dense_scores else None
        records.append(
            VQARecord(
                image_path=prefix + name,
                image_id=q["image_id"],
                question_id=qid,
                question=q["question"],
                answers=answers,
                scores=scores,
            )
        )
    finish_report(report, skipped_before, q_path)
    return records, vocab
