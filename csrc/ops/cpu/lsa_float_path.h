// One problem of the CPU kernel's fast float path: a contiguous float working
// copy (rows the smaller side) solved with float duals and the vector loops of
// lsa_simd.h.  Included by hungarian_match_kernel.cpp (generic code) and by
// hungarian_match_avx2.cpp (the same source compiled for AVX2); UF_LSA_ISA keeps
// the two apart (see hungarian_match_core.h).
#pragma once

#include <cstdint>

#include "../hungarian_match_core.h"
#include "lsa_simd.h"

namespace unit_fast {
namespace lsa {
inline namespace UF_LSA_ISA {

// Solves the nr x nc working problem `cost` (row-major, nr <= nc, sign applied,
// already checked for NaN / -inf) with the JV start, and writes out[0..n_out)
// as write_result does.  ws: workspace_bytes<float>(R, C) bytes, 16-aligned.
inline void solve_float(const float* cost, int nr, int nc, bool transposed, int n_out, void* ws, int64_t R,
                        int64_t C, int64_t* out) {
  FloatWorkspace w = carve_workspace<float>(ws, R, C);
  const FloatProblem p{cost, nr, nc};
#if UF_LSA_SIMD
  FloatSerialBlock blk;
#else
  SerialBlock blk;
#endif
  ArrState st{};
  const int status = solve(p, w, /*use_jv_start=*/true, /*check_invalid=*/false, blk, &st);
  write_result(w, status, transposed, n_out, out, 0, 1);
}

}  // inline namespace UF_LSA_ISA
}  // namespace lsa
}  // namespace unit_fast
