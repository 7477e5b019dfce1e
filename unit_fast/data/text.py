"""BERT text inputs: a local-only tokenizer and MMF's BERT-processor encoding.

``encode`` lays a text (pair) out as MMF's ``BertTokenizer``/``MaskedTokenProcessor`` does:
``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, segment ids 0 for ``[CLS] a [SEP]`` and 1 for
``b [SEP]``, pair truncation by popping the last token of the longer text (``b`` on ties),
padding with ``[PAD]`` to ``max_length``.
"""

import os

import torch
from transformers import BertTokenizerFast

from unit_fast._local_files import resolve_local

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a written vocab
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_tokenizer(path_or_name):
    """A lower-casing ``BertTokenizerFast`` from local files only.

    Args:
        path_or_name: a ``vocab.txt`` file (WordPiece, one token per line), a directory with
            ``tokenizer.json`` or ``vocab.txt`` (e.g. from ``save_pretrained``), or a model name
            already in the local HF cache (``"bert-base-uncased"``).

    Raises:
        FileNotFoundError: naming ``path_or_name`` when none of these is found.  (Checked here:
            ``from_pretrained(..., local_files_only=True)`` on a name it cannot find quietly
            returns a tokenizer with only the special tokens.)
    """
    path = resolve_local(path_or_name, "tokenizer")
    if os.path.isfile(path):
        return BertTokenizerFast(vocab=path, do_lower_case=True)
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer: {path_or_name!r} ({path}) holds neither of {_TOKENIZER_FILES}")
    return BertTokenizerFast.from_pretrained(path, local_files_only=True, do_lower_case=True)


def write_vocab(words, path):
    """Write a WordPiece ``vocab.txt``: ``SPECIAL_TOKENS`` first (``[PAD]`` = 0, ``[UNK]`` = 1,
    ``[CLS]`` = 2, ``[SEP]`` = 3, ``[MASK]`` = 4), then ``words`` lower-cased (the tokenizer
    lower-cases its input, so an upper-case entry could never match), first occurrence kept.
    Returns ``path``."""
    vocab = dict.fromkeys(SPECIAL_TOKENS)
    vocab.update(dict.fromkeys(w.lower() for w in words if w.strip() and w not in SPECIAL_TOKENS))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(token + "\n" for token in vocab)
    return path


def encode(tokenizer, text_a, text_b=None, *, max_length):
    """Token ids of ``text_a`` (and ``text_b``) in MMF's BERT layout (module docstring).

    Returns:
        dict of int64 tensors, each ``(max_length,)``: ``input_ids`` (``[PAD]`` after the text),
        ``input_mask`` (1 = token, 0 = padding), ``segment_ids`` (0 = first text, 1 = second,
        0 on padding).
    """
    ids_a = tokenizer.encode(text_a, add_special_tokens=False)
    ids_b = None if text_b is None else tokenizer.encode(text_b, add_special_tokens=False)
    budget = max_length - (2 if ids_b is None else 3)  # room left by [CLS], [SEP] (, [SEP])
    if budget < 0:
        raise ValueError(f"max_length {max_length} leaves no room for the special tokens")
    if ids_b is None:
        ids_a = ids_a[:budget]
    else:
        while len(ids_a) + len(ids_b) > budget:
            (ids_a if len(ids_a) > len(ids_b) else ids_b).pop()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = [cls, *ids_a, sep] + ([] if ids_b is None else [*ids_b, sep])
    n_first = len(ids_a) + 2

    input_ids = torch.full((max_length,), tokenizer.pad_token_id, dtype=torch.int64)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    input_mask = torch.zeros(max_length, dtype=torch.int64)
    input_mask[: len(ids)] = 1
    segment_ids = torch.zeros(max_length, dtype=torch.int64)
    segment_ids[n_first : len(ids)] = 1
    return {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids}
