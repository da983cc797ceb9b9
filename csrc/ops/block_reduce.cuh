// Block-wide reductions shared by the row kernels of softmax_kl and pearson: each thread holds
// a partial (a sum, or an online softmax normaliser), warps combine with shuffles, then warp 0
// combines the warps' results and every thread gets the total. blockDim.x is a multiple of 32,
// at most 1024.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace autokd {

template <typename T>
__device__ __forceinline__ T dev_exp(T x);
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return expf(x);
}
template <>
__device__ __forceinline__ double dev_exp<double>(double x) {
  return exp(x);
}

// Online softmax normaliser: m = running max, z = sum exp(v - m), and optionally
// a = sum exp(v - m) d (a weighted sum that rescales with z).
template <typename T>
struct Norm {
  T m, z, a;
};

template <typename T>
__device__ __forceinline__ Norm<T> norm_empty() {
  return {-INFINITY, T(0), T(0)};
}

// exp(m_old - m_new), 0 for an empty partial (avoids exp(-inf - -inf) = NaN).
template <typename T>
__device__ __forceinline__ T rescale_factor(T z, T m_old, T m_new) {
  return z == T(0) ? T(0) : dev_exp<T>(m_old - m_new);
}

template <typename T>
__device__ __forceinline__ void norm_add(Norm<T>& n, T v, T d = T(0)) {
  if (v > n.m) {
    const T r = rescale_factor(n.z, n.m, v);
    n.z = n.z * r + T(1);
    n.a = n.a * r + d;
    n.m = v;
  } else {
    const T e = dev_exp<T>(v - n.m);
    n.z += e;
    n.a += e * d;
  }
}

template <typename T>
__device__ __forceinline__ Norm<T> norm_merge(Norm<T> x, Norm<T> y) {
  const T m = x.m > y.m ? x.m : y.m;
  const T rx = rescale_factor(x.z, x.m, m), ry = rescale_factor(y.z, y.m, m);
  return {m, x.z * rx + y.z * ry, x.a * rx + y.a * ry};
}

// Sums M values across the block; every thread returns with the totals in v.
template <int M, typename T>
__device__ __forceinline__ void block_sum(T (&v)[M]) {
  __shared__ T shared[32][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
  }
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < M; ++i) shared[warp][i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < M; ++i) {
    T t = T(0);
    for (int w = 0; w < warps; ++w) t += shared[w][i];  // fixed order: same total everywhere
    v[i] = t;
  }
}

// Merges M online normalisers across the block; every thread returns with the totals.
template <int M, typename T>
__device__ __forceinline__ void block_norm(Norm<T> (&v)[M]) {
  __shared__ Norm<T> shared[32][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    for (int o = 16; o > 0; o >>= 1) {
      Norm<T> other{__shfl_xor_sync(0xffffffffu, v[i].m, o),
                    __shfl_xor_sync(0xffffffffu, v[i].z, o),
                    __shfl_xor_sync(0xffffffffu, v[i].a, o)};
      v[i] = norm_merge(v[i], other);
    }
  }
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < M; ++i) shared[warp][i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < M; ++i) {
    Norm<T> t = shared[0][i];
    for (int w = 1; w < warps; ++w) t = norm_merge(t, shared[w][i]);
    v[i] = t;
  }
}

// Threads per row block: enough to cover short rows with one warp, up to 512 for long ones.
inline int row_block_threads(int64_t row_len) {
  int t = 32;
  while (t < 512 && t * 4 < row_len) t *= 2;
  return t;
}

}  // namespace autokd
