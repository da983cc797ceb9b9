// CPU kernels of multiscale_pool (algorithm in multiscale_pool.h): planes in parallel
// (at::parallel_for, OpenMP), one pass over the input per plane, float accumulation (double for
// float64).
//
// Two paths each way. The blocked kernels take every dtype, layout and geometry. One geometry
// has a kernel of its own because a training step of a model the product uses measurably gains
// from it: float32 4 x 4 planes with grids from {1, 2, 4}, the multi-scale view of the embedded
// digits pair's features (see Planes4x4 below). Every other specialised path this file had (8 x 8
// and 32 x 32 vector kernels, unrolled kernels for other small and large nested geometries, a
// float32 per-plane kernel, a channels-last kernel) made a training step no faster than the
// blocked kernels beyond noise on resnet20 / resnet8x4 (32 x 32 inputs, one to three taps,
// contiguous or channels-last), so they were removed: benchmarks/results/ops-pool.md.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fast_exp.h"  // AUTOKD_CLONES
#include "multiscale_pool.h"

namespace autokd {
namespace {

// Work items of at least this many pixels, so that small planes come many to a task.
constexpr int64_t kGrainPixels = 32768;

// Offsets of planes p0, p0 + 1, ... of a flattened [N, C] batch of planes: plane p starts at
// (p / C) * sN + (p % C) * sC, stepped through (n, c) because a 64-bit division per plane costs
// as much as the arithmetic of a small plane.
struct PlaneWalk {
  int64_t n, c;
  const int64_t C, sN, sC;
  PlaneWalk(int64_t p0, int64_t C, int64_t sN, int64_t sC)
      : n(p0 / C), c(p0 % C), C(C), sN(sN), sC(sC) {}
  int64_t next() {
    const int64_t off = n * sN + c * sC;
    if (++c == C) {
      c = 0;
      ++n;
    }
    return off;
  }
};

// Per-call tables shared by all planes.
struct PoolGeometry {
  PoolAxis rows, cols;
  int64_t S = 0;  // output length per plane, sum of s^2
  // Per output index k: its bin as elementary-segment ranges [r0, r1) x [c0, c1), and its area.
  std::vector<int64_t> r0, r1, c0, c1, area;

