// CUDA kernels of pearson (formulas in pearson.h).
//   rows kernel (one block per row): online softmax normalisers of s/tau and t/tau, then the
//     row's centred moments of (P, Q) and its correlation terms -> row info [N, kRowInfo].
//   cols kernel (32 columns x 8 row stripes per block): column moments in double (fp64 is
//     cheap next to the loads), shifted by row 0's (P, Q) as on the CPU, merged over the
//     stripes -> column info [K, kColInfo].
//   grad kernel (one block per row): d loss / d P from both terms, <g, P>, then the gradient.
// The two losses are means of the [N] and [K] correlations on the device (no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "block_reduce.cuh"
#include "pearson.h"

namespace autokd {
namespace {

// Row info: max and 1/sum of the two softmaxes, correlation terms, row means of P and Q.
enum { kMx = 0, kIzx, kMy, kIzy, kRowCorr, kRowAlpha, kRowBeta, kMp, kMq, kRowInfo };
// Column info: correlation terms and column means of P and Q.
enum { kColCorr = 0, kColAlpha, kColBeta, kMa, kMb, kColInfo };

constexpr int kColTile = 32, kRowStripes = 8;

template <typename scalar_t, typename acc_t>
__global__ void pearson_rows_kernel(const scalar_t* __restrict__ s,
                                    const scalar_t* __restrict__ t, int64_t K, int64_t ss0,
                                    int64_t ss1, int64_t ts0, int64_t ts1, acc_t it,
                                    double* __restrict__ info) {
  const int64_t n = blockIdx.x;
  const scalar_t* sr = s + n * ss0;
  const scalar_t* tr = t + n * ts0;
  Norm<acc_t> st[2] = {norm_empty<acc_t>(), norm_empty<acc_t>()};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    norm_add(st[0], static_cast<acc_t>(sr[k * ss1]) * it);
    norm_add(st[1], static_cast<acc_t>(tr[k * ts1]) * it);
  }
  block_norm(st);
  const acc_t izx = acc_t(1) / st[0].z, izy = acc_t(1) / st[1].z;
  const acc_t c = acc_t(1) / static_cast<acc_t>(K);
  acc_t m[5] = {0, 0, 0, 0, 0};  // su, sv, suv, suu, svv with u = p - 1/K, v = q - 1/K
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t u = dev_exp<acc_t>(static_cast<acc_t>(sr[k * ss1]) * it - st[0].m) * izx - c;
    const acc_t v = dev_exp<acc_t>(static_cast<acc_t>(tr[k * ts1]) * it - st[1].m) * izy - c;
    m[0] += u;
    m[1] += v;
    m[2] += u * v;
    m[3] += u * u;
    m[4] += v * v;
  }
  block_sum(m);
  if (threadIdx.x == 0) {
    const double kd = static_cast<double>(K), su = m[0], sv = m[1];
    const CorrTerms ct = corr_terms(m[2] - su * sv / kd, m[3] - su * su / kd, m[4] - sv * sv / kd);
    double* o = info + n * kRowInfo;
    o[kMx] = st[0].m;
    o[kIzx] = izx;
    o[kMy] = st[1].m;
    o[kIzy] = izy;
    o[kRowCorr] = ct.corr;
    o[kRowAlpha] = ct.alpha;
    o[kRowBeta] = ct.beta;
    o[kMp] = 1.0 / kd + su / kd;
    o[kMq] = 1.0 / kd + sv / kd;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pearson_cols_kernel(const scalar_t* __restrict__ s,
                                    const scalar_t* __restrict__ t, int64_t N, int64_t K,
                                    int64_t ss0, int64_t ss1, int64_t ts0, int64_t ts1, acc_t it,
                                    const double* __restrict__ rows, double* __restrict__ info) {
  __shared__ double part[kRowStripes][kColTile][5];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  double m[5] = {0, 0, 0, 0, 0};
  // P[n, k], Q[n, k] from the row normalisers
  auto pq = [&](int64_t n, double& p, double& q) {
    const double* r = rows + n * kRowInfo;
    p = static_cast<double>(dev_exp<acc_t>(static_cast<acc_t>(s[n * ss0 + k * ss1]) * it -
                                           static_cast<acc_t>(r[kMx])) *
                            static_cast<acc_t>(r[kIzx]));
    q = static_cast<double>(dev_exp<acc_t>(static_cast<acc_t>(t[n * ts0 + k * ts1]) * it -
                                           static_cast<acc_t>(r[kMy])) *
                            static_cast<acc_t>(r[kIzy]));
  };
  double cp = 0, cq = 0;
  if (k < K) {
    pq(0, cp, cq);
    for (int64_t n = threadIdx.y; n < N; n += kRowStripes) {
      double p, q;
      pq(n, p, q);
      const double u = p - cp, v = q - cq;
      m[0] += u;
      m[1] += v;
      m[2] += u * v;
      m[3] += u * u;
      m[4] += v * v;
    }
  }
#pragma unroll
  for (int i = 0; i < 5; ++i) part[threadIdx.y][threadIdx.x][i] = m[i];
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    for (int y = 1; y < kRowStripes; ++y) {
#pragma unroll
      for (int i = 0; i < 5; ++i) m[i] += part[y][threadIdx.x][i];
    }
    const double nd = static_cast<double>(N);
    const CorrTerms ct =
        corr_terms(m[2] - m[0] * m[1] / nd, m[3] - m[0] * m[0] / nd, m[4] - m[1] * m[1] / nd);
    double* o = info + k * kColInfo;
    o[kColCorr] = ct.corr;
    o[kColAlpha] = ct.alpha;
    o[kColBeta] = ct.beta;
    o[kMa] = cp + m[0] / nd;
    o[kMb] = cq + m[1] / nd;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pearson_grad_kernel(const double* __restrict__ grads,
                                    const scalar_t* __restrict__ s,
                                    const scalar_t* __restrict__ t, scalar_t* __restrict__ out,
                                    int64_t N, int64_t K, int64_t ss0, int64_t ss1, int64_t ts0,
                                    int64_t ts1, int64_t os0, int64_t os1, double tau,
                                    const double* __restrict__ rows,
                                    const double* __restrict__ cols) {
  const int64_t n = blockIdx.x;
  const double* r = rows + n * kRowInfo;
  const double t2 = tau * tau;
  const double gi = grads[0], gc = N > 1 ? grads[1] : 0.0;  // see pearson_cpu.cpp
  const acc_t it = static_cast<acc_t>(1.0 / tau);
  const acc_t a_row = static_cast<acc_t>(-t2 * gi / N * r[kRowAlpha]);
  const acc_t b_row = static_cast<acc_t>(t2 * gi / N * r[kRowBeta]);
  const acc_t a_col = static_cast<acc_t>(-t2 * gc / K), b_col = static_cast<acc_t>(t2 * gc / K);
  const acc_t mx = static_cast<acc_t>(r[kMx]), izx = static_cast<acc_t>(r[kIzx]);
  const acc_t my = static_cast<acc_t>(r[kMy]), izy = static_cast<acc_t>(r[kIzy]);
  const acc_t mp = static_cast<acc_t>(r[kMp]), mq = static_cast<acc_t>(r[kMq]);
  const scalar_t* sr = s + n * ss0;
  const scalar_t* tr = t + n * ts0;
  // g_k = d loss / d P[n, k]; recomputed in the second sweep rather than stored.
  auto pqg = [&](int64_t k, acc_t& p, acc_t& g) {
    p = dev_exp<acc_t>(static_cast<acc_t>(sr[k * ss1]) * it - mx) * izx;
    const acc_t q = dev_exp<acc_t>(static_cast<acc_t>(tr[k * ts1]) * it - my) * izy;
    const double* c = cols + k * kColInfo;
    g = a_row * (q - mq) + b_row * (p - mp) +
        a_col * static_cast<acc_t>(c[kColAlpha]) * (q - static_cast<acc_t>(c[kMb])) +
        b_col * static_cast<acc_t>(c[kColBeta]) * (p - static_cast<acc_t>(c[kMa]));
  };
  acc_t dot[1] = {0};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t p, g;
    pqg(k, p, g);
    dot[0] += g * p;
  }
  block_sum(dot);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t p, g;
    pqg(k, p, g);
    out[n * os0 + k * os1] = static_cast<scalar_t>(p * (g - dot[0]) * it);
  }
}

// Row and column info of (student, teacher), both [N, K].
std::pair<at::Tensor, at::Tensor> pearson_info(const at::Tensor& s, const at::Tensor& t,
                                               double tau) {
  const int64_t N = s.size(0), K = s.size(1);
  const auto opts = s.options().dtype(at::kDouble);
  at::Tensor rows = at::empty({N, kRowInfo}, opts), cols = at::empty({K, kColInfo}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pearson_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t it = static_cast<acc_t>(1.0 / tau);
    pearson_rows_kernel<scalar_t, acc_t><<<N, row_block_threads(K), 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), K, s.stride(0), s.stride(1),
        t.stride(0), t.stride(1), it, rows.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 block(kColTile, kRowStripes);
    const auto grid = static_cast<unsigned>((K + kColTile - 1) / kColTile);
    pearson_cols_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), N, K, s.stride(0),
        s.stride(1), t.stride(0), t.stride(1), it, rows.const_data_ptr<double>(),
        cols.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, cols};
}

