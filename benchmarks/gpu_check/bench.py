"""Timing on CUDA and the headline benchmark cases, each with its baselines in the same run.

``measure`` warms up (compilation, autotuning, allocator), then times single calls between CUDA
events (median), cycling the input sets, and records peak memory
(``torch.cuda.max_memory_allocated``) and host syncs (CUPTI, ``benchmarks.conftest``).  The
providers and baselines are the pytest-benchmark suites' own (``benchmarks/bench_*.py``), so a
figure here and one from ``pytest benchmarks/`` time the same code.  Imported on CUDA only.
"""

import functools
import os
import statistics

import pytest
import torch

from benchmarks import shapes as S
from benchmarks.conftest import count_host_syncs, peak_mem_mb
from benchmarks.gpu_check.report import Check, case

DEVICE = "cuda"
MIN_TIME_S = 0.2  # timed calls per provider: enough for ~0.2 s, between 3 and MAX_ITERS
MAX_ITERS = 25
SKIPPED = (Exception, pytest.skip.Exception)  # bench helpers call pytest.skip / importorskip


def time_ms(fn, inputs, warmup=1):
    """Median milliseconds of ``fn(x)`` over ``inputs`` (cycled), each call between CUDA events."""
    for _ in range(warmup):
        for x in inputs:
            fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(inputs[0])
    end.record()
    end.synchronize()  # sync: sizes the timed loop
    one_ms = max(start.elapsed_time(end), 1e-3)
    n = int(min(MAX_ITERS, max(3, MIN_TIME_S * 1e3 / one_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i, (a, b) in enumerate(events):
        a.record()
        fn(inputs[i % len(inputs)])
        b.record()
    torch.cuda.synchronize()  # sync: read the events
    return statistics.median(a.elapsed_time(b) for a, b in events)


def measure(fn, inputs):
    """``{"ms", "peak_mem_mb", "host_syncs"}`` of ``fn`` over ``inputs``."""
    ms = time_ms(fn, inputs)
    return {"ms": ms, "peak_mem_mb": peak_mem_mb(lambda: fn(inputs[0]), DEVICE),
            "host_syncs": count_host_syncs(lambda: fn(inputs[0]), DEVICE)}


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _side_by_side(run, item, name, shape, dtype, ours, providers, inputs, **extra):
    """Times ``ours`` and every ``providers[name]`` on ``inputs``; adds one case to ``run``.

    A baseline that cannot run (missing tool, refused inputs, out of memory) is skipped with
    its reason; so is the case when unit_fast itself cannot run (and a check failure recorded).
    """
    try:
        mine = measure(ours, inputs)
    except SKIPPED as e:
        run.checks.append(Check(item.topic, f"bench:{name}", "fail", dtype, shape,
                                f"unit_fast failed: {e!r}"[:500]))
        _free()
        return
    _side_by_side_measured(run, item, name, shape, dtype, mine, providers, inputs, **extra)


def _side_by_side_measured(run, item, name, shape, dtype, mine, providers, inputs, **extra):
    """``_side_by_side`` with unit_fast's ``measure`` result ``mine`` already taken."""
    skipped = dict(item.skipped_baselines)
    base, base_mem = {}, {}
    for b, fn in providers.items():
        if b in skipped:
            continue
        try:
            m = measure(fn, inputs)
            base[b], base_mem[b] = m["ms"], m["peak_mem_mb"]
        except SKIPPED as e:
            skipped[b] = f"{type(e).__name__}: {e}"[:300]
        _free()
    for b, why in skipped.items():
        run.add_skip(item.topic, f"{name} baseline {b}", why)
    run.add_case(item.topic, case(name, shape, dtype, mine["ms"], base, mine["host_syncs"],
                                  mine["peak_mem_mb"], baselines_peak_mem_mb=base_mem,
                                  baselines_skipped=skipped, **extra))
    _free()


def bench_lsa(item, run):
    import unit_fast
    from benchmarks import bench_hungarian_match as H

    ours = functools.partial(unit_fast.batched_linear_sum_assignment, backend="cpp")
    for name in item.shapes:
        shape = S.LSA_SHAPES[name]
        inputs = S.lsa_costs(shape, DEVICE)
        providers = {}
        for b in item.baselines:
            if b in item.skipped_baselines:
                continue
            try:
                providers[b] = H._solver(b, shape, inputs)
            except SKIPPED as e:
                item.skipped_baselines[b] = str(e)
        if "torch_linear_assignment" in providers:
            from torch_linear_assignment import assignment

            if not assignment._cuda_uses_triton(inputs[0]):
                del providers["torch_linear_assignment"]
                run.add_skip(item.topic, f"{name} baseline torch_linear_assignment",
                             "no Triton path here; it would time its scipy fallback")
        # The cluster path (few problems of >= 256 columns) against the block path it replaces,
        # same run: the launcher's choice is a design decision no GPU has measured yet.
        no_cluster = measure(_without_lsa_cluster(ours), inputs)["ms"]
        _side_by_side(run, item, name, shape.as_dict(), "float32", ours, providers, inputs,
                      variants={"unit_fast_cluster_off": round(no_cluster, 4)})


def _without_lsa_cluster(fn):
    """``fn`` run with ``UNIT_FAST_LSA_CLUSTER=0`` (the CUDA launcher reads it on every call)."""
    def run(*args):
        old = os.environ.get("UNIT_FAST_LSA_CLUSTER")
        os.environ["UNIT_FAST_LSA_CLUSTER"] = "0"
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["UNIT_FAST_LSA_CLUSTER"]
            else:
                os.environ["UNIT_FAST_LSA_CLUSTER"] = old
    return run


def bench_matcher(item, run):
    from benchmarks import bench_hungarian_match as H

    for name in item.shapes:
        setting = S.MATCHER_SETTINGS[name]
        outputs, targets = S.matcher_inputs(setting, DEVICE)
        ours = H._matcher("unit_fast_match_all_keep_on_device", targets)
        providers = {"detr_matcher": H._matcher("detr_matcher", targets)}
        cpu_indices = measure(H._matcher("unit_fast_match_all", targets), [outputs])["ms"]
        _side_by_side(run, item, name, setting.as_dict(), "float32", ours, providers, [outputs],
                      variants={"unit_fast_match_all_cpu_indices": round(cpu_indices, 4)})


def bench_matching_cost(item, run):
    from benchmarks import bench_matching_cost as M

    for name in item.shapes:
        shape = S.MATCHING_COST_SHAPES[name]
        inputs = S.matching_cost_inputs(shape, DEVICE)
        providers = {b: M._provider(b) for b in item.baselines}
        ours = M._provider("unit_fast_triton")
        _side_by_side(run, item, name, shape.as_dict(), "float32", ours, providers, inputs)


def bench_box_loss(item, run):
    from benchmarks import bench_box_loss as X

    for name in item.shapes:
        shape = S.BOX_LOSS_SHAPES[name]
        inputs = [(src.requires_grad_(), tgt) for src, tgt in S.box_loss_pairs(shape, DEVICE)]

        def call(provider, shape=shape):
            return X._forward_backward(X._losses_fn(provider), float(shape.N))

        providers = {b: call(b) for b in item.baselines}
        ours = call("unit_fast_triton")
        _side_by_side(run, item, name, shape.as_dict(), "float32", ours, providers, inputs)


def bench_attention(item, run):
    """Forward + backward of a training-mode attention layer (bench_attention's providers), bf16;
    each provider's eval-mode output is checked first against torch MHA's reference call."""
    from benchmarks import bench_attention as A

    dtype = torch.bfloat16
    for name in item.shapes:
        shape = S.ATTENTION_SHAPES[name]
        gen = torch.Generator().manual_seed(S.SEED + 2)
        inputs = []
        for x in S.attention_inputs(shape, DEVICE, dtype):
            for t in A._leaves(x):
                t.requires_grad_()
            inputs.append((*x, torch.randn(shape.L, shape.B, shape.E, generator=gen).to(DEVICE, dtype)))

        def provider(p, shape=shape, inputs=inputs):
            module = A._module(p, shape, DEVICE, dtype)
            forward = A._forward_fn(p)
            call = A._timed_call(forward, module, "fwdbwd")
            if p in A.SDPA_BACKENDS:
                A._skip_if_refused(p, call, inputs[0], DEVICE)  # pytest.skip with torch's reasons
            A._check_once(p, DEVICE, shape, dtype, module, forward, inputs[0])
            return call

        try:
            ours = provider("unit_fast_triton")
        except AssertionError as e:
            run.checks.append(Check(item.topic, f"bench:{name}:vs_mha", "fail", "bfloat16", shape.as_dict(),
                                    str(e)[:500]))
            continue
        run.checks.append(Check(item.topic, f"bench:{name}:vs_mha", "pass", "bfloat16", shape.as_dict(),
                                "eval-mode output vs torch MHA's reference call (bench_attention's check)"))
        providers = {}
        for b in item.baselines:
            try:
                providers[b] = provider(b)
            except SKIPPED as e:
                item.skipped_baselines[b] = f"{type(e).__name__}: {e}"[:300]
        _side_by_side(run, item, name, shape.as_dict(), "bfloat16", ours, providers, inputs, pass_="fwdbwd",
                      dropout=A.DROPOUT, note="flex_attention runs without dropout (it has none)")


def bench_moe_dispatch(item, run):
    """Forward + backward (all six gradients) of bench_moe_dispatch's providers, gelu experts, in
    each of ``item.dtypes``: ``moe_dispatch(backend="triton")`` against ``item.baselines``."""
    from benchmarks import bench_moe_dispatch as X

    ours = X._forward_backward(X._provider("unit_fast_triton"))
    providers = {b: X._forward_backward(X._provider(b)) for b in item.baselines}
    for name in item.shapes:
        shape = S.MOE_DISPATCH_SHAPES[name]
        for dname in item.dtypes:
            dtype = getattr(torch, dname)
            inputs = [X._leaves(x) for x in S.moe_dispatch_inputs(shape, DEVICE, dtype=dtype)]
            _side_by_side(run, item, name, shape.as_dict(), dname, ours, providers, inputs,
                          activation=X.ACTIVATION, pass_="fwdbwd")
            del inputs
            _free()


def bench_unit_step(item, run):
    """MMF's reference step (float32) against the fast step (bf16 autocast), twice: on the very
    same batch of ``bench_unit_step.SAME_BATCH`` images (the per-step ratio), then MMF's one image
    per step against the largest batch of ``params["fast_batches"]`` that fits (samples/s)."""
    from benchmarks import bench_unit_step as U

    for name in item.shapes:
        setting = S.UNIT_STEP_SETTINGS[name]
        for mode, fast_batches, ref_batches in (("same", (U.SAME_BATCH,), (U.SAME_BATCH,)),
                                                 ("max", item.params["fast_batches"], (1,))):
            results = {}
            for provider, batches in (("unit_fast", fast_batches), ("mmf_reference", ref_batches)):
                model, params, optimizer = U._build(setting, provider, DEVICE)
                step = U._step_fn(model, params, optimizer)
                best = None
                for bs in batches:
                    try:
                        inputs = [S.unit_step_batch(setting, bs, DEVICE, seed=s) for s in range(2)]
                        m = measure(step, inputs)
                        best = (bs, m)
                    except torch.cuda.OutOfMemoryError:
                        break
                    finally:
                        optimizer.zero_grad(set_to_none=True)
                        _free()
                del model, params, optimizer
                _free()
                results[provider] = best
            case_name = f"{name}:{mode}"
            if results["unit_fast"] is None:
                run.checks.append(Check(item.topic, f"bench:{case_name}", "fail", "bfloat16",
                                        setting.as_dict(), "the fast step ran out of memory at every batch"))
                continue
            (bs, ours), ref = results["unit_fast"], results["mmf_reference"]
            per_s = {"unit_fast": bs / ours["ms"] * 1e3}
            if ref is not None:
                per_s["mmf_reference"] = ref[0] / ref[1]["ms"] * 1e3
            run.add_case(item.topic, case(
                case_name, setting.as_dict(), "bfloat16", ours["ms"],
                {"mmf_reference": None if ref is None else ref[1]["ms"]}, ours["host_syncs"],
                ours["peak_mem_mb"],
                baselines_peak_mem_mb={} if ref is None else {"mmf_reference": ref[1]["peak_mem_mb"]},
                samples_per_step={"unit_fast": bs, "mmf_reference": None if ref is None else ref[0]},
                samples_per_s={k: round(v, 2) for k, v in per_s.items()},
                baselines_dtype={"mmf_reference": "float32"}, batch_mode=mode))


def bench_patch_transformers(item, run):
    """transformers' own loss (``bench_patch_transformers._call``) unpatched, against the same call
    under ``patch_transformers(families=[family])``; the patched loss is checked against the
    unpatched one first (a failed check is recorded and the case not timed).  The patch is
    entered once around the timed calls (as a user's ``with`` block is), not per call."""
    from benchmarks import bench_patch_transformers as X
    from unit_fast.patch.transformers import patch_transformers

    for name in item.shapes:
        family, B, Q, C, T, L = X.SETTINGS[name]
        shape = {"B": B, "Q": Q, "C": C, "T": T, "L": L}
        loss = X._call(name, DEVICE)
        inputs = [X._inputs(name, DEVICE, s) for s in range(2)]
        want = [loss(x) for x in inputs]
        with patch_transformers(families=[family]) as report:
            got = [loss(x) for x in inputs]
            try:
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            except AssertionError as e:
                run.checks.append(Check(item.topic, f"bench:{name}:vs_transformers", "fail", "float32", shape,
                                        str(e)[:500]))
                continue
            run.checks.append(Check(item.topic, f"bench:{name}:vs_transformers", "pass", "float32", shape,
                                    f"patched {family} loss vs transformers' own ({report.replaced} "
                                    "functions replaced)"))
            mine = measure(loss, inputs)
        _side_by_side_measured(run, item, name, shape, "float32", mine, {"transformers": loss}, inputs,
                               family=family)


BENCHES = {"lsa": bench_lsa, "matcher": bench_matcher, "matching_cost": bench_matching_cost,
           "box_loss": bench_box_loss, "attention": bench_attention, "moe_dispatch": bench_moe_dispatch,
           "unit_step": bench_unit_step, "patch_transformers": bench_patch_transformers}
