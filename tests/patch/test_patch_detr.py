"""``unit_fast.patch_detr`` on a DETR in facebookresearch/detr's layout (tests/peers/detr_peer.py):
same losses, gradients, matches and training steps as the unpatched model, same parameters."""

import copy

import torch

from tests.peers import detr_peer
from unit_fast.nn.multihead_attention import MultiheadAttention
from unit_fast.patch.detr import LayerBatchedMatcher, patch_detr
from unit_fast.testing import assert_within_ref_error

COUNTS = [3, 0, 4]  # one image with no targets


def _inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(COUNTS)
    images = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, 32, 32, dtype=torch.bool)
    mask[1, :, 24:] = True  # padded columns
    mask[2, 20:, :] = True  # padded rows
    targets = []
    for n in COUNTS:
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        targets.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    cast = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in targets]
    return images.to(dtype), mask, cast


def _trio(**kw):
    """(patched fp32, unpatched fp32, unpatched fp64) (model, criterion) pairs, same weights."""
    torch.manual_seed(0)
    model, crit = detr_peer.build(**kw)
    ref = (model, crit)
    fast = copy.deepcopy(ref)
    hi = copy.deepcopy(ref)
    hi[0].double(), hi[1].double()
    report = patch_detr(*fast)
    return fast, ref, hi, report


def _run(pair, dtype):
    model, crit = pair
    images, mask, targets = _inputs(dtype)
    out = model(images, mask)
    losses = crit(out, targets)
    total = sum(crit.weight_dict[k] * v for k, v in losses.items() if k in crit.weight_dict)
    return out, losses, total


def _check_losses(lf, lr, lh):
    assert set(lf) == set(lr) == set(lh)
    for k in lr:
        assert_within_ref_error(lf[k].detach(), lr[k].detach(), lh[k].detach(), torch.float32, msg=k)


def test_losses_and_gradients_match_unpatched():
    fast, ref, hi, _ = _trio()
    results = [_run(p, d) for p, d in ((fast, torch.float32), (ref, torch.float32), (hi, torch.float64))]
    _check_losses(*(r[1] for r in results))
    assert any(k.endswith("_0") for k in results[0][1])  # aux layers were in the loss
    for r in results:
        r[2].backward()
    names = [n for n, _ in ref[0].named_parameters()]
    pf, pr, ph = (dict(p[0].named_parameters()) for p in (fast, ref, hi))
    for n in names:
        assert pr[n].grad is not None, n
        assert_within_ref_error(pf[n].grad, pr[n].grad, ph[n].grad, torch.float32, msg=n)


def test_matched_indices_equal_scipy_matcher_every_layer():
    fast, ref, _, _ = _trio()
    matcher = fast[1].matcher
    assert isinstance(matcher, LayerBatchedMatcher)
    images, mask, targets = _inputs()
    with torch.no_grad():
        out = ref[0](images, mask)
    layers = [out, *out["aux_outputs"]]
    assert len(layers) == 2
    got = matcher.match_all(out, targets)
    assert len(got) == len(layers)
    for layer, mine in zip(layers, got, strict=True):
        theirs = ref[1].matcher(layer, targets)
        for (i, j), (ti, tj), n in zip(mine, theirs, COUNTS, strict=True):
            assert len(ti) == n
            assert torch.equal(i.cpu(), ti) and torch.equal(j.cpu(), tj)
        # and the per-layer call path (what SetCriterion.forward makes) answers the same
        for (i, j), (ti, tj) in zip(matcher(layer, targets), theirs, strict=True):
            assert torch.equal(i.cpu(), ti) and torch.equal(j.cpu(), tj)


def test_three_sgd_steps_stay_equal():
    fast, ref, hi, _ = _trio()
    runs = [(fast, torch.float32), (ref, torch.float32), (hi, torch.float64)]
    opts = [torch.optim.SGD(p[0].parameters(), lr=0.05) for p, _ in runs]
    for _ in range(3):
        results = []
        for (pair, dtype), opt in zip(runs, opts, strict=True):
            opt.zero_grad()
            _, losses, total = _run(pair, dtype)
            total.backward()
            opt.step()
            results.append((losses, total))
        _check_losses(*(r[0] for r in results))
        assert_within_ref_error(*(r[1].detach() for r in results), torch.float32, msg="total")
    pf, pr, ph = (dict(p[0].named_parameters()) for p, _ in runs)
    for n in pr:
        assert_within_ref_error(pf[n].detach(), pr[n].detach(), ph[n].detach(), torch.float32, msg=n)


def test_same_parameters_report_and_second_patch():
    torch.manual_seed(0)
    model, crit = detr_peer.build()
    ref = copy.deepcopy((model, crit))
    ids = [id(p) for p in model.parameters()]
    keys = (list(model.state_dict()), list(crit.state_dict()))
    report = patch_detr(model, crit)
    assert [id(p) for p in model.parameters()] == ids
    assert (list(model.state_dict()), list(crit.state_dict())) == keys
    assert report.replaced > 0
    text = str(report)
    assert "criterion.matcher" in text and "LayerBatchedMatcher" in text
    assert "criterion.loss_boxes" in text
    for name in ("transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.1.self_attn",
                 "transformer.decoder.layers.1.multihead_attn"):
        assert name in text, name
    matcher = crit.matcher
    again = patch_detr(model, crit)
    assert crit.matcher is matcher and isinstance(crit, detr_peer.SetCriterion)
    assert [id(p) for p in model.parameters()] == ids
    assert again.skipped  # reports what is already patched
    hi = copy.deepcopy(ref)
    hi[0].double(), hi[1].double()
    _check_losses(_run((model, crit), torch.float32)[1], _run(ref, torch.float32)[1], _run(hi, torch.float64)[1])


def test_drop_weights_exactly_on_discarding_call_sites():
    fast, _, _, _ = _trio()
    model = fast[0]
    attn = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    assert len(attn) == 2 + 2 * 2  # 2 encoder self_attn, 2 decoder (self_attn, multihead_attn)
    for n, m in attn.items():
        assert type(m) is MultiheadAttention, n
        site = n.rsplit(".", 1)[-1] in ("self_attn", "multihead_attn") and ".layers." in n
        assert m.drop_weights is site, n
    # an nn.MultiheadAttention at an unknown call site gets drop_weights=False
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(8, 2)
    patch_detr(holder)
    assert type(holder.attn) is MultiheadAttention and holder.attn.drop_weights is False


def test_patch_detr_switches_this_repos_unit():
    import unit_fast

    cfg = unit_fast.load_config("tiny")
    model = unit_fast.build_model({**cfg, "model": {**cfg["model"], "implementation": "reference"}})
    assert model.implementation == "reference"
    crits = list(model.det_losses.values())
    assert crits and all(c.implementation == "reference" for c in crits)
    ids = [id(p) for p in model.parameters()]
    report = patch_detr(model)
    assert model.implementation == "fast"
    assert all(c.implementation == "fast" for c in model.det_losses.values())
    assert [id(p) for p in model.parameters()] == ids
    assert report.replaced > 0
    assert "UniT.set_implementation" in str(report)
    assert patch_detr(model).skipped
