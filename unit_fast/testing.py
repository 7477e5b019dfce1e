"""Test helpers shared by tests/ and benchmarks/ (house style section 7)."""

import torch

# torch.testing.assert_close defaults; any local loosening carries a comment.
TOLERANCES = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}

# atol floors of the "2x the reference's own error" rule (flash-attn tests).
REF_ERROR_ATOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def devices():
    """Devices to parametrize over: CPU, plus CUDA when present (torchvision ``cpu_and_cuda``)."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def assert_close_ref(out, ref, dtype=None, msg=""):
    """``out`` against an fp64 reference with the dtype's tolerance; prints the worst index."""
    tol = TOLERANCES[dtype or out.dtype]
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    err = (out64 - ref64).abs() - tol["rtol"] * ref64.abs()
    if out64.numel() and not torch.allclose(out64, ref64, **tol, equal_nan=True):
        worst = tuple(int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), err.shape))
        raise AssertionError(
            f"{msg} mismatch at {worst}: got {out64[worst].item()!r}, expected {ref64[worst].item()!r} "
            f"(rtol={tol['rtol']}, atol={tol['atol']})"
        )


def assert_within_ref_error(out, ref_lowp, ref_hi, dtype, msg=""):
    """max|out - ref_hi| <= 2 * max|ref_lowp - ref_hi| + atol floor of ``dtype``."""
    err = (out.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lowp.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    bound = 2 * ref_err + REF_ERROR_ATOL[dtype]
    if not err <= bound:
        raise AssertionError(f"{msg} error {err:.3e} exceeds 2 x reference error {ref_err:.3e} + atol")
