// CPU kernel of unit_fast::matching_cost_cpp: the DETR/MMF matcher cost, several decoder
// layers at once, one pass over each (layer, image, query block).
//
// Math, in float32 whatever the input dtypes, for query q and target t of image b
// (matching_cost_ref is the spec; the Triton kernel does the same in tiles):
//
//   lse[q]     = m[q] + log sum_c exp(x[q, c] - m[q])            m[q] = max_c x[q, c]
//   p[q, t]    = exp(x[q, label_t] - lse[q])   (x[q, label_t] - lse[q] with logsoftmax)
//   L1[q, t]   = sum_k |pred[q, k] - tgt[t, k]|                  (cxcywh)
//   GIoU[q, t] = inter / union - (hull - union) / hull           (xyxy)
//   out[q, t]  = cost_bbox * L1 + cost_class * (-p) + cost_giou * (-GIoU)   (DETR's order)
//
// and out[q, t] = +inf for t >= num_targets[b].  A row whose max logit is not finite (a NaN,
// a +inf, or all -inf) gets lse = NaN: torch's softmax and log_softmax give that row NaN too.
// A real target whose label is outside [0, C+1) gets a NaN class cost (hence a NaN column).
//
// Parallel decomposition: at::parallel_for over (layer, image, block of kQueryBlock queries).
// Each task converts its block's logit rows to float32 once (exact for fp16/bf16; the
// reference's .float() rounding for fp64), then per row: a max pass and an exp-sum pass over
// the classes, a gather of the T target logits, and one vectorized pass over the T targets.
// The targets' per-image terms (xyxy corners, area, clamped label, padding flag) are laid out
// once, structure-of-arrays, before the parallel loop, so the per-target loop reads unit-stride
// floats.  Nothing is accumulated across tasks: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cpu_math.h"
#include "../matching_cost.h"

