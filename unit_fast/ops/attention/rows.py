"""The program-to-rows mapping every query-row attention kernel shares (``triton.py``,
``split_kv.py``): grid axis 0 = blocks of ``BLOCK_M`` queries, axis 1 = ``batch * head``."""

import triton
import triton.language as tl


@triton.jit
def _query_rows(H, BLOCK_M: tl.constexpr):
    """``(bh, b, h, offs_m)``: this program's ``batch * head`` index, its batch and head (int64,
    for pointer offsets) and its ``(BLOCK_M,)`` query rows (unmasked: callers test ``< L``)."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), offs_m
