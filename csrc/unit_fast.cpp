// Schemas of every C++ op in unit_fast._C.  Kernels register per dispatch key
// in ops/cpu/*.cpp and ops/cuda/*.cu; fake kernels live in Python (op.py).
#include <Python.h>
#include <torch/library.h>

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
      "int threads) -> Tensor");
  m.def("_cuda_version() -> int", &_cuda_version);
}

}  // namespace unit_fast

// Importing unit_fast._C only loads the library so the registrations above run.
// The plain C-API module (instead of an empty PYBIND11_MODULE) keeps pybind11
// out of the build, which saves most of a minute of compile time per file.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