namespace unit_fast {
namespace ops {
namespace {

using namespace cpu_math;  // NOLINT: the v8 helpers

constexpr int64_t kQueryBlock = 16;  // rows per task: a 16 x 96 float block (6 KB) stays in L1
constexpr int64_t kLanes = 8;        // floats per v8f (the target loop); target arrays are padded to it
constexpr int64_t kClassPad = 32;    // logit rows are padded to it: two v16f (or four v8f)

UNIT_FAST_INLINE int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// One image's targets, structure-of-arrays, each [Tpad] (see make_targets).
struct Targets {
  const float* cx;
  const float* cy;
  const float* w;
  const float* h;
  const float* x0;
  const float* y0;
  const float* x1;
  const float* y1;
  const float* area;
  const float* pad;      // +inf for padding columns (t >= num_targets[b]), else 0
  const float* bad;      // NaN for a real target whose label is out of range, else 0
  const int64_t* label;  // the label to gather, 0 where none is (padding, out of range)
};
constexpr int kTargetFields = 11;  // float fields above

// Costs of `nq` query rows against one image's T targets.
//   x:     [nq, C1pad] float32 logits (C1pad: C+1 rounded up to 32), columns past C+1 hold -inf;
//   boxes: [nq, 4] float32 cxcywh;  out: [nq, T] (row stride T);
//   e:     [C1pad] scratch (the row's exp(x - max));  g, o: [Tpad] scratch (the gathered
//          class terms, one padded output row).
template <typename VC>
UNIT_FAST_INLINE void cost_rows_body(const float* __restrict x, int64_t nq, int64_t C1pad,
                                     const float* __restrict boxes, const Targets& tg, int64_t T, float w_class,
                                     float w_bbox, float w_giou, bool logsoftmax, float* __restrict out,
                                     float* __restrict e, float* __restrict g, float* __restrict o) {
  const float kInf = std::numeric_limits<float>::infinity();
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const int64_t Tpad = round_up(T);
  for (int64_t q = 0; q < nq; ++q) {
    const float* __restrict row = x + q * C1pad;
    // Softmax statistics over the classes, 8 lanes at a time: a max pass, then an exp-sum pass
    // that keeps exp(x - max) for the gather.  Two accumulators each (C1pad is a multiple of
    // 2 * W): with one, the exp-sum pass waits on the add latency.
    constexpr int64_t W = sizeof(VC) / sizeof(float);  // lanes of the class loops: 8 or 16
    VC mx = v_splat<VC>(-kInf), mx2 = mx;
    for (int64_t c = 0; c < C1pad; c += 2 * W) {
      mx = v_max(mx, v_load<VC>(row + c));
      mx2 = v_max(mx2, v_load<VC>(row + c + W));
    }
    mx = v_max(mx, mx2);
    float m = mx[0];
    for (int j = 1; j < W; ++j) m = std::max(m, mx[j]);
    // A row with a NaN, a +inf or only -inf logits is NaN throughout, as torch's softmax and
    // log_softmax give it.  (The max above may skip a NaN; the exp-sum below does not.)
    float lse = kNaN, inv_s = kNaN;
    if (std::isfinite(m)) {
      VC sum = VC{}, sum2 = VC{};
      for (int64_t c = 0; c < C1pad; c += 2 * W) {
        const VC e1 = v_exp(v_load<VC>(row + c) - m), e2 = v_exp(v_load<VC>(row + c + W) - m);
        v_store(e + c, e1);
        v_store(e + c + W, e2);
        sum += e1;
        sum2 += e2;
      }
      sum += sum2;
      float s = 0.0f;
      for (int j = 0; j < W; ++j) s += sum[j];
      lse = m + std::log(s);
      inv_s = 1.0f / s;
    }
    // The gather: p = exp(x - max) / sum (as torch's softmax forms it), or x - lse.
    const float* __restrict src = logsoftmax ? row : e;
    for (int64_t t = 0; t < Tpad; ++t) g[t] = src[tg.label[t]];

    const float* b = boxes + q * 4;
    const float pcx = b[0], pcy = b[1], pw = b[2], ph = b[3];
    // xyxy as the reference's _cxcywh_to_xyxy (c - 0.5 * w, c + 0.5 * w)
    const float px0 = pcx - 0.5f * pw, py0 = pcy - 0.5f * ph, px1 = pcx + 0.5f * pw, py1 = pcy + 0.5f * ph;
    const float parea = (px1 - px0) * (py1 - py0);
    // torch.min / max propagate NaN, v_min / v_max need not.  No matter: a NaN corner (from a
    // NaN coordinate, or inf - inf) is also in its box's area, so the union, the GIoU and the
    // cost are NaN whatever the min / max pick (tests: NaN and inf boxes vs the reference).
    const v8f vpx0 = v_splat<v8f>(px0), vpy0 = v_splat<v8f>(py0), vpx1 = v_splat<v8f>(px1), vpy1 = v_splat<v8f>(py1);
    for (int64_t t = 0; t < Tpad; t += kLanes) {
      const v8f gt = v_load<v8f>(g + t);
      const v8f c_class = logsoftmax ? lse - gt : -(gt * inv_s);
      // L1 in coordinate order, as the reference's .sum(-1)
      const v8f l1 = v_abs(pcx - v_load<v8f>(tg.cx + t)) + v_abs(pcy - v_load<v8f>(tg.cy + t)) +
                     v_abs(pw - v_load<v8f>(tg.w + t)) + v_abs(ph - v_load<v8f>(tg.h + t));
      const v8f tx0 = v_load<v8f>(tg.x0 + t), ty0 = v_load<v8f>(tg.y0 + t);
      const v8f tx1 = v_load<v8f>(tg.x1 + t), ty1 = v_load<v8f>(tg.y1 + t);
      const v8f inter = v_clamp0(v_min(vpx1, tx1) - v_max(vpx0, tx0)) *
                        v_clamp0(v_min(vpy1, ty1) - v_max(vpy0, ty0));
      const v8f uni = parea + v_load<v8f>(tg.area + t) - inter;
      const v8f hull = v_clamp0(v_max(vpx1, tx1) - v_min(vpx0, tx0)) *
                       v_clamp0(v_max(vpy1, ty1) - v_min(vpy0, ty0));
      const v8f giou = inter / uni - (hull - uni) / hull;
      const v8f cost = w_bbox * l1 + w_class * c_class + w_giou * (-giou) + v_load<v8f>(tg.bad + t);
      v_store(o + t, v_load<v8f>(tg.pad + t) != 0.0f ? v_splat<v8f>(kInf) : cost);
    }
    std::memcpy(out + q * T, o, static_cast<size_t>(T) * sizeof(float));
  }
}

UNIT_FAST_CPU_DISPATCH(cost_rows, cost_rows_body<v16f>, cost_rows_body<v8f>,
                       (const float* x, int64_t nq, int64_t C1pad, const float* boxes, const Targets& tg,
                        int64_t T, float w_class, float w_bbox, float w_giou, bool logsoftmax, float* out,
                        float* e, float* g, float* o),
                       (x, nq, C1pad, boxes, tg, T, w_class, w_bbox, w_giou, logsoftmax, out, e, g, o))

// The per-image target terms: [B, kTargetFields, T] floats plus [B, T] gather labels.
void make_targets(const at::Tensor& tgt_boxes, const at::Tensor& tgt_labels, const at::Tensor& num_targets,
                  int64_t C1, std::vector<float>& fields, std::vector<int64_t>& labels) {
  const int64_t B = tgt_labels.size(0), T = tgt_labels.size(1), Tpad = round_up(T);
  // Columns T..Tpad-1 are padding (+inf, computed and dropped): unit boxes, label 0.
  fields.assign(static_cast<size_t>(B * kTargetFields * Tpad), 0.0f);
  labels.assign(static_cast<size_t>(B * Tpad), 0);
  const float* tb = tgt_boxes.data_ptr<float>();  // [B, T, 4] contiguous
  const int64_t* tl = tgt_labels.data_ptr<int64_t>();  // [B, T] contiguous
  const int64_t* nt = num_targets.data_ptr<int64_t>();  // [B]
  const float kInf = std::numeric_limits<float>::infinity();
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  for (int64_t b = 0; b < B; ++b) {
    float* f = fields.data() + b * kTargetFields * Tpad;
    for (int64_t t = 0; t < Tpad; ++t) {
      const bool real = t < T && t < nt[b];
      const float* box = tb + (b * T + t) * 4;
      // Padding boxes may hold anything (NaN): their columns are +inf whatever they compute.
      const float cx = real ? box[0] : 0.5f, cy = real ? box[1] : 0.5f;
      const float w = real ? box[2] : 1.0f, h = real ? box[3] : 1.0f;
      const float x0 = cx - 0.5f * w, y0 = cy - 0.5f * h, x1 = cx + 0.5f * w, y1 = cy + 0.5f * h;
      const int64_t label = real ? tl[b * T + t] : 0;
      const bool in_range = label >= 0 && label < C1;
      const float values[kTargetFields] = {cx, cy, w, h, x0, y0, x1, y1, (x1 - x0) * (y1 - y0),
                                           real ? 0.0f : kInf,
                                           (real && !in_range) ? kNaN : 0.0f};
      for (int k = 0; k < kTargetFields; ++k) f[k * Tpad + t] = values[k];
      labels[b * Tpad + t] = (real && in_range) ? label : 0;
    }
  }
}

template <typename scalar_t>
void matching_cost_kernel_impl(const at::Tensor& logits, const at::Tensor& boxes, const std::vector<float>& fields,
                               const std::vector<int64_t>& labels, float w_class, float w_bbox, float w_giou,
                               bool logsoftmax, at::Tensor& out) {
  const int64_t L = logits.size(0), B = logits.size(1), Q = logits.size(2), C1 = logits.size(3);
  const int64_t T = out.size(3);
  const int64_t C1pad = (C1 + kClassPad - 1) / kClassPad * kClassPad, Tpad = round_up(T);
  const int64_t sx_l = logits.stride(0), sx_b = logits.stride(1), sx_q = logits.stride(2), sx_c = logits.stride(3);
  const int64_t sb_l = boxes.stride(0), sb_b = boxes.stride(1), sb_q = boxes.stride(2), sb_k = boxes.stride(3);
  const scalar_t* xbase = logits.data_ptr<scalar_t>();
  const float* bbase = boxes.data_ptr<float>();
  float* obase = out.data_ptr<float>();
  const int64_t qblocks = (Q + kQueryBlock - 1) / kQueryBlock;
  const float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, L * B * qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(static_cast<size_t>(kQueryBlock * C1pad), kNegInf);  // padding stays -inf
    std::vector<float> bbuf(kQueryBlock * 4);
    std::vector<float> e(static_cast<size_t>(C1pad)), g(static_cast<size_t>(Tpad)), o(static_cast<size_t>(Tpad));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t lb = task / qblocks, q0 = (task % qblocks) * kQueryBlock;
      const int64_t l = lb / B, b = lb % B;
      const int64_t nq = std::min(kQueryBlock, Q - q0);
      for (int64_t i = 0; i < nq; ++i) {
        const scalar_t* src = xbase + l * sx_l + b * sx_b + (q0 + i) * sx_q;
        float* dst = xbuf.data() + i * C1pad;
        if (std::is_same<scalar_t, float>::value && sx_c == 1) {
          std::memcpy(dst, src, static_cast<size_t>(C1) * sizeof(float));  // the common layout
        } else {
          for (int64_t c = 0; c < C1; ++c) dst[c] = static_cast<float>(src[c * sx_c]);  // exact for fp16/bf16
        }
        const float* bsrc = bbase + l * sb_l + b * sb_b + (q0 + i) * sb_q;
        for (int64_t k = 0; k < 4; ++k) bbuf[i * 4 + k] = bsrc[k * sb_k];
      }
      const float* f = fields.data() + b * kTargetFields * Tpad;
      const int64_t P = Tpad;
      const Targets tg{f,         f + P,     f + 2 * P, f + 3 * P, f + 4 * P,  f + 5 * P,
                       f + 6 * P, f + 7 * P, f + 8 * P, f + 9 * P, f + 10 * P, labels.data() + b * P};
      cost_rows(xbuf.data(), nq, C1pad, bbuf.data(), tg, T, w_class, w_bbox, w_giou, logsoftmax,
                obase + (lb * Q + q0) * T, e.data(), g.data(), o.data());
    }
  });
}

