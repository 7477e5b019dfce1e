"""``unit_fast::attention`` (Triton flash attention) against the fp64 math reference.

Every Triton case runs through the interpreter on CPU (``TRITON_INTERPRET=1``), with blocks of
16 (``triton._configs``), so the shapes below are chosen to cover: partial blocks and exact
multiples of 16 (the key loops' unmasked full blocks and masked tail), a key block that is all
padding in the middle of a sequence (masked in the key loops, skipped by its dK/dV program),
trailing padding (the key loop's ``kv_end``), rows with no allowed key, and sequence-first
strided views.
"""

import numpy as np
import pytest
import torch

from unit_fast import _backend
from unit_fast.nn.functional import attention
from unit_fast.ops.attention import attention_ref, attention_with_lse
from unit_fast.ops.attention.triton import PHILOX_KEYS_PER_CALL
from unit_fast.testing import assert_within_ref_error, devices

pytestmark = pytest.mark.skipif("triton" not in _backend.backends_for("attention", "cpu")
                                and not torch.cuda.is_available(),
                                reason="Triton unavailable (CPU needs TRITON_INTERPRET=1, set by conftest)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, H, L, S, D, dtype, device, Dv=None, layout="bhld"):
    """q (B, H, L, D), k (B, H, S, D), v (B, H, S, Dv) leaf tensors; ``layout="seq_first"``
    makes them strided views of ``(L, B, H * D)`` buffers, as MultiheadAttention passes them."""
    Dv = Dv or D
    gen = torch.Generator().manual_seed(1)

    def make(n, d):
        if layout == "seq_first":
            base = torch.randn(n, B, H * d, generator=gen).to(device, dtype)
            return base.view(n, B, H, d).permute(1, 2, 0, 3).detach().requires_grad_()
        return torch.randn(B, H, n, d, generator=gen).to(device, dtype).requires_grad_()

    return make(L, D), make(S, D), make(S, Dv)


def _kpm(B, S, device):
    """(B, S) bool padding: batch 0 has a fully padded 16-key block in the middle (skipped by its
    dK/dV program), batch 1 trailing padding that starts one key past a block boundary (so a key loop
    that stopped one key early would miss a whole block), others none."""
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 16:32] = True
    kpm[0, 3] = True
    if B > 1:
        kpm[1, min(33, S - 1):] = True
    return kpm.to(device)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _check_against_reference(q, k, v, kpm, mask, dropout_mask=None, dropout_p=0.0, scale=None, msg=""):
    """Triton forward + backward vs the fp64 reference, with the "2x the reference's own error in
    the test dtype" rule (house style section 7)."""
    dtype = q.dtype
    if dropout_mask is not None:  # the seed the caller drew ``dropout_mask`` for
        torch.manual_seed(123)
    out = attention(q, k, v, kpm, mask, dropout_p=dropout_p, scale=scale, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, dtype)
    g_out = _grads(out, (q, k, v), grad)

    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask_hi = mask.double() if mask is not None and mask.dtype.is_floating_point else mask
    ref_hi = attention_ref(*hi, kpm, mask_hi, dropout_p, scale, dropout_mask=dropout_mask)
    g_hi = _grads(ref_hi, hi, grad.double())
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_lo = attention_ref(*lo, kpm, mask, dropout_p, scale, dropout_mask=dropout_mask, upcast=False)
    g_lo = _grads(ref_lo, lo, grad)

    assert out.dtype == dtype and out.shape == ref_hi.shape
    assert_within_ref_error(out.cpu(), ref_lo.cpu(), ref_hi.cpu(), dtype, msg=f"{msg} out")
    for name, a, b, c in zip("qkv", g_out, g_lo, g_hi, strict=True):
        assert a.shape == c.shape
        assert_within_ref_error(a.cpu(), b.cpu(), c.cpu(), dtype, msg=f"{msg} d{name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_dtypes_and_head_dims(device, dtype, head_dim):
    B, H, L, S = 2, 2, 19, 45
    q, k, v = _qkv(B, H, L, S, head_dim, dtype, device)
    bias = torch.randn(L, S, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    _check_against_reference(q, k, v, _kpm(B, S, device), bias, msg=f"{dtype} D={head_dim}")


MASKS = ["none", "kpm", "kpm_float", "bias_2d", "bool_4d", "kpm_and_bias", "kpm_and_bool"]


def _masks(kind, B, H, L, S, device):
    gen = torch.Generator().manual_seed(4)
    kpm = _kpm(B, S, device) if kind.startswith("kpm") else None
    mask = None
    if kind in ("bias_2d", "kpm_and_bias"):
        mask = torch.randn(L, S, generator=gen).to(device)
    if kind in ("bool_4d", "kpm_and_bool"):
        mask = (torch.rand(B, H, L, S, generator=gen) < 0.3).to(device)
    if kind == "kpm_float":
        kpm = torch.randn(B, S, generator=gen).to(device)
    return kpm, mask


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["bhld", "seq_first"])
@pytest.mark.parametrize("kind", MASKS)
def test_masks_and_layouts(device, layout, kind):
    B, H, L, S, D = 3, 2, 21, 40, 32
    q, k, v = _qkv(B, H, L, S, D, torch.float32, device, layout=layout)
    kpm, mask = _masks(kind, B, H, L, S, device)
    _check_against_reference(q, k, v, kpm, mask, msg=f"{kind} {layout}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("L, S", [(16, 32), (32, 48), (5, 16), (17, 33)])
@pytest.mark.parametrize("kind", ["none", "kpm", "kpm_and_bias", "kpm_float"])
def test_full_and_partial_blocks(device, L, S, kind):
    """Lengths at and off block multiples: the key loops' unmasked full blocks with no tail, a
    tail only, both; the dK/dV query loop likewise in L; with and without padding and biases."""
    B, H, D = 2, 1, 32
    q, k, v = _qkv(B, H, L, S, D, torch.float32, device)
    kpm, mask = _masks(kind, B, H, L, S, device)
    _check_against_reference(q, k, v, kpm, mask, msg=f"{kind} L={L} S={S}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bhld", "seq_first"])
def test_delta_kernel_matches_torch(device, dtype, layout):
    """The backward's pre-kernel ``delta = rowsum(dO * O)`` (fp32) against torch, on a partial
    row block, a non-power-of-two Dv and strided inputs."""
    from unit_fast.ops.attention.triton import attention_bwd_delta_triton

    B, H, L, DV = 2, 3, 37, 48
    out, grad, _ = _qkv(B, H, L, L, DV, dtype, device, layout=layout)
    out, grad = out.detach(), grad.detach() * 3.0
    got = attention_bwd_delta_triton(grad, out)
    want = (grad.double() * out.double()).sum(-1)
    assert got.dtype == torch.float32 and got.shape == (B, H, L) and got.is_contiguous()
    # Products of upcast inputs are exact in fp32; only the summation order differs from fp64.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_scale_and_value_dim(device):
    q, k, v = _qkv(2, 3, 17, 33, 32, torch.float32, device, Dv=48)
    _check_against_reference(q, k, v, _kpm(2, 33, device), None, scale=0.37, msg="scale, Dv != D")


@pytest.mark.parametrize("device", devices())
def test_seq_first_output_keeps_the_layout(device):
    """A sequence-first view in gives a sequence-first buffer out: (L, B, H, D) contiguous, so
    ``out.permute(2, 0, 1, 3).reshape(L, B, E)`` is a view (no copy before ``out_proj``)."""
    B, H, L, S, D = 2, 2, 9, 12, 32
    q, k, v = _qkv(B, H, L, S, D, torch.float32, device, layout="seq_first")
    out = attention(q, k, v, backend="triton")
    assert out.permute(2, 0, 1, 3).is_contiguous()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.permute(2, 0, 1, 3).is_contiguous() and dk.permute(2, 0, 1, 3).is_contiguous()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_with_nothing_to_attend_give_zero(device, backend):
    """All keys padded (batch 1), or a -inf bias row: output 0, lse -inf, zero gradients, no NaN
    (what ``scaled_dot_product_attention`` and ``MultiheadAttention(need_weights=False)`` give)."""
    B, H, L, S, D = 2, 2, 6, 20, 32
    q, k, v = _qkv(B, H, L, S, D, torch.float32, device)
    kpm = torch.zeros(B, S, dtype=torch.bool, device=device)
    kpm[1] = True
    bias = torch.zeros(L, S, device=device)
    bias[2] = float("-inf")
    out, lse = attention_with_lse(q, k, v, kpm, bias, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, 2]).all()
    assert torch.isfinite(lse[0, :, :2]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert not dq[1].any() and not dk[1].any() and not dv[1].any() and not dq[0, :, 2].any()
    _check_against_reference(q, k, v, kpm, bias, msg="empty rows")


@pytest.mark.parametrize("device", devices())
def test_no_keys_and_no_queries(device):
    q, k, v = _qkv(2, 2, 5, 0, 32, torch.float32, device)
    out, lse = attention_with_lse(q, k, v, backend="triton")
    assert out.shape == (2, 2, 5, 32) and not out.any() and torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert not dq.any()
    q, k, v = _qkv(2, 2, 0, 7, 32, torch.float32, device)
    out = attention(q, k, v, backend="triton")
    assert out.shape == (2, 2, 0, 32)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dk.shape == k.shape and not dk.any() and not dv.any()


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(device, dtype):
    """Forward and backward with dropout equal the reference given the very mask the kernel
    drew (``attention_dropout_mask_triton`` regenerates it from the seed): the forward and both
    backward kernels drop the same weights."""
    from unit_fast.ops.attention.triton import attention_dropout_mask_triton

    B, H, L, S, D, p = 2, 2, 19, 37, 32, 0.3
    q, k, v = _qkv(B, H, L, S, D, dtype, device)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what attention() draws
    keep = attention_dropout_mask_triton(B, H, L, S, p, seed, device)
    _check_against_reference(q, k, v, _kpm(B, S, device), None, dropout_mask=keep.cpu(), dropout_p=p,
                             msg=f"dropout {dtype}")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    """Keep rate 1 - p (torch's ``dropout``), independent across heads, rows and keys."""
    from unit_fast.ops.attention.triton import attention_dropout_mask_triton

    B, H, L, S = 2, 4, 64, 96
    keep = attention_dropout_mask_triton(B, H, L, S, p, 987654321, "cpu").double()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # Pairwise correlation of neighbouring keys, rows and heads ~ N(0, 1/n): |r| < 5 / sqrt(n').
    neighbours = ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1]),
                  (keep[:, 1:], keep[:, :-1]))
    for a, b in neighbours:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        r = (a * b).sum() / (a.norm() * b.norm())
        assert abs(r.item()) < 5 / a.numel() ** 0.5
    # Per (query row) keep counts are Binomial(S, 1 - p): their spread matches.
    row_var = keep.sum(-1).var().item()
    assert 0.7 * S * p * (1 - p) < row_var < 1.3 * S * p * (1 - p)


