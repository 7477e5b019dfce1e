// unit_fast::matching_cost_cpp -- the DETR/MMF Hungarian matcher's cost, per image.
//
// matching_cost_cpp(pred_logits [(L,) B, Q, C+1], pred_boxes [(L,) B, Q, 4],
//                   tgt_labels [B, T] int, tgt_boxes [B, T, 4], num_targets [B] int,
//                   cost_class, cost_bbox, cost_giou, logsoftmax) -> [(L,) B, Q, T] float32
// The spec is unit_fast/ops/matching_cost/reference.py::matching_cost_ref.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "py_format.h"

namespace unit_fast {
namespace ops {

// The Python dispatcher's checks (op.py::_check_inputs), with the same messages and
// exception types (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError), so that
// a direct call of the op fails as the reference path does instead of reading out of bounds.
inline void check_matching_cost_args(const at::Tensor& pred_logits, const at::Tensor& pred_boxes,
                                     const at::Tensor& tgt_labels, const at::Tensor& tgt_boxes,
                                     const at::Tensor& num_targets) {
  TORCH_CHECK_VALUE(pred_logits.dim() == 3 || pred_logits.dim() == 4,
                    "pred_logits must be [B, Q, C+1] or [L, B, Q, C+1], got ", py_shape(pred_logits.sizes()));
  std::vector<int64_t> box_shape(pred_logits.sizes().begin(), pred_logits.sizes().end() - 1);
  box_shape.push_back(4);
  TORCH_CHECK_VALUE(pred_boxes.sizes() == at::IntArrayRef(box_shape), "pred_boxes must be ",
                    py_shape(box_shape), " to match pred_logits, got ", py_shape(pred_boxes.sizes()));
  TORCH_CHECK_VALUE(pred_logits.size(-1) >= 1, "pred_logits needs at least one class (C+1 >= 1)");
  const int64_t B = pred_logits.size(-3);
  TORCH_CHECK_VALUE(tgt_labels.dim() == 2 && tgt_labels.size(0) == B, "tgt_labels must be [B=", B,
                    ", T], got ", py_shape(tgt_labels.sizes()));
  const int64_t T = tgt_labels.size(1);
  TORCH_CHECK_VALUE(tgt_boxes.dim() == 3 && tgt_boxes.size(0) == B && tgt_boxes.size(1) == T &&
                        tgt_boxes.size(2) == 4,
                    "tgt_boxes must be (", B, ", ", T, ", 4), got ", py_shape(tgt_boxes.sizes()));
  TORCH_CHECK_VALUE(num_targets.dim() == 1 && num_targets.size(0) == B, "num_targets must be [B=", B,
                    "], got ", py_shape(num_targets.sizes()));
  const std::pair<const char*, const at::Tensor*> floats[] = {
      {"pred_logits", &pred_logits}, {"pred_boxes", &pred_boxes}, {"tgt_boxes", &tgt_boxes}};
  for (const auto& nt : floats) {
    TORCH_CHECK_TYPE(at::isFloatingType(nt.second->scalar_type()), nt.first,
                     " must be a floating tensor, got ", py_dtype(nt.second->scalar_type()));
  }
  const std::pair<const char*, const at::Tensor*> ints[] = {{"tgt_labels", &tgt_labels},
                                                            {"num_targets", &num_targets}};
  for (const auto& nt : ints) {
    TORCH_CHECK_TYPE(at::isIntegralType(nt.second->scalar_type(), /*includeBool=*/false), nt.first,
                     " must hold integers (int64), got ", py_dtype(nt.second->scalar_type()));
  }
  for (const at::Tensor* t : {&pred_boxes, &tgt_labels, &tgt_boxes, &num_targets}) {
    TORCH_CHECK_VALUE(t->device() == pred_logits.device(), "matching_cost inputs must share one device, got ",
                      pred_logits.device(), " and ", t->device());
  }
}

}  // namespace ops
}  // namespace unit_fast
