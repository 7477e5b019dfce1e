"""``attention``'s ``torch`` backend (torch's fused CPU kernel, ``ops/attention/sdpa.py``) against
the fp64 reference: dtypes, masks and layouts, empty rows (0 out, ``-inf`` lse, zero gradients),
gradcheck; dropout and ``D != Dv`` fall back to the reference (or raise when forced); the CPU
default and ``MultiheadAttention`` take it."""

import pytest
import torch

import unit_fast
from tests.ops.test_attention import _grads, _kpm, _qkv
from unit_fast import _backend
from unit_fast.ops.attention import attention, attention_ref, attention_with_lse
from unit_fast.testing import assert_within_ref_error


def _against_reference(q, k, v, kpm, mask, msg=""):
    dtype = q.dtype
    out, lse = attention_with_lse(q, k, v, kpm, mask, backend="torch")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    g_out = _grads(out, (q, k, v), grad)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask_hi = mask.double() if mask is not None and mask.dtype.is_floating_point else mask
    ref_hi, lse_hi = attention_ref(*hi, kpm, mask_hi, 0.0, None, return_lse=True)
    g_hi = _grads(ref_hi, hi, grad.double())
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_lo = attention_ref(*lo, kpm, mask, 0.0, None, upcast=False)
    g_lo = _grads(ref_lo, lo, grad)
    assert out.dtype == dtype and out.shape == ref_hi.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_hi)), msg  # the same empty rows
    finite = ~torch.isneginf(lse_hi)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the lse is float32 whatever q's dtype
    torch.testing.assert_close(lse[finite].double(), lse_hi[finite], rtol=tol, atol=tol)
    assert_within_ref_error(out, ref_lo, ref_hi, dtype, msg=f"{msg} out")
    for name, a, b, c in zip("qkv", g_out, g_lo, g_hi, strict=True):
        assert_within_ref_error(a, b, c, dtype, msg=f"{msg} d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["none", "kpm", "bool_mask", "float_mask", "both", "float_kpm"])
@pytest.mark.parametrize("layout", ["bhld", "seq_first"])
def test_matches_the_reference(dtype, kind, layout):
    B, H, L, S, D = 2, 3, 37, 53, 32
    q, k, v = _qkv(B, H, L, S, D, dtype, "cpu", layout=layout)
    gen = torch.Generator().manual_seed(5)
    kpm = _kpm(B, S, "cpu") if kind in ("kpm", "both") else None
    if kind == "float_kpm":
        kpm = torch.randn(B, S, generator=gen).to(dtype)
    mask = None
    if kind in ("bool_mask", "both"):
        mask = torch.rand(L, S, generator=gen) < 0.2
    elif kind == "float_mask":
        mask = torch.randn(B, H, L, S, generator=gen)  # float32 with low-precision q: cast inside
    _against_reference(q, k, v, kpm, mask, msg=f"{dtype} {kind} {layout}")


def test_rows_with_nothing_to_attend_give_zero_and_neg_inf_lse():
    B, H, L, S, D = 2, 2, 5, 7, 16
    q, k, v = _qkv(B, H, L, S, D, torch.float32, "cpu")
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0] = True  # batch 0: every key is padding
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[2] = True  # query 2 of batch 1: nothing allowed
    out, lse = attention_with_lse(q, k, v, kpm, mask, backend="torch")
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, :, 2]).all()
    assert torch.isfinite(lse[1, :, [0, 1, 3, 4]]).all()
    assert (out[0] == 0).all() and (out[1, :, 2] == 0).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[0] == 0).all() and (dq[1, :, 2] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_gradcheck_float64():
    B, H, L, S, D = 1, 2, 4, 6, 8
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(B, H, L, S, D, torch.float32, "cpu"))
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 4:] = True
    mask = torch.randn(L, S, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: attention(*x, kpm, mask, backend="torch"), (q, k, v))


def test_ineligible_inputs_fall_back_or_raise_when_forced():
    q, k, v = _qkv(2, 2, 5, 7, 16, torch.float32, "cpu", Dv=8)  # D != Dv
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v, None, None, 0.0, None))
    with pytest.raises(ValueError, match="torch backend cannot run these inputs.*D == Dv"):
        attention(q, k, v, backend="torch")
    q, k, v = _qkv(2, 2, 5, 7, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no dropout"):
        attention(q, k, v, dropout_p=0.1, backend="torch")
    torch.manual_seed(7)
    a = attention(q, k, v, dropout_p=0.1)  # default: falls back to the reference's dropout
    torch.manual_seed(7)
    b = attention(q, k, v, dropout_p=0.1, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_default_and_multihead_attention_take_it(monkeypatch):
    assert _backend.backends_for("attention", "cpu")[0] == "torch"
    calls = []
    from unit_fast.ops.attention import sdpa

    real = sdpa.attention_torch
    monkeypatch.setattr(sdpa, "attention_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mha = unit_fast.MultiheadAttention(32, 4, batch_first=True).eval()
    mha.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    got = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    want = ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert calls, "MultiheadAttention did not take the torch backend on CPU"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
