// CPU kernels of unit_fast::pairwise_giou_cpp and unit_fast::_pairwise_giou_cpp_backward.
//
// Math (pairwise_giou_ref, DETR generalized_box_iou), for a = boxes1[n], b = boxes2[m], xyxy,
// in S = float32 (float64 for float64 inputs), rounded once to the inputs' dtype:
//
//   I    = clamp(min(a2, b2) - max(a0, b0), 0) * clamp(min(a3, b3) - max(a1, b1), 0)
//   U    = area(a) + area(b) - I,   C = clamp(max(a2, b2) - min(a0, b0), 0) * (... y ...)
//   GIoU = I / U - (C - U) / C      (0 / 0 = NaN for zero-area pairs, as DETR)
//
// Decomposition: boxes2 is laid out once as structure-of-arrays (padded to the vector width
// with unit boxes); at::parallel_for over fixed blocks of kRows rows of boxes1; each row runs
// one vector pass over the M columns.  Plain (non-NaN-propagating) min / max suffice: a NaN
// corner is also in its box's area, so U -- hence the GIoU -- is NaN anyway.
// Backward (the Triton kernel's analytic formulas): per row, d/d boxes1[n] is summed over the
// columns in vector lanes, then across lanes; d/d boxes2 is accumulated per row block into
// its own partial (kRows rows), and the partials are added in block order.  Blocks do not
// depend on the thread count: the gradients are deterministic, with no atomics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cpu_math.h"
#include "../pairwise_giou.h"

