// CUDA kernels of autokd::cka (see cka.h for the math). K and L by at::mm (half inputs give
// float32 Grams through the out_dtype overload); row sums, inner products, scalars and
// gram_grad are four kernels that keep every intermediate on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cka.h"
#include "gram_reduce.cuh"

namespace autokd {
namespace {

// Pass 1, one block per row i: r_i of K and of L (off-diagonal sums when debiased).
template <typename T>
__global__ void cka_rowsum_kernel(const T* __restrict__ K, const T* __restrict__ L, int64_t n,
                                  bool debiased, T* __restrict__ rows) {
  __shared__ T smem[2 * kGramThreads / 32];
  const int64_t i = blockIdx.x;
  T v[2] = {0, 0};
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (debiased && j == i) continue;
    v[0] += K[i * n + j];
    v[1] += L[i * n + j];
  }
  block_sum<T, 2>(v, smem);
  if (threadIdx.x == 0) {
    rows[i] = v[0];
    rows[n + i] = v[1];
  }
}

// Totals s_K, s_L of the row sums, computed by each block that needs them (n values: cheaper
// than another launch). Valid in every thread on return.
template <typename T>
__device__ inline void cka_totals(const T* __restrict__ rows, int64_t n, T* smem, T& sk,
                                  T& sl) {
  __shared__ T tot[2];
  T v[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    v[0] += rows[i];
    v[1] += rows[n + i];
  }
  block_sum<T, 2>(v, smem);
  if (threadIdx.x == 0) {
    tot[0] = v[0];
    tot[1] = v[1];
  }
  __syncthreads();
  sk = tot[0];
  sl = tot[1];
}

// Pass 2: partial <P(K),P(L)>, <P(K),P(K)>, <P(L),P(L)> over chunk blockIdx.x of the n*n
// entries.
template <typename T>
__global__ void cka_inner_kernel(const T* __restrict__ K, const T* __restrict__ L,
                                 const T* __restrict__ rows, int64_t n, bool debiased,
                                 T* __restrict__ part) {
  __shared__ T smem[3 * kGramThreads / 32];
  T sk, sl;
  cka_totals<T>(rows, n, smem, sk, sl);
  T v[3] = {0, 0, 0};
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    const T pk = cka_center<T>(K[e], rows[i], rows[j], sk, i, j, n, debiased);
    const T pl = cka_center<T>(L[e], rows[n + i], rows[n + j], sl, i, j, n, debiased);
    v[0] += pk * pl;
    v[1] += pk * pk;
    v[2] += pl * pl;
  }
  block_sum<T, 3>(v, smem);
  if (threadIdx.x == 0) {
    part[3 * blockIdx.x] = v[0];
    part[3 * blockIdx.x + 1] = v[1];
    part[3 * blockIdx.x + 2] = v[2];
  }
}

// One block: sums the partials, writes the CKA value and the gram_grad coefficients.
template <typename T>
__global__ void cka_scalars_kernel(const T* __restrict__ part, int chunks, int64_t n,
                                   bool debiased, T* __restrict__ value, T* __restrict__ coef) {
  __shared__ T smem[3 * kGramThreads / 32];
  T v[3] = {0, 0, 0};
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    v[0] += part[3 * c];
    v[1] += part[3 * c + 1];
    v[2] += part[3 * c + 2];
  }
  block_sum<T, 3>(v, smem);
  if (threadIdx.x == 0) {
    const auto s = cka_scalars<T>(v[0], v[1], v[2], n, debiased);
    value[0] = s.value;
    coef[0] = s.a_k;
    coef[1] = s.b_k;
    coef[2] = s.a_l;
    coef[3] = s.b_l;
  }
}

