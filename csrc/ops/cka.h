// cka: linear centred kernel alignment between x [N, Dx] and y [N, Dy] (the Auto-KD reward
// term L_CKA = 1 - CKA, and the train-free layer weight mu_q).
//
//   K = x x^T, L = y y^T (N x N),   CKA = h(K, L) / (sqrt(max(h(K, K), eps)) sqrt(max(h(L, L), eps)))
//
// Both estimators are written as h(K, L) = c <P(K), P(L)>:
//   biased   (Gretton et al. 2005):  P(K) = H K H (double centring), c = 1 / (N - 1)^2.
//   debiased (Song et al. 2012, unbiased HSIC; needs N >= 4): P = U-centring of Szekely &
//            Rizzo 2014, zero diagonal and, off it,
//            P(K)_ij = K_ij - (r_i + r_j) / (N - 2) + s / ((N - 1)(N - 2)),
//            r = row sums of K with its diagonal zeroed, s = sum of r; c = 1 / (N (N - 3)).
//            U-centring is an orthogonal projection, so c <P(K), P(L)> equals Song's formula.
// eps = kCkaEps (1e-12) clamps the self-similarities in the denominator (degenerate features,
// e.g. identical rows, give CKA = 0 instead of 0/0); the eager reference uses the same clamp.
//
// Gradients (both inputs), with den = sqrt(max(h_KK, eps)) sqrt(max(h_LL, eps)):
//   dCKA/dK = c / den * (P(L) - [h_KK > eps] h_KL / h_KK * P(K))
//   dCKA/dL = c / den * (P(K) - [h_LL > eps] h_KL / h_LL * P(L))
//   dCKA/dx = 2 dCKA/dK x,  dCKA/dy = 2 dCKA/dL y   (both Gram gradients are symmetric).
// The forward returns them as gram_grad [2, N, N] (float32, or float64 for float64 inputs), so
// the backward is two GEMMs. No value leaves the device: every branch on data is computed
// inside the kernels.
//
// Work: K and L through at::mm; then row sums (pass 1), the three inner products (pass 2) and
// gram_grad (pass 3), each a single read of K and L. Accumulation: double on CPU, the Gram's
// dtype on CUDA.
#pragma once

#include <c10/macros/Macros.h>

#include "checks.h"

namespace autokd {

constexpr double kCkaEps = 1e-12;

inline void check_cka_inputs(const at::Tensor& x, const at::Tensor& y, bool debiased) {
  constexpr const char* op = "cka";
  check_defined(op, "x", x);
  check_defined(op, "y", y);
  check_floating(op, "x", x);
  check_floating(op, "y", y);
  check_same_dtype_device(op, "x", x, "y", y);
  check_dim(op, "x", x, 2, "[N, Dx]");
  check_dim(op, "y", y, 2, "[N, Dy]");
  AUTOKD_CHECK(x.size(0) == y.size(0), op, "expected y with the same N (dim 0) as x (",
               x.size(0), "), got ", shape_str(y));
  check_nonempty(op, "x", x);
  check_nonempty(op, "y", y);
  const int64_t min_n = debiased ? 4 : 2;
  AUTOKD_CHECK(x.size(0) >= min_n, op, "expected x with N >= ", min_n,
               debiased ? " samples (debiased HSIC)" : " samples", ", got ", shape_str(x));
}

inline at::ScalarType cka_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cka_backward_inputs(const at::Tensor& grad, const at::Tensor& gram_grad,
                                      const at::Tensor& x, const at::Tensor& y) {
  constexpr const char* op = "cka_backward";
  check_defined(op, "grad", grad);
  check_defined(op, "gram_grad", gram_grad);
  check_floating(op, "x", x);
  check_same_dtype_device(op, "x", x, "y", y);
  AUTOKD_CHECK(grad.numel() == 1, op, "expected grad with one element, got ", shape_str(grad));
  check_dim(op, "x", x, 2, "[N, Dx]");
  check_dim(op, "y", y, 2, "[N, Dy]");
  const int64_t n = x.size(0);
  AUTOKD_CHECK(gram_grad.dim() == 3 && gram_grad.size(0) == 2 && gram_grad.size(1) == n &&
                   gram_grad.size(2) == n && y.size(0) == n,
               op, "expected gram_grad of shape [2, N, N] with N = ", n, ", got ",
               shape_str(gram_grad));
  AUTOKD_CHECK(gram_grad.scalar_type() == cka_acc_type(x.scalar_type()), op,
               "expected gram_grad of dtype ", cka_acc_type(x.scalar_type()), ", got ",
               gram_grad.scalar_type());
  AUTOKD_CHECK(gram_grad.device() == x.device() && grad.device() == x.device(), op,
               "expected grad, gram_grad and x on one device, got ", grad.device(), ", ",
               gram_grad.device(), ", ", x.device());
}

// P(A)_ij from A_ij, the row sums r_i, r_j and their total s (see above; for the debiased
// estimator r and s exclude the diagonal).
template <typename T>
C10_HOST_DEVICE inline T cka_center(T a, T ri, T rj, T s, int64_t i, int64_t j, int64_t n,
                                    bool debiased) {
  if (!debiased) {
    const T inv_n = T(1) / static_cast<T>(n);
    return a - (ri + rj) * inv_n + s * inv_n * inv_n;
  }
  if (i == j) return T(0);
  return a - (ri + rj) / static_cast<T>(n - 2) + s / static_cast<T>((n - 1) * (n - 2));
}

template <typename T>
C10_HOST_DEVICE inline T cka_norm_const(int64_t n, bool debiased) {
  return debiased ? T(1) / static_cast<T>(n * (n - 3))
                  : T(1) / static_cast<T>((n - 1) * (n - 1));
}

// From the inner products <P(K),P(L)>, <P(K),P(K)>, <P(L),P(L)>: the CKA value and the
// coefficients of gram_grad = (aK P(K) + bK P(L), aL P(K) + bL P(L)).
template <typename T>
struct CkaScalars {
  T value, a_k, b_k, a_l, b_l;
};

template <typename T>
C10_HOST_DEVICE inline CkaScalars<T> cka_scalars(T kl, T kk, T ll, int64_t n, bool debiased) {
  const T c = cka_norm_const<T>(n, debiased);
  const T eps = static_cast<T>(kCkaEps);
  const T hkl = c * kl, hkk = c * kk, hll = c * ll;
  const T ck = hkk > eps ? hkk : eps;
  const T cl = hll > eps ? hll : eps;
  const T inv_den = T(1) / (::sqrt(ck) * ::sqrt(cl));
  const T rk = hkk > eps ? hkl / hkk : T(0);
  const T rl = hll > eps ? hkl / hll : T(0);
  const T g = c * inv_den;
  return {hkl * inv_den, -g * rk, g, g, -g * rl};
}

}  // namespace autokd