  PoolGeometry(int64_t H, int64_t W, c10::IntArrayRef grids) : rows(H, grids), cols(W, grids) {
    int64_t base = 0;
    for (int64_t s : grids) {
      S += s * s;
      for (int64_t i = 0; i < s; ++i) {
        for (int64_t j = 0; j < s; ++j) {
          r0.push_back(rows.seg_lo[base + i]);
          r1.push_back(rows.seg_hi[base + i]);
          c0.push_back(cols.seg_lo[base + j]);
          c1.push_back(cols.seg_hi[base + j]);
          area.push_back(rows.bin_len[base + i] * cols.bin_len[base + j]);
        }
      }
      base += s;
    }
  }
};

// Planes are handled in blocks of kLanes. Each plane's rows of one row segment are summed
// element-wise (vectorised along W, kChunk columns at a time in registers when rows are
// contiguous), and the W-long sums are stored with the block's planes innermost; from there the
// column segments and every bin are vector adds across the block, so per-plane bookkeeping is
// amortised even for small planes.
constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 8;

template <typename scalar_t>
void forward_planes(const at::Tensor& input, const PoolGeometry& geo, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2);
  const int64_t sW = W == 1 ? 1 : input.stride(3);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t S = geo.S, Rh = geo.rows.nseg, Rw = geo.cols.nseg, P = N * C;
  const int64_t nblocks = (P + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, kGrainPixels / (H * W * kLanes));
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rowsT(Rh * W * kLanes), cellsT(Rh * Rw * kLanes);
    std::vector<acc_t> inv(S);
    for (int64_t k = 0; k < S; ++k) inv[k] = acc_t(1) / acc_t(geo.area[k]);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * kLanes, nb = std::min(kLanes, P - p0);
      if (nb < kLanes) std::fill(rowsT.begin(), rowsT.end(), acc_t(0));
      PlaneWalk planes(p0, C, sN, sC);
      for (int64_t b = 0; b < nb; ++b) {
        const scalar_t* plane = x + planes.next();
        for (int64_t r = 0; r < Rh; ++r) {
          const int64_t h0 = geo.rows.seg_begin[r], h1 = geo.rows.seg_begin[r + 1];
          acc_t* dst = rowsT.data() + r * W * kLanes + b;
          int64_t w0 = 0;
          if (sW == 1) {
            // Chunks of kChunk columns summed over the segment's rows in registers.
            for (; w0 + kChunk <= W; w0 += kChunk) {
              acc_t a[kChunk];
              const scalar_t* row = plane + h0 * sH + w0;
              for (int64_t l = 0; l < kChunk; ++l) a[l] = static_cast<acc_t>(row[l]);
              for (int64_t h = h0 + 1; h < h1; ++h) {
                row = plane + h * sH + w0;
                for (int64_t l = 0; l < kChunk; ++l) a[l] += static_cast<acc_t>(row[l]);
              }
              for (int64_t l = 0; l < kChunk; ++l) dst[(w0 + l) * kLanes] = a[l];
            }
          }
          for (int64_t w = w0; w < W; ++w) {
            acc_t a = 0;
            for (int64_t h = h0; h < h1; ++h) a += static_cast<acc_t>(plane[h * sH + w * sW]);
            dst[w * kLanes] = a;
          }
        }
      }
      // Column segments: [Rh, W, lanes] -> [Rh, Rw, lanes].
      for (int64_t r = 0; r < Rh; ++r) {
        for (int64_t c = 0; c < Rw; ++c) {
          acc_t* cell = cellsT.data() + (r * Rw + c) * kLanes;
          const acc_t* src = rowsT.data() + (r * W + geo.cols.seg_begin[c]) * kLanes;
          for (int64_t l = 0; l < kLanes; ++l) cell[l] = src[l];
          for (int64_t w = geo.cols.seg_begin[c] + 1; w < geo.cols.seg_begin[c + 1]; ++w) {
            src += kLanes;
            for (int64_t l = 0; l < kLanes; ++l) cell[l] += src[l];
          }
        }
      }
      // Bins: sums of their elementary cells.
      for (int64_t k = 0; k < S; ++k) {
        acc_t sum[kLanes] = {};
        for (int64_t r = geo.r0[k]; r < geo.r1[k]; ++r) {
          for (int64_t c = geo.c0[k]; c < geo.c1[k]; ++c) {
            const acc_t* cell = cellsT.data() + (r * Rw + c) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) sum[l] += cell[l];
          }
        }
        scalar_t* o = y + p0 * S + k;
        for (int64_t b = 0; b < nb; ++b) o[b * S] = static_cast<scalar_t>(sum[b] * inv[k]);
      }
    }
  });
}

// Backward: the value every pixel of an elementary cell receives is summed per cell from the
// bins covering it (vector adds across a block of planes), expanded to one W-long row per row
// segment, and copied to each row of the segment.
template <typename scalar_t>
void backward_planes(const at::Tensor& grad, const PoolGeometry& geo, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad_input.size(0), C = grad_input.size(1);
  const int64_t H = grad_input.size(2), W = grad_input.size(3);
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gS = grad.stride(2);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const int64_t S = geo.S, Rh = geo.rows.nseg, Rw = geo.cols.nseg, P = N * C;
  const int64_t nblocks = (P + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, kGrainPixels / (H * W * kLanes));
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cellsT(Rh * Rw * kLanes), inv(S);
    std::vector<scalar_t> rowbuf(W);
    for (int64_t k = 0; k < S; ++k) inv[k] = acc_t(1) / acc_t(geo.area[k]);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * kLanes, nb = std::min(kLanes, P - p0);
      const scalar_t* gp[kLanes];
      PlaneWalk planes(p0, C, gN, gC);
      for (int64_t b = 0; b < nb; ++b) {
        gp[b] = g + planes.next();
      }
      std::fill(cellsT.begin(), cellsT.end(), acc_t(0));
      for (int64_t k = 0; k < S; ++k) {
        acc_t v[kLanes] = {};
        for (int64_t b = 0; b < nb; ++b) v[b] = static_cast<acc_t>(gp[b][k * gS]) * inv[k];
        for (int64_t r = geo.r0[k]; r < geo.r1[k]; ++r) {
          for (int64_t c = geo.c0[k]; c < geo.c1[k]; ++c) {
            acc_t* cell = cellsT.data() + (r * Rw + c) * kLanes;
            for (int64_t l = 0; l < kLanes; ++l) cell[l] += v[l];
          }
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        scalar_t* out = gi + (p0 + b) * H * W;
        for (int64_t r = 0; r < Rh; ++r) {
          for (int64_t c = 0; c < Rw; ++c) {
            const scalar_t v = static_cast<scalar_t>(cellsT[(r * Rw + c) * kLanes + b]);
            for (int64_t w = geo.cols.seg_begin[c]; w < geo.cols.seg_begin[c + 1]; ++w) {
              rowbuf[w] = v;
            }
          }
          // Short rows (8 x 8 planes) make a memcpy call per row the dominant cost.
          for (int64_t h = geo.rows.seg_begin[r]; h < geo.rows.seg_begin[r + 1]; ++h) {
            scalar_t* dst = out + h * W;
            int64_t w = 0;
            for (; w + kChunk <= W; w += kChunk) {
              for (int64_t l = 0; l < kChunk; ++l) dst[w + l] = rowbuf[w + l];
            }
            for (; w < W; ++w) dst[w] = rowbuf[w];
          }
        }
      }
    }
  });
}

