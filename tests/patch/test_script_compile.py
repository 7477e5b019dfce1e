"""TorchScript and torch.compile of unit_fast.MultiheadAttention and a patch_detr-patched DETR."""

import copy

import pytest
import torch

from tests.peers import detr_peer
from unit_fast.nn.multihead_attention import MultiheadAttention
from unit_fast.patch.detr import patch_detr


@pytest.mark.parametrize("kw", [{}, {"batch_first": True}, {"kdim": 8, "vdim": 12}, {"add_bias_kv": True},
                                {"drop_weights": True}])
@pytest.mark.parametrize("need_weights", [True, False])
def test_scripted_attention_equals_eager(kw, need_weights):
    m = MultiheadAttention(16, 2, **kw).eval()
    s = torch.jit.script(m)
    L, S, N = 5, 7, 3
    bf = kw.get("batch_first", False)
    q = torch.randn(N, L, 16) if bf else torch.randn(L, N, 16)
    k = torch.randn(N, S, kw.get("kdim", 16)) if bf else torch.randn(S, N, kw.get("kdim", 16))
    v = torch.randn(N, S, kw.get("vdim", 16)) if bf else torch.randn(S, N, kw.get("vdim", 16))
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 4:] = True
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[0, :2] = True
    for masks in ({"key_padding_mask": kpm}, {"key_padding_mask": kpm, "attn_mask": attn_mask}):
        out, w = m(q, k, v, need_weights=need_weights, **masks)
        sout, sw = s(q, k, v, need_weights=need_weights, **masks)
        torch.testing.assert_close(sout, out, rtol=1.3e-6, atol=1e-5)
        assert (w is None) == (sw is None)
        if w is not None:
            torch.testing.assert_close(sw, w)
        assert w is None or (need_weights and not kw.get("drop_weights"))


def _models():
    torch.manual_seed(0)
    model, crit = detr_peer.build(aux_loss=False)
    model.eval()
    ref = copy.deepcopy(model)
    patch_detr(model, crit)
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[1, :, 12:] = True
    return model, ref, images, mask


def test_scripted_patched_detr_equals_eager_and_unpatched():
    model, ref, images, mask = _models()
    scripted = torch.jit.script(model)
    mhas = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert mhas and all(type(m) is MultiheadAttention for m in mhas)
    with torch.no_grad():
        got, eager, unpatched = scripted(images, mask), model(images, mask), ref(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], eager[key], rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(got[key], unpatched[key], rtol=1.3e-6, atol=1e-5)


def test_compiled_patched_detr_fullgraph_equals_eager():
    torch._dynamo.reset()
    model, _, images, mask = _models()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got, eager = compiled(images, mask), model(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], eager[key], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_patched_detr_fullgraph_trains_like_eager():
    """Forward and backward of the fullgraph-compiled patched model, loss from the patched
    criterion (eager: its targets are per-image lists): loss and every gradient as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, crit = detr_peer.build(aux_loss=True)
    patch_detr(model, crit)
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[1, :, 12:] = True
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    compiled = torch.compile(model, fullgraph=True)
    losses = []
    for m in (compiled, twin):
        out = m(images, mask)
        parts = crit(out, targets)
        loss = sum(parts[k] * crit.weight_dict[k] for k in parts if k in crit.weight_dict)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()
