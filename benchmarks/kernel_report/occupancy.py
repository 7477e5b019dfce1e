"""Resident blocks and warp occupancy of one kernel launch on an H100 (sm_90).

The CUDA occupancy calculator's formula (``cuda_occupancy.h``), with sm_90's limits: the
smallest of four per-SM limits on resident blocks --

  warps       ``64 // warps_per_block``;
  registers   the register file is split into 4 sub-partitions of 16,384 registers, each
              warp's registers (``regs * 32`` rounded up to 256) come from one of them:
              ``(4 * (16384 // regs_per_warp)) // warps_per_block``;
  shared      ``228 KiB // (static + dynamic + 1 KiB reserved, rounded up to 128 B)``; a block
              over 227 KiB cannot launch;
  blocks      32 --

and the warp occupancy ``blocks * warps_per_block / 64``.
"""

from dataclasses import dataclass

H100 = dict(
    max_warps=64, max_blocks=32, warp_size=32, regs_per_sm=65536, sub_partitions=4,
    reg_alloc_unit=256, max_regs_per_thread=255, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
    smem_reserved_per_block=1024, smem_alloc_unit=128,
)


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warp_occupancy: float  # resident warps / 64
    limited_by: str  # "warps", "registers", "shared", "blocks" (ties joined by "+"); "launch" if 0


def _round_up(n, unit):
    return -(-n // unit) * unit


def occupancy(threads_per_block, registers, shared_bytes, gpu=H100):
    """Resident blocks per SM of a kernel using ``registers`` per thread and ``shared_bytes``
    (static + dynamic) per block, launched with ``threads_per_block`` threads."""
    g = gpu
    warps = -(-threads_per_block // g["warp_size"])
    limits = {"blocks": g["max_blocks"], "warps": g["max_warps"] // warps}
    if registers > 0:
        regs_per_warp = _round_up(registers * g["warp_size"], g["reg_alloc_unit"])
        per_partition = g["regs_per_sm"] // g["sub_partitions"] // regs_per_warp
        limits["registers"] = per_partition * g["sub_partitions"] // warps
        if registers > g["max_regs_per_thread"]:
            limits["registers"] = 0
    smem = _round_up(shared_bytes + g["smem_reserved_per_block"], g["smem_alloc_unit"])
    limits["shared"] = 0 if shared_bytes > g["smem_per_block"] else g["smem_per_sm"] // smem
    blocks = min(limits.values())
    limited_by = "launch" if blocks == 0 else "+".join(k for k, v in limits.items() if v == blocks)
    return Occupancy(blocks, blocks * warps / g["max_warps"], limited_by)
