"""``unit_fast.MultiheadAttention`` and ``patch_attention`` against ``torch.nn.MultiheadAttention``.

The torch module in float64 is the reference: same state dict, same inputs, same call.  Ours
runs its fused path (``need_weights=False``) with each attention backend, in float32 on CPU
(the Triton backend through the interpreter); outputs and the gradients of every parameter
and input are compared.  Low-precision cases use the "2x torch's own error in that dtype" rule.
"""

import copy

import pytest
import torch
from torch import nn

import unit_fast
from unit_fast import _backend
from unit_fast.testing import assert_within_ref_error, devices

# torch warns when a bool and a float mask are mixed; mixing them is what some tests check.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

BACKENDS = [b for b in ("triton", "reference") if b in _backend.backends_for("attention", "cpu")
            or torch.cuda.is_available()]
E, H = 32, 2  # head dim 16: the smallest Triton dot tile; 32 and more are covered in tests/ops

CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_bf": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    "kdim_vdim": {"kdim": 12, "vdim": 20},
    "no_bias": {"bias": False},
}


def _pair(config, device="cpu", backend=None, dtype=torch.float32):
    """(torch reference module in float64, ours in ``dtype``) with identical weights."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **config).double().to(device)
    if ref.bias_k is not None:  # torch draws them xavier-normal, small for a (1, 1, E) tensor
        nn.init.normal_(ref.bias_k)
        nn.init.normal_(ref.bias_v)
    if ref.in_proj_bias is not None:
        nn.init.normal_(ref.in_proj_bias, std=0.1)  # torch inits biases to 0: test them non-zero
        nn.init.normal_(ref.out_proj.bias, std=0.1)
    ours = unit_fast.MultiheadAttention(E, H, backend=backend, **config).to(device)
    ours.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()}, strict=True)
    return ref, ours.to(dtype)


def _inputs(config, N=3, L=7, S=19, device="cpu", unbatched=False):
    gen = torch.Generator().manual_seed(1)
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    q = torch.randn(L, N, E, generator=gen, dtype=torch.float64)
    k = torch.randn(S, N, kdim, generator=gen, dtype=torch.float64)
    v = torch.randn(S, N, vdim, generator=gen, dtype=torch.float64)
    if unbatched:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif config.get("batch_first"):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return [t.to(device) for t in (q, k, v)]


def _masks(kind, N, L, S, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    kpm = attn = None
    if "kpm" in kind:
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, 11:] = True
        kpm[-1, 2:5] = True
        if "float" in kind:
            kpm = torch.zeros(N, S, dtype=torch.float64).masked_fill(kpm, -1e4) + torch.rand(N, S, generator=gen, dtype=torch.float64)
    if "attn2d" in kind:
        attn = torch.randn(L, S, generator=gen, dtype=torch.float64)
    if "attn3d" in kind:
        attn = torch.randn(N * H, L, S, generator=gen, dtype=torch.float64)
    if "bool2d" in kind:
        attn = torch.rand(L, S, generator=gen) < 0.3
        attn[:, 0] = False  # every row keeps a key (empty rows have their own test)
    if "bool3d" in kind:
        attn = torch.rand(N * H, L, S, generator=gen) < 0.3
        attn[..., 0] = False
    return [None if m is None else m.to(device) for m in (kpm, attn)]


def _as(m, dtype):
    return m.to(dtype) if m is not None and m.dtype.is_floating_point else m


def _run(module, inputs, kpm, attn, dtype, need_weights=False, **kw):
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out, w = module(*xs, key_padding_mask=_as(kpm, dtype), attn_mask=_as(attn, dtype), need_weights=need_weights, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.device, dtype)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, xs + params, grad, allow_unused=True)
    names = [f"input{i}" for i in range(len(xs))] + [n for n, _ in module.named_parameters()]
    return out, w, dict(zip(names, grads))


def _compare(out, grads, ref_out, ref_grads, atol=2e-5, rtol=1e-4, msg=""):
    # float32 against float64 torch through projections and softmax: ~1e-6 relative.
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{msg} out: {m}")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None:
            assert g is None or not g.any(), f"{msg} {name}"
            continue
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{msg} grad {n}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("masks", ["none", "kpm+attn2d"])
def test_matches_torch_across_options(device, backend, config, masks):
    ref, ours = _pair(CONFIGS[config], device, backend)
    inputs = _inputs(CONFIGS[config], device=device)
    N, L, S = 3, 7, 19
    kpm, attn = _masks(masks, N, L, S, device)
    r_out, _, r_grads = _run(ref, inputs, kpm, attn, torch.float64)
    o_out, w, o_grads = _run(ours, inputs, kpm, attn, torch.float32)
    assert w is None
    _compare(o_out, o_grads, r_out, r_grads, msg=f"{config} {masks} {backend}")


MASK_KINDS = ["kpm", "kpm_float", "attn2d", "attn3d", "bool2d", "bool3d", "kpm+attn2d", "kpm+bool3d",
              "kpm_float+bool2d"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masks", MASK_KINDS)
def test_matches_torch_across_masks(device, backend, masks):
    """bool / float, 2-D / 3-D attention masks, bool / float key padding, and their mixtures
    (torch merges a bool mask with a float one by adding -inf; so do we)."""
    ref, ours = _pair({}, device, backend)
    inputs = _inputs({}, device=device)
    kpm, attn = _masks(masks, 3, 7, 19, device)
    r_out, _, r_grads = _run(ref, inputs, kpm, attn, torch.float64)
    o_out, _, o_grads = _run(ours, inputs, kpm, attn, torch.float32)
    _compare(o_out, o_grads, r_out, r_grads, msg=f"{masks} {backend}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["self_same_tensor", "detr_q_is_k", "cross_k_is_v", "unbatched"])
def test_matches_torch_across_call_patterns(device, backend, call):
    """The in-projection shares matmuls when query/key/value are the same tensor; every pattern
    (and unbatched inputs) gives torch's result."""
    ref, ours = _pair({}, device, backend)
    q, k, v = _inputs({}, device=device, unbatched=call == "unbatched", S=7)

    def run(module, dtype):
        x = q.detach().to(dtype).requires_grad_()
        y = k.detach().to(dtype).requires_grad_()
        if call == "self_same_tensor":
            args = (x, x, x)
        elif call == "detr_q_is_k":
            args = (x, x, y)
        elif call == "cross_k_is_v":
            args = (x, y, y)
        else:
            args = (x, y, v.detach().to(dtype))
        out, _ = module(*args, need_weights=False)
        g = torch.autograd.grad(out.square().sum(), [x, y] + list(module.parameters()), allow_unused=True)
        return out, dict(enumerate(g))

    r_out, r_grads = run(ref, torch.float64)
    o_out, o_grads = run(ours, torch.float32)
    _compare(o_out, o_grads, r_out, r_grads, msg=call)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torchs_error(device, dtype):
    """bf16 / fp16: our error vs torch in float64 is at most 2x torch's own error in ``dtype``."""
    ref, ours = _pair({}, device, "triton", dtype)
    ref_lo = copy.deepcopy(ref).to(dtype)
    inputs = _inputs({}, device=device)
    kpm, attn = _masks("kpm+attn2d", 3, 7, 19, device)
    r_out, _, r_grads = _run(ref, inputs, kpm, attn, torch.float64)
    l_out, _, l_grads = _run(ref_lo, inputs, kpm, attn, dtype)
    o_out, _, o_grads = _run(ours, inputs, kpm, attn, dtype)
    assert o_out.dtype == dtype
    assert_within_ref_error(o_out.cpu(), l_out.cpu(), r_out.cpu(), dtype, msg="out")
    for name in r_grads:
        assert_within_ref_error(o_grads[name].cpu(), l_grads[name].cpu(), r_grads[name].cpu(), dtype, msg=name)


