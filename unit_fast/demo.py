"""``python -m unit_fast.demo``: a batch of DETR-shaped matchings, timed against DETR's scipy loop.

Stands in as the quick-start job until the trainer (``python -m unit_fast.train``) lands.
Solves 6 decoder layers x 64 images x 100 queries x 20 targets, as one UniT/DETR detection
step does, checks that every total equals scipy's, and prints both times.  Timings on a
shared CPU are indicative; ``pytest benchmarks/ --benchmark-only`` measures properly.
"""

import argparse
import time

import scipy.optimize
import torch

from unit_fast import _backend, batched_linear_sum_assignment


def _scipy_loop(cost):
    host = cost.cpu()  # what DETR does: copy to the host, one scipy call per image
    return [scipy.optimize.linear_sum_assignment(host[b]) for b in range(host.shape[0])]


def _best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--targets", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    B = args.layers * args.batch
    cost = torch.rand(B, args.queries, args.targets, generator=g).to(args.device)
    sync = torch.cuda.synchronize if cost.is_cuda else (lambda: None)

    def ours():
        out = batched_linear_sum_assignment(cost)
        sync()
        return out

    assign = ours().cpu()
    ref = _scipy_loop(cost)
    host = cost.cpu().double()
    for b, (r, c) in enumerate(ref):
        rows = torch.nonzero(assign[b] >= 0).flatten()
        got, want = host[b, rows, assign[b, rows]].sum().item(), host[b, r, c].sum().item()
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            raise SystemExit(f"problem {b}: total {got} differs from scipy's {want}")

    t_ours = _best_of(ours, args.repeats)
    t_scipy = _best_of(lambda: _scipy_loop(cost), args.repeats)
    backend = _backend.backends_for("hungarian_match", args.device)[0]
    print(f"{B} assignment problems of {args.queries} queries x {args.targets} targets "
          f"({args.layers} decoder layers x {args.batch} images), device {args.device}")
    print("all totals equal scipy's")
    print(f"  scipy loop (DETR)            {t_scipy * 1e3:9.2f} ms")
    print(f"  unit_fast ({backend:<9})       {t_ours * 1e3:9.2f} ms   ({t_scipy / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