def _philox4x32(seed, c0, c1, c2, c3):
    """Philox-4x32-10 (Salmon et al. 2011) on uint32 numpy arrays, as ``tl.random.philox``
    computes it (key = the seed's low and high 32 bits)."""
    m32 = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c[0], B * c[2]  # exact: 32 x 32 bits fit in uint64
        hi_a, hi_b = pa >> np.uint64(32), pb >> np.uint64(32)
        c = [(hi_b ^ c[1] ^ k0) & m32, pb & m32, (hi_a ^ c[3] ^ k1) & m32, pa & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return [x.astype(np.uint32) for x in c]


def _keep_mask_model(B, H, L, S, p, seed):
    """The kernels' dropout mask, from the documented counter layout: weight ``(bh, m, n)`` is
    output ``n % 4`` of Philox at counter ``(n // 4, m, bh, 0)``.  Returns ``(mask (B, H, L, S)
    bool, number of Philox calls)``."""
    G = -(-S // PHILOX_KEYS_PER_CALL)  # key groups per row
    bh, m, g = np.meshgrid(np.arange(B * H), np.arange(L), np.arange(G), indexing="ij")  # (B*H, L, G)
    outs = _philox4x32(seed, g, m, bh, np.zeros_like(g))  # one call per (bh, m, g)
    r = np.stack(outs, axis=-1).reshape(B * H, L, G * 4)[..., :S]  # output n % 4 at key n
    x = r.view(np.int32)
    u = np.where(x < 0, ~x, x).astype(np.float32) * np.float32(4.6566127342e-10)  # uint_to_uniform_float
    return torch.from_numpy(u >= np.float32(p)).view(B, H, L, S), g.size


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (2, 3, 19, 37)])
def test_dropout_mask_follows_the_counter_layout(shape):
    """The kernel's mask equals the model's bit for bit, and the model spends one Philox call
    per 4 keys: ceil(S / 4) per (head, query) row, i.e. 1/4 call per weight."""
    from unit_fast.ops.attention.triton import attention_dropout_mask_triton

    B, H, L, S = shape
    seed, p = 2**40 + 12345, 0.3
    want, calls = _keep_mask_model(B, H, L, S, p, seed)
    assert calls == B * H * L * -(-S // 4)
    assert torch.equal(attention_dropout_mask_triton(B, H, L, S, p, seed, "cpu"), want)


def test_each_kernel_draws_one_philox_call_per_four_weights(monkeypatch):
    """Counts the Philox lanes the interpreted kernels draw (a wrapper around
    ``tl.random.philox``): a quarter of the score elements each kernel evaluates, in the forward,
    both backward kernels and the mask kernel."""
    import triton.language as tl

    from unit_fast.ops.attention.triton import attention_dropout_mask_triton

    drawn = []
    philox = tl.random.philox

    def counting(seed, c0, c1, c2, c3, *args, **kwargs):
        drawn.append(c0.shape)
        return philox(seed, c0, c1, c2, c3, *args, **kwargs)

    monkeypatch.setattr(tl.random, "philox", counting)
    B, H, L, S, D = 1, 2, 16, 48, 32  # whole 16 x 16 tiles: 3 key blocks per row block
    attention_dropout_mask_triton(B, H, L, S, 0.2, 5, "cpu")
    assert drawn and all(shape == (16, 16 // 4) for shape in drawn)
    assert sum(a * b for a, b in drawn) == B * H * L * S // 4
    drawn.clear()
    q, k, v = _qkv(B, H, L, S, D, torch.float32, "cpu")
    out = attention(q, k, v, dropout_p=0.2, backend="triton")
    assert sum(a * b for a, b in drawn) == B * H * L * S // 4
    drawn.clear()
    torch.autograd.grad(out.sum(), (q, k, v))
    assert sum(a * b for a, b in drawn) == 2 * B * H * L * S // 4  # dK/dV and dQ kernels


def test_dropout_mask_lanes_are_independent():
    """The four outputs of one Philox call decide four neighbouring keys: each lane keeps at rate
    1 - p and no two lanes of a call are correlated (|r| < 5 sigma of r under independence)."""
    from unit_fast.ops.attention.triton import attention_dropout_mask_triton

    B, H, L, S, p = 1, 4, 128, 256, 0.5
    keep = attention_dropout_mask_triton(B, H, L, S, p, 31337, "cpu").double()
    lanes = keep.view(B, H, L, S // 4, 4).reshape(-1, 4)  # (calls, lane)
    n = lanes.shape[0]
    sigma = (p * (1 - p) / n) ** 0.5
    assert ((lanes.mean(0) - (1 - p)).abs() < 5 * sigma).all(), lanes.mean(0)
    centred = lanes - lanes.mean(0)
    corr = (centred.T @ centred) / (centred.norm(dim=0)[:, None] * centred.norm(dim=0)[None, :])
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert (off_diagonal.abs() < 5 / n ** 0.5).all(), corr
    # Nor does a lane repeat another's decision (an identical-lane bug keeps r = 1 or runs of 4).
    assert not torch.equal(lanes[:, 0], lanes[:, 1])


def test_dropout_is_deterministic_per_seed_and_unbiased():
    B, H, L, S, D = 1, 2, 16, 32, 32
    q, k, v = _qkv(B, H, L, S, D, torch.float32, "cpu")
    torch.manual_seed(7)
    a = attention(q, k, v, dropout_p=0.2, backend="triton")
    torch.manual_seed(7)
    b = attention(q, k, v, dropout_p=0.2, backend="triton")
    c = attention(q, k, v, dropout_p=0.2, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # E[dropout(P)] = P: the average over draws approaches the no-dropout output.
    clean = attention(q, k, v, backend="triton")
    draws = torch.stack([attention(q, k, v, dropout_p=0.2, backend="triton") for _ in range(30)]).mean(0)
    spread = (a - clean).abs().mean()
    assert (draws - clean).abs().mean() < 0.4 * spread


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(2, 2, 5, 7, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="k .* does not match q"):
        attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="v .* does not match k"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool or float"):
        attention(q, k, v, key_padding_mask=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, attn_mask=torch.zeros(5, 6))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="gradient wrt attn_mask"):
        attention(q, k, v, attn_mask=torch.zeros(5, 7, requires_grad=True))
    with pytest.raises(ValueError, match="triton backend takes"):
        attention(*(t.detach().double() for t in (q, k, v)), backend="triton")
    with pytest.raises(TypeError, match="must be a Tensor"):
        attention([1.0], k, v)


def test_float64_falls_back_to_the_reference_when_not_forced():
    q, k, v = (t.detach().double() for t in _qkv(1, 2, 5, 7, 32, torch.float32, "cpu"))
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v))


def test_double_backward_raises():
    q, k, v = _qkv(1, 1, 4, 5, 32, torch.float32, "cpu")
    out = attention(q, k, v, backend="triton")
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


# ---------------------------------------------------------------------------------------------
# Registration


def _op_args(device, dropout_p=0.0, with_masks=True):
    q, k, v = _qkv(2, 2, 9, 20, 32, torch.float32, device)
    kpm = _kpm(2, 20, device) if with_masks else None
    bias = torch.randn(9, 20, device=device) if with_masks else None
    seed = torch.tensor(11, dtype=torch.int64)
    return (q, k, v, bias, kpm, dropout_p, 32 ** -0.5, seed)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("with_masks", [True, False])
def test_opcheck(device, dropout_p, with_masks):
    torch.library.opcheck(torch.ops.unit_fast.attention.default, _op_args(device, dropout_p, with_masks))


@pytest.mark.parametrize("device", devices())
def test_opcheck_backward(device):
    q, k, v, bias, kpm, p, scale, seed = _op_args(device, 0.25)
    out, lse = torch.ops.unit_fast.attention(q, k, v, bias, kpm, p, scale, seed)
    grad = torch.randn_like(out)
    args = (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, bias, kpm, p, scale, seed)
    torch.library.opcheck(torch.ops.unit_fast._attention_backward.default, args)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(2, 2, 9, 20, 32, torch.float32, device, layout="seq_first")
    kpm = _kpm(2, 20, device)

    def f(q, k, v, kpm):
        return attention(q, k, v, key_padding_mask=kpm, dropout_p=0.1, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(q, k, v, kpm)
    got_grads = torch.autograd.grad(got, (q, k, v))
    torch.manual_seed(5)
    want = f(q, k, v, kpm)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
