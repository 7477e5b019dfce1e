"""Worker: compiles the Triton kernels for sm_90 with no GPU and prints one JSON line per compile.

Run by ``report.py`` in a subprocess with ``TRITON_INTERPRET`` unset (with it set, ``@triton.jit``
builds interpreter objects and ``_configs`` returns the interpreter's single config), as
``tests/ops/attention_gpu_build.py`` does.  Each compile goes TTIR -> PTX -> cubin through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; the ptxas it runs is
``TRITON_PTXAS_PATH`` (set by the parent), and its ``-v`` log (``TRITON_DUMP_PTXAS_LOG``) gives
registers and spills.

Usage: ``python -m benchmarks.kernel_report.triton_build [--all] [--shard I/N]``.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.kernel_report.ptxas import parse_ptxas  # noqa: E402

ARCH = 90
# Scalar arguments that are floats or 64-bit; every other non-pointer argument is i32.
FLOAT_ARGS = {"qk_scale", "scale", "dropout_p", "cost_class", "cost_bbox", "cost_giou"}
I64_ARGS = {"seed"}
DROPOUT = True  # UniT trains with dropout 0.1 (configs/defaults.yaml): the key the autotuner tunes
SMS = 132  # the report's GPU, an H100 SXM: the SM count the attention launcher's key_splits sees


def constexpr_names(kernel):
    return [p.name for p in kernel.params if p.is_constexpr]


def signature(kernel, dtype, constexprs, ptr_types=None):
    """Triton signature from the kernel's own ``arg_names``: constexprs as given, ``*_ptr`` of
    ``ptr_types[name]`` (default ``*dtype``), floats and i64 scalars by name, the rest i32."""
    ptr_types = ptr_types or {}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, f"*{dtype}")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in I64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _case(name, kernel, dtype, constexprs, options, setting, role=None, ptr_types=None, tuned=False):
    return dict(name=name, kernel=kernel, dtype=dtype, constexprs=constexprs, options=options,
                settings=[setting], role=role, ptr_types=ptr_types or {}, tuned=tuned)


def attention_settings(full):
    """``(setting, B, H, L, S, head dim, HAS_KPM, HAS_DROPOUT)``: UniT's attention calls
    (``benchmarks/shapes.py``; bf16 autocast), each an autotuning key.  The default covers the
    DC5 image encoder and the decoder's cross-attention; ``--all`` adds BERT, the decoder's
    self-attention (100 queries, no padding mask) and eval (no dropout)."""
    from benchmarks.shapes import ATTENTION_SHAPES

    def shape(name, kpm=True, dropout=DROPOUT, label=None, L=None, S=None):
        s = ATTENTION_SHAPES[name]
        return (label or name, s.B, s.H, L or s.L, S or s.S, s.E // s.H, kpm, dropout)

    out = [shape("unit_encoder_dc5"), shape("unit_decoder_cross")]
    if full:
        out += [shape("bert_base_l128"),
                shape("unit_decoder_cross", kpm=False, label="unit_decoder_self", S=100),
                shape("unit_encoder_dc5", dropout=False, label="unit_encoder_dc5/eval"),
                shape("unit_decoder_cross", dropout=False, label="unit_decoder_cross/eval"),
                shape("bert_base_l128", dropout=False, label="bert_base_l128/eval")]
    return out


def attention_cases(full):
    """Every config of ``_configs`` that survives ``_prune`` at each setting: those are the
    configs the autotuner can pick (its key holds no sequence length).  The forward and dQ
    kernels at the split count the launcher picks there on an H100 (``key_splits``: the
    decoder's cross-attention splits its keys), and then the split's combine and dQ reduce
    kernels at their launchers' fixed tiles."""
    from unit_fast.ops.attention import triton as T

    kernels = {"attention_fwd": "fwd", "attention_bwd_dkdv": "dkdv", "attention_bwd_dq": "dq"}
    bucket = getattr(T, "seq_bucket", lambda n: n)
    ptr_types = {"LSE_ptr": "*fp32", "Delta_ptr": "*fp32", "Bias_ptr": "*fp32", "KPM_ptr": "*u8",
                 "KVEnd_ptr": "*i32", "Mask_ptr": "*i8", "PartO_ptr": "*fp32", "PartLSE_ptr": "*fp32",
                 "PartDQ_ptr": "*fp32"}
    for setting, B, H, L, S, head_dim, kpm, dropout in attention_settings(full):
        block_d = max(16, triton.next_power_of_2(head_dim))
        n_split = T.key_splits(L, S, B, H, SMS)
        flags = dict(HAS_BIAS=False, HAS_KPM=kpm, HAS_DROPOUT=dropout, DOT=T.DOT_NATIVE)
        named = dict(D=head_dim, DV=head_dim, H=H, L=L, S=S, bucket_l=bucket(L), bucket_s=bucket(S),
                     n_split=n_split, SPLIT=n_split > 1, **flags)
        for name, short in kernels.items():
            # The launcher's own autotuner: its config list and its prune (with whatever options
            # the module binds), called as Triton calls it, on the launch's named arguments.
            tuner = T._launcher(short)
            kernel = tuner.fn
            args = {k: v for k, v in named.items() if k in kernel.arg_names}
            kernel_flags = {k: v for k, v in args.items() if k in flags or k == "SPLIT"}
            prune = tuner.early_config_prune
            for c in (prune(tuner.configs, args) if prune else tuner.configs):
                constexprs = dict(kernel_flags, BLOCK_D=block_d, BLOCK_DV=block_d, **c.kwargs)
                options = dict(num_warps=c.num_warps, num_stages=c.num_stages)
                if getattr(c, "maxnreg", None):
                    options["maxnreg"] = c.maxnreg
                role = "attention_fwd" if name == "attention_fwd" else "attention_bwd"
                yield _case(name, kernel, "bf16", constexprs, options, setting, role, ptr_types, tuned=True)
        if n_split > 1:
            block_m = T._row_block(block_d)
            yield _case("attention_fwd_combine", T._attention_fwd_combine_kernel, "bf16",
                        dict(BLOCK_M=block_m, BLOCK_DV=block_d), dict(num_warps=4), setting, "attention_fwd",
                        ptr_types)
            yield _case("attention_bwd_dq_reduce", T._attention_bwd_dq_reduce_kernel, "bf16",
                        dict(BLOCK_M=block_m, BLOCK_D=block_d), dict(num_warps=4), setting, "attention_bwd",
                        ptr_types)


def other_cases():
    """The untuned kernels at their launchers' fixed configs (UniT / DETR shapes: COCO's 92
    logits, up to 64 targets per image)."""
    from unit_fast.ops.box_loss import triton as BL
    from unit_fast.ops.matching_cost import triton as MC
    from unit_fast.ops.moe_dispatch import triton as MOE
    from unit_fast.ops.pairwise_giou import triton as PG

    f32 = {"Partial_ptr": "*fp32", "GradBbox_ptr": "*fp32", "GradGiou_ptr": "*fp32"}
    warps = dict(num_warps=BL.NUM_WARPS)
    yield _case("box_loss_fwd", BL._box_loss_fwd_kernel, "fp32", dict(ACC_FP64=False, BLOCK_N=BL.BLOCK_N),
                warps, "detr_loss", ptr_types=f32)
    yield _case("box_loss_bwd", BL._box_loss_bwd_kernel, "fp32",
                dict(ACC_FP64=False, NEED_DT=True, BLOCK_N=BL.BLOCK_N), dict(num_warps=BL.BWD_NUM_WARPS),
                "detr_loss", ptr_types=f32)
    # pairwise_giou's launcher: 32 x 32 tiles, Triton's default 4 warps.
    for name, kernel in (("pairwise_giou_fwd", PG._pairwise_giou_fwd_kernel),
                         ("pairwise_giou_bwd", PG._pairwise_giou_bwd_kernel)):
        yield _case(name, kernel, "fp32", dict(F64=False, BLOCK_N=32, BLOCK_M=32), dict(num_warps=4),
                    "detr_matcher")
    # matching_cost's launcher: BLOCK_Q 32, BLOCK_T = clamp(next_pow2(T), 16, 64) (T varies per
    # batch, so all three), BLOCK_C = next_pow2(92) = 128, 4 warps.
    for block_t in (16, 32, 64):
        yield _case("matching_cost_fwd", MC._matching_cost_fwd_kernel, "fp32",
                    dict(LOGSOFTMAX=False, BLOCK_Q=32, BLOCK_T=block_t, BLOCK_C=128), dict(num_warps=4),
                    "detr_matcher", ptr_types={"TL_ptr": "*i64", "NT_ptr": "*i64"})
    blocks, launch = MOE._config()
    moe_ptrs = {"Order_ptr": "*i64", "TileSeg_ptr": "*i32", "TileRow_ptr": "*i32", "TileEnd_ptr": "*i32",
                "SegStart_ptr": "*i64", "SegEnd_ptr": "*i64", "YSlot_ptr": "*fp32", "DXSlot_ptr": "*fp32",
                "DGP_ptr": "*fp32"}
    common = dict(DOT=MOE.DOT_NATIVE, ACC=tl.float32)
    gelu = dict(ACT=MOE.ACT_GELU)
    for name, kernel, extra in (("moe_dispatch_fwd_fc1", MOE._moe_dispatch_fwd_fc1_kernel, gelu),
                                ("moe_dispatch_fwd_fc2", MOE._moe_dispatch_fwd_fc2_kernel, gelu),
                                ("moe_dispatch_bwd_dh", MOE._moe_dispatch_bwd_dh_kernel, gelu),
                                ("moe_dispatch_bwd_dx", MOE._moe_dispatch_bwd_dx_kernel, {})):
        yield _case(name, kernel, "bf16", dict(common, **extra, **blocks), dict(launch), "moe",
                    ptr_types=moe_ptrs)
    dw_blocks = dict(BLOCK_P=blocks["BLOCK_N"], BLOCK_Q=blocks["BLOCK_N"], BLOCK_R=blocks["BLOCK_K"])
    for which, flags in (("dW2", dict(P_GATHER=False, P_GELU=True, Q_GATHER=True, Q_GATE=True)),
                         ("dW1", dict(P_GATHER=True, P_GELU=False, Q_GATHER=False, Q_GATE=False))):
        yield _case("moe_dispatch_bwd_dw", MOE._moe_dispatch_bwd_dw_kernel, "bf16",
                    dict(common, **flags, **dw_blocks), dict(launch), f"moe ({which})", ptr_types=moe_ptrs)


def cases(full=False):
    """Every compile, de-duplicated (one compile serves every setting that shares it)."""
    seen = {}
    for case in [*attention_cases(full), *other_cases()]:
        key = (case["name"], case["dtype"], repr(sorted(case["constexprs"].items())),
               repr(sorted(case["options"].items())))
        if key in seen:
            seen[key]["settings"] += case["settings"]
        else:
            seen[key] = case
    return list(seen.values())


def _ptxas_on_ptx(ptx):
    """``ptxas -v`` on the PTX ourselves, when Triton did not print its log."""
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a", src, "-o",
               os.path.join(d, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def case_config(case):
    """The JSON ``config`` of a case: its constexprs, launch options and dtype."""
    config = {k: _jsonable(v) for k, v in case["constexprs"].items()}
    config.update(case["options"], dtype=case["dtype"])
    return config


def compile_case(case):
    kernel, constexprs = case["kernel"], case["constexprs"]
    config = case_config(case)
    row = dict(name=case["name"], source=f"{kernel.fn.__module__}.{kernel.fn.__name__}", config=config,
               settings=case["settings"], role=case["role"], tuned=case["tuned"])
    missing = [n for n in constexpr_names(kernel) if n not in constexprs]
    if missing:
        return dict(row, error=f"constexprs not set by the report: {missing}")
    src = ASTSource(fn=kernel, signature=signature(kernel, case["dtype"], constexprs, case["ptr_types"]),
                    constexprs=constexprs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=case["options"])
    except Exception as exc:  # reported per row; the checks fail on it
        msg, cause = f"{type(exc).__name__}: {exc}", exc.__cause__
        while cause is not None:  # the root cause (a NameError inside a helper, say) comes last
            msg, cause = f"{msg}\n<- {type(cause).__name__}: {cause}", cause.__cause__
        return dict(row, error=msg[-2000:])
    parsed = parse_ptxas(log.getvalue()) or parse_ptxas(_ptxas_on_ptx(compiled.asm["ptx"]))
    if len(parsed) != 1:
        return dict(row, error=f"expected one entry function in the ptxas log, got {sorted(parsed)}")
    (usage,) = parsed.values()
    return dict(row, num_warps=compiled.metadata.num_warps, dynamic_shared=compiled.metadata.shared, **usage)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th case from the I-th")
    parser.add_argument("--list", action="store_true", help="print the cases without compiling")
    args = parser.parse_args(argv)
    i, n = (int(x) for x in args.shard.split("/"))
    for case in cases(args.all)[i::n]:
        if args.list:
            print(json.dumps(dict(name=case["name"], config=case_config(case), settings=case["settings"])),
                  flush=True)
        else:
            print(json.dumps(compile_case(case)), flush=True)


if __name__ == "__main__":
    main()
