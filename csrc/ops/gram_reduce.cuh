// Block-wide sums for the Gram reductions of gram_l2 and cka (CUDA). Deterministic: fixed
// shuffle tree per warp, fixed order across warps.
#pragma once

#include <cuda_runtime.h>

namespace autokd {

constexpr int kGramThreads = 256;  // threads per block of every Gram kernel
constexpr int kGramMaxChunks = 128;  // blocks per Gram in the partial-sum passes

// Sums R values per thread across the block; the result is valid in thread 0.
// `smem` holds at least R * (blockDim.x / 32) values.
template <typename T, int R>
__device__ inline void block_sum(T (&v)[R], T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int o = 16; o > 0; o >>= 1) v[r] += __shfl_down_sync(0xffffffffu, v[r], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) smem[r * warps + warp] = v[r];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T s = 0;
      for (int w = 0; w < warps; ++w) s += smem[r * warps + w];
      v[r] = s;
    }
  }
  __syncthreads();
}

inline int gram_chunks(int64_t elems) {
  const int64_t per_block = static_cast<int64_t>(kGramThreads) * 8;
  const int64_t c = (elems + per_block - 1) / per_block;
  return static_cast<int>(c < 1 ? 1 : (c > kGramMaxChunks ? kGramMaxChunks : c));
}

}  // namespace autokd