// ---- float32 4 x 4 planes, grids from {1, 2, 4} ---------------------------------------------
//
// Why this path exists: the embedded digits pair (digits_student <- digits_teacher, the default
// of every command) distils features of 4 x 4 pixels ([N, 64, 4, 4] after the adapter); the
// multi-scale transform pools them to grids 1, 2, 4 every step, student and teacher side. On
// 16-pixel planes the blocked kernels spend more on bookkeeping than on the pixels. Measured on
// a whole training step (Distiller forward + backward, batch 32, one thread, paired rounds,
// benchmarks/results/ops-pool.md): this forward makes the step 0.948x of the step with the
// blocked forward (IQR 0.927-0.958), this backward 0.966x (0.932-0.986), both 0.917x.
//
// Per plane: `sums` holds grid 1 | grid 2 (2 x 2) | grid 4 (the 16 pixels), each row-major, 21
// floats; grid 2 sums 2 x 2 blocks of pixels and grid 1 the grid-2 bins. Output index k reads
// sums[idx[k]] * inv[k], so any order of the grids, with repeats, is served; `identity` marks
// the common order 1, 2, 4 (idx[k] == k).
constexpr int64_t kSide4x4 = 4;
constexpr int kSums4x4 = 1 + 4 + 16;

bool is_planes_4x4(int64_t H, int64_t W, c10::IntArrayRef grids) {
  if (H != kSide4x4 || W != kSide4x4) return false;
  return std::all_of(grids.begin(), grids.end(),
                     [](int64_t s) { return s == 1 || s == 2 || s == 4; });
}

struct Planes4x4 {
  std::vector<int64_t> idx;  // [S] position in sums of output k
  std::vector<float> inv;    // [S] 1 / area of output k's bin
  bool identity = true;

  explicit Planes4x4(c10::IntArrayRef grids) {
    int64_t k = 0;
    for (int64_t s : grids) {
      const int64_t base = s == 1 ? 0 : s == 2 ? 1 : 5;
      for (int64_t q = 0; q < s * s; ++q, ++k) {
        idx.push_back(base + q);
        inv.push_back(static_cast<float>(s * s) / (kSide4x4 * kSide4x4));
        identity = identity && base + q == k;
      }
    }
    identity = identity && k == kSums4x4;
  }
};

// Compiled for AVX-512, AVX2 and baseline (setup.py builds for baseline) as measured.
AUTOKD_CLONES void forward_4x4_f32(const float* __restrict x, int64_t p0, int64_t p1, int64_t C,
                                   int64_t sN, int64_t sC, int64_t sH, int64_t S,
                                   const int64_t* __restrict idx, const float* __restrict inv,
                                   bool identity, float* __restrict y) {
  PlaneWalk planes(p0, C, sN, sC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict plane = x + planes.next();
    float sums[kSums4x4];
    float* __restrict cells = sums + 5;
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) cells[i * 4 + j] = plane[i * sH + j];
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const float* c = cells + 2 * i * 4 + 2 * j;
        sums[1 + 2 * i + j] = (c[0] + c[1]) + (c[4] + c[5]);
      }
    }
    sums[0] = (sums[1] + sums[2]) + (sums[3] + sums[4]);
    float* __restrict out = y + p * S;
    if (identity) {
      for (int k = 0; k < kSums4x4; ++k) out[k] = sums[k] * inv[k];
    } else {
      for (int64_t k = 0; k < S; ++k) out[k] = sums[idx[k]] * inv[k];
    }
  }
}

