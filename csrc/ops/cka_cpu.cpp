// CPU kernels of autokd::cka (see cka.h for the math): K and L by at::mm, then three parallel
// passes over them with double accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cka.h"

namespace autokd {
namespace {

constexpr int64_t kGrainElems = 16384;

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
  // Pass 2: <P(K), P(L)>, <P(K), P(K)>, <P(L), P(L)>.
  std::vector<double> part(3 * n);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double kl = 0, kk = 0, ll = 0;
      // simd reduction: lets the compiler reorder the sums into vector lanes.
#pragma omp simd reduction(+ : kl, kk, ll)
      for (int64_t j = 0; j < n; ++j) {
        const double pk = cka_center<double>(K[i * n + j], rk[i], rk[j], sk, i, j, n, debiased);
        const double pl = cka_center<double>(L[i * n + j], rl[i], rl[j], sl, i, j, n, debiased);
        kl += pk * pl;
        kk += pk * pk;
        ll += pl * pl;
      }
      part[3 * i] = kl;
      part[3 * i + 1] = kk;
      part[3 * i + 2] = ll;
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
      for (int64_t j = 0; j < n; ++j) {
        const double pk = cka_center<double>(K[i * n + j], rk[i], rk[j], sk, i, j, n, debiased);
        const double pl = cka_center<double>(L[i * n + j], rl[i], rl[j], sl, i, j, n, debiased);
        gk[i * n + j] = static_cast<T>(s.a_k * pk + s.b_k * pl);
        gl[i * n + j] = static_cast<T>(s.a_l * pk + s.b_l * pl);
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
