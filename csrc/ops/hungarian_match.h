// unit_fast::hungarian_match -- batched exact linear-sum assignment.
//
// hungarian_match(cost [B, N, M] float, num_cols [B] int64 or None,
//                 maximize, scipy_ties) -> [B, N] int64
// For each problem b, row n is assigned column out[b, n] among the first
// num_cols[b] columns, -1 if left unassigned; min(N, num_cols[b]) rows are
// assigned.  A problem with NaN/-inf costs (after the maximize sign flip) or
// num_cols outside [0, M] is filled with kInvalid (-2); one without a complete
// finite-cost assignment with kInfeasible (-3).  See hungarian_match_core.h.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>

namespace unit_fast {
namespace ops {

// The instruction set the CPU kernel's fast float path runs ("avx2" or
// "generic"): AVX2 where the CPU has AVX2 and FMA, unless the environment
// variable UNIT_FAST_CPU_ISA=generic asks for the generic code (read once).
std::string lsa_cpu_isa();

// Shared argument checks; errors surface in Python as ValueError / TypeError.
inline void check_hungarian_match_args(const at::Tensor& cost, const c10::optional<at::Tensor>& num_cols) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "hungarian_match: cost must be [B, N, M], got ", cost.dim(),
                    "-D tensor of shape ", cost.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cost.scalar_type()),
                   "hungarian_match: cost must be a floating tensor, got ", cost.scalar_type());
  TORCH_CHECK_VALUE(cost.size(1) < std::numeric_limits<int32_t>::max() &&
                        cost.size(2) < std::numeric_limits<int32_t>::max(),
                    "hungarian_match: N and M must be below 2^31, got ", cost.sizes());
  if (num_cols.has_value()) {
    const at::Tensor& nc = *num_cols;
    TORCH_CHECK_TYPE(nc.scalar_type() == at::kLong, "hungarian_match: num_cols must be int64, got ",
                     nc.scalar_type());
    TORCH_CHECK_VALUE(nc.dim() == 1 && nc.size(0) == cost.size(0),
                      "hungarian_match: num_cols must have shape [B] = [", cost.size(0), "], got ",
                      nc.sizes());
    TORCH_CHECK_VALUE(nc.device() == cost.device(), "hungarian_match: num_cols is on ", nc.device(),
                      " but cost is on ", cost.device());
  }
}

}  // namespace ops
}  // namespace unit_fast
