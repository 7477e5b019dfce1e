# ruff: noqa: B023  (every check closure runs at once, inside its loop iteration: _record calls it)
"""Every CUDA and Triton path against its reference, at benchmark shapes, in bf16, fp16 and fp32.

Rules are the tests' (house style section 7, ``unit_fast.testing``): discrete ops compare
totals with scipy's optimum (never indices), reductions / attention / losses use
``assert_within_ref_error`` (within 2x the reference's own error in the test dtype, against a
float64 or float32 reference), elementwise costs ``assert_close``.  Each claim of "no host sync"
is run under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up call.  Each check
appends ``report.Check`` records; an exception inside a check is a failure with its message.
Imported on CUDA only.
"""

import contextlib
import time

import torch

from benchmarks import shapes as S
from benchmarks.gpu_check.report import Check
from unit_fast.testing import assert_within_ref_error

DEVICE = "cuda"
DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# LSA totals in float64 on float32 costs (fp16 / bf16 costs are solved in float32): rounding only.
TOTAL_TOL = {"rtol": 1e-5, "atol": 1e-5}
# matching_cost: a float32 output from dtype-rounded inputs vs float64 on the same rounded
# inputs; cdist-vs-broadcast and fused-vs-unfused float32 rounding only (bench_matching_cost).
COST_TOL = {"rtol": 1e-5, "atol": 1e-4}


