// CPU kernel of autokd::masked_sgd_step (math and contract in masked_sgd_step.h): one pass over
// param, grad, mask and momentum per element, all tensors in one OpenMP loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "masked_sgd_step.h"
#include "multi_tensor_cpu.h"

namespace autokd {
namespace {

enum class Momentum { kNone, kFirst, kRunning };

// Template flags keep the inner loop branch-free so the compiler vectorises it; keep_or_zero (not
// a multiply by the mask) zeroes pruned entries so NaN/Inf gradients there cannot leak.
template <typename T, Momentum M, bool kNesterov, bool kMasked>
void sgd_span(T* __restrict p, const T* __restrict g, const uint8_t* __restrict m, T* __restrict b,
              int64_t n, at::opmath_type<T> lr, at::opmath_type<T> momentum,
              at::opmath_type<T> damp1, at::opmath_type<T> wd) {
  using acc = at::opmath_type<T>;
  for (int64_t j = 0; j < n; ++j) {
    const acc pj = static_cast<acc>(p[j]);
    const acc d = static_cast<acc>(g[j]) + wd * pj;
    acc u = d;
    acc bj = acc(0);
    if constexpr (M == Momentum::kFirst) {
      bj = d;
    } else if constexpr (M == Momentum::kRunning) {
      bj = momentum * static_cast<acc>(b[j]) + damp1 * d;
    }
    if constexpr (M != Momentum::kNone) u = kNesterov ? d + momentum * bj : bj;
    const acc np = pj - lr * u;
    if constexpr (kMasked) {
      const uint8_t keep = m[j];
      p[j] = static_cast<T>(keep_or_zero(keep, np));
      if constexpr (M != Momentum::kNone) b[j] = static_cast<T>(keep_or_zero(keep, bj));
    } else {
      p[j] = static_cast<T>(np);
      if constexpr (M != Momentum::kNone) b[j] = static_cast<T>(bj);
    }
  }
}

template <typename T, Momentum M, bool kNesterov>
void sgd_all(const std::vector<T*>& p, const std::vector<const T*>& g,
             const std::vector<const uint8_t*>& m, const std::vector<T*>& b,
             const std::vector<Span>& spans, int64_t total, double lr, double momentum,
             double dampening, double wd) {
  using acc = at::opmath_type<T>;
  const acc a_lr = static_cast<acc>(lr), a_mom = static_cast<acc>(momentum),
            a_damp1 = static_cast<acc>(1.0 - dampening), a_wd = static_cast<acc>(wd);
  for_each_span(spans, total, [&](const Span& s) {
    const int64_t i = s.tensor, o = s.begin, n = s.end - s.begin;
    T* bi = M == Momentum::kNone ? nullptr : b[i] + o;
    if (m[i] != nullptr) {
      sgd_span<T, M, kNesterov, true>(p[i] + o, g[i] + o, m[i] + o, bi, n, a_lr, a_mom, a_damp1,
                                      a_wd);
    } else {
      sgd_span<T, M, kNesterov, false>(p[i] + o, g[i] + o, nullptr, bi, n, a_lr, a_mom, a_damp1,
                                       a_wd);
    }
  });
}

void masked_sgd_step_cpu(at::TensorList params, at::TensorList grads,
                         const c10::List<std::optional<at::Tensor>>& masks,
                         at::TensorList momentum_buffers, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool first_step) {
  check_masked_sgd_step_inputs(params, grads, masks, momentum_buffers, lr, momentum, dampening,
                               weight_decay, nesterov);
  const size_t n = params.size();
  if (n == 0) return;
  const StepInputs in = prepare_step_inputs(params, grads, masks);
  const std::vector<at::Tensor>& g_c = in.grads;
  const std::vector<at::Tensor>& m_c = in.masks;
  const std::vector<Span>& spans = in.spans;
  const int64_t total = in.total;
  const Momentum mode =
      momentum == 0.0 ? Momentum::kNone : (first_step ? Momentum::kFirst : Momentum::kRunning);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "masked_sgd_step_cpu", [&] {
    std::vector<scalar_t*> p(n), b(n, nullptr);
    std::vector<const scalar_t*> g(n);
    std::vector<const uint8_t*> m(n, nullptr);
    for (size_t i = 0; i < n; ++i) {
      p[i] = params[i].data_ptr<scalar_t>();
      g[i] = g_c[i].const_data_ptr<scalar_t>();
      if (m_c[i].defined()) m[i] = reinterpret_cast<const uint8_t*>(m_c[i].const_data_ptr<bool>());
      if (mode != Momentum::kNone) b[i] = momentum_buffers[i].data_ptr<scalar_t>();
    }
    auto run = [&](auto mode_c, auto nest_c) {
      sgd_all<scalar_t, decltype(mode_c)::value, decltype(nest_c)::value>(
          p, g, m, b, spans, total, lr, momentum, dampening, weight_decay);
    };
    using F = std::false_type;
    using T = std::true_type;
    using None = std::integral_constant<Momentum, Momentum::kNone>;
    using First = std::integral_constant<Momentum, Momentum::kFirst>;
    using Running = std::integral_constant<Momentum, Momentum::kRunning>;
    if (mode == Momentum::kNone) {
      run(None{}, F{});
    } else if (mode == Momentum::kFirst) {
      nesterov ? run(First{}, T{}) : run(First{}, F{});
    } else {
      nesterov ? run(Running{}, T{}) : run(Running{}, F{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) { m.impl("masked_sgd_step", &masked_sgd_step_cpu); }

}  // namespace autokd
