"""The LSA kernel's workload under ``compute-sanitizer`` (run by ``sanitizer.py``): a few solves
on CUDA -- rectangular, square, ragged ``num_cols``, empty and infeasible problems -- each
checked against scipy, so a kernel that only looked clean but was wrong still fails.

``python -m benchmarks.gpu_check.lsa_sanitize [--quick]``; exit status 0 when every total is right.
"""

import sys

import torch

import unit_fast
from unit_fast.ops.hungarian_match.reference import hungarian_match_ref


def main(quick=False):
    gen = torch.Generator().manual_seed(0)
    # (B, N, M): rectangular, square, N < M, and few problems of >= 256 columns (the cluster path
    # on sm_90: distributed shared memory and cluster barriers under the sanitizer too).
    shapes = [(4, 30, 7), (3, 17, 17), (2, 5, 9), (2, 260, 40)]
    if not quick:
        shapes += [(8, 100, 20), (4, 64, 64), (3, 900, 50)]
    bad = 0
    for B, N, M in shapes:
        cost = torch.rand(B, N, M, generator=gen)
        num_cols = torch.randint(0, M + 1, (B,), generator=gen)
        cost[0, :, 0] = float("inf")  # one forbidden column in problem 0
        for nc in (None, num_cols):
            out = unit_fast.batched_linear_sum_assignment(cost.cuda(), None if nc is None else nc.cuda(),
                                                          backend="cpp").cpu()  # host sync
            ref = hungarian_match_ref(cost, nc)
            c = cost.double()
            for b in range(B):
                got = sum(c[b, i, j].item() for i, j in enumerate(out[b].tolist()) if j >= 0)
                want = sum(c[b, i, j].item() for i, j in enumerate(ref[b].tolist()) if j >= 0)
                if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                    bad += 1
                    print(f"problem {(B, N, M)}[{b}] num_cols={nc}: total {got} != scipy {want}")
    torch.cuda.synchronize()
    print(f"lsa_sanitize: {bad} wrong total(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv[1:]))