@contextlib.contextmanager
def no_host_sync():
    """Raises RuntimeError on any host sync torch makes inside (sync debug mode "error")."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _record(run, topic, name, dtype, shape, fn):
    """Runs ``fn() -> detail`` and records pass, or fail with the exception."""
    start = time.perf_counter()
    try:
        detail = fn() or ""
        status = "pass"
    except Exception as e:  # a failing check, whatever raised
        status, detail = "fail", f"{type(e).__name__}: {e}"[:800]
    seconds = round(time.perf_counter() - start, 2)
    run.checks.append(Check(topic, name, status, dtype, shape, detail, seconds=seconds))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _sync_claim(run, topic, name, shape, fn):
    """``fn`` (already warmed up) must make no host sync."""

    def check():
        with no_host_sync():
            fn()
        torch.cuda.synchronize()
        return "no host sync under set_sync_debug_mode('error')"

    _record(run, topic, f"{name}:no_host_sync", None, shape, check)


# ---------------------------------------------------------------------------------------- lsa


def _totals(cost, assign):
    """float64 total and assigned-row count per problem, and whether ``assign`` is a valid
    partial permutation (every column at most once)."""
    c = cost.detach().double().cpu()
    a = assign.cpu()
    taken = a >= 0
    picked = c.gather(2, a.clamp(min=0)[..., None])[..., 0]
    cols = torch.where(taken, a, -1 - torch.arange(a.shape[1]))  # distinct negatives for untaken rows
    valid = all(len(set(row.tolist())) == row.numel() for row in cols)
    return (picked * taken).sum(1), taken.sum(1), valid


def check_lsa(item, run):
    import unit_fast
    from unit_fast.ops.hungarian_match.reference import hungarian_match_ref

    solve = unit_fast.batched_linear_sum_assignment
    for name in item.shapes:
        shape = S.LSA_SHAPES[name]
        base = S.lsa_costs(shape, DEVICE, num_sets=1)[0]
        gen = torch.Generator().manual_seed(S.SEED + 3)
        num_cols = torch.randint(0, shape.T + 1, (shape.B,), generator=gen)  # ragged, some empty
        for dname in item.dtypes:
            cost = base.to(DTYPE[dname])

            def check(cost=cost):
                for nc in (None, num_cols):
                    out = solve(cost, None if nc is None else nc.to(DEVICE), backend="cpp")
                    ref = hungarian_match_ref(cost.float().cpu(), nc)
                    got, count, valid = _totals(cost.float(), out)
                    want, want_count, _ = _totals(cost.float(), ref)
                    assert out.device.type == "cuda" and valid, "not a valid partial permutation"
                    assert torch.equal(count, want_count), "wrong number of assignments"
                    torch.testing.assert_close(got, want, **TOTAL_TOL)
                return "totals equal scipy's (all columns, and ragged num_cols)"

            _record(run, item.topic, "solve_vs_scipy", dname, name, check)
        nc_dev = num_cols.to(DEVICE)
        solve(base, nc_dev, backend="cpp")
        _sync_claim(run, item.topic, "solve", name, lambda b=base, n=nc_dev: solve(b, n, backend="cpp"))


# ------------------------------------------------------------------------------------ matcher


def check_matcher(item, run):
    import unit_fast
    from unit_fast.ops.hungarian_match.reference import hungarian_matcher_ref

    for name in item.shapes:
        setting = S.MATCHER_SETTINGS[name]
        outputs32, targets = S.matcher_inputs(setting, DEVICE)
        matcher = unit_fast.HungarianMatcher(**S.MATCHER_COSTS, keep_on_device=True)
        for dname in item.dtypes:
            dt = DTYPE[dname]
            outputs = {k: v.to(dt) for k, v in outputs32.items() if k != "aux_outputs"}
            outputs["aux_outputs"] = [{k: v.to(dt) for k, v in a.items()} for a in outputs32["aux_outputs"]]

            def check(outputs=outputs):
                layers = [outputs, *outputs["aux_outputs"]]
                got = matcher.match_all(outputs, targets)
                assert len(got) == setting.layers
                for layer, pairs in zip(layers, got, strict=True):
                    plain = {k: v.float() for k, v in layer.items() if k != "aux_outputs"}
                    ref = hungarian_matcher_ref(plain, targets, **S.MATCHER_COSTS)
                    cost = _detr_cost(layer, targets)  # [B, Q, T] float64
                    for b, ((i, j), (ri, rj)) in enumerate(zip(pairs, ref, strict=True)):
                        assert i.device.type == "cuda" and len(i) == len(ri) == min(setting.Q, setting.T)
                        g, w = cost[b, i.cpu(), j.cpu()].sum(), cost[b, ri, rj].sum()
                        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
                return "every layer's totals equal DETR's matcher (scipy), indices stay on the GPU"

            _record(run, item.topic, "match_all_vs_detr", dname, name, check)
        matcher.match_all(outputs32, targets)
        _sync_claim(run, item.topic, "match_all_keep_on_device", name,
                    lambda o=outputs32, t=targets: matcher.match_all(o, t))


def _detr_cost(layer, targets):
    """Per-image float64 matcher costs ``(B, Q, T)`` by the reference (every image has T targets)."""
    from unit_fast.ops.matching_cost import matching_cost_ref

    labels = torch.stack([t["labels"] for t in targets])
    tboxes = torch.stack([t["boxes"] for t in targets]).double()
    nt = torch.full((labels.shape[0],), labels.shape[1], device=labels.device)
    cost = matching_cost_ref(layer["pred_logits"].double(), layer["pred_boxes"].double(), labels, tboxes, nt,
                             **S.MATCHER_COSTS)
    return cost.cpu()


# ------------------------------------------------------------------------------ matching_cost


def check_matching_cost(item, run):
    from unit_fast.ops.matching_cost import matching_cost, matching_cost_ref

    for name in item.shapes:
        shape = S.MATCHING_COST_SHAPES[name]
        x32 = S.matching_cost_inputs(shape, DEVICE, num_sets=1)[0]
        for dname in item.dtypes:
            dt = DTYPE[dname]
            x = (x32[0].to(dt), x32[1].to(dt), *x32[2:])

            def check(x=x):
                out = matching_cost(*x, **S.MATCHER_COSTS, backend="triton")
                ref = matching_cost_ref(x[0].double(), x[1].double(), x[2], x[3].double(), x[4],
                                        **S.MATCHER_COSTS)
                assert out.dtype == torch.float32
                torch.testing.assert_close(out.double(), ref, **COST_TOL)
                return "float32 cost vs float64 reference on the same rounded inputs"

            _record(run, item.topic, "triton_vs_reference", dname, name, check)
        call = lambda x=x32: matching_cost(*x, **S.MATCHER_COSTS, backend="triton")  # noqa: E731
        call()
        _sync_claim(run, item.topic, "matching_cost", name, call)


# ----------------------------------------------------------------------------------- box_loss


def _box_loss_run(fn, src, tgt, n):
    src = src.detach().clone().requires_grad_()
    loss_bbox, loss_giou = fn(src, tgt, n)
    (grad,) = torch.autograd.grad(5.0 * loss_bbox + 2.0 * loss_giou, src)
    return loss_bbox.detach(), loss_giou.detach(), grad


def check_box_loss(item, run):
    from unit_fast.ops.box_loss import box_loss, box_loss_ref

    triton = lambda s, t, n: box_loss(s, t, n, backend="triton")  # noqa: E731
    for name in item.shapes:
        shape = S.BOX_LOSS_SHAPES[name]
        src32, tgt32 = S.box_loss_pairs(shape, DEVICE, num_sets=1)[0]
        for dname in item.dtypes:
            dt = DTYPE[dname]
            src, tgt = src32.to(dt), tgt32.to(dt)

            def check(src=src, tgt=tgt, dt=dt):
                got = _box_loss_run(triton, src, tgt, float(shape.N))
                hi = _box_loss_run(box_loss_ref, src.double(), tgt.double(), float(shape.N))
                lo = _box_loss_run(box_loss_ref, src, tgt, float(shape.N))
                for what, g, h, low in zip(("loss_bbox", "loss_giou", "grad_src"), got, hi, lo, strict=True):
                    assert_within_ref_error(g.cpu(), low.cpu(), h.cpu(), dt, msg=what)
                return "losses and gradient within 2x the reference's own error"

            _record(run, item.topic, "triton_vs_reference", dname, name, check)
        call = lambda s=src32, t=tgt32: _box_loss_run(triton, s, t, float(shape.N))  # noqa: E731
        call()
        _sync_claim(run, item.topic, "box_loss_fwd_bwd", name, call)


# ------------------------------------------------------------------------------ pairwise_giou


def _giou_run(fn, a, b):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = fn(a, b)
    w = torch.linspace(0.5, 1.5, out.shape[1], device=out.device, dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad((out * w).sum(), (a, b)))


def check_pairwise_giou(item, run):
    from unit_fast.ops.pairwise_giou import pairwise_giou, pairwise_giou_ref

    triton = lambda a, b: pairwise_giou(a, b, backend="triton")  # noqa: E731
    for name in item.shapes:
        shape = S.PAIRWISE_GIOU_SHAPES[name]
        a32, b32 = S.pairwise_boxes(shape, DEVICE, num_sets=1)[0]
        for dname in item.dtypes:
            dt = DTYPE[dname]
            a, b = a32.to(dt), b32.to(dt)

            def check(a=a, b=b, dt=dt):
                got = _giou_run(triton, a, b)
                hi = _giou_run(pairwise_giou_ref, a.double(), b.double())
                lo = _giou_run(pairwise_giou_ref, a, b)
                for what, g, h, low in zip(("giou", "grad_a", "grad_b"), got, hi, lo, strict=True):
                    assert_within_ref_error(g.cpu(), low.cpu(), h.cpu(), dt, msg=what)
                return "matrix and gradients within 2x the reference's own error"

            _record(run, item.topic, "triton_vs_reference", dname, name, check)
        call = lambda a=a32, b=b32: _giou_run(triton, a, b)  # noqa: E731
        call()
        _sync_claim(run, item.topic, "pairwise_giou_fwd_bwd", name, call)


# ---------------------------------------------------------------------------------- attention


def _heads(x, H):
    """``(seq, B, E)`` -> ``(B, H, seq, D)`` strided view, as MultiheadAttention passes it."""
    return x.unflatten(-1, (H, x.shape[-1] // H)).permute(1, 2, 0, 3)


def _attention_grads(fn, q, k, v, kpm, grad, chunk=None):
    """``(out, dq, dk, dv)`` of ``fn(q, k, v, kpm)``, batch-chunked (the reference materialises
    ``(B, H, L, S)`` scores: chunks keep DC5's float64 under a few GB)."""
    chunk = chunk or q.shape[0]
    outs = []
    for s in range(0, q.shape[0], chunk):
        leaves = [t[s:s + chunk].detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, kpm[s:s + chunk])
        outs.append((out.detach(), *torch.autograd.grad(out, leaves, grad[s:s + chunk])))
    return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def _attention_case(shape, dt):
    query, key, value, kpm = S.attention_inputs(shape, DEVICE, dt, num_sets=1)[0]
    H = shape.H
    q, k, v = _heads(query, H), _heads(key, H), _heads(value, H)
    gen = torch.Generator().manual_seed(S.SEED + 4)
    grad = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen).to(DEVICE, dt)
    return q, k, v, kpm, grad


