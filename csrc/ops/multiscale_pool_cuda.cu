// CUDA kernels of multiscale_pool (bins and formulas in multiscale_pool.h).
//
// Forward: one block per (n, c) plane. The plane is read once from global memory into shared
// memory (when it fits in 48 KiB), then each warp reduces whole bins of every grid from shared
// memory, so overlapping or non-nesting bins cost shared-memory reads only. Larger planes read
// the bins straight from global memory (L2 serves the repeats).
// Backward: one thread per input pixel; it finds the (at most 2 x 2) bins of each grid that
// contain it and sums grad / area; grad is tiny and cached, grad_input is written once,
// coalesced. float64, float32, float16, bfloat16; accumulation in float (double for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "multiscale_pool.h"

namespace autokd {
namespace {

// Grid sizes and their first output index, passed to the kernels by value.
struct GridList {
  int n;
  int s[kMultiscalePoolMaxGrids];
  int offset[kMultiscalePoolMaxGrids];
};

GridList make_grid_list(c10::IntArrayRef grids) {
  GridList gl{};
  gl.n = static_cast<int>(grids.size());
  int off = 0;
  for (int g = 0; g < gl.n; ++g) {
    gl.s[g] = static_cast<int>(grids[g]);
    gl.offset[g] = off;
    off += gl.s[g] * gl.s[g];
  }
  return gl;
}

constexpr int kSharedBytes = 48 * 1024;

template <typename scalar_t, typename acc_t, bool kStage>
__global__ void multiscale_pool_fwd_kernel(const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ y, int64_t C, int H, int W,
                                           int64_t sN, int64_t sC, int64_t sH, int64_t sW,
                                           GridList gl, int S) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* plane_s = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t p = blockIdx.x;
  const scalar_t* xp = x + (p / C) * sN + (p % C) * sC;
  if constexpr (kStage) {
    const int HW = H * W;
    for (int e = threadIdx.x; e < HW; e += blockDim.x) {
      const int h = e / W, w = e - h * W;
      plane_s[e] = static_cast<acc_t>(xp[h * sH + w * sW]);
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int k = warp; k < S; k += nwarps) {
    int g = 0;
    while (g + 1 < gl.n && k >= gl.offset[g + 1]) ++g;
    const int s = gl.s[g], local = k - gl.offset[g];
    const int i = local / s, j = local - i * s;
    const int h0 = static_cast<int>(pool_bin_start(i, H, s));
    const int h1 = static_cast<int>(pool_bin_end(i, H, s));
    const int w0 = static_cast<int>(pool_bin_start(j, W, s));
    const int w1 = static_cast<int>(pool_bin_end(j, W, s));
    const int bw = w1 - w0, area = (h1 - h0) * bw;
    acc_t sum = 0;
    for (int e = lane; e < area; e += 32) {
      const int dh = e / bw, h = h0 + dh, w = w0 + (e - dh * bw);
      if constexpr (kStage) {
        sum += plane_s[h * W + w];
      } else {
        sum += static_cast<acc_t>(xp[h * sH + w * sW]);
      }
    }
    for (int d = 16; d > 0; d >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, d);
    if (lane == 0) y[p * S + k] = static_cast<scalar_t>(sum / static_cast<acc_t>(area));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void multiscale_pool_bwd_kernel(const scalar_t* __restrict__ grad,
                                           scalar_t* __restrict__ grad_input, int64_t total,
                                           int64_t C, int H, int W, int64_t gN, int64_t gC,
                                           int64_t gS, GridList gl) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / HW;
    const int rem = static_cast<int>(e - p * HW);
    const int h = rem / W, w = rem - h * W;
    const scalar_t* gp = grad + (p / C) * gN + (p % C) * gC;
    acc_t acc = 0;
    for (int g = 0; g < gl.n; ++g) {
      const int s = gl.s[g];
      // Bins containing h: i in [floor(h s / H), ...] while bin i starts at or before h.
      const int i0 = static_cast<int>((static_cast<int64_t>(h) * s) / H);
      const int j0 = static_cast<int>((static_cast<int64_t>(w) * s) / W);
      for (int i = i0; i < s && pool_bin_start(i, H, s) <= h; ++i) {
        const int rows = static_cast<int>(pool_bin_end(i, H, s) - pool_bin_start(i, H, s));
        for (int j = j0; j < s && pool_bin_start(j, W, s) <= w; ++j) {
          const int cols = static_cast<int>(pool_bin_end(j, W, s) - pool_bin_start(j, W, s));
          acc += static_cast<acc_t>(gp[(gl.offset[g] + i * s + j) * gS]) /
                 static_cast<acc_t>(rows * cols);
        }
      }
    }
    grad_input[e] = static_cast<scalar_t>(acc);
  }
}

at::Tensor multiscale_pool_cuda(const at::Tensor& input, c10::IntArrayRef grids) {
  check_multiscale_pool_inputs(input, grids);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1);
  const int H = static_cast<int>(input.size(2)), W = static_cast<int>(input.size(3));
  const GridList gl = make_grid_list(grids);
  const int S = static_cast<int>(multiscale_pool_out_size(grids));
  at::Tensor out = at::empty({N, C, S}, input.options());
  const int HW = H * W;
  const int threads = std::clamp(1 << (32 - __builtin_clz(std::max(HW / 4, 1))), 64, 256);
  const int64_t blocks = N * C;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "multiscale_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const size_t smem = static_cast<size_t>(HW) * sizeof(acc_t);
        const scalar_t* x = input.const_data_ptr<scalar_t>();
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        if (smem <= kSharedBytes) {
          multiscale_pool_fwd_kernel<scalar_t, acc_t, true><<<blocks, threads, smem, stream>>>(
              x, y, C, H, W, input.stride(0), input.stride(1), input.stride(2), input.stride(3),
              gl, S);
        } else {
          multiscale_pool_fwd_kernel<scalar_t, acc_t, false><<<blocks, threads, 0, stream>>>(
              x, y, C, H, W, input.stride(0), input.stride(1), input.stride(2), input.stride(3),
              gl, S);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor multiscale_pool_backward_cuda(const at::Tensor& grad, c10::IntArrayRef input_size,
                                         c10::IntArrayRef grids) {
  check_multiscale_pool_backward_inputs(grad, input_size, grids);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_input = at::empty(input_size, grad.options());
  const int64_t total = grad_input.numel();
  const GridList gl = make_grid_list(grids);
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "multiscale_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        multiscale_pool_bwd_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), total,
            input_size[1], static_cast<int>(input_size[2]), static_cast<int>(input_size[3]),
            grad.stride(0), grad.stride(1), grad.stride(2), gl);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CUDA, m) {
  m.impl("multiscale_pool", &multiscale_pool_cuda);
  m.impl("multiscale_pool_backward", &multiscale_pool_backward_cuda);
}

}  // namespace autokd
