// The CPU LSA kernel's transposing copy: a problem with fewer columns than
// rows (DETR's Q queries x T targets) is solved with the targets as working
// rows, so source column m becomes working row m.
//
// Why it is written out: at 64 x 900 x 100 a column-at-a-time copy took longer
// than the solve.  Rows are read kBlockRows at a time, so that the working rows
// being written (kBlockRows floats each) stay in L1 and every line of them is
// filled before it leaves; the next block is prefetched, because the hardware
// prefetcher does not follow 64 interleaved row streams (measured: 2x); float
// rows are moved 4 x 4 with vector shuffles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../hungarian_match_core.h"

namespace unit_fast {
namespace ops {

constexpr int64_t kBlockRows = 64;

// dst[m * nc + n] = sign * src[n * sN + m * sM] for n < N, m < Mb (working
// row length nc >= N).  Returns true when any copied value is NaN or -inf.
template <typename scalar_t, typename T>
bool transpose_copy(const scalar_t* src, int64_t sN, int64_t sM, int64_t N, int64_t Mb, double sign, T* dst,
                    int64_t nc) {
  int bad = 0;
  const T s = static_cast<T>(sign);
  for (int64_t n0 = 0; n0 < N; n0 += kBlockRows) {
    const int64_t n1 = std::min(N, n0 + kBlockRows);
    for (int64_t n = n1; n < std::min(N, n1 + kBlockRows); ++n) {
      for (int64_t m = 0; m < Mb; m += 64 / static_cast<int64_t>(sizeof(scalar_t)))
        __builtin_prefetch(src + n * sN + m * sM);
    }
    int64_t m_done = 0;
#if defined(__GNUC__) && !defined(__clang__)
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (sM == 1) {
        typedef float f4 __attribute__((vector_size(16)));
        typedef int32_t i4 __attribute__((vector_size(16)));
        const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
        m_done = Mb / 4 * 4;
        const f4 sv = f4{} + s;
        i4 bad4 = i4{};
        for (int64_t m = 0; m < m_done; m += 4) {
          for (int64_t n = n0; n < n4; n += 4) {
            f4 r0, r1, r2, r3;
            std::memcpy(&r0, src + (n + 0) * sN + m, 16);
            std::memcpy(&r1, src + (n + 1) * sN + m, 16);
            std::memcpy(&r2, src + (n + 2) * sN + m, 16);
            std::memcpy(&r3, src + (n + 3) * sN + m, 16);
            const f4 t0 = __builtin_shuffle(r0, r1, i4{0, 4, 1, 5}), t1 = __builtin_shuffle(r0, r1, i4{2, 6, 3, 7});
            const f4 t2 = __builtin_shuffle(r2, r3, i4{0, 4, 1, 5}), t3 = __builtin_shuffle(r2, r3, i4{2, 6, 3, 7});
            const f4 c[4] = {__builtin_shuffle(t0, t2, i4{0, 1, 4, 5}) * sv, __builtin_shuffle(t0, t2, i4{2, 3, 6, 7}) * sv,
                             __builtin_shuffle(t1, t3, i4{0, 1, 4, 5}) * sv, __builtin_shuffle(t1, t3, i4{2, 3, 6, 7}) * sv};
            for (int k = 0; k < 4; ++k) {
              bad4 |= !(c[k] > -INFINITY);  // NaN or -inf, as lsa::invalid_cost
              std::memcpy(dst + (m + k) * nc + n, &c[k], 16);
            }
          }
          for (int64_t n = n4; n < n1; ++n) {
            for (int k = 0; k < 4; ++k) {
              const T c = s * src[n * sN + m + k];
              dst[(m + k) * nc + n] = c;
              bad |= lsa::invalid_cost(c);
            }
          }
        }
        for (int k = 0; k < 4; ++k) bad |= bad4[k] != 0;
      }
    }
#endif
    for (int64_t m = m_done; m < Mb; ++m) {
      T* drow = dst + m * nc;
      const scalar_t* scol = src + m * sM;
      for (int64_t n = n0; n < n1; ++n) {
        const T c = s * static_cast<T>(scol[n * sN]);
        drow[n] = c;
        bad |= lsa::invalid_cost(c);
      }
    }
  }
  return bad != 0;
}

}  // namespace ops
}  // namespace unit_fast
