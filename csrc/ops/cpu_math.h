// Small branch-free float helpers shared by the CPU kernels (csrc/ops/cpu/*_kernel.cpp).
//
// Written as plain selects so that GCC/Clang auto-vectorize the loops that call them: the
// kernels' inner loops run over a contiguous row of targets (or classes), and a libm call or
// a branch would keep them scalar.
#pragma once

#include <cstdint>
#include <cstring>

namespace unit_fast {
namespace ops {
namespace cpu_math {

// Forced inline: the kernels' hot loops are compiled per ISA (target_clones), and GCC does not
// inline a plain-target function into those clones by itself -- the call would keep them scalar.
#if defined(__GNUC__)
#define UNIT_FAST_INLINE inline __attribute__((always_inline))
// Passing v8f by value without AVX "changes the ABI": harmless here, every helper is inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define UNIT_FAST_INLINE inline
#endif

// NaN-propagating min / max / clamp(min=0), as torch.min / torch.max / clamp: a NaN operand
// gives NaN (a plain `a < b ? a : b` would silently drop a NaN in `a`).
UNIT_FAST_INLINE float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
UNIT_FAST_INLINE float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
UNIT_FAST_INLINE float clamp0(float v) { return v < 0.0f ? 0.0f : v; }  // NaN < 0 is false: NaN stays
UNIT_FAST_INLINE double min_nan(double a, double b) { return (a < b || a != a) ? a : b; }
UNIT_FAST_INLINE double max_nan(double a, double b) { return (a > b || a != a) ? a : b; }
UNIT_FAST_INLINE double clamp0(double v) { return v < 0.0 ? 0.0 : v; }

// 8 floats, GCC/Clang vector extensions: the kernels' loops are written on these so that they
// vectorize whatever the compiler's auto-vectorizer decides (it refused the float selects of
// these loops as "control flow").  In a baseline-x86 build they become two SSE registers, in the AVX2
// build (UNIT_FAST_CPU_DISPATCH) one YMM register.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));  // AVX-512 builds' class loops

typedef int32_t v16i __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));  // the box losses' float64 path
typedef int64_t v4l __attribute__((vector_size(32)));

// Generic over v8f / v16f: V is a float vector type, ivec_t<V> its int32 twin.
template <typename V>
struct IntVec;
template <>
struct IntVec<v8f> {
  typedef v8i type;
};
template <>
struct IntVec<v16f> {
  typedef v16i type;
};
template <>
struct IntVec<v4d> {
  typedef v4l type;
};
template <typename V>
using ivec_t = typename IntVec<V>::type;

template <typename V>
UNIT_FAST_INLINE V v_splat(double x) {
  return V{} + static_cast<decltype(V{}[0] + 0)>(x);
}
template <typename V, typename S>
UNIT_FAST_INLINE V v_load(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
UNIT_FAST_INLINE void v_store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename S, typename V>
UNIT_FAST_INLINE void v_store_s(S* p, V v) {  // any element type (float or double vectors)
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>
UNIT_FAST_INLINE V v_abs(V x) {
  return (V)((ivec_t<V>)x & 0x7fffffff);
}
// Plain min / max: `a < b ? a : b` per lane, one vminps / vmaxps (a NaN in `a` is dropped, as
// in std::min; callers that must propagate NaN track it separately).  clamp0 keeps NaN, as
// torch's clamp(min=0) does.
template <typename V>
UNIT_FAST_INLINE V v_min(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
UNIT_FAST_INLINE V v_max(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
UNIT_FAST_INLINE V v_clamp0(V v) {
  return v < 0 ? V{} : v;
}
// NaN-propagating, as torch.minimum / maximum (for the box losses, whose tests check NaN).
template <typename V>
UNIT_FAST_INLINE V v_min_nan(V a, V b) {
  return ((a < b) | (a != a)) ? a : b;
}
template <typename V>
UNIT_FAST_INLINE V v_max_nan(V a, V b) {
  return ((a > b) | (a != a)) ? a : b;
}
// The share of d min(x, y) that autograd's minimum backward gives x: all when x is the smaller,
// half on a tie, none when it is the larger; a NaN compares false both ways, so each side gets
// all.  x's share of d max(x, y) is min_share(y, x).
template <typename V>
UNIT_FAST_INLINE V min_share(V x, V y) {
  return x == y ? v_splat<V>(0.5) : (x > y ? V{} : v_splat<V>(1.0));
}

// exp(x) in float32, within 2 ulp of expf over the range it is used on ([-inf, 88]); below
// -87.3 (where expf is denormal or 0) it returns 0; NaN gives NaN.  Cephes' expf: x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial in r, and 2^n built in the exponent bits.
// Why not std::exp: a libm call per element keeps the loops scalar; the softmax over the
// C+1 = 92 classes is most of matching_cost's work.
template <typename V>
UNIT_FAST_INLINE V v_exp(V x) {
  const V xc = x < -87.0f ? v_splat<V>(-87.0f) : x;  // n >= -126: 2^n stays normal
  // round(xc * log2(e)) by the 1.5 * 2^23 trick: plain adds, exact for |v| < 2^22.
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = xc - n ln2 in two steps (Cody-Waite): ln2 = 0.693359375 - 2.12194440e-4.
  const V r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = v_splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const ivec_t<V> bits = (__builtin_convertvector(n, ivec_t<V>) + 127) << 23;
  return x < -87.3f ? V{} : y * (V)bits;  // NaN compares false: stays NaN
}

// UNIT_FAST_CPU_DISPATCH(name, body_avx512, body, (params), (args)) defines `void name(params)`
// that runs the always-inline `body_avx512(args)` compiled for AVX-512, else `body(args)`
// compiled for AVX2+FMA, else `body(args)` for the baseline ISA, as the CPU supports (checked
// once).  The extension stays portable while recent x86 runs the vector loops in YMM / ZMM
// registers.  GCC's target_clones("arch=haswell") would dispatch on the CPU *model* (a newer
// EPYC gets the baseline clone), hence the explicit feature test.
#if defined(__GNUC__) && defined(__x86_64__)
#define UNIT_FAST_CPU_DISPATCH(name, body_avx512, body, params, args)                              \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void name##_avx512 params {      \
    body_avx512 args;                                                                             \
  }                                                                                               \
  __attribute__((target("avx2,fma"))) void name##_avx2 params { body args; }                      \
  void name##_base params { body args; }                                                          \
  void name params {                                                                              \
    static const int isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") \
                               ? 2                                                                \
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")); \
    if (isa == 2) {                                                                               \
      name##_avx512 args;                                                                         \
    } else if (isa == 1) {                                                                        \
      name##_avx2 args;                                                                           \
    } else {                                                                                      \
      name##_base args;                                                                           \
    }                                                                                             \
  }
#else
#define UNIT_FAST_CPU_DISPATCH(name, body_avx512, body, params, args) \
  void name params { body args; }
#endif

// The 32-byte vector of a scalar type: what the box kernels compute in (float32 and float64).
template <typename S>
struct VecOf;
template <>
struct VecOf<float> {
  typedef v8f type;
};
template <>
struct VecOf<double> {
  typedef v4d type;
};

}  // namespace cpu_math
}  // namespace ops
}  // namespace unit_fast