def _check_attention(q, k, v, kpm, grad, dt, fn):
    from unit_fast.ops.attention import attention_ref

    got = _attention_grads(fn, q, k, v, kpm, grad)
    hi = _attention_grads(attention_ref, q.double(), k.double(), v.double(), kpm, grad.double(), 2)
    lo = _attention_grads(lambda *a: attention_ref(*a, upcast=False), q, k, v, kpm, grad, 2)
    for what, g, h, low in zip(("out", "dq", "dk", "dv"), got, hi, lo, strict=True):
        assert_within_ref_error(g.cpu(), low.cpu(), h.cpu(), dt, msg=what)


def check_attention(item, run):
    from unit_fast.ops.attention import attention

    fn = lambda q, k, v, kpm: attention(q, k, v, kpm, backend="triton")  # noqa: E731
    for name in item.shapes:
        shape = S.ATTENTION_SHAPES[name]
        for dname in item.dtypes:
            dt = DTYPE[dname]

            def check(dt=dt):
                _check_attention(*_attention_case(shape, dt), dt, fn)
                return "out, dq, dk, dv within 2x the reference's own error (key padding on)"

            _record(run, item.topic, "triton_vs_reference", dname, name, check)
        q, k, v, kpm, grad = _attention_case(shape, torch.bfloat16)
        q.requires_grad_()
        call = lambda: torch.autograd.grad(fn(q, k, v, kpm), q, grad)  # noqa: E731
        call()
        _sync_claim(run, item.topic, "attention_fwd_bwd", name, call)


