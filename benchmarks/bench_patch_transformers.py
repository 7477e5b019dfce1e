"""``unit_fast.patch_transformers()``: transformers' own DETR-family loss, unpatched vs patched.

Group ``patch_transformers:<setting>``: the loss entry point only (the model's outputs are
precomputed), main + 5 auxiliary layers, on the same inputs:
  transformers   ``ForObjectDetectionLoss`` / ``RTDetrForObjectDetectionLoss`` as installed
  unit_fast      the same call under ``patch_transformers(families=[...])``
Shapes are defined here, not in shapes.py (another file's owner), until they move there.
Before timing, the patched loss is checked against the unpatched one.
"""

import contextlib

import pytest
import torch
from transformers import DetrConfig, RTDetrConfig
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss
from transformers.loss.loss_rt_detr import RTDetrForObjectDetectionLoss

from benchmarks.conftest import devices, measure
from unit_fast.patch.transformers import patch_transformers

# name: (family filter, B, Q, classes, targets per image, layers)
SETTINGS = {
    "detr_b8_q100": ("DETR", 8, 100, 91, 15, 6),
    "rtdetr_b8_q300": ("RT-DETR", 8, 300, 80, 15, 6),
}


def _inputs(setting, device, seed):
    family, B, Q, C, T, L = SETTINGS[setting]
    g = torch.Generator().manual_seed(seed)
    classes = C + 1 if family == "DETR" else C  # DETR's softmax has a no-object class

    def boxes(*shape):
        return torch.cat([torch.rand(*shape, 2, generator=g) * 0.6 + 0.2,
                          torch.rand(*shape, 2, generator=g) * 0.3 + 0.05], -1)

    labels = [{"class_labels": torch.randint(0, C, (T,), generator=g).to(device), "boxes": boxes(T).to(device)}
              for _ in range(B)]
    logits, coords = torch.randn(L, B, Q, classes, generator=g).to(device), boxes(L, B, Q).to(device)
    return labels, logits, coords


def _call(setting, device):
    family = SETTINGS[setting][0]
    if family == "DETR":
        config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, auxiliary_loss=True,
                            num_labels=SETTINGS[setting][3], decoder_layers=SETTINGS[setting][5])

        def loss(x):
            labels, logits, coords = x
            return ForObjectDetectionLoss(logits[-1], labels, device, coords[-1], config, logits, coords)[0]
    else:
        config = RTDetrConfig(num_labels=SETTINGS[setting][3], decoder_layers=SETTINGS[setting][5])

        def loss(x):
            labels, logits, coords = x  # RT-DETR stacks layers on dim 1; its encoder top-k is one more
            return RTDetrForObjectDetectionLoss(logits[-1], labels, device, coords[-1], config,
                                                logits.transpose(0, 1), coords.transpose(0, 1),
                                                enc_topk_logits=logits[0], enc_topk_bboxes=coords[0])[0]
    return loss


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("provider", ["transformers", "unit_fast"])
def test_patch_transformers(benchmark, provider, setting, device):
    benchmark.group = f"patch_transformers:{setting}"
    family, B, Q, C, T, L = SETTINGS[setting]
    benchmark.extra_info.update(provider=provider, device=device, shape={"B": B, "Q": Q, "C": C, "T": T, "L": L})
    loss = _call(setting, device)
    inputs = [_inputs(setting, device, s) for s in range(2)]
    want = {id(x): loss(x) for x in inputs}
    patch = patch_transformers(families=[family]) if provider == "unit_fast" else contextlib.nullcontext()

    def check(x, out):
        torch.testing.assert_close(out, want[id(x)], rtol=1e-4, atol=1e-4)

    with patch:
        measure(benchmark, loss, inputs, device, check=check)
