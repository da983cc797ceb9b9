// Input validation shared by the CPU and CUDA kernels of every op. Each op has one
// check_<op>_inputs() (in <op>.h) built from these, so both devices reject the same inputs with
// the same words: "autokd::<op>: expected <arg> <what>, got <what>".
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace autokd {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Raises ValueError in Python (c10::ValueError) with the op and argument named.
#define AUTOKD_CHECK(cond, op, ...)                                    \
  TORCH_CHECK_VALUE((cond), "autokd::", op, ": ", __VA_ARGS__)

inline void check_defined(const char* op, const char* arg, const at::Tensor& t) {
  AUTOKD_CHECK(t.defined(), op, "expected ", arg, " to be a tensor, got None");
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  AUTOKD_CHECK(at::isFloatingType(t.scalar_type()), op, "expected ", arg,
               " to be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
               t.scalar_type());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  AUTOKD_CHECK(t.dim() == dim, op, "expected ", arg, " of shape ", layout, ", got ",
               shape_str(t));
}

inline void check_nonempty(const char* op, const char* arg, const at::Tensor& t) {
  AUTOKD_CHECK(t.numel() > 0, op, "expected ", arg, " to be non-empty, got shape ",
               shape_str(t));
}

inline void check_same_shape(const char* op, const char* a, const at::Tensor& x, const char* b,
                             const at::Tensor& y) {
  AUTOKD_CHECK(x.sizes() == y.sizes(), op, "expected ", b, " of the same shape as ", a, " ",
               shape_str(x), ", got ", shape_str(y));
}

inline void check_same_dtype_device(const char* op, const char* a, const at::Tensor& x,
                                    const char* b, const at::Tensor& y) {
  AUTOKD_CHECK(x.device() == y.device(), op, "expected ", b, " on the same device as ", a, " (",
               x.device(), "), got ", y.device());
  AUTOKD_CHECK(x.scalar_type() == y.scalar_type(), op, "expected ", b, " of the same dtype as ",
               a, " (", x.scalar_type(), "), got ", y.scalar_type());
}

inline void check_positive(const char* op, const char* arg, double v) {
  AUTOKD_CHECK(v > 0 && std::isfinite(v), op, "expected ", arg, " > 0 and finite, got ", v);
}

}  // namespace autokd
