// CPU kernel of autokd::masked_adamw_step (math and contract in masked_adamw_step.h): one pass
// over param, grad, mask, exp_avg and exp_avg_sq per element, all tensors in one OpenMP loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "masked_adamw_step.h"
#include "multi_tensor_cpu.h"

namespace autokd {
namespace {

template <typename T>
struct AdamWCoef {
  using acc = at::opmath_type<T>;
  acc decay;       // 1 - lr * weight_decay
  acc one_m_b1;    // 1 - beta1
  acc beta2;
  acc one_m_b2;    // 1 - beta2
  acc step_size;   // lr / (1 - beta1^t)
  acc bc2_sqrt;    // sqrt(1 - beta2^t)
  acc eps;
};

// Square roots of a tile in place. A plain std::sqrt in the main loop keeps it scalar (sqrt may
// set errno, so the compiler will not vectorise it); an explicit packed sqrt does not.
inline void sqrt_tile(float* x, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(x + j, _mm_sqrt_ps(_mm_loadu_ps(x + j)));
#endif
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}

inline void sqrt_tile(double* x, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 2 <= n; j += 2) _mm_storeu_pd(x + j, _mm_sqrt_pd(_mm_loadu_pd(x + j)));
#endif
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}

constexpr int64_t kTile = 512;  // the second moments of a tile live in L1 between the passes

template <typename T, bool kMasked>
void adamw_span(T* __restrict p, const T* __restrict g, const uint8_t* __restrict m,
                T* __restrict m1, T* __restrict m2, int64_t n, const AdamWCoef<T> c) {
  using acc = at::opmath_type<T>;
  acc e1[kTile], e2[kTile], root[kTile];
  for (int64_t o = 0; o < n; o += kTile) {
    const int64_t len = std::min(kTile, n - o);
    for (int64_t j = 0; j < len; ++j) {
      const acc gj = static_cast<acc>(g[o + j]);
      const acc a = static_cast<acc>(m1[o + j]);
      e1[j] = a + c.one_m_b1 * (gj - a);
      e2[j] = c.beta2 * static_cast<acc>(m2[o + j]) + c.one_m_b2 * gj * gj;
      root[j] = e2[j];
    }
    sqrt_tile(root, len);
    for (int64_t j = 0; j < len; ++j) {
      const acc pj = static_cast<acc>(p[o + j]) * c.decay;
      const acc denom = root[j] / c.bc2_sqrt + c.eps;
      const acc np = pj - c.step_size * e1[j] / denom;
      if constexpr (kMasked) {
        const uint8_t keep = m[o + j];
        p[o + j] = static_cast<T>(keep_or_zero(keep, np));
        m1[o + j] = static_cast<T>(keep_or_zero(keep, e1[j]));
        m2[o + j] = static_cast<T>(keep_or_zero(keep, e2[j]));
      } else {
        p[o + j] = static_cast<T>(np);
        m1[o + j] = static_cast<T>(e1[j]);
        m2[o + j] = static_cast<T>(e2[j]);
      }
    }
  }
}

void masked_adamw_step_cpu(at::TensorList params, at::TensorList grads,
                           const c10::List<std::optional<at::Tensor>>& masks,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step,
                           double lr, double beta1, double beta2, double eps,
                           double weight_decay) {
  check_masked_adamw_step_inputs(params, grads, masks, exp_avgs, exp_avg_sqs, step, lr, beta1,
                                 beta2, eps, weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  const StepInputs in = prepare_step_inputs(params, grads, masks);
  const std::vector<at::Tensor>& g_c = in.grads;
  const std::vector<at::Tensor>& m_c = in.masks;
  const std::vector<Span>& spans = in.spans;
  const int64_t total = in.total;
  // Bias corrections in double, then rounded once, as torch does with Python floats.
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "masked_adamw_step_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const AdamWCoef<scalar_t> c{static_cast<acc>(1.0 - lr * weight_decay),
                                static_cast<acc>(1.0 - beta1),
                                static_cast<acc>(beta2),
                                static_cast<acc>(1.0 - beta2),
                                static_cast<acc>(lr / bc1),
                                static_cast<acc>(std::sqrt(bc2)),
                                static_cast<acc>(eps)};
    std::vector<scalar_t*> p(n), e1(n), e2(n);
    std::vector<const scalar_t*> g(n);
    std::vector<const uint8_t*> m(n, nullptr);
    for (size_t i = 0; i < n; ++i) {
      p[i] = params[i].data_ptr<scalar_t>();
      g[i] = g_c[i].const_data_ptr<scalar_t>();
      e1[i] = exp_avgs[i].data_ptr<scalar_t>();
      e2[i] = exp_avg_sqs[i].data_ptr<scalar_t>();
      if (m_c[i].defined()) m[i] = reinterpret_cast<const uint8_t*>(m_c[i].const_data_ptr<bool>());
    }
    for_each_span(spans, total, [&](const Span& s) {
      const int64_t i = s.tensor, o = s.begin, len = s.end - s.begin;
      if (m[i] != nullptr) {
        adamw_span<scalar_t, true>(p[i] + o, g[i] + o, m[i] + o, e1[i] + o, e2[i] + o, len, c);
      } else {
        adamw_span<scalar_t, false>(p[i] + o, g[i] + o, nullptr, e1[i] + o, e2[i] + o, len, c);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) { m.impl("masked_adamw_step", &masked_adamw_step_cpu); }

}  // namespace autokd
