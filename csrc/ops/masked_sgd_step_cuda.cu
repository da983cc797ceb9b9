// CUDA kernel of autokd::masked_sgd_step (math and contract in masked_sgd_step.h): one
// multi-tensor launch per up to 24 tensors / 320 chunks, one pass per element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "masked_sgd_step.h"
#include "multi_tensor_cuda.cuh"

namespace autokd {
namespace {

// kMode: 0 no momentum, 1 first step (buffer = update), 2 running momentum.
template <typename T, int kMode, bool kNesterov>
__global__ void masked_sgd_kernel(MultiTensorMeta<3> meta, at::opmath_type<T> lr,
                                  at::opmath_type<T> momentum, at::opmath_type<T> damp1,
                                  at::opmath_type<T> wd) {
  using acc = at::opmath_type<T>;
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(meta.numel[t] - start, kChunk);
  T* p = static_cast<T*>(meta.ptrs[0][t]) + start;
  const T* g = static_cast<const T*>(meta.ptrs[1][t]) + start;
  T* b = kMode == 0 ? nullptr : static_cast<T*>(meta.ptrs[2][t]) + start;
  const bool* m = meta.masks[t] == nullptr ? nullptr : meta.masks[t] + start;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc pj = static_cast<acc>(p[j]);
    const acc d = static_cast<acc>(g[j]) + wd * pj;
    acc u = d;
    acc bj = acc(0);
    if constexpr (kMode == 1) bj = d;
    if constexpr (kMode == 2) bj = momentum * static_cast<acc>(b[j]) + damp1 * d;
    if constexpr (kMode != 0) u = kNesterov ? d + momentum * bj : bj;
    const bool keep = m == nullptr || m[j];
    p[j] = static_cast<T>(keep ? pj - lr * u : acc(0));
    if constexpr (kMode != 0) b[j] = static_cast<T>(keep ? bj : acc(0));
  }
}

void masked_sgd_step_cuda(at::TensorList params, at::TensorList grads,
                          const c10::List<std::optional<at::Tensor>>& masks,
                          at::TensorList momentum_buffers, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov,
                          bool first_step) {
  check_masked_sgd_step_inputs(params, grads, masks, momentum_buffers, lr, momentum, dampening,
                               weight_decay, nesterov);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int mode = momentum == 0.0 ? 0 : (first_step ? 1 : 2);
  std::vector<std::vector<at::Tensor>> lists(3);
  std::vector<at::Tensor> m_c(n);
  for (size_t i = 0; i < n; ++i) {
    lists[0].push_back(params[i]);
    lists[1].push_back(grads[i].contiguous());
    // Without momentum the buffer slot is never read: the param stands in for it.
    lists[2].push_back(mode == 0 ? params[i] : momentum_buffers[i]);
    const std::optional<at::Tensor> mi = masks[i];
    if (mi.has_value() && mi->defined()) m_c[i] = mi->contiguous();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "masked_sgd_step_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc a_lr = static_cast<acc>(lr), a_mom = static_cast<acc>(momentum),
              a_damp1 = static_cast<acc>(1.0 - dampening), a_wd = static_cast<acc>(weight_decay);
    auto go = [&](auto kernel) {
      multi_tensor_apply<3>(lists, m_c, [&](const MultiTensorMeta<3>& meta, int blocks) {
        kernel<<<blocks, kThreads, 0, stream>>>(meta, a_lr, a_mom, a_damp1, a_wd);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (mode == 0) {
      go(masked_sgd_kernel<scalar_t, 0, false>);
    } else if (mode == 1) {
      nesterov ? go(masked_sgd_kernel<scalar_t, 1, true>) : go(masked_sgd_kernel<scalar_t, 1, false>);
    } else {
      nesterov ? go(masked_sgd_kernel<scalar_t, 2, true>) : go(masked_sgd_kernel<scalar_t, 2, false>);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) { m.impl("masked_sgd_step", &masked_sgd_step_cuda); }

}  // namespace autokd
