// unit_fast::pairwise_giou_cpp / unit_fast::_pairwise_giou_cpp_backward -- DETR's
// generalized_box_iou of every pair of xyxy boxes.
//
// pairwise_giou_cpp(boxes1 [N, 4], boxes2 [M, 4]) -> [N, M] in the inputs' dtype;
// _pairwise_giou_cpp_backward(grad [N, M], boxes1, boxes2) -> (grad1 [N, 4], grad2 [M, 4]).
// The spec is unit_fast/ops/pairwise_giou/reference.py::pairwise_giou_ref.
#pragma once

#include <ATen/ATen.h>

#include "py_format.h"

namespace unit_fast {
namespace ops {

// op.py::_check, same messages and exception types (ValueError / TypeError).
inline void check_pairwise_giou_args(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  const std::pair<const char*, const at::Tensor*> named[] = {{"boxes1", &boxes1}, {"boxes2", &boxes2}};
  for (const auto& nb : named) {
    const at::Tensor& b = *nb.second;
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(1) == 4, "pairwise_giou: ", nb.first, " must be an (N, 4) tensor, got ",
                      py_shape(b.sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "pairwise_giou: ", nb.first, " must be floating, got ",
                     py_dtype(b.scalar_type()));
  }
  TORCH_CHECK_VALUE(boxes1.scalar_type() == boxes2.scalar_type() && boxes1.device() == boxes2.device(),
                    "pairwise_giou: boxes1 (", py_dtype(boxes1.scalar_type()), ", ", boxes1.device(),
                    ") and boxes2 (", py_dtype(boxes2.scalar_type()), ", ", boxes2.device(),
                    ") must share dtype and device");
}

}  // namespace ops
}  // namespace unit_fast
