// Schemas of every C++ op in unit_fast._C.  Kernels register per dispatch key
// in ops/cpu/*.cpp and ops/cuda/*.cu; fake kernels live in Python (op.py).
#include <Python.h>
#include <torch/library.h>

#include "ops/hungarian_match.h"

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace unit_fast {

// CUDA runtime version the extension was built with, -1 for a CPU-only build
// (torchvision's _cuda_version idea): how Python learns HAS_CUDA_EXT.
int64_t _cuda_version() {
#ifdef WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(unit_fast, m) {
  m.def(
      "hungarian_match(Tensor cost, Tensor? num_cols=None, bool maximize=False, "
      "bool scipy_ties=False) -> Tensor");
  // Test-only: the CUDA kernel's per-block decomposition simulated on the CPU.
  m.def(
      "_hungarian_match_block_sim(Tensor cost, Tensor? num_cols, bool maximize, bool scipy_ties, "
      "int threads, int cluster=1) -> Tensor");
  // CPU kernels of the matcher's cost and the box losses (ops/<op>.h; the Triton-backed ops of
  // the same names without "_cpp" are Python custom ops, unit_fast/ops/<op>/op.py).
  m.def(
      "matching_cost_cpp(Tensor pred_logits, Tensor pred_boxes, Tensor tgt_labels, Tensor tgt_boxes, "
      "Tensor num_targets, float cost_class, float cost_bbox, float cost_giou, bool logsoftmax) -> Tensor");
  m.def("box_loss_cpp(Tensor src_boxes, Tensor target_boxes) -> (Tensor, Tensor)");
  m.def(
      "_box_loss_cpp_backward(Tensor grad_bbox, Tensor grad_giou, Tensor src_boxes, Tensor target_boxes, "
      "bool need_target_grad) -> (Tensor, Tensor)");
  m.def("pairwise_giou_cpp(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("_pairwise_giou_cpp_backward(Tensor grad, Tensor boxes1, Tensor boxes2) -> (Tensor, Tensor)");
  m.def("_cuda_version() -> int", &_cuda_version);
  // Which build of the CPU LSA kernel's float path runs here (ops/hungarian_match.h).
  m.def("_lsa_cpu_isa() -> str", &ops::lsa_cpu_isa);
}

}  // namespace unit_fast

// Importing unit_fast._C only loads the library so the registrations above run.
// The plain C-API module (instead of an empty PYBIND11_MODULE) keeps pybind11
// out of the build, which saves most of a minute of compile time per file.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
