// pearson: DIST-style relation distillation of [N, K] logits.
//
//   P = softmax(s / tau, dim=1), Q = softmax(t / tau, dim=1)            # [N, K]
//   corr(a, b) = sum (a - mean a)(b - mean b) / (||a - mean a|| ||b - mean b|| + eps)
//   inter = tau^2 * mean_n (1 - corr(P[n, :], Q[n, :]))   (per sample, across classes)
//   intra = tau^2 * mean_k (1 - corr(P[:, k], Q[:, k]))   (per class, across the batch)
// with eps = kPearsonEps = 1e-8 added to the product of the two norms (of the un-normalised
// centred sums, not of standard deviations), the same in the reference and every kernel.
// A constant vector (K = 1, N = 1) has norm 0: its correlation is 0 and its gradient 0.
//
// Moments come from one pass over (P, Q) per row as shifted sums (which avoid the cancellation
// of raw ones), corrected by the accumulated residual sums: rows shift by the exact softmax
// mean 1/K, columns by row 0's (P[0, k], Q[0, k]), a value of the same column. With u = a - mean a, v = b - mean b,
// D = ||u|| ||v|| + eps:  d corr / d a = v / D - (u.v) ||v|| / (D^2 ||u||) u   (already centred),
// then through the softmax: d/ds = P (g - <g, P>) / tau. The teacher gets no gradient.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace autokd {

constexpr double kPearsonEps = 1e-8;

#ifdef __CUDACC__
#define AUTOKD_HOST_DEVICE __host__ __device__
#else
#define AUTOKD_HOST_DEVICE
#endif

inline void check_pearson_inputs(const char* op, const at::Tensor& student,
                                 const at::Tensor& teacher, double tau) {
  check_defined(op, "student", student);
  check_defined(op, "teacher", teacher);
  check_dim(op, "student", student, 2, "[N, K]");
  check_same_shape(op, "student", student, "teacher", teacher);
  check_same_dtype_device(op, "student", student, "teacher", teacher);
  check_floating(op, "student", student);
  check_nonempty(op, "student", student);
  check_positive(op, "tau", tau);
}

inline void check_pearson_grads(const char* op, const at::Tensor& grad_inter,
                                const at::Tensor& grad_intra, const at::Tensor& student) {
  const at::Tensor* gs[2] = {&grad_inter, &grad_intra};
  const char* names[2] = {"grad_inter", "grad_intra"};
  for (int i = 0; i < 2; ++i) {
    check_defined(op, names[i], *gs[i]);
    AUTOKD_CHECK(gs[i]->numel() == 1, op, "expected ", names[i], " with one element, got shape ",
                 shape_str(*gs[i]));
    AUTOKD_CHECK(gs[i]->device() == student.device(), op, "expected ", names[i],
                 " on the same device as student (", student.device(), "), got ",
                 gs[i]->device());
  }
}

// Correlation and its two gradient coefficients from centred sums: corr = suv / D,
// d corr / du = alpha v - beta u.
struct CorrTerms {
  double corr, alpha, beta;
};

AUTOKD_HOST_DEVICE inline CorrTerms corr_terms(double suv, double suu, double svv) {
  const double nu = sqrt(fmax(suu, 0.0)), nv = sqrt(fmax(svv, 0.0));
  const double d = nu * nv + kPearsonEps;
  CorrTerms c;
  c.corr = suv / d;
  c.alpha = 1.0 / d;
  c.beta = nu > 0 ? suv * nv / (d * d * nu) : 0.0;
  return c;
}

}  // namespace autokd
