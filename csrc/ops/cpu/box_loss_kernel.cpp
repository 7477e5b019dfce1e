// CPU kernels of unit_fast::box_loss_cpp and unit_fast::_box_loss_cpp_backward: DETR's L1 +
// GIoU box loss over N matched (N, 4) cxcywh pairs, forward and analytic backward.
//
// Math per pair (s, t cxcywh; a, b their xyxy boxes), in the compute dtype S (float32, or
// float64 when an input is float64), as the reference and the Triton kernels:
//
//   L1   = sum_k |s_k - t_k|
//   I    = clamp(min(a_x1, b_x1) - max(a_x0, b_x0), 0) * clamp(... y ..., 0)
//   U    = area(a) + area(b) - I           (areas from the xyxy corners, as DETR)
//   C    = clamp(max(a_x1, b_x1) - min(a_x0, b_x0), 0) * clamp(... y ..., 0)
//   GIoU = I / U - (C - U) / C             (DETR's operation order)
//
// Decomposition: the pairs are cut into fixed blocks of kBlock, spread over threads with
// at::parallel_for.  Inside a block, pairs are processed kLanes at a time: their 4 + 4
// coordinates are transposed into structure-of-arrays vectors (any input strides), and the
// math runs on vectors of kLanes pairs (8 floats or 4 doubles, one YMM register).
// Forward: each block writes its (sum L1, sum (1 - GIoU)) partial, accumulated in float64 in
// pair order; the partials are then added in block order.  The blocks do not depend on the
// thread count, so neither does the result (deterministic, no atomics).
// Backward: reverse mode through the same graph with autograd's subgradients (see
// pair_backward), written per pair, so no reduction at all.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../box_loss.h"
#include "../cpu_math.h"

