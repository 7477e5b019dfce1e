// The fast float path of the CPU LSA kernel compiled for AVX2 + FMA (8 float
// lanes), chosen at run time by hungarian_match_kernel.cpp when the CPU has
// them.  The package itself is built for the baseline x86-64 ISA so that one
// build runs on any x86-64 CPU; only this file's functions use AVX2.
//
// GCC only: `#pragma GCC target` applies to the functions defined after it.
// The standard headers come first so that their inline functions keep the
// baseline ISA, and UF_LSA_ISA puts every LSA function of this file in its own
// inline namespace (hungarian_match_core.h), so none is merged with its
// generic twin.  Other compilers and CPUs take the generic path.
#include "hungarian_match_avx2.h"

#if UF_LSA_HAVE_AVX2_TU

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define UF_LSA_ISA avx2
#define UF_LSA_LANES 8
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "lsa_float_path.h"

namespace unit_fast {
namespace ops {

void lsa_solve_float_avx2(const float* cost, int nr, int nc, bool transposed, int n_out, void* ws, int64_t R,
                          int64_t C, int64_t* out) {
  lsa::avx2::solve_float(cost, nr, nc, transposed, n_out, ws, R, C, out);
}

}  // namespace ops
}  // namespace unit_fast

#pragma GCC pop_options

#endif  // UF_LSA_HAVE_AVX2_TU
