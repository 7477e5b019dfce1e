// Vector loops of the CPU kernel's fast float path for the LSA core
// (hungarian_match_core.h): the row and column scans of the JV start and the
// Dijkstra relaxation, over float lanes.
//
// They apply to a DenseProblem<float> solved with a WorkspaceT<float> (float,
// half and bfloat16 inputs without scipy_ties).  Each overload below is found
// by argument-dependent lookup from the core's templates and computes what the
// scalar loop it replaces computes over the same float values, except that the
// relaxation picks the lowest-index column among equal path costs instead of
// scipy's order (any minimum keeps the search exact; scipy_ties never gets
// here).  Written with GCC/Clang vector extensions, so the same source builds
// SSE2, AVX2 or NEON code; other compilers take the scalar loops.
//
// Why vectors and a dense relaxation: the scalar relaxation walks the
// unsettled-column list (a gather per column) with a branch per column; the
// dense one runs over all columns, settled ones masked, in unit-stride lanes.
// It touches about twice the columns and still wins several times over.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../hungarian_match_core.h"

#if defined(__GNUC__) && !defined(__CUDACC__)
#define UF_LSA_SIMD 1
#endif

namespace unit_fast {
namespace lsa {
inline namespace UF_LSA_ISA {

// The fast float path's working problem and workspace.
using FloatProblem = DenseProblem<float>;
using FloatWorkspace = WorkspaceT<float>;

#if UF_LSA_SIMD

namespace simd {

// Float lanes per vector: 4 (16-byte SSE2 / NEON vectors) unless the
// translation unit is compiled for AVX2 and says 8.
#ifndef UF_LSA_LANES
#define UF_LSA_LANES 4
#endif
constexpr int kLanes = UF_LSA_LANES;
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));
typedef uint8_t bvec __attribute__((vector_size(kLanes)));

inline fvec loadf(const float* p) {
  fvec x;
  std::memcpy(&x, p, sizeof x);  // unaligned load
  return x;
}
inline void storef(float* p, fvec x) { std::memcpy(p, &x, sizeof x); }
inline ivec loadi(const int32_t* p) {
  ivec x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void storei(int32_t* p, ivec x) { std::memcpy(p, &x, sizeof x); }
// Lane mask (-1 / 0) of SC[j..j+kLanes) != 0.
inline ivec settled_mask(const uint8_t* sc) {
  bvec b;
  std::memcpy(&b, sc, sizeof b);
  return __builtin_convertvector(b, ivec) != 0;
}
inline fvec splatf(float x) { return fvec{} + x; }
inline ivec splati(int32_t x) { return ivec{} + x; }
inline ivec iota() {
  ivec r;
  for (int l = 0; l < kLanes; ++l) r[l] = l;
  return r;
}
inline fvec select(ivec m, fvec a, fvec b) { return m ? a : b; }
inline ivec select(ivec m, ivec a, ivec b) { return m ? a : b; }

// Per-lane two_min_scan state: lane l sees j = l, l + kLanes, ... in order, so
// strict < keeps each lane's first index on ties, as two_min_scan does.
struct LaneTwoMin {
  fvec v1, v2;
  ivec j1, j2;
  LaneTwoMin() : v1(splatf(INFINITY)), v2(splatf(INFINITY)), j1(splati(-1)), j2(splati(-1)) {}
  void push(fvec h, ivec j) {
    const ivec lt1 = h < v1, lt2 = h < v2;
    v2 = select(lt1, v1, select(lt2, h, v2));
    j2 = select(lt1, j1, select(lt2, j, j2));
    v1 = select(lt1, h, v1);
    j1 = select(lt1, j, j1);
  }
  // The lex-smallest two over all lanes: two_min_merge of the lanes.
  TwoMin reduce(TwoMin t) const {
    for (int l = 0; l < kLanes; ++l) {
      two_min_push(t, v1[l], j1[l]);
      two_min_push(t, v2[l], j2[l]);
    }
    return t;
  }
};

}  // namespace simd

// row_two_min over h = c(i, j) - v[j], float arithmetic as the scalar loop.
inline TwoMin row_two_min(const FloatProblem& p, const FloatWorkspace& w, int i, int start, int stride) {
  if (start != 0 || stride != 1) return row_two_min<FloatProblem, FloatWorkspace>(p, w, i, start, stride);
  using namespace simd;
  const float* c = p.cost + static_cast<int64_t>(i) * p.nc;
  const int nc = p.nc, nv = nc - nc % kLanes;
  LaneTwoMin lanes;
  ivec jv = iota();
  for (int j = 0; j < nv; j += kLanes, jv += kLanes) lanes.push(loadf(c + j) - loadf(w.v + j), jv);
  TwoMin t = two_min_empty();
  for (int j = nv; j < nc; ++j) two_min_scan(t, static_cast<double>(c[j] - w.v[j]), j);
  return lanes.reduce(t);
}

// transfer_min: the cheapest reduced column other than j1 (only v1, j1 are used).
inline TwoMin transfer_min(const FloatProblem& p, const FloatWorkspace& w, int i, int j1, int start, int stride) {
  if (start != 0 || stride != 1) return transfer_min<FloatProblem, FloatWorkspace>(p, w, i, j1, start, stride);
  const TwoMin t = row_two_min(p, w, i, 0, 1);
  return t.j1 == j1 ? TwoMin{t.v2, t.j2, INFINITY, -1} : TwoMin{t.v1, t.j1, INFINITY, -1};
}

// column_min: v[j] = min_i c(i, j) and its first argmin row, rows outer so the
// lanes run along a row.
inline void column_min(const FloatProblem& p, FloatWorkspace& w, int start, int stride) {
  if (start != 0 || stride != 1) return column_min<FloatProblem, FloatWorkspace>(p, w, start, stride);
  using namespace simd;
  const int nc = p.nc, nv = nc - nc % kLanes;
  for (int j = 0; j < nc; ++j) {
    w.spc[j] = INFINITY;  // the running minimum (spc is free until the search)
    w.path[j] = -1;
  }
  for (int i = 0; i < p.nr; ++i) {
    const float* c = p.cost + static_cast<int64_t>(i) * nc;
    const ivec iv = splati(i);
    for (int j = 0; j < nv; j += kLanes) {
      const fvec x = loadf(c + j), best = loadf(w.spc + j);
      const ivec lt = x < best;
      storef(w.spc + j, select(lt, x, best));
      storei(w.path + j, select(lt, iv, loadi(w.path + j)));
    }
    for (int j = nv; j < nc; ++j) {
      if (c[j] < w.spc[j]) {
        w.spc[j] = c[j];
        w.path[j] = i;
      }
    }
  }
  for (int j = 0; j < nc; ++j) w.v[j] = w.path[j] >= 0 ? w.spc[j] : 0.0f;
}

// SerialBlock with the dense vector relaxation.
struct FloatSerialBlock : SerialBlock {
  Key scan(const FloatProblem& p, FloatWorkspace& w, int i, double min_val_d, int /*n_rem*/) {
    using namespace simd;
    const float* c = p.cost + static_cast<int64_t>(i) * p.nc;
    const int nc = p.nc, nv = nc - nc % kLanes;
    const float min_val = static_cast<float>(min_val_d), ui = w.u[i];  // min_val is a float spc value
    const fvec mv = splatf(min_val), uv = splatf(ui), inf = splatf(INFINITY);
    const ivec iv = splati(i);
    fvec best = inf;
    ivec arg = splati(-1), jv = iota();
    for (int j = 0; j < nv; j += kLanes, jv += kLanes) {
      const ivec done = settled_mask(w.SC + j);
      const fvec r = mv + loadf(c + j) - uv - loadf(w.v + j);
      fvec s = loadf(w.spc + j);
      const ivec upd = (r < s) & ~done;
      s = select(upd, r, s);
      storef(w.spc + j, s);
      storei(w.path + j, select(upd, iv, loadi(w.path + j)));
      // Unsettled columns only; <= keeps j >= 0 for a lane whose columns are all +inf.
      const ivec take = ~done & ((s < best) | (arg < 0));
      best = select(take, s, best);
      arg = select(take, jv, arg);
    }
    Key k{INFINITY, -1};
    for (int l = 0; l < kLanes; ++l) {
      if (arg[l] >= 0 && (k.j < 0 || best[l] < k.val || (best[l] == k.val && arg[l] < k.j))) k = Key{best[l], arg[l]};
    }
    for (int j = nv; j < nc; ++j) {
      if (w.SC[j]) continue;
      const float r = min_val + c[j] - ui - w.v[j];
      if (r < w.spc[j]) {
        w.path[j] = i;
        w.spc[j] = r;
      }
      if (k.j < 0 || w.spc[j] < k.val) k = Key{w.spc[j], j};
    }
    return k;
  }
};

#endif  // UF_LSA_SIMD

}  // inline namespace UF_LSA_ISA
}  // namespace lsa
}  // namespace unit_fast
