// Input validation shared by the CPU and CUDA kernels of every op. Each op has one
// check_<op>_inputs() (in <op>.h) built from these, so both devices reject the same inputs with
// the same words: "autokd::<op>: expected <arg> <what>, got <what>".
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace autokd {

// Error messages are assembled here with std::to_string/snprintf, never with std::ostream.
// Streaming a number through an ostream built in this library depends on the locale facets of
// the libstdc++ that this library was linked against; where a toolchain links a second copy of
// libstdc++ into the extension (seen on a lent GPU image: the check for multiscale_pool's grid
// sizes crashed inside std::ostream::_M_insert<long>), those facets are not the process's and
// the error path itself segfaults. Strings, numbers and torch's own to-string functions are
// safe everywhere.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  char buf[32];  // %g is what an ostream prints by default (6 significant digits)
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::Layout v) {
  switch (v) {
    case at::kStrided: s += "Strided"; return;
    case at::kSparse: s += "Sparse"; return;
    case at::kSparseCsr: s += "SparseCsr"; return;
    case at::kSparseCsc: s += "SparseCsc"; return;
    case at::kSparseBsr: s += "SparseBsr"; return;
    case at::kSparseBsc: s += "SparseBsc"; return;
    case at::kMkldnn: s += "Mkldnn"; return;
    case at::kJagged: s += "Jagged"; return;
    default: s += "layout " + std::to_string(static_cast<int>(v));
  }
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
}  // namespace detail

template <class... Args>
inline std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

inline std::string shape_str(const at::Tensor& t) { return message(t.sizes()); }

// Raises ValueError in Python (c10::ValueError) with the op and argument named.
#define AUTOKD_CHECK(cond, op, ...)                                                     \
  TORCH_CHECK_VALUE((cond), ::autokd::message("autokd::", op, ": ", __VA_ARGS__))

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
