// CUDA kernels of autokd::gram_l2 (see gram_l2.h for the math). Grams by at::mm/at::bmm (half
// inputs give float32 Grams through the out_dtype overloads); four small kernels do the two
// passes and the final mean on the device, without a host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gram_l2.h"
#include "gram_reduce.cuh"

namespace autokd {
namespace {

// Pass 1: partial ||G_S||^2, ||G_T||^2, <G_S, G_T> of chunk blockIdx.x of Gram blockIdx.y.
template <typename T>
__global__ void gram_l2_norms_kernel(const T* __restrict__ gs, const T* __restrict__ gt,
                                     int64_t elems, T* __restrict__ part) {
  __shared__ T smem[3 * kGramThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * elems;
  T v[3] = {0, 0, 0};
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elems;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T a = gs[base + e], b = gt[base + e];
    v[0] += a * a;
    v[1] += b * b;
    v[2] += a * b;
  }
  block_sum<T, 3>(v, smem);
  if (threadIdx.x == 0) {
    T* p = part + 3 * (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
    p[0] = v[0];
    p[1] = v[1];
    p[2] = v[2];
  }
}

// One block per Gram: sums the chunk partials into the Gram's scalars.
template <typename T>
__global__ void gram_l2_scalars_kernel(const T* __restrict__ part, int chunks,
                                       T* __restrict__ scal) {
  __shared__ T smem[3 * kGramThreads / 32];
  const T* p = part + 3 * static_cast<int64_t>(blockIdx.x) * chunks;
  T v[3] = {0, 0, 0};
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    v[0] += p[3 * c];
    v[1] += p[3 * c + 1];
    v[2] += p[3 * c + 2];
  }
  block_sum<T, 3>(v, smem);
  if (threadIdx.x == 0) {
    const auto s = gram_l2_scalars<T>(v[0], v[1], v[2]);
    T* o = scal + 3 * blockIdx.x;
    o[0] = s.inv_ns;
    o[1] = s.inv_nt;
    o[2] = s.k;
  }
}

// Pass 2: gram_grad and partial sums of d^2.
template <typename T>
__global__ void gram_l2_grad_kernel(const T* __restrict__ gs, const T* __restrict__ gt,
                                    const T* __restrict__ scal, int64_t elems, T grad_scale,
                                    T* __restrict__ gram_grad, T* __restrict__ part) {
  __shared__ T smem[kGramThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * elems;
  const T inv_ns = scal[3 * blockIdx.y], inv_nt = scal[3 * blockIdx.y + 1];
  const T k = scal[3 * blockIdx.y + 2];
  const T gscale = T(2) * inv_ns * grad_scale;
  T v[1] = {0};
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elems;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T ns = gs[base + e] * inv_ns;
    const T d = ns - gt[base + e] * inv_nt;
    v[0] += d * d;
    gram_grad[base + e] = (d - ns * k) * gscale;
  }
  block_sum<T, 1>(v, smem);
  if (threadIdx.x == 0) part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = v[0];
}

// One block: the mean over Grams of the per-Gram loss.
template <typename T>
__global__ void gram_l2_loss_kernel(const T* __restrict__ part, int64_t count, T inv_b,
                                    T* __restrict__ out) {
  __shared__ T smem[kGramThreads / 32];
  T v[1] = {0};
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) v[0] += part[i];
  block_sum<T, 1>(v, smem);
  if (threadIdx.x == 0) out[0] = v[0] * inv_b;
}

at::Tensor gram(const at::Tensor& f, GramMode m, at::ScalarType acc) {
  const bool half = f.scalar_type() != acc;
  if (m == GramMode::kSample) {
    return half ? at::mm(f, f.t(), acc) : at::mm(f, f.t());
  }
  const at::Tensor ft = f.transpose(1, 2);
  return half ? at::bmm(f, ft, acc) : at::bmm(f, ft);
}

std::tuple<at::Tensor, at::Tensor> gram_l2_cuda(const at::Tensor& student,
                                                const at::Tensor& teacher,
                                                c10::string_view mode) {
  const GramMode m = check_gram_l2_inputs(student, teacher, mode);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = gram_acc_type(student.scalar_type());
  const at::Tensor gs = gram(student, m, acc).contiguous();  // [N, N] or [N, C, C]
  const at::Tensor gt = gram(teacher, m, acc).contiguous();
  const int64_t B = m == GramMode::kSample ? 1 : gs.size(0);
  const int64_t M = gs.size(-1);
  const int64_t elems = M * M;
  const int chunks = gram_chunks(elems);
  at::Tensor gram_grad = at::empty_like(gs);
  at::Tensor part = at::empty({B * chunks * 3}, gs.options());
  at::Tensor scal = at::empty({B * 3}, gs.options());
  at::Tensor loss = at::empty({}, gs.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(chunks, static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES(acc, "gram_l2_cuda", [&] {
    const scalar_t* a = gs.const_data_ptr<scalar_t>();
    const scalar_t* b = gt.const_data_ptr<scalar_t>();
    scalar_t* p = part.mutable_data_ptr<scalar_t>();
    scalar_t* s = scal.mutable_data_ptr<scalar_t>();
    const scalar_t inv_b = scalar_t(1) / static_cast<scalar_t>(B);
    gram_l2_norms_kernel<scalar_t><<<grid, kGramThreads, 0, stream>>>(a, b, elems, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gram_l2_scalars_kernel<scalar_t>
        <<<static_cast<unsigned>(B), kGramThreads, 0, stream>>>(p, chunks, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gram_l2_grad_kernel<scalar_t><<<grid, kGramThreads, 0, stream>>>(
        a, b, s, elems, inv_b, gram_grad.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gram_l2_loss_kernel<scalar_t><<<1, kGramThreads, 0, stream>>>(
        p, B * chunks, inv_b, loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss.to(student.scalar_type()), gram_grad};
}

at::Tensor gram_l2_backward_cuda(const at::Tensor& grad, const at::Tensor& gram_grad,
                                 const at::Tensor& student) {
  check_gram_l2_backward_inputs(grad, gram_grad, student);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = gram_grad.scalar_type();
  const bool sample = student.dim() == 2;
  at::Tensor a = gram_grad * (grad.reshape({}).to(acc) * 2);  // [N, N] or [N, C, C]
  if (student.scalar_type() == acc) return sample ? at::mm(a, student) : at::bmm(a, student);
  // Half inputs: gram_grad entries can sit below float16's normal range, so the factor is
  // rescaled to a max of 1 per Gram on the device, multiplied in half precision with float32
  // output, and the scale put back in float32.
  const std::vector<int64_t> dims = sample ? std::vector<int64_t>{0, 1}
                                           : std::vector<int64_t>{1, 2};
  const at::Tensor scale = a.abs().amax(dims, /*keepdim=*/true).clamp_min(1e-30);
  const at::Tensor ah = (a / scale).to(student.scalar_type());
  at::Tensor out = sample ? at::mm(ah, student, acc) : at::bmm(ah, student, acc);
  out.mul_(scale);
  return out.to(student.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) {
  m.impl("gram_l2", &gram_l2_cuda);
  m.impl("gram_l2_backward", &gram_l2_backward_cuda);
}

}  // namespace autokd
