// CPU side of the multi-tensor optimizer steps: the elements of every tensor in a list are cut
// into fixed-size spans and all spans of all tensors share ONE OpenMP loop, so a model made of
// many small tensors (ResNet-20: 2,304-element convs) still fills every core without a parallel
// region per tensor.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace autokd {

struct Span {
  int64_t tensor;  // index into the lists
  int64_t begin;   // first element
  int64_t end;     // one past the last element
};

// 16 Ki elements: 64 KiB per fp32 array, a few arrays per span stay within L2.
constexpr int64_t kSpanElems = 16384;
// Below this many elements in all, one thread is faster than waking the others.
constexpr int64_t kParallelMinElems = 65536;

inline std::vector<Span> plan_spans(const std::vector<int64_t>& numels, int64_t* total) {
  std::vector<Span> spans;
  *total = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kSpanElems) {
      spans.push_back({i, b, std::min(numels[i], b + kSpanElems)});
    }
    *total += numels[i];
  }
  return spans;
}

// What both fused steps read, prepared once: contiguous copies of the read-only inputs (usually
// no-ops; any layout is accepted for grads and masks) and the span plan over all tensors.
struct StepInputs {
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> masks;  // undefined where the parameter is dense
  std::vector<Span> spans;
  int64_t total = 0;
};

inline StepInputs prepare_step_inputs(at::TensorList params, at::TensorList grads,
                                      const c10::List<std::optional<at::Tensor>>& masks) {
  const size_t n = params.size();
  StepInputs in;
  in.grads.resize(n);
  in.masks.resize(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    in.grads[i] = grads[i].contiguous();
    const std::optional<at::Tensor> mi = masks[i];
    if (mi.has_value() && mi->defined()) in.masks[i] = mi->contiguous();
    numels[i] = params[i].numel();
  }
  in.spans = plan_spans(numels, &in.total);
  return in;
}

// v where keep != 0, +0.0 elsewhere, as a bit mask: `keep ? v : 0` does not vectorise here
// (SSE2 baseline, no blend; scalar code then mispredicts a random mask: 10x slower at 50%
// sparsity), and `v * keep` would turn NaN/Inf into NaN, not zero. The mask is read as bytes.
template <typename A>
inline A keep_or_zero(uint8_t keep, A v) {
  static_assert(std::is_floating_point_v<A>, "opmath types are float or double");
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  return std::bit_cast<A>(std::bit_cast<U>(v) & (U(0) - static_cast<U>(keep)));
}

template <typename F>
void for_each_span(const std::vector<Span>& spans, int64_t total, const F& f) {
  const int64_t count = static_cast<int64_t>(spans.size());
  const int threads = at::get_num_threads();
  const bool parallel = threads > 1 && total >= kParallelMinElems && count > 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t s = 0; s < count; ++s) f(spans[s]);
}

}  // namespace autokd
