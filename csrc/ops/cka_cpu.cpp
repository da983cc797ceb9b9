// CPU kernels of autokd::cka (see cka.h for the math): K and L by at::mm, then three parallel
// passes over them with double accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cka.h"
#include "fast_exp.h"  // AUTOKD_CLONES

namespace autokd {
namespace {

constexpr int64_t kGrainElems = 16384;

// The centred Grams in the form the row loops vectorise: P(A)_ij = A_ij + c_i - u_j with
// u = r / d1 and c_i = s / d2 - u_i (d1, d2 as in cka_center: n, n^2 biased; n - 2,
// (n - 1)(n - 2) debiased). The debiased P has a zero diagonal: its row loops skip j = i and
// its gram_grad rows get a 0 there. Everything in double, as the header says.

// Adds row i's <P(K)_i, P(L)_i>, <P(K)_i, P(K)_i>, <P(L)_i, P(L)_i> over j in [j0, j1) to out.
template <typename T>
__attribute__((always_inline)) inline void inner_row(const T* __restrict Ki,
                                                     const T* __restrict Li,
                                                     const double* __restrict uk,
                                                     const double* __restrict ul, double ck,
                                                     double cl, int64_t j0, int64_t j1,
                                                     double* out) {
  double kl = 0, kk = 0, ll = 0;
#pragma omp simd reduction(+ : kl, kk, ll)
  for (int64_t j = j0; j < j1; ++j) {
    const double pk = static_cast<double>(Ki[j]) + ck - uk[j];
    const double pl = static_cast<double>(Li[j]) + cl - ul[j];
    kl += pk * pl;
    kk += pk * pk;
    ll += pl * pl;
  }
  out[0] += kl;
  out[1] += kk;
  out[2] += ll;
}

// Row i of gram_grad: gk_ij = a_k P(K)_ij + b_k P(L)_ij, gl_ij = a_l P(K)_ij + b_l P(L)_ij.
template <typename T>
__attribute__((always_inline)) inline void grad_row(const T* Ki, const T* Li,
                                                    const double* __restrict uk,
                                                    const double* __restrict ul, double ck,
                                                    double cl, int64_t n,
                                                    const CkaScalars<double>& s, T* gk, T* gl) {
  // gk, gl may be K, L themselves (see cka_reduce_cpu): each j reads before it writes.
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double pk = static_cast<double>(Ki[j]) + ck - uk[j];
    const double pl = static_cast<double>(Li[j]) + cl - ul[j];
    gk[j] = static_cast<T>(s.a_k * pk + s.b_k * pl);
    gl[j] = static_cast<T>(s.a_l * pk + s.b_l * pl);
  }
}

// float rows compiled for several ISAs (fast_exp.h): 8 doubles a vector on AVX-512 where the
// baseline build has 2. double rows run the same bodies, baseline only.
AUTOKD_CLONES void inner_row_f32(const float* Ki, const float* Li, const double* uk,
                                 const double* ul, double ck, double cl, int64_t j0, int64_t j1,
                                 double* out) {
  inner_row<float>(Ki, Li, uk, ul, ck, cl, j0, j1, out);
}
AUTOKD_CLONES void grad_row_f32(const float* Ki, const float* Li, const double* uk,
                                const double* ul, double ck, double cl, int64_t n,
                                const CkaScalars<double>& s, float* gk, float* gl) {
  grad_row<float>(Ki, Li, uk, ul, ck, cl, n, s, gk, gl);
}

template <typename T>
void inner_row_any(const T* Ki, const T* Li, const double* uk, const double* ul, double ck,
                   double cl, int64_t j0, int64_t j1, double* out) {
  if constexpr (std::is_same_v<T, float>) {
    inner_row_f32(Ki, Li, uk, ul, ck, cl, j0, j1, out);
  } else {
    inner_row<T>(Ki, Li, uk, ul, ck, cl, j0, j1, out);
  }
}

template <typename T>
void grad_row_any(const T* Ki, const T* Li, const double* uk, const double* ul, double ck,
                  double cl, int64_t n, const CkaScalars<double>& s, T* gk, T* gl) {
  if constexpr (std::is_same_v<T, float>) {
    grad_row_f32(Ki, Li, uk, ul, ck, cl, n, s, gk, gl);
  } else {
    grad_row<T>(Ki, Li, uk, ul, ck, cl, n, s, gk, gl);
  }
}

// K, L: contiguous N x N Grams. Writes gram_grad [2, N, N] (which may hold K and L: each pair
// of entries is read before it is overwritten); returns the CKA value.
template <typename T>
double cka_reduce_cpu(const T* K, const T* L, T* gram_grad, int64_t n, bool debiased) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  // Pass 1: row sums (off-diagonal for the debiased estimator).
  std::vector<double> rk(n), rl(n);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t j = 0; j < n; ++j) {
        a += K[i * n + j];
        b += L[i * n + j];
      }
      if (debiased) {
        a -= K[i * n + i];
        b -= L[i * n + i];
      }
      rk[i] = a;
      rl[i] = b;
    }
  });
  double sk = 0, sl = 0;
  for (int64_t i = 0; i < n; ++i) {
    sk += rk[i];
    sl += rl[i];
  }
  const double d1 = debiased ? static_cast<double>(n - 2) : static_cast<double>(n);
  const double d2 = debiased ? static_cast<double>(n - 1) * static_cast<double>(n - 2)
                             : static_cast<double>(n) * static_cast<double>(n);
  std::vector<double> uk(n), ul(n);
  for (int64_t i = 0; i < n; ++i) {
    uk[i] = rk[i] / d1;
    ul[i] = rl[i] / d1;
  }
  const double wk = sk / d2, wl = sl / d2;  // c_i = w - u_i
  // Pass 2: <P(K), P(L)>, <P(K), P(K)>, <P(L), P(L)>.
  std::vector<double> part(3 * n, 0.0);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* Ki = K + i * n;
      const T* Li = L + i * n;
      const double ck = wk - uk[i], cl = wl - ul[i];
      double* out = part.data() + 3 * i;
      if (debiased) {
        inner_row_any(Ki, Li, uk.data(), ul.data(), ck, cl, 0, i, out);
        inner_row_any(Ki, Li, uk.data(), ul.data(), ck, cl, i + 1, n, out);
      } else {
        inner_row_any(Ki, Li, uk.data(), ul.data(), ck, cl, 0, n, out);
      }
    }
  });
  double kl = 0, kk = 0, ll = 0;
  for (int64_t i = 0; i < n; ++i) {
    kl += part[3 * i];
    kk += part[3 * i + 1];
    ll += part[3 * i + 2];
  }
  const auto s = cka_scalars<double>(kl, kk, ll, n, debiased);
  // Pass 3: gram_grad.
  T* gk = gram_grad;
  T* gl = gram_grad + n * n;
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      grad_row_any(K + i * n, L + i * n, uk.data(), ul.data(), wk - uk[i], wl - ul[i], n, s,
                   gk + i * n, gl + i * n);
      if (debiased) {
        gk[i * n + i] = T(0);
        gl[i * n + i] = T(0);
      }
    }
  });
  return s.value;
}

