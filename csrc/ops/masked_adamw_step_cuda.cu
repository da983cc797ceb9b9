// CUDA kernel of autokd::masked_adamw_step (math and contract in masked_adamw_step.h): one
// multi-tensor launch per up to 24 tensors / 320 chunks, one pass per element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "masked_adamw_step.h"
#include "multi_tensor_cuda.cuh"

namespace autokd {
namespace {

template <typename T>
__global__ void masked_adamw_kernel(MultiTensorMeta<4> meta, at::opmath_type<T> decay,
                                    at::opmath_type<T> one_m_b1, at::opmath_type<T> beta2,
                                    at::opmath_type<T> one_m_b2, at::opmath_type<T> step_size,
                                    at::opmath_type<T> bc2_sqrt, at::opmath_type<T> eps) {
  using acc = at::opmath_type<T>;
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(meta.numel[t] - start, kChunk);
  T* p = static_cast<T*>(meta.ptrs[0][t]) + start;
  const T* g = static_cast<const T*>(meta.ptrs[1][t]) + start;
  T* m1 = static_cast<T*>(meta.ptrs[2][t]) + start;
  T* m2 = static_cast<T*>(meta.ptrs[3][t]) + start;
  const bool* m = meta.masks[t] == nullptr ? nullptr : meta.masks[t] + start;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc gj = static_cast<acc>(g[j]);
    const acc pj = static_cast<acc>(p[j]) * decay;
    const acc a = static_cast<acc>(m1[j]);
    const acc e1 = a + one_m_b1 * (gj - a);
    const acc e2 = beta2 * static_cast<acc>(m2[j]) + one_m_b2 * gj * gj;
    const acc denom = sqrt(e2) / bc2_sqrt + eps;
    const bool keep = m == nullptr || m[j];
    p[j] = static_cast<T>(keep ? pj - step_size * e1 / denom : acc(0));
    m1[j] = static_cast<T>(keep ? e1 : acc(0));
    m2[j] = static_cast<T>(keep ? e2 : acc(0));
  }
}

void masked_adamw_step_cuda(at::TensorList params, at::TensorList grads,
                            const c10::List<std::optional<at::Tensor>>& masks,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step,
                            double lr, double beta1, double beta2, double eps,
                            double weight_decay) {
  check_masked_adamw_step_inputs(params, grads, masks, exp_avgs, exp_avg_sqs, step, lr, beta1,
                                 beta2, eps, weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::vector<at::Tensor>> lists(4);
  std::vector<at::Tensor> m_c(n);
  for (size_t i = 0; i < n; ++i) {
    lists[0].push_back(params[i]);
    lists[1].push_back(grads[i].contiguous());
    lists[2].push_back(exp_avgs[i]);
    lists[3].push_back(exp_avg_sqs[i]);
    const std::optional<at::Tensor> mi = masks[i];
    if (mi.has_value() && mi->defined()) m_c[i] = mi->contiguous();
  }
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "masked_adamw_step_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    multi_tensor_apply<4>(lists, m_c, [&](const MultiTensorMeta<4>& meta, int blocks) {
      masked_adamw_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          meta, static_cast<acc>(1.0 - lr * weight_decay), static_cast<acc>(1.0 - beta1),
          static_cast<acc>(beta2), static_cast<acc>(1.0 - beta2), static_cast<acc>(lr / bc1),
          static_cast<acc>(std::sqrt(bc2)), static_cast<acc>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) { m.impl("masked_adamw_step", &masked_adamw_step_cuda); }

}  // namespace autokd