namespace unit_fast {
namespace ops {
namespace {

using namespace cpu_math;  // NOLINT: the vector helpers

constexpr int64_t kBlock = 1024;  // pairs per partial sum (and per parallel task)


// kLanes pairs, transposed: c[k][j] is coordinate k of pair j; lanes past `n` hold a unit box
// (finite, nonzero area: no 0 / 0), whose results are dropped.
template <typename S, typename V>
struct Lanes {
  static constexpr int64_t kLanes = sizeof(V) / sizeof(S);
  V s[4], t[4];
};

template <typename S, typename V>
UNIT_FAST_INLINE void load_lanes(const S* src, int64_t ss0, int64_t ss1, const S* tgt, int64_t ts0, int64_t ts1,
                                 int64_t i0, int64_t n, Lanes<S, V>& p) {
  constexpr int64_t L = Lanes<S, V>::kLanes;
  S sa[4][L], ta[4][L];
  for (int64_t j = 0; j < L; ++j) {
    const bool ok = j < n;
    for (int k = 0; k < 4; ++k) {
      sa[k][j] = ok ? src[(i0 + j) * ss0 + k * ss1] : S(1);
      ta[k][j] = ok ? tgt[(i0 + j) * ts0 + k * ts1] : S(1);
    }
  }
  for (int k = 0; k < 4; ++k) {
    std::memcpy(&p.s[k], sa[k], sizeof(V));
    std::memcpy(&p.t[k], ta[k], sizeof(V));
  }
}

template <typename V>
UNIT_FAST_INLINE V v_abs_nan(V x) {  // |x| with NaN kept (bit tricks would need the int type)
  return x < 0 ? -x : x;
}

// Forward of kLanes pairs: L1 and 1 - GIoU per lane.
template <typename V>
UNIT_FAST_INLINE void pair_forward(const V* s, const V* t, V& l1, V& lg) {
  l1 = v_abs_nan(s[0] - t[0]) + v_abs_nan(s[1] - t[1]) + v_abs_nan(s[2] - t[2]) + v_abs_nan(s[3] - t[3]);
  const V ax0 = s[0] - 0.5 * s[2], ay0 = s[1] - 0.5 * s[3], ax1 = s[0] + 0.5 * s[2], ay1 = s[1] + 0.5 * s[3];
  const V bx0 = t[0] - 0.5 * t[2], by0 = t[1] - 0.5 * t[3], bx1 = t[0] + 0.5 * t[2], by1 = t[1] + 0.5 * t[3];
  const V area_a = (ax1 - ax0) * (ay1 - ay0);
  const V area_b = (bx1 - bx0) * (by1 - by0);
  const V inter = v_clamp0(v_min_nan(ax1, bx1) - v_max_nan(ax0, bx0)) * v_clamp0(v_min_nan(ay1, by1) - v_max_nan(ay0, by0));
  const V uni = area_a + area_b - inter;
  const V hull = v_clamp0(v_max_nan(ax1, bx1) - v_min_nan(ax0, bx0)) * v_clamp0(v_max_nan(ay1, by1) - v_min_nan(ay0, by0));
  lg = 1.0 - (inter / uni - (hull - uni) / hull);
}

template <typename S>
UNIT_FAST_INLINE void box_loss_fwd_body(const S* src, int64_t ss0, int64_t ss1, const S* tgt, int64_t ts0,
                                        int64_t ts1, int64_t i0, int64_t n, double* partial) {
  typedef typename VecOf<S>::type V;
  constexpr int64_t L = Lanes<S, V>::kLanes;
  double sum_l1 = 0.0, sum_lg = 0.0;
  for (int64_t i = 0; i < n; i += L) {
    Lanes<S, V> p;
    const int64_t m = std::min(L, n - i);
    load_lanes(src, ss0, ss1, tgt, ts0, ts1, i0 + i, m, p);
    V l1, lg;
    pair_forward(p.s, p.t, l1, lg);
    for (int64_t j = 0; j < m; ++j) {  // float64, in pair order
      sum_l1 += static_cast<double>(l1[j]);
      sum_lg += static_cast<double>(lg[j]);
    }
  }
  partial[0] = sum_l1;
  partial[1] = sum_lg;
}

template <typename V>
UNIT_FAST_INLINE V sign_or_zero(V d) {  // abs backward: sgn(d), 0 at 0 and for NaN
  return d > 0 ? v_splat<V>(1.0) : (d < 0 ? v_splat<V>(-1.0) : V{});
}

// Gradients of g_bbox * L1 + g_giou * (1 - GIoU) of kLanes pairs wrt s and t (each [4]).
// Reverse mode in autograd's order and with its subgradients:
//   |d|: sgn(d); clamp(x, min=0): passes where x > 0 only (touching edges and NaN blocked);
//   max / min: all to the winner, half each on a tie; I / U and (C - U) / C: div's two partials.
template <typename V>
UNIT_FAST_INLINE void pair_backward(const V* s, const V* t, const V& g_bbox, const V& g_giou, V* ds, V* dt) {
  const V ax0 = s[0] - 0.5 * s[2], ay0 = s[1] - 0.5 * s[3], ax1 = s[0] + 0.5 * s[2], ay1 = s[1] + 0.5 * s[3];
  const V bx0 = t[0] - 0.5 * t[2], by0 = t[1] - 0.5 * t[3], bx1 = t[0] + 0.5 * t[2], by1 = t[1] + 0.5 * t[3];
  const V aw = ax1 - ax0, ah = ay1 - ay0, bw = bx1 - bx0, bh = by1 - by0;
  const V area_a = aw * ah, area_b = bw * bh;
  const V riw = v_min_nan(ax1, bx1) - v_max_nan(ax0, bx0), rih = v_min_nan(ay1, by1) - v_max_nan(ay0, by0);
  const V iw = v_clamp0(riw), ih = v_clamp0(rih);
  const V inter = iw * ih;
  const V uni = area_a + area_b - inter;
  const V rcw = v_max_nan(ax1, bx1) - v_min_nan(ax0, bx0), rch = v_max_nan(ay1, by1) - v_min_nan(ay0, by0);
  const V cw = v_clamp0(rcw), ch = v_clamp0(rch);
  const V hull = cw * ch;
  const V excess = hull - uni;

  // loss = 1 - (iou - excess / hull): d loss / d giou = -g_giou
  const V d_giou = -g_giou;
  V d_inter = d_giou / uni;  // iou = inter / union
  V d_union = -d_giou * (inter / uni) / uni;
  const V d_excess = -d_giou / hull;  // excess / hull
  V d_hull = d_giou * (excess / hull) / hull;
  d_hull += d_excess;  // excess = hull - union
  d_union -= d_excess;
  const V d_area_a = d_union, d_area_b = d_union;  // union = area_a + area_b - inter
  d_inter -= d_union;

  const V zero = V{};
  const V d_riw = riw > 0 ? d_inter * ih : zero;  // inter = clamp(riw, 0) * clamp(rih, 0)
  const V d_rih = rih > 0 ? d_inter * iw : zero;
  const V d_rcw = rcw > 0 ? d_hull * ch : zero;  // hull = clamp(rcw, 0) * clamp(rch, 0)
  const V d_rch = rch > 0 ? d_hull * cw : zero;

  // corners: areas, then the intersection's and the hull's min / max
  V d_ax1 = d_area_a * ah, d_ax0 = -d_area_a * ah, d_ay1 = d_area_a * aw, d_ay0 = -d_area_a * aw;
  V d_bx1 = d_area_b * bh, d_bx0 = -d_area_b * bh, d_by1 = d_area_b * bw, d_by0 = -d_area_b * bw;
  // a's share of each coordinate's min (the intersection's x1, y1 and the hull's x0, y0) and
  // b's, which is a's share of the max (the intersection's x0, y0 and the hull's x1, y1).
  const V ax1_s = min_share(ax1, bx1), bx1_s = min_share(bx1, ax1), ay1_s = min_share(ay1, by1),
          by1_s = min_share(by1, ay1), ax0_s = min_share(ax0, bx0), bx0_s = min_share(bx0, ax0),
          ay0_s = min_share(ay0, by0), by0_s = min_share(by0, ay0);
  d_ax1 += d_riw * ax1_s;
  d_bx1 += d_riw * bx1_s;
  d_ax0 -= d_riw * bx0_s;
  d_bx0 -= d_riw * ax0_s;
  d_ay1 += d_rih * ay1_s;
  d_by1 += d_rih * by1_s;
  d_ay0 -= d_rih * by0_s;
  d_by0 -= d_rih * ay0_s;
  d_ax1 += d_rcw * bx1_s;
  d_bx1 += d_rcw * ax1_s;
  d_ax0 -= d_rcw * ax0_s;
  d_bx0 -= d_rcw * bx0_s;
  d_ay1 += d_rch * by1_s;
  d_by1 += d_rch * ay1_s;
  d_ay0 -= d_rch * ay0_s;
  d_by0 -= d_rch * by0_s;

  // xyxy = (cx -/+ w / 2, cy -/+ h / 2), plus the L1 term's sgn(s - t)
  const V l1_cx = g_bbox * sign_or_zero(s[0] - t[0]), l1_cy = g_bbox * sign_or_zero(s[1] - t[1]);
  const V l1_w = g_bbox * sign_or_zero(s[2] - t[2]), l1_h = g_bbox * sign_or_zero(s[3] - t[3]);
  ds[0] = l1_cx + (d_ax0 + d_ax1);
  ds[1] = l1_cy + (d_ay0 + d_ay1);
  ds[2] = l1_w + 0.5 * (d_ax1 - d_ax0);
  ds[3] = l1_h + 0.5 * (d_ay1 - d_ay0);
  dt[0] = -l1_cx + (d_bx0 + d_bx1);
  dt[1] = -l1_cy + (d_by0 + d_by1);
  dt[2] = -l1_w + 0.5 * (d_bx1 - d_bx0);
  dt[3] = -l1_h + 0.5 * (d_by1 - d_by0);
}

// Backward of pairs [i0, i0 + n): writes [n, 4] rows of gs / gt (S, contiguous; gt may be null).
template <typename S>
UNIT_FAST_INLINE void box_loss_bwd_body(const S* src, int64_t ss0, int64_t ss1, const S* tgt, int64_t ts0,
                                        int64_t ts1, int64_t i0, int64_t n, S g_bbox, S g_giou, S* gs, S* gt) {
  typedef typename VecOf<S>::type V;
  constexpr int64_t L = Lanes<S, V>::kLanes;
  const V vg_bbox = v_splat<V>(g_bbox), vg_giou = v_splat<V>(g_giou);
  for (int64_t i = 0; i < n; i += L) {
    Lanes<S, V> p;
    const int64_t m = std::min(L, n - i);
    load_lanes(src, ss0, ss1, tgt, ts0, ts1, i0 + i, m, p);
    V ds[4], dt[4];
    pair_backward(p.s, p.t, vg_bbox, vg_giou, ds, dt);
    for (int64_t j = 0; j < m; ++j) {
      S* o = gs + (i0 + i + j) * 4;
      for (int k = 0; k < 4; ++k) o[k] = ds[k][j];
      if (gt != nullptr) {
        S* u = gt + (i0 + i + j) * 4;
        for (int k = 0; k < 4; ++k) u[k] = dt[k][j];
      }
    }
  }
}

#define BOX_LOSS_FWD_PARAMS(S)                                                                              \
  (const S* src, int64_t ss0, int64_t ss1, const S* tgt, int64_t ts0, int64_t ts1, int64_t i0, int64_t n, \
   double* partial)
#define BOX_LOSS_FWD_ARGS (src, ss0, ss1, tgt, ts0, ts1, i0, n, partial)
#define BOX_LOSS_BWD_PARAMS(S)                                                                              \
  (const S* src, int64_t ss0, int64_t ss1, const S* tgt, int64_t ts0, int64_t ts1, int64_t i0, int64_t n, \
   S g_bbox, S g_giou, S* gs, S* gt)
#define BOX_LOSS_BWD_ARGS (src, ss0, ss1, tgt, ts0, ts1, i0, n, g_bbox, g_giou, gs, gt)

// The AVX-512 build runs the same YMM-wide code (kLanes pairs per vector); it is listed for the
// dispatcher's sake only.
UNIT_FAST_CPU_DISPATCH(box_loss_fwd_f32, box_loss_fwd_body<float>, box_loss_fwd_body<float>,
                       BOX_LOSS_FWD_PARAMS(float), BOX_LOSS_FWD_ARGS)
UNIT_FAST_CPU_DISPATCH(box_loss_fwd_f64, box_loss_fwd_body<double>, box_loss_fwd_body<double>,
                       BOX_LOSS_FWD_PARAMS(double), BOX_LOSS_FWD_ARGS)
UNIT_FAST_CPU_DISPATCH(box_loss_bwd_f32, box_loss_bwd_body<float>, box_loss_bwd_body<float>,
                       BOX_LOSS_BWD_PARAMS(float), BOX_LOSS_BWD_ARGS)
UNIT_FAST_CPU_DISPATCH(box_loss_bwd_f64, box_loss_bwd_body<double>, box_loss_bwd_body<double>,
                       BOX_LOSS_BWD_PARAMS(double), BOX_LOSS_BWD_ARGS)

void box_loss_fwd(const float* src, int64_t ss0, int64_t ss1, const float* tgt, int64_t ts0, int64_t ts1,
                  int64_t i0, int64_t n, double* partial) {
  box_loss_fwd_f32(src, ss0, ss1, tgt, ts0, ts1, i0, n, partial);
}
void box_loss_fwd(const double* src, int64_t ss0, int64_t ss1, const double* tgt, int64_t ts0, int64_t ts1,
                  int64_t i0, int64_t n, double* partial) {
  box_loss_fwd_f64(src, ss0, ss1, tgt, ts0, ts1, i0, n, partial);
}
void box_loss_bwd(const float* src, int64_t ss0, int64_t ss1, const float* tgt, int64_t ts0, int64_t ts1,
                  int64_t i0, int64_t n, float g_bbox, float g_giou, float* gs, float* gt) {
  box_loss_bwd_f32(src, ss0, ss1, tgt, ts0, ts1, i0, n, g_bbox, g_giou, gs, gt);
}
void box_loss_bwd(const double* src, int64_t ss0, int64_t ss1, const double* tgt, int64_t ts0, int64_t ts1,
                  int64_t i0, int64_t n, double g_bbox, double g_giou, double* gs, double* gt) {
  box_loss_bwd_f64(src, ss0, ss1, tgt, ts0, ts1, i0, n, g_bbox, g_giou, gs, gt);
}

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return at::promote_types(at::promote_types(a.scalar_type(), b.scalar_type()), at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> box_loss_forward_kernel(const at::Tensor& src_boxes, const at::Tensor& target_boxes) {
  check_box_loss_args(src_boxes, target_boxes);
  const at::ScalarType acc = compute_dtype(src_boxes, target_boxes);
  // A no-op for the usual float32 inputs; a float16 / bfloat16 input is widened exactly.
  const at::Tensor src = src_boxes.to(acc), tgt = target_boxes.to(acc);
  const int64_t N = src.size(0), blocks = (N + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(2 * blocks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "box_loss_cpu", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    const scalar_t* t = tgt.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * kBlock;
        box_loss_fwd(s, src.stride(0), src.stride(1), t, tgt.stride(0), tgt.stride(1), i0, std::min(kBlock, N - i0),
                     partial.data() + 2 * blk);
      }
    });
  });
  double sum_l1 = 0.0, sum_lg = 0.0;
  for (int64_t blk = 0; blk < blocks; ++blk) {  // block order: deterministic
    sum_l1 += partial[2 * blk];
    sum_lg += partial[2 * blk + 1];
  }
  const auto opts = src_boxes.options().dtype(acc);
  return {at::scalar_tensor(sum_l1, opts), at::scalar_tensor(sum_lg, opts)};
}

std::tuple<at::Tensor, at::Tensor> box_loss_backward_kernel(const at::Tensor& grad_bbox, const at::Tensor& grad_giou,
                                                            const at::Tensor& src_boxes, const at::Tensor& target_boxes,
                                                            bool need_target_grad) {
  check_box_loss_args(src_boxes, target_boxes);
  TORCH_CHECK(grad_bbox.numel() == 1 && grad_giou.numel() == 1,
              "box_loss backward: the upstream gradients must be scalars, got ", py_shape(grad_bbox.sizes()), " and ",
              py_shape(grad_giou.sizes()));
  const at::ScalarType acc = compute_dtype(src_boxes, target_boxes);
  const at::Tensor src = src_boxes.to(acc), tgt = target_boxes.to(acc);
  const int64_t N = src.size(0), blocks = (N + kBlock - 1) / kBlock;
  at::Tensor gs = at::empty({N, 4}, src.options());
  at::Tensor gt = at::empty({need_target_grad ? N : 0, 4}, tgt.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "box_loss_backward_cpu", [&] {
    const scalar_t gb = grad_bbox.item().to<scalar_t>();  // CPU: reading them costs no sync
    const scalar_t gg = grad_giou.item().to<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    const scalar_t* t = tgt.data_ptr<scalar_t>();
    scalar_t* gsp = gs.data_ptr<scalar_t>();
    scalar_t* gtp = need_target_grad ? gt.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * kBlock;
        box_loss_bwd(s, src.stride(0), src.stride(1), t, tgt.stride(0), tgt.stride(1), i0, std::min(kBlock, N - i0),
                     gb, gg, gsp, gtp);
      }
    });
  });
  // Gradients in the inputs' own dtypes (float32 / float64 inputs: no copy).
  return {gs.to(src_boxes.scalar_type()), gt.to(target_boxes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(unit_fast, CPU, m) {
  m.impl("box_loss_cpp", &box_loss_forward_kernel);
  m.impl("_box_loss_cpp_backward", &box_loss_backward_kernel);
}

}  // namespace ops
}  // namespace unit_fast
