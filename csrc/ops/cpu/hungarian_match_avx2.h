// Entry points of hungarian_match_avx2.cpp (see there).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UF_LSA_HAVE_AVX2_TU 1
#else
#define UF_LSA_HAVE_AVX2_TU 0
#endif

namespace unit_fast {
namespace ops {

#if UF_LSA_HAVE_AVX2_TU
// lsa::solve_float compiled for AVX2; call only where the CPU has AVX2 and FMA.
void lsa_solve_float_avx2(const float* cost, int nr, int nc, bool transposed, int n_out, void* ws, int64_t R,
                          int64_t C, int64_t* out);
#endif

}  // namespace ops
}  // namespace unit_fast