# ------------------------------------------------------------------------------- moe_dispatch


def _moe_run(fn, args, activation):
    """``(y, dx, dgates, dw1, db1, dw2, db2)`` of ``fn`` on ``args`` (the 7 op arguments + grad_y)."""
    *op_args, grad_y = args
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in op_args]
    y = fn(*leaves, activation)
    diff = [t for t in leaves if t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, diff, grad_y)]


def check_moe_dispatch(item, run):
    """Each backend in ``item.params["backends"]``, values and all six gradients, within 2x the
    error of an oracle run in the test dtype (against it in float64): the per-token reference
    where it is affordable (relu and gelu), else the per-expert loop peer (gelu only: relu's
    kink makes a float32-vs-float64 comparison of its gradients flip where a pre-activation
    rounds to 0; the CPU tests check relu against the reference)."""
    import functools

    from benchmarks import bench_moe_dispatch as X
    from unit_fast.ops.moe_dispatch import moe_dispatch, moe_dispatch_ref

    for name in item.shapes:
        shape = S.MOE_DISPATCH_SHAPES[name]
        with_reference = shape.N * shape.k <= S.MOE_DISPATCH_REFERENCE_MAX_SLOTS
        oracle_hi = moe_dispatch_ref if with_reference else X.per_expert_loop
        oracle_lo = functools.partial(moe_dispatch_ref, upcast=False) if with_reference else X.per_expert_loop
        base = S.moe_dispatch_inputs(shape, DEVICE, num_sets=1, dtype=torch.float64)[0]
        for activation in ("relu", "gelu") if with_reference else ("gelu",):
            hi = [t.cpu() for t in _moe_run(oracle_hi, base, activation)]
            for dname in item.dtypes:
                dt = DTYPE[dname]
                args = [t.to(dt) if t.is_floating_point() else t for t in base]
                lo = [t.cpu() for t in _moe_run(oracle_lo, args, activation)]
                for backend in item.params["backends"]:

                    def check(args=args, lo=lo, dt=dt, backend=backend, activation=activation):
                        fn = functools.partial(moe_dispatch, backend=backend)
                        got = _moe_run(lambda *a: fn(*a[:7], activation=a[7]), args, activation)
                        for what, g, h, low in zip(("y", "dx", "dgates", "dw1", "db1", "dw2", "db2"),
                                                   got, hi, lo, strict=True):
                            assert g.dtype == dt, f"{what}: {g.dtype}"
                            assert_within_ref_error(g.cpu(), low, h, dt, msg=what)
                        oracle = "the reference" if with_reference else "the per-expert loop"
                        return f"{activation}: y and six gradients within 2x {oracle}'s own error"

                    _record(run, item.topic, f"{backend}_vs_reference:{activation}", dname, name, check)


def time_moe_dispatch(item, run):
    """Kind "check" (see plan.py): the timing cases, recorded by ``bench.bench_moe_dispatch``."""
    from benchmarks.gpu_check.bench import bench_moe_dispatch

    before = len(run.checks)
    bench_moe_dispatch(item, run)
    if not any(c.status == "fail" for c in run.checks[before:]):  # _side_by_side records failures
        run.checks.append(Check(item.topic, item.name, "pass", None, None,
                                "timed: Triton vs the torch backend, the per-expert loop and padded bmm"))