// The gradient of every bin (times 1 / area) is gathered into grid 1 | grid 2 | cells, pushed
// down (each grid-2 bin adds grid 1, each pixel its grid-2 bin) and written to the pixels of a
// fresh contiguous [N, C, 4, 4] grad_input; grad is read through its strides.
AUTOKD_CLONES void backward_4x4_f32(const float* __restrict g, int64_t p0, int64_t p1, int64_t C,
                                    int64_t gN, int64_t gC, int64_t gS, int64_t S,
                                    const int64_t* __restrict idx, const float* __restrict inv,
                                    bool identity, float* __restrict gi) {
  PlaneWalk planes(p0, C, gN, gC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict gp = g + planes.next();
    float sums[kSums4x4];
    if (identity) {
      for (int k = 0; k < kSums4x4; ++k) sums[k] = gp[k * gS] * inv[k];
    } else {
      for (int k = 0; k < kSums4x4; ++k) sums[k] = 0.0f;
      for (int64_t k = 0; k < S; ++k) sums[idx[k]] += gp[k * gS] * inv[k];
    }
    for (int q = 0; q < 4; ++q) sums[1 + q] += sums[0];
    const float* __restrict cells = sums + 5;
    float* __restrict out = gi + p * kSide4x4 * kSide4x4;
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        out[i * 4 + j] = cells[i * 4 + j] + sums[1 + (i / 2) * 2 + j / 2];
      }
    }
  }
}

at::Tensor multiscale_pool_cpu(const at::Tensor& input, c10::IntArrayRef grids) {
  check_multiscale_pool_inputs(input, grids);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({N, C, multiscale_pool_out_size(grids)}, input.options());
  if (input.scalar_type() == at::kFloat && input.stride(3) == 1 && is_planes_4x4(H, W, grids)) {
    const Planes4x4 map(grids);
    const float* x = input.const_data_ptr<float>();
    float* y = out.mutable_data_ptr<float>();
    at::parallel_for(0, N * C, kGrainPixels / (H * W), [&](int64_t begin, int64_t end) {
      forward_4x4_f32(x, begin, end, C, input.stride(0), input.stride(1), input.stride(2),
                      out.size(2), map.idx.data(), map.inv.data(), map.identity, y);
    });
    return out;
  }
  const PoolGeometry geo(H, W, grids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "multiscale_pool_cpu",
                                  [&] { forward_planes<scalar_t>(input, geo, out); });
  return out;
}

at::Tensor multiscale_pool_backward_cpu(const at::Tensor& grad, c10::IntArrayRef input_size,
                                        c10::IntArrayRef grids) {
  check_multiscale_pool_backward_inputs(grad, input_size, grids);
  at::Tensor grad_input = at::empty(input_size, grad.options());
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  if (grad.scalar_type() == at::kFloat && is_planes_4x4(H, W, grids)) {
    const Planes4x4 map(grids);
    const float* g = grad.const_data_ptr<float>();
    float* gi = grad_input.mutable_data_ptr<float>();
    at::parallel_for(0, N * C, kGrainPixels / (H * W), [&](int64_t begin, int64_t end) {
      backward_4x4_f32(g, begin, end, C, grad.stride(0), grad.stride(1), grad.stride(2),
                       grad.size(2), map.idx.data(), map.inv.data(), map.identity, gi);
    });
    return grad_input;
  }
  const PoolGeometry geo(H, W, grids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "multiscale_pool_backward_cpu",
                                  [&] { backward_planes<scalar_t>(grad, geo, grad_input); });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) {
  m.impl("multiscale_pool", &multiscale_pool_cpu);
  m.impl("multiscale_pool_backward", &multiscale_pool_backward_cpu);
}

}  // namespace autokd
