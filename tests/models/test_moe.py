"""``model.moe`` (MultiModel's sparsely gated MoE FFN, ``unit_fast/models/moe.py``): the routing
(k gates summing to 1, eval deterministic, Shazeer's smooth load against Monte Carlo, capacity
order), the balance losses, one expert equal to the dense layer, padding excluded in an encoder
layer, gradients into the gates, bf16 autocast, parameter counts, and the whole UniT (loss keys,
``moe_usage``, ``training.freeze: shared``, the default building nothing, config errors); tiny
sizes, CPU."""

import math

import pytest
import torch

import unit_fast
import unit_fast.models.moe as moe_module
from tests.models.test_unit import _samples
from unit_fast.models.misc import NestedTensor
from unit_fast.models.moe import MoEFFN, moe_options
from unit_fast.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from unit_fast.training.freeze import freeze

ON = ["model.moe.layers=[1]", "model.moe.encoder_layers=[0]", "model.moe.num_experts=3", "model.moe.k=2"]


def _build(overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = unit_fast.load_config("tiny", ["model.implementation=reference", *overrides])
    return unit_fast.build_model(cfg)


def _moe(d=8, E=4, f=12, perturb=True, seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoEFFN(d, E, f, **kw)
    if perturb:  # a trained router: the zero init routes every token alike
        with torch.no_grad():
            moe.w_gate.weight.normal_()
            if moe.w_noise is not None:
                moe.w_noise.weight.normal_(0, 0.3)
    return moe


def _full_gates(expert_idx, gates, E):
    """``(N, E)`` dense gates from the routed slots (-1 dropped)."""
    out = torch.zeros(expert_idx.shape[0], E)
    keep = expert_idx >= 0
    rows = torch.arange(expert_idx.shape[0])[:, None].expand_as(expert_idx)
    out[rows[keep], expert_idx[keep]] = gates[keep]
    return out


# ---------------------------------------------------------------------------------------------
# 1. routing


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_each_valid_token_gets_k_gates_summing_to_one(k, training):
    moe = _moe(E=5, k=k).train(training)
    x = torch.randn(23, 8)
    valid = torch.ones(23, dtype=torch.bool)
    valid[[3, 17]] = False
    expert_idx, gates, _, usage = moe.route(x, valid)
    full = _full_gates(expert_idx, gates, 5)
    assert ((full > 0).sum(1)[valid] == k).all()  # k distinct experts, none with a zero gate
    torch.testing.assert_close(full[valid].sum(1), torch.ones(21))
    assert (expert_idx[~valid] == -1).all() and (gates[~valid] == 0).all()
    assert usage.dtype == torch.int64 and usage.sum() == 21 * k


def test_eval_is_deterministic_training_is_noisy():
    """Eval: the clean logits' top k, the same every call; training: the noise changes the routing."""
    moe = _moe(E=6, k=2)
    x, valid = torch.randn(64, 8), torch.ones(64, dtype=torch.bool)
    moe.eval()
    a, b = moe.route(x, valid)[:2], moe.route(x, valid)[:2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    clean = x @ moe.w_gate.weight.T
    assert torch.equal(a[0], clean.topk(2, dim=1).indices)
    moe.train()
    routes = [moe.route(x, valid)[0] for _ in range(3)]
    assert not torch.equal(routes[0], routes[1]) or not torch.equal(routes[1], routes[2])


def test_smooth_load_is_the_probability_of_staying_in_the_top_k():
    """Shazeer eq. 8-10: ``P(x, e)`` (one token at a time) equals the Monte Carlo frequency of ``e``
    being in the top k when only ``e``'s noise is redrawn, the other noisy logits held fixed."""
    gen = torch.Generator().manual_seed(0)
    moe = _moe(E=5, k=2).train()
    for _ in range(4):
        x = torch.randn(1, 8, generator=gen)
        clean = x @ moe.w_gate.weight.T  # (1, E)
        std = torch.nn.functional.softplus(x @ moe.w_noise.weight.T) + 1e-2
        noisy = clean + torch.randn(clean.shape, generator=gen) * std
        top = noisy.topk(3, dim=1).values
        p = moe._smooth_load(clean, noisy, std, top, torch.ones(1))  # (E,)
        for e in range(5):
            draws = clean[0, e] + torch.randn(40000, generator=gen) * std[0, e]  # e's noise redrawn
            others = noisy[0, torch.arange(5) != e]  # (E - 1,)
            kth = others.topk(2).values[-1]  # e is in the top 2 iff it beats the 2nd best of the others
            torch.testing.assert_close(p[e], (draws > kth).float().mean(), rtol=0, atol=0.015)


def _capacity_reference(expert_idx, gates, capacity):
    """A loop: slot j of every token in token order, then slot j + 1; an expert full drops the slot."""
    idx, g = expert_idx.clone(), gates.clone()
    taken = {}
    for j in range(idx.shape[1]):
        for n in range(idx.shape[0]):
            e = int(idx[n, j])
            if e < 0:
                continue
            if taken.get(e, 0) >= capacity:
                idx[n, j], g[n, j] = -1, 0.0
            else:
                taken[e] = taken.get(e, 0) + 1
    return idx, g


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_the_slots_past_ceil_c_n_k_over_e_in_order(factor, k):
    """``ceil(c N k / E)`` slots per expert (N: the valid tokens), first choices first; a dropped
    slot's gate is 0 and the kept gates are unchanged; padding takes no capacity."""
    E, N = 4, 19
    moe = _moe(E=E, k=k, capacity_factor=factor).eval()
    free = _moe(E=E, k=k).eval()  # the same router (same seed), no capacity
    x = torch.randn(N, 8) + torch.tensor([2.0] + [0.0] * 7)  # skewed: some experts overflow
    valid = torch.ones(N, dtype=torch.bool)
    valid[[0, 5]] = False
    capacity = math.ceil(factor * 17 * k / E)
    idx, gates, _, usage = moe.route(x, valid)
    idx0, gates0, _, _ = free.route(x, valid)
    want_idx, want_gates = _capacity_reference(idx0, gates0, capacity)
    assert (idx0 >= 0).sum() > (want_idx >= 0).sum()  # something was dropped
    assert torch.equal(idx, want_idx) and torch.equal(gates, want_gates)
    assert usage.max() <= capacity and torch.equal(usage, torch.bincount(idx[idx >= 0], minlength=E))


# ---------------------------------------------------------------------------------------------
# 2. balance losses


def _balanced_router(E=4, k=1, loss="cv2"):
    """Token n prefers expert n % E (then (n + 1) % E, ...) by the same margins: perfectly balanced."""
    moe = MoEFFN(E, E, 6, k=k, noisy=False, loss=loss, loss_coef=1.0).eval()
    with torch.no_grad():
        moe.w_gate.weight.copy_(torch.eye(E))
    base = torch.tensor([3.0, 2.0, 1.0, 0.0][:E])
    x = torch.stack([base.roll(n % E) for n in range(4 * E)])  # (4 E, E)
    return moe, x


@pytest.mark.parametrize("k", [1, 2])
def test_cv2_is_zero_when_balanced_and_positive_otherwise(k):
    moe, x = _balanced_router(k=k)
    valid = torch.ones(len(x), dtype=torch.bool)
    losses = moe.route(x, valid)[2]
    assert set(losses) == {"loss_moe_importance", "loss_moe_load"}
    assert all(float(v.detach()) == 0.0 for v in losses.values()), losses
    skewed = x.clone()
    skewed[:, 0] += 5  # expert 0 first everywhere
    losses = moe.route(skewed, valid)[2]
    assert all(float(v.detach()) > 0.1 for v in losses.values()), losses
    # padded tokens do not count: padding every token that does not prefer expert 0 skews it too
    losses = moe.route(x, torch.arange(len(x)) % 4 == 0)[2]
    assert all(float(v.detach()) > 0.1 for v in losses.values()), losses


def test_switch_loss_is_one_when_balanced_and_larger_otherwise():
    moe, x = _balanced_router(loss="switch")
    valid = torch.ones(len(x), dtype=torch.bool)
    losses = moe.route(x, valid)[2]
    assert set(losses) == {"loss_moe_switch"}
    torch.testing.assert_close(losses["loss_moe_switch"], torch.tensor(1.0))
    skewed = x.clone()
    skewed[:, 0] += 5
    assert float(moe.route(skewed, valid)[2]["loss_moe_switch"].detach()) > 1.5
    moe.loss = "none"
    assert moe.route(x, valid)[2] == {}


# ---------------------------------------------------------------------------------------------
# 3. one expert is the dense FFN; padding in an encoder layer


@pytest.mark.parametrize("layer_cls", [TransformerDecoderLayer, TransformerEncoderLayer])
@pytest.mark.parametrize("normalize_before", [False, True])
def test_one_expert_equals_the_dense_layer(layer_cls, normalize_before):
    """E = 1, k = 1, the dense weights copied: the whole layer's output equals the dense layer's
    (fp32 tolerance: the op's matmuls group the rows differently) at every query, and at every
    valid token of a padded encoder batch."""
    torch.manual_seed(0)
    d, f = 16, 24
    dense = layer_cls(d, 2, f, dropout=0.0, normalize_before=normalize_before).eval()
    moe_layer = layer_cls(d, 2, f, dropout=0.0, normalize_before=normalize_before).eval()
    moe_layer.load_state_dict(dense.state_dict())
    moe = MoEFFN(d, 1, f, k=1)
    with torch.no_grad():
        moe.w1.copy_(dense.linear1.weight.T[None])
        moe.b1.copy_(dense.linear1.bias[None])
        moe.w2.copy_(dense.linear2.weight.T[None])
        moe.b2.copy_(dense.linear2.bias[None])
    moe_layer.use_moe(moe)
    assert not hasattr(moe_layer, "linear1") and not any("linear" in k for k in moe_layer.state_dict())
    x, memory = torch.randn(5, 3, d), torch.randn(7, 3, d)
    if layer_cls is TransformerDecoderLayer:
        want, got = dense(x, memory), moe_layer(x, memory)
    else:
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[1, 3:] = True
        # padded tokens are routed nowhere (their FFN output is 0): only the valid ones compare
        valid = ~mask.t()  # (S, B)
        want = dense(x, src_key_padding_mask=mask)[valid]
        got = moe_layer(x, src_key_padding_mask=mask)[valid]
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


def test_padded_tokens_are_excluded_in_an_encoder_layer(monkeypatch):
    """In an encoder layer (noisy, training, capacity on) the outputs at valid positions and the
    losses do not change when the padded tokens' content changes, and padded tokens get expert -1."""
    torch.manual_seed(0)
    d = 8
    layer = TransformerEncoderLayer(d, 2, 16, dropout=0.0).train()
    layer.use_moe(_moe(d=d, E=4, k=2, capacity_factor=1.0, loss_coef=1.0).train())
    routed = []
    real = moe_module.moe_dispatch
    monkeypatch.setattr(moe_module, "moe_dispatch",
                        lambda x, idx, *a, **kw: routed.append(idx) or real(x, idx, *a, **kw))
    S, B = 6, 3
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 4:] = True
    mask[2, 1:] = True
    src, pos = torch.randn(S, B, d), torch.randn(S, B, d)
    outs = []
    for scale in (1.0, 100.0):
        x = src.clone()
        x[mask.t()] = scale * torch.randn(int(mask.sum()), d)
        torch.manual_seed(1)  # the same gate noise draws
        outs.append((layer(x, src_key_padding_mask=mask, pos=pos), dict(layer.moe.last["losses"])))
    valid = ~mask.t()  # (S, B)
    assert torch.equal(outs[0][0][valid], outs[1][0][valid])
    assert outs[0][1].keys() == outs[1][1].keys() and all(torch.equal(outs[0][1][k], outs[1][1][k])
                                                          for k in outs[0][1])
    flat_mask = mask.reshape(-1)  # the op's rows are batch-major (B S)
    for idx in routed:
        assert (idx[flat_mask] == -1).all() and (idx[~flat_mask] >= 0).any(1).all()


# ---------------------------------------------------------------------------------------------
# 4. gradients, bf16


def test_gradients_reach_w_gate_and_w_noise():
    """Noisy training: with k = 2 the task loss alone reaches both gate matrices; with k = 1 the gate
    is exactly 1, so only the auxiliary loss does (the smooth load reaches both)."""
    x = torch.randn(5, 2, 8)
    for k, loss in ((2, "none"), (1, "cv2")):
        moe = _moe(E=4, k=k, loss=loss).train()
        y = moe(x)
        total = (y ** 2).sum() + sum(moe.last["losses"].values())
        total.backward()
        for p in (moe.w_gate.weight, moe.w_noise.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, (k, loss)
    moe = _moe(E=4, k=1, loss="none").train()
    (moe(x) ** 2).sum().backward()
    assert moe.w_gate.weight.grad is None or moe.w_gate.weight.grad.abs().sum() == 0


def test_bf16_autocast_forward_and_backward_on_cpu(monkeypatch):
    """Under CPU bf16 autocast the experts run in bf16 and the gate in fp32: the routing is the
    fp32 routing exactly; the backward reaches the experts and the gate."""
    moe = _moe(d=16, E=6, f=32, k=2, loss_coef=1.0).eval()
    x = torch.randn(12, 4, 16)
    moe(x)
    fp32_usage = moe.last["usage"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        assert y.dtype == torch.bfloat16 and torch.equal(moe.last["usage"], fp32_usage)
        assert all(v.dtype == torch.float32 for v in moe.last["losses"].values())
    (y.float().sum() + sum(moe.last["losses"].values())).backward()
    assert torch.isfinite(moe.w1.grad).all() and moe.w1.grad.abs().sum() > 0
    assert moe.w_gate.weight.grad.abs().sum() > 0
    routed = []  # the per-token routing, not only its counts, is fp32's
    real = moe_module.moe_dispatch
    monkeypatch.setattr(moe_module, "moe_dispatch",
                        lambda x, idx, *a, **kw: routed.append(idx) or real(x, idx, *a, **kw))
    moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    assert torch.equal(routed[0], routed[1])


def test_whole_unit_under_bf16_autocast():
    """The fast path under ``model.autocast_dtype: bfloat16`` (CPU autocast): encoder and decoder MoE
    with a task gate, forward and backward, finite fp32 losses and gradients."""
    model = _build([*ON, "model.implementation=fast", "model.autocast_dtype=bfloat16",
                    "model.moe.gate_task=true"])
    out = model(_samples()["detection_coco"])
    moe_losses = [v for k, v in out["losses"].items() if "loss_moe" in k]
    assert len(moe_losses) == 2 and all(v.dtype == torch.float32 for v in moe_losses)
    sum(out["losses"].values()).backward()
    grads = [p.grad for n, p in model.named_parameters() if ".moe." in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.unit_base_model.transformer.encoder.layers[0].moe.w1.grad.abs().sum() > 0


@pytest.mark.parametrize("noisy,task_dim", [(True, 0), (False, 0), (True, 5)])
def test_parameter_count(noisy, task_dim):
    moe = MoEFFN(10, 3, 7, k=2, noisy=noisy, task_dim=task_dim)
    real = sum(p.numel() for p in moe.parameters())
    assert MoEFFN.parameter_count(10, 3, 7, noisy=noisy, task_dim=task_dim) == real


# ---------------------------------------------------------------------------------------------
# 5. the whole UniT


def test_unit_with_moe_reports_losses_and_usage():
    """Loss keys per dataset (encoder + decoder MoE layers summed), ``moe_usage`` of the last forward
    (slots = valid tokens x k; a text task runs no encoder), experts xavier-initialised and gates zero."""
    model = _build(ON)
    t = model.unit_base_model.transformer
    assert not hasattr(t.decoder.layers[1], "linear1") and hasattr(t.decoder.layers[0], "linear1")
    moe = t.decoder.layers[1].moe
    assert moe.w_gate.weight.abs().sum() == 0  # UniT's xavier loop leaves the gates as they start
    bound = math.sqrt(6 / (48 + 64))  # xavier per expert (d_dec 48, dim_feedforward 64)
    assert moe.w1.abs().max() <= bound and moe.w1.abs().max() > 0.9 * bound
    samples = _samples()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 96, generator=gen), torch.randn(3, 32, 40, generator=gen)]  # padded at /32
    model.train()
    out = model({**samples["detection_coco"], "image": images})
    keys = {k for k in out["losses"] if "moe" in k}
    assert keys == {"train/detection_coco/loss_moe_importance", "train/detection_coco/loss_moe_load"}
    usage = model.moe_usage()
    enc = "unit_base_model.transformer.encoder.layers.0.moe"
    dec = "unit_base_model.transformer.decoder.layers.1.moe"
    assert set(usage) == {enc, dec}
    assert int(usage[dec].sum()) == 2 * 6 * 2  # B x Q x k
    features, _ = model.unit_base_model.backbone(NestedTensor.from_tensor_list(images))
    valid = int((~features[-1].mask).sum())
    assert valid < features[-1].mask.numel()  # the batch is padded
    assert int(usage[enc].sum()) == (valid + 2) * 2  # valid tokens (+ each image's task token) x k
    sum(out["losses"].values()).backward()
    assert moe.w1.grad.abs().sum() > 0
    out = model({**samples["glue_sst2"], "dataset_type": "val"})
    assert {k for k in out["losses"] if "moe" in k} == {"val/glue_sst2/loss_moe_importance",
                                                         "val/glue_sst2/loss_moe_load"}
    assert set(model.moe_usage()) == {dec}  # no image: the encoder did not run
    switch = _build([*ON, "model.moe.loss=switch"])
    assert {k for k in switch(samples["vqa2"])["losses"] if "moe" in k} == {"train/vqa2/loss_moe_switch"}


def test_one_expert_unit_equals_unit():
    """The whole model: with E = 1, k = 1 in an encoder and a decoder layer and UniT's dense FFN
    weights copied into the expert, every output (predictions, auxiliary outputs, losses but the
    MoE's own) is UniT's to fp32 rounding (rtol 1e-5, atol 1e-5: the op groups the matmul rows
    differently), padded image batches included (their padded tokens are masked downstream)."""
    plain = _build()
    model = _build(["model.moe.layers=[1]", "model.moe.encoder_layers=[0]", "model.moe.num_experts=1"],
                   seed=1)
    state = plain.state_dict()
    for name in [n for n in state if ".linear1.weight" in n]:
        moe = name.replace(".linear1.weight", ".moe.")
        if moe + "w1" in model.state_dict():
            lin = name[: -len("linear1.weight")]
            for i in ("1", "2"):  # expert 0 is the dense FFN: w = Linear.weight.T, stacked over E = 1
                state[f"{moe}w{i}"] = state.pop(f"{lin}linear{i}.weight").T[None]
                state[f"{moe}b{i}"] = state.pop(f"{lin}linear{i}.bias")[None]
    gates = {k: v for k, v in model.state_dict().items() if ".moe.w_" in k}
    model.load_state_dict({**state, **gates}, strict=True)
    samples = _samples()
    gen = torch.Generator().manual_seed(0)
    samples["detection_coco"]["image"] = [torch.randn(3, 64, 96, generator=gen),
                                          torch.randn(3, 32, 40, generator=gen)]  # padded at /32
    plain.eval()
    model.eval()
    with torch.no_grad():
        for ds in ("detection_coco", "vqa2", "glue_sst2"):
            want = plain({**samples[ds], "dataset_type": "val"})
            got = model({**samples[ds], "dataset_type": "val"})
            got["losses"] = {k: v for k, v in got["losses"].items() if "loss_moe" not in k}
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{ds} {key}")


def test_separate_decoders_report_only_the_layers_that_ran():
    """Each dataset's own decoder: the usage (and losses) are the batch's decoder's only, not a stale
    report of the previous batch's."""
    model = _build(["model.moe.layers=[0]", "model.base_args.share_decoders=false"])
    samples = _samples()
    model(samples["vqa2"])
    assert set(model.moe_usage()) == {"unit_base_model.transformer.decoders.vl.vqa2.layers.0.moe"}
    torch.manual_seed(3)  # the same gate noise in both runs
    out = model(samples["glue_sst2"])
    assert set(model.moe_usage()) == {"unit_base_model.transformer.decoders.glue.glue_sst2.layers.0.moe"}
    fresh = _build(["model.moe.layers=[0]", "model.base_args.share_decoders=false"])
    torch.manual_seed(3)
    alone = fresh(samples["glue_sst2"])
    for k in ("train/glue_sst2/loss_moe_importance", "train/glue_sst2/loss_moe_load"):
        assert torch.equal(out["losses"][k], alone["losses"][k])


def test_freeze_shared_trains_a_new_datasets_gate_embedding_not_the_experts():
    """``gate_task``: a new dataset (``add_task``) gets its own task embedding; ``freeze: [shared]``
    trains it (and its head, queries) and freezes every expert and gate; a step moves it and leaves
    the old tasks' outputs bitwise as they were."""
    model = _build([*ON, "model.moe.gate_task=true", "model.moe.task_dim=4"])
    with torch.no_grad():  # a trained router: with W_g zero the task embedding gets no gradient
        for n, p in model.named_parameters():
            if ".moe.w_gate" in n or ".moe.w_noise" in n:
                p.normal_()
    assert "moe_task_embeddings.glue_sst2.weight" in {n for n, _ in model.dataset_parameters()["glue_sst2"]}
    samples = _samples()
    model.eval()
    with torch.no_grad():
        before = {ds: model({**samples[ds], "dataset_type": "val"})["losses"]
                  for ds in ("glue_sst2", "detection_coco")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    new = unit_fast.add_task(model, "my_task", "detection", num_classes=3, num_queries=4)
    assert "moe_task_embeddings.my_task.weight" in new
    freeze(model, ["shared"], ["my_task"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".moe." in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    emb = model.moe_task_embeddings["my_task"].weight
    start = emb.detach().clone()
    model.train()
    for _ in range(2):
        targets = [{"labels": t["labels"] % 3, "boxes": t["boxes"]}  # 3 classes
                   for t in samples["detection_coco"]["targets"]]
        sample = {**samples["detection_coco"], "dataset_name": "my_task", "targets": targets}
        sum(model(sample)["losses"].values()).backward()
        assert emb.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert not torch.equal(start, emb)
    for n, p in model.named_parameters():  # as tests/test_add_task.py: the old flags (matmul folding)
        p.requires_grad_(flags.get(n, True))
    model.eval()
    with torch.no_grad():
        after = {ds: model({**samples[ds], "dataset_type": "val"})["losses"] for ds in before}
    for ds in before:
        assert before[ds].keys() == after[ds].keys()
        assert all(torch.equal(before[ds][k], after[ds][k]) for k in before[ds]), ds


def test_parameter_count_of_the_whole_model():
    """The model's parameters: UniT's, less the replaced dense FFNs, plus ``parameter_count`` per MoE
    layer and the task embeddings."""
    plain = sum(p.numel() for p in _build().parameters())
    model = _build([*ON, "model.moe.gate_task=true", "model.moe.task_dim=4", "model.moe.expert_ff=10"])
    dense = {48: 2 * 48 * 64 + 64 + 48, 32: 2 * 32 * 64 + 64 + 32}  # decoder d 48, encoder d 32, ff 64
    n_ds = len(model.moe_task_embeddings)
    want = (plain - dense[48] - dense[32] + MoEFFN.parameter_count(48, 3, 10, task_dim=4)
            + MoEFFN.parameter_count(32, 3, 10, task_dim=4) + n_ds * 4)
    assert sum(p.numel() for p in model.parameters()) == want


def test_default_builds_no_moe():
    plain = _build()
    assert plain.moe_usage() == {} and plain.moe_task_embeddings is None
    assert not any("moe" in k for k in plain.state_dict())
    # every other option set, but no layer listed: UniT
    other = _build(["model.moe.num_experts=2", "model.moe.gate_task=true", "model.moe.loss=switch"])
    assert other.state_dict().keys() == plain.state_dict().keys()
    assert not any("moe" in k for k in plain(_samples()["vqa2"])["losses"])


@pytest.mark.parametrize("key,value,message", [
    ("layers", "[5]",
     r"model.moe.layers has \[5\], but the decoder \(model.base_args.dec_layers\) has 2 layers"),
    ("encoder_layers", "[2]", r"model.moe.encoder_layers has \[2\], but the image encoder"),
    ("layers", "[0, 0]", "model.moe.layers lists a layer twice"),
    ("layers", "[-1]", "model.moe.layers must be a list of layer indices"),
    ("num_experts", "0", "model.moe.num_experts must be an integer >= 1"),
    ("k", "9", r"model.moe.k must be <= num_experts \(8\), got 9"),
    ("expert_ff", "0", "model.moe.expert_ff must be an integer >= 1 or null"),
    ("noisy", "maybe", "model.moe.noisy must be true or false"),
    ("gate_task", "1", "model.moe.gate_task must be true or false"),
    ("task_dim", "0", "model.moe.task_dim must be an integer >= 1"),
    ("loss", "l2", "model.moe.loss must be one of cv2, switch, none"),
    ("loss_coef", "-1", "model.moe.loss_coef must be a number >= 0"),
    ("capacity_factor", "0", "model.moe.capacity_factor must be a number > 0 or null"),
])
def test_bad_value_names_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        _build([f"model.moe.{key}={value}"])


def test_separate_decoders_check_the_indices_and_unknown_key():
    with pytest.raises(ValueError, match=r"model.moe.layers has \[3\]"):
        _build(["model.moe.layers=[3]", "model.base_args.share_decoders=false"])
    with pytest.raises(ValueError, match=r"model.moe: unknown key\(s\) \['top_k'\]"):
        moe_options({"top_k": 2})
