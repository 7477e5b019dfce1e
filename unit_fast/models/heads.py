"""UniT's detection heads: DETR's box ``MLP`` and MMF's Visual Genome ``AttributeHead``.

Written from the facts of MMF ``mmf/models/unit/unit_base_model.py`` (``MLP`` is DETR's
``models/detr.py::MLP``), see ``shared/reference/unit_mmf_detr.md`` section 1.3.  Parameter
names, shapes and initialisation are the reference's, so MMF state dicts load strictly
(``bbox_embeds.<ds>.layers.{i}.*``, ``attribute_head.{cls_embed,attr_linear1,attr_linear2}.*``).
No deliberate difference.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Width of the class embedding AttributeHead concatenates to the hidden state: a constant in MMF.
_CLS_EMBED_DIM = 256
_ATTR_HIDDEN_DIM = 512


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them and none after the last.

    ``MLP(d, d, 4, 3)`` is DETR's box head (followed by a sigmoid outside).  Parameters are
    ``layers.{i}.weight`` / ``layers.{i}.bias``.

    Shapes: ``(..., input_dim)`` -> ``(..., output_dim)``.
    """

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class AttributeHead(nn.Module):
    """MMF's attribute classifier for Visual Genome, conditioned on the object class.

    ``relu(attr_linear2(attr_linear1(cat(h, cls_embed(label)))))``, with MMF's quirks kept:
    no activation after ``attr_linear1`` (the two linears compose to one affine map) and a
    ReLU *after* the last layer, so the returned "logits" are non-negative.

    Args:
        object_class_num: C; ``cls_embed`` has C + 1 rows, the last one for no-object.
        attribute_class_num: A, the number of attribute classes.
        representation_size: d, the width of the decoder hidden states.

    Init: every weight (embedding included) normal with std 0.01, biases 0.

    Shapes: ``forward(hidden_states (..., d) float, labels (...) int64 in [0, C])`` ->
    ``(..., A)``.
    """

    def __init__(self, object_class_num, attribute_class_num, representation_size):
        super().__init__()
        self.cls_embed = nn.Embedding(object_class_num + 1, _CLS_EMBED_DIM)
        self.attr_linear1 = nn.Linear(representation_size + _CLS_EMBED_DIM, _ATTR_HIDDEN_DIM)
        self.attr_linear2 = nn.Linear(_ATTR_HIDDEN_DIM, attribute_class_num)
        for module in (self.cls_embed, self.attr_linear1, self.attr_linear2):
            nn.init.normal_(module.weight, std=0.01)
        nn.init.zeros_(self.attr_linear1.bias)
        nn.init.zeros_(self.attr_linear2.bias)

    def forward(self, hidden_states, labels):
        x = torch.cat([hidden_states, self.cls_embed(labels)], dim=-1)  # [..., d + 256]
        x = self.attr_linear1(x)  # [..., 512]: no activation here (MMF)
        return F.relu(self.attr_linear2(x))  # [..., A]: ReLU on the output (MMF)
