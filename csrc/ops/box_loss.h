// unit_fast::box_loss_cpp / unit_fast::_box_loss_cpp_backward -- DETR's L1 + GIoU box loss of
// matched pairs (SetCriterion.loss_boxes), unnormalised.
//
// box_loss_cpp(src [N, 4], tgt [N, 4]) -> (sum_i L1_i, sum_i (1 - GIoU_i)), 0-d tensors of the
//   compute dtype (float64 if an input is float64, else float32);
// _box_loss_cpp_backward(grad_bbox, grad_giou, src, tgt, need_target_grad)
//   -> (grad_src [N, 4] in src's dtype, grad_tgt [N, 4] in tgt's dtype, or [0, 4]).
// The spec is unit_fast/ops/box_loss/reference.py::box_loss_ref.
#pragma once

#include <ATen/ATen.h>

#include "py_format.h"

namespace unit_fast {
namespace ops {

// op.py::_check_inputs, same messages; RuntimeError as torch._check raises.
inline void check_box_loss_args(const at::Tensor& src, const at::Tensor& tgt) {
  TORCH_CHECK(src.dim() == 2 && src.size(-1) == 4, "box_loss: src_boxes must be (N, 4), got ", py_shape(src.sizes()));
  TORCH_CHECK(tgt.sizes() == src.sizes(), "box_loss: target_boxes ", py_shape(tgt.sizes()), " != src_boxes ",
              py_shape(src.sizes()));
  TORCH_CHECK(at::isFloatingType(src.scalar_type()) && at::isFloatingType(tgt.scalar_type()),
              "box_loss: boxes must be floating, got ", py_dtype(src.scalar_type()), " and ",
              py_dtype(tgt.scalar_type()));
  TORCH_CHECK(src.device() == tgt.device(), "box_loss: boxes on ", src.device(), " and ", tgt.device());
}

}  // namespace ops
}  // namespace unit_fast
