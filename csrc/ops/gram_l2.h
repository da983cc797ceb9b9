// gram_l2: G-L2 distance between normalised Gram matrices (Auto-KD's "G-L2" feature distance).
//
//   loss = || G_S / n(G_S) - G_T / n(G_T) ||_F^2,   G = F F^T,   n(G) = sqrt(||G||_F^2 + eps^2)
//
// mode "sample":  F is [N, D]; one N x N Gram (D may differ between student and teacher).
// mode "channel": F is [N, C, L]; one C x C Gram per sample, each normalised on its own;
//                 loss = mean over the N samples (L may differ, C must agree).
// eps = kGramL2Eps (1e-12) keeps n(G) smooth at G = 0 and is negligible otherwise; the eager
// reference autokd/reference/gram_l2.py uses the same value.
//
// Gradient (student only; the teacher's Gram is a constant target): with Gn = G / n,
//   dL/dGn_S = 2 (Gn_S - Gn_T),   dL/dG_S = (dGn - Gn_S <dGn, Gn_S>) / n_S,
//   dL/dF_S  = (dG + dG^T) F_S = 2 dG F_S   (dG is symmetric).
// The forward returns dL/dG_S next to the loss ("gram_grad", [N, N] or [N, C, C], float32, or
// float64 for float64 inputs) so the backward is a single GEMM instead of recomputing both
// Grams.
//
// Work: the Grams go through at::mm / at::bmm; the kernels fuse the two passes over them:
//   pass 1: ||G_S||^2, ||G_T||^2, <G_S, G_T> per Gram;
//   pass 2: d = Gn_S - Gn_T, sum d^2 (summed directly, not from pass-1 sums, so a loss near 0
//           keeps its relative precision) and gram_grad, using <d, Gn_S> = ||G_S||^2/n_S^2 -
//           <G_S, G_T>/(n_S n_T).
// Accumulation: double on CPU, the Gram's dtype (float32, or float64) on CUDA. Half inputs form
// their Grams in float32 (CPU: upcast; CUDA: at::mm with out_dtype float32).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace autokd {

constexpr double kGramL2Eps = 1e-12;

enum class GramMode { kSample, kChannel };

inline GramMode parse_gram_mode(c10::string_view mode) {
  if (mode == "sample") return GramMode::kSample;
  if (mode == "channel") return GramMode::kChannel;
  AUTOKD_CHECK(false, "gram_l2", "expected mode one of 'sample', 'channel', got '",
               std::string(mode), "'");
  return GramMode::kSample;  // unreachable
}

// Validates student/teacher for the forward and returns the parsed mode.
inline GramMode check_gram_l2_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                     c10::string_view mode) {
  constexpr const char* op = "gram_l2";
  const GramMode m = parse_gram_mode(mode);
  check_defined(op, "student", student);
  check_defined(op, "teacher", teacher);
  check_floating(op, "student", student);
  check_floating(op, "teacher", teacher);
  check_same_dtype_device(op, "student", student, "teacher", teacher);
  if (m == GramMode::kSample) {
    check_dim(op, "student", student, 2, "[N, D] (mode 'sample')");
    check_dim(op, "teacher", teacher, 2, "[N, D] (mode 'sample')");
  } else {
    check_dim(op, "student", student, 3, "[N, C, L] (mode 'channel')");
    check_dim(op, "teacher", teacher, 3, "[N, C, L] (mode 'channel')");
  }
  AUTOKD_CHECK(student.size(0) == teacher.size(0), op,
               "expected teacher with the same N (dim 0) as student (", student.size(0),
               "), got ", shape_str(teacher));
  if (m == GramMode::kChannel) {
    AUTOKD_CHECK(student.size(1) == teacher.size(1), op,
                 "expected teacher with the same C (dim 1) as student (", student.size(1),
                 "), got ", shape_str(teacher));
  }
  check_nonempty(op, "student", student);
  check_nonempty(op, "teacher", teacher);
  return m;
}

// dtype of the Grams and of gram_grad for inputs of dtype `t`.
inline at::ScalarType gram_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_gram_l2_backward_inputs(const at::Tensor& grad, const at::Tensor& gram_grad,
                                          const at::Tensor& student) {
  constexpr const char* op = "gram_l2_backward";
  check_defined(op, "grad", grad);
  check_defined(op, "gram_grad", gram_grad);
  check_defined(op, "student", student);
  check_floating(op, "student", student);
  AUTOKD_CHECK(grad.numel() == 1, op, "expected grad with one element, got ", shape_str(grad));
  AUTOKD_CHECK(student.dim() == 2 || student.dim() == 3, op,
               "expected student of shape [N, D] or [N, C, L], got ", shape_str(student));
  const bool sample = student.dim() == 2;
  const int64_t n = student.size(sample ? 0 : 1);
  const bool ok = sample ? (gram_grad.dim() == 2 && gram_grad.size(0) == n &&
                            gram_grad.size(1) == n)
                         : (gram_grad.dim() == 3 && gram_grad.size(0) == student.size(0) &&
                            gram_grad.size(1) == n && gram_grad.size(2) == n);
  AUTOKD_CHECK(ok, op, "expected gram_grad of shape ",
               sample ? "[N, N]" : "[N, C, C]", " for student ", shape_str(student), ", got ",
               shape_str(gram_grad));
  AUTOKD_CHECK(gram_grad.scalar_type() == gram_acc_type(student.scalar_type()), op,
               "expected gram_grad of dtype ", gram_acc_type(student.scalar_type()), ", got ",
               gram_grad.scalar_type());
  AUTOKD_CHECK(gram_grad.device() == student.device() && grad.device() == student.device(), op,
               "expected grad, gram_grad and student on one device, got ", grad.device(), ", ",
               gram_grad.device(), ", ", student.device());
}

// Per-Gram scalars after pass 1, shared by the CPU and CUDA kernels.
template <typename T>
struct GramL2Scalars {
  T inv_ns;  // 1 / n(G_S)
  T inv_nt;  // 1 / n(G_T)
  T k;       // <Gn_S - Gn_T, Gn_S>
};

template <typename T>
C10_HOST_DEVICE inline GramL2Scalars<T> gram_l2_scalars(T ss, T tt, T st) {
  const T eps2 = static_cast<T>(kGramL2Eps * kGramL2Eps);
  const T inv_ns = T(1) / ::sqrt(ss + eps2);
  const T inv_nt = T(1) / ::sqrt(tt + eps2);
  return {inv_ns, inv_nt, ss * inv_ns * inv_ns - st * inv_ns * inv_nt};
}

}  // namespace autokd