# ---------------------------------------------------------------------------------------------
# Weights, empty rows, dropout, is_causal


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_returns_torchs_weights(average):
    ref, ours = _pair({"batch_first": True})
    inputs = _inputs({"batch_first": True})
    kpm, attn = _masks("kpm+bool2d", 3, 7, 19)
    r_out, r_w = ref(*inputs, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
    o_out, o_w = ours(*(x.float() for x in inputs), key_padding_mask=kpm, attn_mask=attn,
                      average_attn_weights=average)
    assert o_w.shape == r_w.shape == ((3, 7, 19) if average else (3, H, 7, 19))
    torch.testing.assert_close(o_w.double(), r_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(o_out.double(), r_out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_behave_as_torch(backend):
    """A sequence with every key padded, and a query row whose mask forbids every key: torch's
    need_weights=False path gives 0 there (and so do we); its need_weights=True path gives NaN
    (ours delegates; ``drop_weights`` reproduces the NaN without weights)."""
    ref, ours = _pair({}, backend=backend)
    inputs = _inputs({})
    kpm = torch.zeros(3, 19, dtype=torch.bool)
    kpm[1] = True
    attn = torch.zeros(7, 19, dtype=torch.bool)
    attn[4] = True
    xs = [x.float() for x in inputs]
    for need_weights in (False, True):
        r_out, _ = ref(*inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        o_out, _ = ours(*xs, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        torch.testing.assert_close(o_out.double(), r_out, atol=2e-5, rtol=1e-4, equal_nan=True)
        assert torch.isnan(r_out).any() == need_weights
    ours.drop_weights = True
    r_out, _ = ref(*inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=True)
    o_out, w = ours(*xs, key_padding_mask=kpm, attn_mask=attn, need_weights=True)
    assert w is None
    torch.testing.assert_close(o_out.double(), r_out, atol=2e-5, rtol=1e-4, equal_nan=True)
    # Gradients of the rows that are not empty are finite and match torch's (need_weights=False).
    x = xs[0].detach().requires_grad_()
    out, _ = ours(x, xs[1], xs[2], key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    (g,) = torch.autograd.grad(out.sum(), (x,))
    xr = inputs[0].detach().requires_grad_()
    out_r, _ = ref(xr, inputs[1], inputs[2], key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    (gr,) = torch.autograd.grad(out_r.sum(), (xr,))
    torch.testing.assert_close(g.double(), gr, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_only(backend):
    """Dropout acts in train mode, is reproducible under torch.manual_seed, keeps the expectation
    (mean over draws -> the eval output), and is off in eval mode (then equals torch exactly)."""
    ref, ours = _pair({"dropout": 0.3}, backend=backend)
    q, k, v = (x.float() for x in _inputs({}, N=2, L=5, S=16))
    ours.eval()
    clean, _ = ours(q, k, v, need_weights=False)
    torch.testing.assert_close(clean.double(), ref.eval()(*(x.double() for x in (q, k, v)), need_weights=False)[0],
                               atol=2e-5, rtol=1e-4)
    ours.train()
    torch.manual_seed(3)
    a, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(3)
    b, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(a, b) and not torch.allclose(a, clean)
    mean = torch.stack([ours(q, k, v, need_weights=False)[0] for _ in range(40)]).mean(0)
    assert (mean - clean).abs().mean() < 0.35 * (a - clean).abs().mean()


def test_is_causal_is_a_hint_that_needs_a_mask():
    ref, ours = _pair({})
    q, k, v = (x.float() for x in _inputs({}, S=7))
    with pytest.raises(ValueError, match="is_causal"):
        ours(q, k, v, need_weights=False, is_causal=True)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    a, _ = ours(q, k, v, need_weights=False, attn_mask=causal, is_causal=True)
    b, _ = ref(*(x.double() for x in (q, k, v)), need_weights=False, attn_mask=causal.double(), is_causal=True)
    torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    _, ours = _pair({})
    q, k, v = (x.float() for x in _inputs({}))
    with pytest.raises(ValueError, match="embed_dim"):
        ours(q[..., :16], k, v, need_weights=False)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        ours(q, k, v, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="2-D attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(7, 5), need_weights=False)
    with pytest.raises(ValueError, match="3-D attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(5, 7, 19), need_weights=False)
    with pytest.raises(TypeError, match="attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(7, 19, dtype=torch.long), need_weights=False)
    with pytest.raises(ValueError, match="same rank"):
        ours(q, k[:, 0], v, need_weights=False)


# ---------------------------------------------------------------------------------------------
# Drop-in: parameters, state dict, patch_attention


def test_same_parameters_and_state_dict_keys_as_torch():
    for config in CONFIGS.values():
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(E, H, **config)
        torch.manual_seed(0)
        ours = unit_fast.MultiheadAttention(E, H, **config)
        assert isinstance(ours, nn.MultiheadAttention)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
        assert ours.state_dict().keys() == ref.state_dict().keys()
        for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)  # same initialisation, from the same seed
        ref.load_state_dict(ours.state_dict(), strict=True)
        ours.load_state_dict(ref.state_dict(), strict=True)
    assert "backend=" in repr(unit_fast.MultiheadAttention(E, H))


class _DetrLikeEncoderLayer(nn.Module):
    """DETR's encoder layer call pattern: q = k = src + pos, v = src, need_weights left True."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(E, H, dropout=0.1)
        self.cross = nn.MultiheadAttention(E, H, dropout=0.1)
        self.linear = nn.Linear(E, E)

    def forward(self, src, pos, memory, kpm):
        q = src + pos
        src = src + self.self_attn(q, q, value=src, key_padding_mask=kpm)[0]
        src = src + self.cross(src, memory, memory)[0]
        return self.linear(src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_attention_keeps_weights_and_outputs(backend):
    torch.manual_seed(0)
    model = nn.Sequential(_DetrLikeEncoderLayer(), nn.TransformerEncoderLayer(E, H, dim_feedforward=64))
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    gen = torch.Generator().manual_seed(4)
    src, pos = torch.randn(9, 2, E, generator=gen), torch.randn(9, 2, E, generator=gen)
    memory = torch.randn(6, 2, E, generator=gen)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    model.eval()
    want = model[1](model[0](src, pos, memory, kpm), src_key_padding_mask=kpm)

    assert unit_fast.patch_attention(model, drop_weights=True, backend=backend) is model
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attns) == 3 and all(type(m) is unit_fast.MultiheadAttention for m in attns)
    assert all(m.drop_weights and m.backend == backend for m in attns)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # optimizers stay valid
    got = model[1](model[0](src, pos, memory, kpm), src_key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    # Training through the patched model: gradients reach every parameter.
    model.train()
    model[1](model[0](src, pos, memory, kpm), src_key_padding_mask=kpm).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_patch_attention_without_drop_weights_keeps_torchs_weights_path():
    layer = _DetrLikeEncoderLayer()
    unit_fast.patch_attention(layer)
    q = torch.randn(5, 2, E)
    out, w = layer.self_attn(q, q, q)
    assert w.shape == (2, 5, 5)
    # Other subclasses of nn.MultiheadAttention are left alone (their forward may differ).

    class Custom(nn.MultiheadAttention):
        pass

    m = nn.Sequential(Custom(E, H))
    unit_fast.patch_attention(m)
    assert type(m[0]) is Custom


def test_torch_compile_module():
    _, ours = _pair({}, backend=BACKENDS[0])
    q, k, v = (x.float() for x in _inputs({}))
    kpm, _ = _masks("kpm", 3, 7, 19)
    want = ours(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ours(*a, key_padding_mask=kpm, need_weights=False)[0], fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), want)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) returns."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("backend", ["triton"] if "triton" in BACKENDS else [])
def test_fused_path_allocates_nothing_of_size_L_times_S(backend):
    """Memory linear in the sequence length: with key padding (DETR's encoder call), no tensor of
    the layer's forward or backward has ``L x S`` elements per head; torch's weights path does."""
    N, L, S = 2, 64, 64  # B*H*L*S = 16384 attention weights; B*L*E = 4096 activations
    layer = unit_fast.MultiheadAttention(E, H, dropout=0.1, backend=backend, drop_weights=True)
    x = torch.randn(L, N, E, requires_grad=True)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 40:] = True
    with _LargestTensor() as mode:
        out, _ = layer(x, x, x, key_padding_mask=kpm)  # need_weights=True, as DETR calls it
        out.sum().backward()
    assert mode.largest[0] <= N * L * 3 * E, mode.largest  # the packed q|k|v projection
    with _LargestTensor() as mode:
        out, _ = nn.MultiheadAttention(E, H, dropout=0.1)(x, x, x, key_padding_mask=kpm)
        out.sum().backward()
    assert mode.largest[0] >= N * H * L * S  # the control: torch's reference call materialises them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["default", "bias_kv_zero_attn_bf"])
def test_autocast_bf16(backend, config):
    """Under ``torch.autocast`` (how UniT trains on GPUs) the projections come out bf16 and the
    fused path runs in bf16, agreeing with torch's module under the same autocast."""
    ref, ours = _pair(CONFIGS[config], backend=backend)
    ref = ref.float()
    q, k, v = (x.float() for x in _inputs(CONFIGS[config]))
    kpm, attn = _masks("kpm+attn2d", 3, 7, 19)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn.float(), need_weights=False)
        want, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn.float(), need_weights=False)
    assert got.dtype == want.dtype == torch.bfloat16
    exact, _ = ref.double()(*(x.double() for x in (q, k, v)), key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    assert_within_ref_error(got, want, exact, torch.bfloat16)
