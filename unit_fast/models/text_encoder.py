"""The BERT text encoder of UniT, built from a config; weights only from local files.

MMF wraps HF's ``BertModel`` in its ``TransformerEncoder`` (``mmf/modules/encoders.py``): the
model lives at ``.module`` and its embeddings are aliased at ``.embeddings``, so a UniT state
dict holds every embedding tensor twice (``bert_model.module.embeddings.*`` and
``bert_model.embeddings.*``).  ``BertTextEncoder`` keeps that layout.
"""

from torch import nn
from transformers import BertConfig, BertModel

from unit_fast._local_files import resolve_local


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
            self.module = BertModel.from_pretrained(resolve_local(pretrained, "BERT weights"), local_files_only=True, **config)
        self.embeddings = self.module.embeddings

    @property
    def config(self):
        return self.module.config
