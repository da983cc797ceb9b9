// CUDA kernels of softmax_kl (formula and layout in softmax_kl.h): one block per row. Each
// thread keeps online normalisers of its strided share of the row (x = s / tau, y = t / tau,
// with a = sum exp(y - my)(y - x) riding on the teacher's), the block merges them, and the
// per-row KL goes to an [R] buffer summed by at::sum (deterministic, no host sync). With
// with_grad a second kernel recomputes the normalisers, then writes the gradient (for a unit
// upstream gradient) in a second sweep.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "block_reduce.cuh"
#include "softmax_kl.h"

namespace autokd {
namespace {

// Element j of a row at offset j_a * sa + j_b * sb, j = j_a * B + j_b.
struct DevLayout {
  int64_t sr, sa, sb;
  uint32_t A, B;
};

DevLayout dev_layout(const RowLayout& l) {
  return {l.sr, l.sa, l.sb, static_cast<uint32_t>(l.A), static_cast<uint32_t>(l.B)};
}

__device__ __forceinline__ int64_t offset(const DevLayout& l, int64_t r, uint32_t j) {
  if (l.A == 1) return r * l.sr + static_cast<int64_t>(j) * l.sb;
  const uint32_t a = j / l.B, b = j - a * l.B;
  return r * l.sr + static_cast<int64_t>(a) * l.sa + static_cast<int64_t>(b) * l.sb;
}

template <typename scalar_t, typename acc_t>
__global__ void kl_forward_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                  DevLayout ls, DevLayout lt, acc_t it, acc_t* __restrict__ kl) {
  const int64_t r = blockIdx.x;
  const uint32_t L = ls.A * ls.B;
  Norm<acc_t> st[2] = {norm_empty<acc_t>(), norm_empty<acc_t>()};  // student, teacher
  for (uint32_t j = threadIdx.x; j < L; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(s[offset(ls, r, j)]) * it;
    const acc_t y = static_cast<acc_t>(t[offset(lt, r, j)]) * it;
    norm_add(st[0], x);
    norm_add(st[1], y, y - x);
  }
  block_norm(st);
  if (threadIdx.x == 0) {
    kl[r] = st[1].a / st[1].z - (st[1].m + log(st[1].z)) + (st[0].m + log(st[0].z));
  }
}

// out = c * (softmax(x) - softmax(y)) per row, c = tau / R.
template <typename scalar_t, typename acc_t>
__global__ void kl_grad_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                               scalar_t* __restrict__ out, DevLayout ls, DevLayout lt,
                               DevLayout lo, acc_t it, acc_t c) {
  const int64_t r = blockIdx.x;
  const uint32_t L = ls.A * ls.B;
  Norm<acc_t> st[2] = {norm_empty<acc_t>(), norm_empty<acc_t>()};
  for (uint32_t j = threadIdx.x; j < L; j += blockDim.x) {
    norm_add(st[0], static_cast<acc_t>(s[offset(ls, r, j)]) * it);
    norm_add(st[1], static_cast<acc_t>(t[offset(lt, r, j)]) * it);
  }
  block_norm(st);
  const acc_t izx = acc_t(1) / st[0].z, izy = acc_t(1) / st[1].z;
  for (uint32_t j = threadIdx.x; j < L; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(s[offset(ls, r, j)]) * it;
    const acc_t y = static_cast<acc_t>(t[offset(lt, r, j)]) * it;
    out[offset(lo, r, j)] = static_cast<scalar_t>(
        c * (dev_exp<acc_t>(x - st[0].m) * izx - dev_exp<acc_t>(y - st[1].m) * izy));
  }
}

void check_row_length(const char* op, const RowLayout& l) {
  AUTOKD_CHECK(l.A * l.B < (int64_t{1} << 31), op,
               "expected rows of fewer than 2^31 elements on CUDA, got ", l.A * l.B);
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_cuda(const at::Tensor& student,
                                                   const at::Tensor& teacher, double tau,
                                                   bool with_grad) {
  check_softmax_kl_inputs("softmax_kl", student, teacher, tau);
  const c10::cuda::CUDAGuard guard(student.device());
  // Same strides as the student where it is dense (e.g. the channel view), so the gradient
  // flows back through views without a copy.
  at::Tensor grad = with_grad ? at::empty_like(student) : student.new_empty({0});
  const auto l = with_grad ? row_layouts<3>({&student, &teacher, &grad})
                           : row_layouts<3>({&student, &teacher, &student});
  check_row_length("softmax_kl", l[0]);
  const int64_t R = l[0].rows;
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor kl = at::empty({R}, student.options().dtype(acc_type));
  const int threads = row_block_threads(l[0].A * l[0].B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t it = static_cast<acc_t>(1.0 / tau);
        kl_forward_kernel<scalar_t, acc_t><<<R, threads, 0, stream>>>(
            student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
            dev_layout(l[0]), dev_layout(l[1]), it, kl.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (with_grad) {
          kl_grad_kernel<scalar_t, acc_t><<<R, threads, 0, stream>>>(
              student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
              grad.mutable_data_ptr<scalar_t>(), dev_layout(l[0]), dev_layout(l[1]),
              dev_layout(l[2]), it, static_cast<acc_t>(tau / static_cast<double>(R)));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  at::Tensor loss = (kl.sum() * (tau * tau / static_cast<double>(R))).to(student.scalar_type());
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_cuda);
}

}  // namespace autokd