std::tuple<at::Tensor, at::Tensor> cka_cpu(const at::Tensor& x, const at::Tensor& y,
                                           bool debiased) {
  check_cka_inputs(x, y, debiased);
  const auto acc = cka_acc_type(x.scalar_type());
  const at::Tensor xa = x.to(acc), ya = y.to(acc);
  const int64_t n = x.size(0);
  // K and L are formed in the buffer that then becomes gram_grad: no other N x N buffers.
  at::Tensor gram_grad = at::empty({2, n, n}, xa.options());
  at::Tensor K = gram_grad[0], L = gram_grad[1];  // [N, N] each
  at::mm_out(K, xa, xa.t());
  at::mm_out(L, ya, ya.t());
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "cka_cpu", [&] {
    value = cka_reduce_cpu<scalar_t>(K.const_data_ptr<scalar_t>(), L.const_data_ptr<scalar_t>(),
                                     gram_grad.mutable_data_ptr<scalar_t>(), n, debiased);
  });
  return {at::scalar_tensor(value, x.options()), gram_grad};
}

std::tuple<at::Tensor, at::Tensor> cka_backward_cpu(const at::Tensor& grad,
                                                    const at::Tensor& gram_grad,
                                                    const at::Tensor& x, const at::Tensor& y) {
  check_cka_backward_inputs(grad, gram_grad, x, y);
  const auto acc = gram_grad.scalar_type();
  // On the CPU reading the incoming gradient costs no synchronisation; as the GEMMs' alpha it
  // needs neither a scaled copy of gram_grad nor a pass over the results.
  const double alpha = 2.0 * grad.item<double>();
  auto one = [&](const at::Tensor& g, const at::Tensor& f) {
    const at::Tensor fa = f.to(acc);
    at::Tensor out = at::empty(fa.sizes(), fa.options());
    out.addmm_(g, fa, /*beta=*/0, alpha);  // beta = 0: out's contents are never read
    return out.to(f.scalar_type());
  };
  return {one(gram_grad[0], x), one(gram_grad[1], y)};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) {
  m.impl("cka", &cka_cpu);
  m.impl("cka_backward", &cka_backward_cpu);
}

}  // namespace autokd