// Pass 3: gram_grad [2, n, n] from the coefficients (the backward applies the incoming
// gradient).
template <typename T>
__global__ void cka_grad_kernel(const T* __restrict__ K, const T* __restrict__ L,
                                const T* __restrict__ rows, const T* __restrict__ coef,
                                int64_t n, bool debiased, T* __restrict__ gram_grad) {
  __shared__ T smem[2 * kGramThreads / 32];
  T sk, sl;
  cka_totals<T>(rows, n, smem, sk, sl);
  const T a_k = coef[0], b_k = coef[1], a_l = coef[2], b_l = coef[3];
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    const T pk = cka_center<T>(K[e], rows[i], rows[j], sk, i, j, n, debiased);
    const T pl = cka_center<T>(L[e], rows[n + i], rows[n + j], sl, i, j, n, debiased);
    gram_grad[e] = a_k * pk + b_k * pl;
    gram_grad[n * n + e] = a_l * pk + b_l * pl;
  }
}

at::Tensor gram(const at::Tensor& f, at::ScalarType acc) {
  return f.scalar_type() != acc ? at::mm(f, f.t(), acc) : at::mm(f, f.t());
}

std::tuple<at::Tensor, at::Tensor> cka_cuda(const at::Tensor& x, const at::Tensor& y,
                                            bool debiased) {
  check_cka_inputs(x, y, debiased);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = cka_acc_type(x.scalar_type());
  const at::Tensor K = gram(x, acc).contiguous();  // [N, N]
  const at::Tensor L = gram(y, acc).contiguous();  // [N, N]
  const int64_t n = x.size(0);
  const int chunks = gram_chunks(n * n);
  at::Tensor gram_grad = at::empty({2, n, n}, K.options());
  at::Tensor rows = at::empty({2 * n}, K.options());
  at::Tensor part = at::empty({3 * chunks}, K.options());
  at::Tensor coef = at::empty({4}, K.options());
  at::Tensor value = at::empty({}, K.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "cka_cuda", [&] {
    const scalar_t* k = K.const_data_ptr<scalar_t>();
    const scalar_t* l = L.const_data_ptr<scalar_t>();
    scalar_t* r = rows.mutable_data_ptr<scalar_t>();
    scalar_t* p = part.mutable_data_ptr<scalar_t>();
    scalar_t* c = coef.mutable_data_ptr<scalar_t>();
    cka_rowsum_kernel<scalar_t>
        <<<static_cast<unsigned>(n), kGramThreads, 0, stream>>>(k, l, n, debiased, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cka_inner_kernel<scalar_t><<<chunks, kGramThreads, 0, stream>>>(k, l, r, n, debiased, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cka_scalars_kernel<scalar_t><<<1, kGramThreads, 0, stream>>>(
        p, chunks, n, debiased, value.mutable_data_ptr<scalar_t>(), c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cka_grad_kernel<scalar_t><<<chunks, kGramThreads, 0, stream>>>(
        k, l, r, c, n, debiased, gram_grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {value.to(x.scalar_type()), gram_grad};
}

// 2 * grad * gram_grad[idx] @ f; half inputs rescale the factor to a max of 1 first (its
// entries can sit below float16's normal range) and put the scale back in float32.
at::Tensor grad_gemm(const at::Tensor& a, const at::Tensor& f) {
  const auto acc = a.scalar_type();
  if (f.scalar_type() == acc) return at::mm(a, f);
  const at::Tensor scale = a.abs().amax().clamp_min(1e-30);
  at::Tensor out = at::mm((a / scale).to(f.scalar_type()), f, acc);
  out.mul_(scale);
  return out.to(f.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cka_backward_cuda(const at::Tensor& grad,
                                                     const at::Tensor& gram_grad,
                                                     const at::Tensor& x, const at::Tensor& y) {
  check_cka_backward_inputs(grad, gram_grad, x, y);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor a = gram_grad * (grad.reshape({}).to(gram_grad.scalar_type()) * 2);
  return {grad_gemm(a[0], x), grad_gemm(a[1], y)};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) {
  m.impl("cka", &cka_cuda);
  m.impl("cka_backward", &cka_backward_cuda);
}

}  // namespace autokd