std::tuple<at::Tensor, at::Tensor> pearson_cuda(const at::Tensor& student,
                                                const at::Tensor& teacher, double tau) {
  check_pearson_inputs("pearson", student, teacher, tau);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto [rows, cols] = pearson_info(student, teacher, tau);
  const double t2 = tau * tau;
  at::Tensor inter = ((1.0 - rows.select(1, kRowCorr)).mean() * t2).to(student.scalar_type());
  at::Tensor intra = ((1.0 - cols.select(1, kColCorr)).mean() * t2).to(student.scalar_type());
  return {inter, intra};
}

at::Tensor pearson_backward_cuda(const at::Tensor& grad_inter, const at::Tensor& grad_intra,
                                 const at::Tensor& student, const at::Tensor& teacher,
                                 double tau) {
  check_pearson_inputs("pearson_backward", student, teacher, tau);
  check_pearson_grads("pearson_backward", grad_inter, grad_intra, student);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), K = student.size(1);
  const auto [rows, cols] = pearson_info(student, teacher, tau);
  const at::Tensor grads =
      at::cat({grad_inter.reshape({1}), grad_intra.reshape({1})}).to(at::kDouble);
  at::Tensor out = at::empty_like(student);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "pearson_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        pearson_grad_kernel<scalar_t, acc_t><<<N, row_block_threads(K), 0, stream>>>(
            grads.const_data_ptr<double>(), student.const_data_ptr<scalar_t>(),
            teacher.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, K,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            out.stride(0), out.stride(1), tau, rows.const_data_ptr<double>(),
            cols.const_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) {
  m.impl("pearson", &pearson_cuda);
  m.impl("pearson_backward", &pearson_backward_cuda);
}

}  // namespace autokd
