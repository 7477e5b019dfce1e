// Shapes and dtypes formatted as Python prints them, for the C++ ops' argument checks: their
// messages then read exactly as the Python dispatchers' (which format tuple(t.shape), t.dtype).
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <utility>

namespace unit_fast {
namespace ops {

// A shape as Python prints a tuple: (3, 4), (3,), ().
inline std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

// A dtype as torch prints it: torch.float32.
inline std::string py_dtype(at::ScalarType t) {
  std::string s = c10::toString(t);  // "Float"
  const std::pair<const char*, const char*> names[] = {{"Float", "torch.float32"}, {"Double", "torch.float64"},
                                                       {"Half", "torch.float16"}, {"BFloat16", "torch.bfloat16"},
                                                       {"Long", "torch.int64"},   {"Int", "torch.int32"},
                                                       {"Bool", "torch.bool"}};
  for (const auto& n : names)
    if (s == n.first) return n.second;
  return s;
}

}  // namespace ops
}  // namespace unit_fast
