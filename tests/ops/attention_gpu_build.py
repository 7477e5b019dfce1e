"""Compiles the attention kernels for a GPU target with no GPU present; prints one JSON line per
kernel.  Run by ``test_attention_gpu_build.py`` in a subprocess: Triton's compiler needs
``TRITON_INTERPRET`` unset at import (with it set, ``@triton.jit`` builds interpreter objects).

Usage: ``python tests/ops/attention_gpu_build.py`` (prints ``{"case": ..., "shared": bytes}``,
or ``{"case": ..., "error": ...}``).
"""

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from unit_fast.ops.attention import triton as T  # noqa: E402

KERNELS = {"fwd": T._attention_fwd_kernel, "dkdv": T._attention_bwd_dkdv_kernel,
           "dq": T._attention_bwd_dq_kernel, "dropout_mask": T._attention_dropout_mask_kernel,
           "delta": T._attention_bwd_delta_kernel, "combine": T._attention_fwd_combine_kernel,
           "dq_reduce": T._attention_bwd_dq_reduce_kernel}
POINTER_TYPES = {"LSE_ptr": "*fp32", "Delta_ptr": "*fp32", "Bias_ptr": "*fp32", "KPM_ptr": "*u8",
                 "KVEnd_ptr": "*i32", "Mask_ptr": "*i8", "PartO_ptr": "*fp32", "PartLSE_ptr": "*fp32",
                 "PartDQ_ptr": "*fp32"}
SPLIT_KERNELS = ("fwd", "dq")  # the kernels with a SPLIT (key-range grid axis) variant


def signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, f"*{dtype}")
        elif name in ("qk_scale", "scale", "dropout_p"):
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def cases():
    """(name, arch, kernel, dtype, constexprs, options): every kernel with every option on, for
    each dtype (one head dim each, all four covered) on Hopper, at the autotuner's smallest
    tiles; plus the largest tiles in bf16 (the training dtype), the delta pre-kernel, the
    key-split variants of the forward and dQ kernels at the decoder's head dim 96 (which is where
    the launcher splits) with their combine / reduce kernels.  ptxas takes seconds per kernel, so
    this is a sample, not the autotuner's whole space."""
    plan = [("bf16", 32, "small"), ("fp16", 64, "small"), ("bf16", 96, "small"), ("fp32", 128, "small"),
            ("bf16", 64, "large")]
    for dtype, head_dim, size in plan:
        block_d = max(16, triton.next_power_of_2(head_dim))
        for name in ("fwd", "dkdv", "dq"):
            if size == "small":
                (bm, bn), warps = ((64, 32) if name == "fwd" else (32, 64)), 4
            else:
                (bm, bn), warps = ((128, 128) if name == "fwd" else (128, 64)), 8
            constexprs = dict(HAS_BIAS=True, HAS_KPM=True, HAS_DROPOUT=True,
                              DOT=T.DOT_IEEE if dtype == "fp32" else T.DOT_NATIVE,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_d)
            if name in SPLIT_KERNELS:
                constexprs["SPLIT"] = False
            yield (f"sm90-{name}-{dtype}-d{head_dim}-{bm}x{bn}", 90, KERNELS[name], dtype, constexprs,
                   dict(num_warps=warps, num_stages=2))
            if name in SPLIT_KERNELS and (dtype, head_dim) == ("bf16", 96):
                yield (f"sm90-{name}-{dtype}-d{head_dim}-{bm}x{bn}-split", 90, KERNELS[name], dtype,
                       dict(constexprs, SPLIT=True), dict(num_warps=warps, num_stages=2))
    yield ("sm90-dropout_mask", 90, KERNELS["dropout_mask"], "i8", dict(BLOCK_M=16, BLOCK_N=16), {})
    for dtype in ("bf16", "fp16", "fp32"):  # the delta pre-kernel at Dv = 128 (its launcher's tile)
        yield (f"sm90-delta-{dtype}", 90, KERNELS["delta"], dtype, dict(BLOCK_M=32, BLOCK_DV=128),
               dict(num_warps=4))
    for dtype in ("bf16", "fp32"):  # the split merges at head dim 96 -> 128 (their launcher's tile)
        yield (f"sm90-combine-{dtype}", 90, KERNELS["combine"], dtype, dict(BLOCK_M=32, BLOCK_DV=128),
               dict(num_warps=4))
        yield (f"sm90-dq_reduce-{dtype}", 90, KERNELS["dq_reduce"], dtype, dict(BLOCK_M=32, BLOCK_D=128),
               dict(num_warps=4))


def specialized(kernel, dtype, constexprs):
    """``(constexprs, attrs)`` as a real launch specialises the kernel: unit head-dim strides
    (contiguous last dims become the constant 1) and pointers, strides and head dims divisible
    by 16.  Without these no load can be vectorised, so none is pipelined either."""
    unit = {n: 1 for n in kernel.arg_names if n.startswith("stride_") and n.endswith("_d")}
    constexprs = dict(constexprs, **unit)
    sig = signature(kernel, dtype, constexprs)
    aligned = [i for i, n in enumerate(kernel.arg_names) if sig[n] != "constexpr" and n != "stride_kpm_b"
               and (n.endswith("_ptr") or n.startswith("stride_") or n in ("D", "DV"))]
    return constexprs, {(i,): [["tt.divisibility", 16]] for i in aligned}


def pipelined_cases():
    """The forward and dQ kernels as launched (``specialized``) in bf16: their full-block key loop
    has no data-dependent branch, so K/V loads become ``cp.async`` copies across stages; also
    split (the loop then starts at the split's first key, a runtime value)."""
    for split in (False, True):
        for name in ("fwd", "dq"):
            constexprs = dict(HAS_BIAS=False, HAS_KPM=True, HAS_DROPOUT=True, DOT=T.DOT_NATIVE, SPLIT=split,
                              BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64)
            yield (f"sm90-{name}-bf16-d64-128x64{'-split' if split else ''}-pipelined", 90, KERNELS[name],
                   "bf16", constexprs, dict(num_warps=8, num_stages=3))


def main():
    plan = [(c, False) for c in cases()] + [(c, True) for c in pipelined_cases()]
    for (case, arch, kernel, dtype, constexprs, options), spec in plan:
        attrs = None
        if spec:
            constexprs, attrs = specialized(kernel, dtype, constexprs)
        src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs,
                        attrs=attrs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            print(json.dumps({"case": case, "arch": arch, "shared": compiled.metadata.shared,
                              "cubin_bytes": len(compiled.asm["cubin"]),
                              "async_copies": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")}),
                  flush=True)
        except Exception as exc:  # reported per case by the test
            error = f"{type(exc).__name__}: {exc}"[:2000]
            print(json.dumps({"case": case, "arch": arch, "error": error}), flush=True)


if __name__ == "__main__":
    main()