@contextlib.contextmanager
def forced_config(tuner, config):
    """Runs ``tuner`` (a ``triton.autotune`` wrapper) with ``config`` only: with one config the
    autotuner launches it without benchmarking."""
    saved = tuner.configs
    tuner.configs = [config]
    try:
        yield
    finally:
        tuner.configs = saved


def check_autotune_configs(item, run):
    """Every candidate config the autotuner may pick (after its pruning), forward and both
    backward kernels, at head dims 32 (DC5 encoder) and 96 (decoder), dtypes in rotation."""
    from unit_fast.ops.attention import attention
    from unit_fast.ops.attention import triton as T

    fn = lambda q, k, v, kpm: attention(q, k, v, kpm, backend="triton")  # noqa: E731
    tuners = {n: T._launcher(n) for n in ("fwd", "dkdv", "dq")}
    for name in item.shapes:
        D = int(name.rsplit("_", 1)[1])
        pruned = {n: T._prune(t.configs, {"D": D, "DV": D}, kind=n) for n, t in tuners.items()}
        count = max(len(c) for c in pruned.values())
        # Awkward sizes: partial blocks everywhere, trailing and scattered key padding.
        shape = S.AttentionShape(f"configs_d{D}", 2, 203, 333, 2 * D, 2, (0.1, 0.3), False, "config sweep")
        for i in range(count):
            dname = item.dtypes[i % len(item.dtypes)]
            dt = DTYPE[dname]
            cfg = {n: c[i % len(c)] for n, c in pruned.items()}
            label = "; ".join(f"{n} {c}" for n, c in cfg.items())

            def check(dt=dt, cfg=cfg, label=label):
                with forced_config(tuners["fwd"], cfg["fwd"]), forced_config(tuners["dkdv"], cfg["dkdv"]), \
                        forced_config(tuners["dq"], cfg["dq"]):
                    _check_attention(*_attention_case(shape, dt), dt, fn)
                return label

            _record(run, item.topic, f"autotune_config_{i}", dname, name, check)


# ---------------------------------------------------------------------------------- unit_step

# Total-loss tolerance of the fast step (autocast in the dtype) against MMF's float32 reference
# step, relative.  Not from a measured error: bf16 rounds to 8 bits through ~20 layers, fp16 to
# 11, and these bounds are loose enough for that; float32 differs in summation order only.
STEP_RTOL = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}


def check_unit_step(item, run):
    """The fast and the reference implementation of one model, same parameters, same batch, in
    eval mode (no dropout): their total losses agree."""
    from benchmarks import bench_unit_step as U

    for name in item.shapes:
        setting = S.UNIT_STEP_SETTINGS[name]
        model, _, _ = U._build(setting, "mmf_reference", DEVICE)
        model.eval()
        sample = S.unit_step_batch(setting, 2, DEVICE)
        with torch.no_grad():
            want = sum(model(sample)["losses"].values()).item()  # host sync: a check
        for dname in item.dtypes:

            def check(dname=dname):
                model.set_implementation("fast")
                model.autocast = None if dname == "float32" else dname
                try:
                    with torch.no_grad():
                        got = sum(model(sample)["losses"].values()).item()  # host sync: a check
                finally:
                    model.set_implementation("reference")
                err = abs(got - want) / abs(want)
                assert err <= STEP_RTOL[dname], f"fast {got:.6g} vs reference {want:.6g}: rel {err:.2e}"
                return f"total loss fast {got:.6g} vs reference {want:.6g} (rel {err:.1e})"

            _record(run, item.topic, "fast_vs_reference_loss", dname, name, check)


CHECKS = {"lsa": check_lsa, "matcher": check_matcher, "matching_cost": check_matching_cost,
          "box_loss": check_box_loss, "pairwise_giou": check_pairwise_giou, "attention": check_attention,
          "autotune_configs": check_autotune_configs, "unit_step": check_unit_step,
          "moe_dispatch": check_moe_dispatch, "timing_vs_peers": time_moe_dispatch}


def run_check(item, run):
    """Dispatches a plan item of kind ``check``."""
    key = item.name if item.name in ("autotune_configs", "timing_vs_peers") else item.topic
    CHECKS[key](item, run)
