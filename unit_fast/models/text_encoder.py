"""The BERT text encoder of UniT, built from a config; weights only from local files.

MMF wraps HF's ``BertModel`` in its ``TransformerEncoder`` (``mmf/modules/encoders.py``): the
model lives at ``.module`` and its embeddings are aliased at ``.embeddings``, so a UniT state
dict holds every embedding tensor twice (``bert_model.module.embeddings.*`` and
``bert_model.embeddings.*``).  ``BertTextEncoder`` keeps that layout.
"""

import os

from torch import nn
from transformers import BertConfig, BertModel


def _resolve_bert(pretrained):
    """A local directory for ``pretrained`` (a path, or a model name found in the local HF
    cache), or a clear error.  Never downloads."""
    if os.path.isdir(os.path.expanduser(str(pretrained))):
        return os.path.expanduser(str(pretrained))
    if os.sep in str(pretrained) or str(pretrained).startswith((".", "~")):
        raise FileNotFoundError(f"BERT weights: the configured path {pretrained!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(pretrained), local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError and friends: the name is not cached
        raise FileNotFoundError(
            f"BERT weights: {pretrained!r} is neither a local directory nor in the local Hugging Face cache, "
            "and unit_fast never downloads; point model.bert.pretrained at a local copy "
            "(e.g. one saved with BertModel.save_pretrained) or set it to null for random initialisation"
        ) from exc


class BertTextEncoder(nn.Module):
    """``module``: a ``transformers.BertModel``; ``embeddings``: its embeddings (an alias).

    Args:
        pretrained: None (random initialisation from ``config``), a local directory, or the name
            of a model in the local HF cache (e.g. ``"bert-base-uncased"``).
        config: ``BertConfig`` fields; the defaults are bert-base-uncased's architecture.
    """

    def __init__(self, pretrained=None, config=None):
        super().__init__()
        config = dict(config or {})
        if pretrained is None:
            self.module = BertModel(BertConfig(**config))
        else:
            self.module = BertModel.from_pretrained(_resolve_bert(pretrained), local_files_only=True, **config)
        self.embeddings = self.module.embeddings

    @property
    def config(self):
        return self.module.config