namespace unit_fast {
namespace ops {
namespace {

using namespace cpu_math;  // NOLINT: the vector helpers

constexpr int64_t kRows = 32;  // rows of boxes1 per task (and per boxes2-gradient partial)

constexpr int64_t kPad = 8;  // columns are padded to 8: a whole v8f or two v4d

int64_t pad_cols(int64_t m) { return (m + kPad - 1) / kPad * kPad; }

// boxes [M, 4] (any dtype, strides) -> b[k * Mpad + m] in S, padding columns the unit box.
template <typename scalar_t, typename S>
std::vector<S> soa(const at::Tensor& boxes, int64_t Mpad) {
  const int64_t M = boxes.size(0), s0 = boxes.stride(0), s1 = boxes.stride(1);
  const scalar_t* p = boxes.data_ptr<scalar_t>();
  std::vector<S> b(static_cast<size_t>(4 * Mpad));
  for (int64_t m = 0; m < Mpad; ++m)
    for (int k = 0; k < 4; ++k)
      b[k * Mpad + m] = m < M ? static_cast<S>(p[m * s0 + k * s1]) : S(k < 2 ? 0 : 1);
  return b;
}

// One row: o[m] = GIoU(a, b[m]) for m < Mpad.
template <typename S>
UNIT_FAST_INLINE void giou_row_body(const S* a, const S* b, int64_t Mpad, S* o) {
  typedef typename VecOf<S>::type V;
  constexpr int64_t L = sizeof(V) / sizeof(S);
  const V a0 = v_splat<V>(a[0]), a1 = v_splat<V>(a[1]), a2 = v_splat<V>(a[2]), a3 = v_splat<V>(a[3]);
  const S area_a = (a[2] - a[0]) * (a[3] - a[1]);
  for (int64_t m = 0; m < Mpad; m += L) {
    const V b0 = v_load<V>(b + m), b1 = v_load<V>(b + Mpad + m);
    const V b2 = v_load<V>(b + 2 * Mpad + m), b3 = v_load<V>(b + 3 * Mpad + m);
    const V inter = v_clamp0(v_min(a2, b2) - v_max(a0, b0)) * v_clamp0(v_min(a3, b3) - v_max(a1, b1));
    const V uni = area_a + (b2 - b0) * (b3 - b1) - inter;
    const V hull = v_clamp0(v_max(a2, b2) - v_min(a0, b0)) * v_clamp0(v_max(a3, b3) - v_min(a1, b1));
    v_store_s(o + m, inter / uni - (hull - uni) / hull);
  }
}

template <typename V>
UNIT_FAST_INLINE V positive(V x) {  // clamp(min=0)'s gradient mask, as a factor
  return x > 0 ? v_splat<V>(1.0) : V{};
}

// One row of the backward: da[0..3] = sum_m g[m] d GIoU(a, b[m]) / d a, and
// db[k * Mpad + m] += g[m] d GIoU / d b[m].  g: [Mpad] in S, zero past M.
template <typename S>
UNIT_FAST_INLINE void giou_bwd_row_body(const S* a, const S* b, const S* g, int64_t Mpad, S* da, S* db) {
  typedef typename VecOf<S>::type V;
  constexpr int64_t L = sizeof(V) / sizeof(S);
  const V A0 = v_splat<V>(a[0]), A1 = v_splat<V>(a[1]), A2 = v_splat<V>(a[2]), A3 = v_splat<V>(a[3]);
  V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
  for (int64_t m = 0; m < Mpad; m += L) {
    const V B0 = v_load<V>(b + m), B1 = v_load<V>(b + Mpad + m);
    const V B2 = v_load<V>(b + 2 * Mpad + m), B3 = v_load<V>(b + 3 * Mpad + m);
    const V gm = v_load<V>(g + m);
    const V iw_pre = v_min(A2, B2) - v_max(A0, B0), ih_pre = v_min(A3, B3) - v_max(A1, B1);
    const V iw = v_clamp0(iw_pre), ih = v_clamp0(ih_pre);
    const V inter = iw * ih;
    const V uni = (A2 - A0) * (A3 - A1) + (B2 - B0) * (B3 - B1) - inter;
    const V hw_pre = v_max(A2, B2) - v_min(A0, B0), hh_pre = v_max(A3, B3) - v_min(A1, B1);
    const V hw = v_clamp0(hw_pre), hh = v_clamp0(hh_pre);
    const V hull = hw * hh;
    // giou = inter / union - 1 + union / hull, union = area_a + area_b - inter: the total
    // derivatives wrt inter, either area and hull, times the incoming gradient.
    const V inv_u2 = 1.0 / (uni * uni);
    const V dG_inter = gm * (1.0 / uni + inter * inv_u2 - 1.0 / hull);
    const V dG_area = gm * (1.0 / hull - inter * inv_u2);
    const V dG_hull = gm * (-uni / (hull * hull));
    const V ciw = dG_inter * ih * positive(iw_pre), cih = dG_inter * iw * positive(ih_pre);
    const V chw = dG_hull * hh * positive(hw_pre), chh = dG_hull * hw * positive(hh_pre);
    // Padding columns have g = 0 and unit boxes: every term above is a finite 0.
    s0 += -ciw * min_share(B0, A0) - chw * min_share(A0, B0) - dG_area * (A3 - A1);
    s2 += ciw * min_share(A2, B2) + chw * min_share(B2, A2) + dG_area * (A3 - A1);
    s1 += -cih * min_share(B1, A1) - chh * min_share(A1, B1) - dG_area * (A2 - A0);
    s3 += cih * min_share(A3, B3) + chh * min_share(B3, A3) + dG_area * (A2 - A0);
    const V db0 = -ciw * min_share(A0, B0) - chw * min_share(B0, A0) - dG_area * (B3 - B1);
    const V db2 = ciw * min_share(B2, A2) + chw * min_share(A2, B2) + dG_area * (B3 - B1);
    const V db1 = -cih * min_share(A1, B1) - chh * min_share(B1, A1) - dG_area * (B2 - B0);
    const V db3 = cih * min_share(B3, A3) + chh * min_share(A3, B3) + dG_area * (B2 - B0);
    v_store_s(db + m, v_load<V>(db + m) + db0);
    v_store_s(db + Mpad + m, v_load<V>(db + Mpad + m) + db1);
    v_store_s(db + 2 * Mpad + m, v_load<V>(db + 2 * Mpad + m) + db2);
    v_store_s(db + 3 * Mpad + m, v_load<V>(db + 3 * Mpad + m) + db3);
  }
  const V sums[4] = {s0, s1, s2, s3};
  for (int k = 0; k < 4; ++k) {
    S t = 0;
    for (int64_t j = 0; j < L; ++j) t += sums[k][j];  // lane order: deterministic
    da[k] = t;
  }
}

UNIT_FAST_CPU_DISPATCH(giou_row_f32, giou_row_body<float>, giou_row_body<float>,
                       (const float* a, const float* b, int64_t Mpad, float* o), (a, b, Mpad, o))
UNIT_FAST_CPU_DISPATCH(giou_row_f64, giou_row_body<double>, giou_row_body<double>,
                       (const double* a, const double* b, int64_t Mpad, double* o), (a, b, Mpad, o))
UNIT_FAST_CPU_DISPATCH(giou_bwd_row_f32, giou_bwd_row_body<float>, giou_bwd_row_body<float>,
                       (const float* a, const float* b, const float* g, int64_t Mpad, float* da, float* db),
                       (a, b, g, Mpad, da, db))
UNIT_FAST_CPU_DISPATCH(giou_bwd_row_f64, giou_bwd_row_body<double>, giou_bwd_row_body<double>,
                       (const double* a, const double* b, const double* g, int64_t Mpad, double* da, double* db),
                       (a, b, g, Mpad, da, db))

void giou_row(const float* a, const float* b, int64_t Mpad, float* o) { giou_row_f32(a, b, Mpad, o); }
void giou_row(const double* a, const double* b, int64_t Mpad, double* o) { giou_row_f64(a, b, Mpad, o); }
void giou_bwd_row(const float* a, const float* b, const float* g, int64_t Mpad, float* da, float* db) {
  giou_bwd_row_f32(a, b, g, Mpad, da, db);
}
void giou_bwd_row(const double* a, const double* b, const double* g, int64_t Mpad, double* da, double* db) {
  giou_bwd_row_f64(a, b, g, Mpad, da, db);
}

template <typename scalar_t>
void pairwise_giou_forward_impl(const at::Tensor& boxes1, const at::Tensor& boxes2, at::Tensor& out) {
  using S = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t N = boxes1.size(0), M = boxes2.size(0), Mpad = pad_cols(M);
  const std::vector<S> b = soa<scalar_t, S>(boxes2, Mpad);
  const scalar_t* p1 = boxes1.data_ptr<scalar_t>();
  const int64_t s0 = boxes1.stride(0), s1 = boxes1.stride(1);
  scalar_t* o = out.data_ptr<scalar_t>();  // [N, M] contiguous
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> row(static_cast<size_t>(Mpad));
    for (int64_t n = begin * kRows; n < std::min(N, end * kRows); ++n) {
      const S a[4] = {static_cast<S>(p1[n * s0]), static_cast<S>(p1[n * s0 + s1]), static_cast<S>(p1[n * s0 + 2 * s1]),
                      static_cast<S>(p1[n * s0 + 3 * s1])};
      giou_row(a, b.data(), Mpad, row.data());
      for (int64_t m = 0; m < M; ++m) o[n * M + m] = static_cast<scalar_t>(row[m]);  // one rounding
    }
  });
}

at::Tensor pairwise_giou_forward_kernel(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_pairwise_giou_args(boxes1, boxes2);
  at::Tensor out = at::empty({boxes1.size(0), boxes2.size(0)}, boxes1.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes1.scalar_type(), "pairwise_giou_cpu", [&] {
    pairwise_giou_forward_impl<scalar_t>(boxes1, boxes2, out);
  });
  return out;
}

template <typename scalar_t>
void pairwise_giou_backward_impl(const at::Tensor& grad, const at::Tensor& boxes1, const at::Tensor& boxes2,
                                 at::Tensor& grad1, at::Tensor& grad2) {
  using S = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t N = boxes1.size(0), M = boxes2.size(0), Mpad = pad_cols(M);
  const int64_t blocks = (N + kRows - 1) / kRows;
  const std::vector<S> b = soa<scalar_t, S>(boxes2, Mpad);
  std::vector<S> dbp(static_cast<size_t>(blocks * 4 * Mpad), S(0));  // [blocks, 4, Mpad] partials
  std::vector<S> da(static_cast<size_t>(N * 4));
  const scalar_t* p1 = boxes1.data_ptr<scalar_t>();
  const int64_t s0 = boxes1.stride(0), s1 = boxes1.stride(1);
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t g0 = grad.stride(0), g1 = grad.stride(1);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> g(static_cast<size_t>(Mpad), S(0));  // padding columns stay 0
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t n = blk * kRows; n < std::min(N, (blk + 1) * kRows); ++n) {
        const S a[4] = {static_cast<S>(p1[n * s0]), static_cast<S>(p1[n * s0 + s1]),
                        static_cast<S>(p1[n * s0 + 2 * s1]), static_cast<S>(p1[n * s0 + 3 * s1])};
        for (int64_t m = 0; m < M; ++m) g[m] = static_cast<S>(gp[n * g0 + m * g1]);
        giou_bwd_row(a, b.data(), g.data(), Mpad, da.data() + n * 4, dbp.data() + blk * 4 * Mpad);
      }
    }
  });
  scalar_t* o1 = grad1.data_ptr<scalar_t>();
  for (int64_t i = 0; i < N * 4; ++i) o1[i] = static_cast<scalar_t>(da[i]);
  scalar_t* o2 = grad2.data_ptr<scalar_t>();
  for (int64_t m = 0; m < M; ++m) {
    for (int k = 0; k < 4; ++k) {
      S t = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) t += dbp[(blk * 4 + k) * Mpad + m];  // block order
      o2[m * 4 + k] = static_cast<scalar_t>(t);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pairwise_giou_backward_kernel(const at::Tensor& grad, const at::Tensor& boxes1,
                                                                 const at::Tensor& boxes2) {
  check_pairwise_giou_args(boxes1, boxes2);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == boxes1.size(0) && grad.size(1) == boxes2.size(0),
                    "pairwise_giou backward: grad must be ", py_shape({boxes1.size(0), boxes2.size(0)}), ", got ",
                    py_shape(grad.sizes()));
  at::Tensor grad1 = at::zeros({boxes1.size(0), 4}, boxes1.options());
  at::Tensor grad2 = at::zeros({boxes2.size(0), 4}, boxes2.options());
  if (grad.numel() == 0) return {grad1, grad2};
  const at::Tensor g = grad.to(boxes1.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes1.scalar_type(), "pairwise_giou_backward_cpu", [&] {
    pairwise_giou_backward_impl<scalar_t>(g, boxes1, boxes2, grad1, grad2);
  });
  return {grad1, grad2};
}

}  // namespace

TORCH_LIBRARY_IMPL(unit_fast, CPU, m) {
  m.impl("pairwise_giou_cpp", &pairwise_giou_forward_kernel);
  m.impl("_pairwise_giou_cpp_backward", &pairwise_giou_backward_kernel);
}

}  // namespace ops
}  // namespace unit_fast