at::Tensor matching_cost_forward_kernel(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                                        const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                                        const at::Tensor& num_targets, double cost_class, double cost_bbox,
                                        double cost_giou, bool logsoftmax) {
  check_matching_cost_args(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets);
  const bool layered = pred_logits.dim() == 4;
  const at::Tensor x = layered ? pred_logits : pred_logits.unsqueeze(0);  // [L, B, Q, C+1]
  // Boxes are small (4 values per query or target): float32 copies (the reference's .float()).
  const at::Tensor pb = (layered ? pred_boxes : pred_boxes.unsqueeze(0)).to(at::kFloat);  // [L, B, Q, 4]
  const int64_t T = tgt_labels.size(1);
  std::vector<int64_t> shape(pred_logits.sizes().begin(), pred_logits.sizes().end() - 1);
  shape.push_back(T);
  at::Tensor out = at::empty(shape, pred_logits.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  std::vector<float> fields;
  std::vector<int64_t> labels;
  make_targets(tgt_boxes.to(at::kFloat).contiguous(), tgt_labels.to(at::kLong).contiguous(),
               num_targets.to(at::kLong).contiguous(), x.size(3), fields, labels);
  at::Tensor out4 = layered ? out : out.unsqueeze(0);  // [L, B, Q, T], a view of out
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matching_cost_cpu", [&] {
    matching_cost_kernel_impl<scalar_t>(x, pb, fields, labels, static_cast<float>(cost_class),
                                        static_cast<float>(cost_bbox), static_cast<float>(cost_giou), logsoftmax,
                                        out4);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unit_fast, CPU, m) { m.impl("matching_cost_cpp", &matching_cost_forward_kernel); }

}  // namespace ops
}  // namespace unit_fast
