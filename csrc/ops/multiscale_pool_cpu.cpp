// CPU kernels of multiscale_pool (algorithm in multiscale_pool.h): planes in parallel
// (at::parallel_for, OpenMP), one pass over the input per plane, float accumulation (double for
// float64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "fast_exp.h"  // AUTOKD_CLONES
#include "multiscale_pool.h"

// 8 x 8 planes are summed in GCC vectors passed between always_inline helpers (see
// planes_8x8 below); GCC's -Wpsabi note about their calling convention without AVX-512
// concerns no real call, and GCC reports it at the end of the file, so it is silenced here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace autokd {
namespace {

// Offsets of planes p0, p0 + 1, ... of a flattened [N, C] batch of planes: plane p starts at
// (p / C) * sN + (p % C) * sC, stepped through (n, c) because a 64-bit division per plane costs
// as much as the arithmetic of an 8 x 8 plane.
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
  std::vector<int64_t> grids, offset;  // offset[g]: first output index of grid g
  int64_t S = 0;

  // Per output index k: its bin as elementary-segment ranges [r0, r1) x [c0, c1), and its area.
  std::vector<int64_t> r0, r1, c0, c1, area;

  PoolGeometry(int64_t H, int64_t W, c10::IntArrayRef g)
      : rows(H, g), cols(W, g), grids(g.begin(), g.end()) {
    int64_t base = 0;
    for (int64_t s : grids) {
      offset.push_back(S);
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
  int64_t ncells() const { return rows.nseg * cols.nseg; }
};

// out[k] = mean of each bin from the elementary cell sums (cells[r * cstride * Rw + c * cstride],
// `lanes` interleaved channels), written to out + lane * out_lane_stride + k.
template <typename scalar_t, typename acc_t>
void bins_from_cells(const PoolGeometry& geo, const acc_t* cells, int64_t lanes, scalar_t* out,
                     int64_t out_lane_stride, std::vector<acc_t>& sum) {
  const int64_t Rw = geo.cols.nseg;
  sum.assign(lanes, acc_t(0));
  int64_t rbin = 0, cbin = 0;
  for (size_t g = 0; g < geo.grids.size(); ++g) {
    const int64_t s = geo.grids[g];
    for (int64_t i = 0; i < s; ++i) {
      const int64_t r0 = geo.rows.seg_lo[rbin + i], r1 = geo.rows.seg_hi[rbin + i];
      for (int64_t j = 0; j < s; ++j) {
        const int64_t c0 = geo.cols.seg_lo[cbin + j], c1 = geo.cols.seg_hi[cbin + j];
        const acc_t inv_area =
            acc_t(1) / acc_t(geo.rows.bin_len[rbin + i] * geo.cols.bin_len[cbin + j]);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t* cell = cells + (r * Rw + c) * lanes;
            for (int64_t l = 0; l < lanes; ++l) sum[l] += cell[l];
          }
        }
        const int64_t k = geo.offset[g] + i * s + j;
        for (int64_t l = 0; l < lanes; ++l) {
          out[l * out_lane_stride + k] = static_cast<scalar_t>(sum[l] * inv_area);
        }
      }
    }
    rbin += s;
    cbin += s;
  }
}

// Planes are handled in blocks of kLanes. Each plane's rows of one row segment are summed
// element-wise (vectorised along W), and the W-long sums are stored with the block's planes
// innermost; from there the column segments and every bin are vector adds across the block, so
// per-plane bookkeeping is amortised even for 8 x 8 planes.
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
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W * kLanes));
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

// float32 planes with contiguous rows, the common case, one plane at a time with everything
// that depends only on (H, W, grids) in tables built once per call.
// Elementary cells: each row segment's rows are summed element-wise into a W-long buffer
// (vector adds, kept in registers across the rows), then each buffer row over the column
// segments.
// Bins: when the grids nest (every grid divides the largest, F, and F divides H and W, e.g.
// 1, 2, 4 on 32 x 32 or 28 x 28) the cells are the F x F bins and every coarser grid is summed
// from the smallest finer grid that it divides (2 x 2 blocks of grid 4 give grid 2, ...): a
// few fixed-stride loops. Otherwise each bin sums its listed cells. Either way the sums are
// scaled by 1 / area on the way out. Compiled for AVX-512, AVX2 and the baseline ISA (setup.py
// builds for baseline). Planes below kPerPlaneMinPixels go to the blocked path instead.
// Small planes without an unrolled kernel (small_nested_planes) take the blocked path
// (forward_planes) below this many pixels: its column and bin sums are vector adds across 16
// planes, while the per-plane path's are scalar (measured on 8 x 8 planes, grids 1, 2, 4:
// ~41 vs ~46 ns per plane with nested bins, ~70 with per-bin cell lists; unrolled: ~13).
constexpr int64_t kPerPlaneMinPixels = 256;

// Every grid divides the largest, F, and F divides H and W: the elementary cells are then the
// F x F bins and every bin of every grid is a block of them.
inline bool pool_grids_nest(const PoolGeometry& geo) {
  const int64_t H = geo.rows.seg_begin.back(), W = geo.cols.seg_begin.back();
  const int64_t F = *std::max_element(geo.grids.begin(), geo.grids.end());
  bool nest = H % F == 0 && W % F == 0 && geo.rows.nseg == F && geo.cols.nseg == F;
  for (int64_t g : geo.grids) nest = nest && F % g == 0;
  return nest;
}

struct PoolTablesF32 {
  int64_t W = 0, Rh = 0, Rw = 0, S = 0;
  std::vector<int64_t> row_begin, col_begin;  // [Rh + 1], [Rw + 1] segment starts
  std::vector<int64_t> bin_off, bin_cell;     // bin k sums cells bin_cell[bin_off[k]:bin_off[k+1]]
  std::vector<float> inv;                     // [S] 1 / area

  // Nested grids: sums of grid `dst` (g x g, at scratch offset dst_off) are the f x f blocks of
  // grid `src` (g * f on a side, at src_off); scratch offset 0 holds the F x F cells. `outs`
  // lists (scratch offset, output offset, g) per entry of `grids`, duplicates included.
  bool nested = false;
  struct Step { int64_t src_off, src_side, dst_off, g, f; };
  std::vector<Step> steps;
  std::vector<std::array<int64_t, 3>> outs;
  int64_t scratch = 0;  // floats of cell and grid sums

  explicit PoolTablesF32(const PoolGeometry& geo)
      : W(geo.cols.seg_begin.back()), Rh(geo.rows.nseg), Rw(geo.cols.nseg), S(geo.S),
        row_begin(geo.rows.seg_begin), col_begin(geo.cols.seg_begin) {
    bin_off.push_back(0);
    for (int64_t k = 0; k < S; ++k) {
      for (int64_t r = geo.r0[k]; r < geo.r1[k]; ++r) {
        for (int64_t c = geo.c0[k]; c < geo.c1[k]; ++c) bin_cell.push_back(r * Rw + c);
      }
      bin_off.push_back(static_cast<int64_t>(bin_cell.size()));
      inv.push_back(1.0f / static_cast<float>(geo.area[k]));
    }
    scratch = Rh * Rw;
    const int64_t F = *std::max_element(geo.grids.begin(), geo.grids.end());
    nested = pool_grids_nest(geo);
    if (!nested) return;
    std::vector<int64_t> sizes(geo.grids.begin(), geo.grids.end());
    std::sort(sizes.begin(), sizes.end(), std::greater<>());
    sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
    std::vector<std::pair<int64_t, int64_t>> done = {{F, 0}};  // (side, scratch offset)
    for (int64_t g : sizes) {
      if (g == F) continue;
      // The smallest computed grid that g divides: fewest additions per bin.
      auto src = done.front();
      for (const auto& d : done) {
        if (d.first % g == 0 && d.first < src.first) src = d;
      }
      steps.push_back({src.second, src.first, scratch, g, src.first / g});
      done.push_back({g, scratch});
      scratch += g * g;
    }
    for (size_t i = 0; i < geo.grids.size(); ++i) {
      const int64_t g = geo.grids[i];
      for (const auto& d : done) {
        if (d.first == g) outs.push_back({d.second, geo.offset[i], g});
      }
    }
  }
};

// dst[w0, w0 + K) = sum over rows [h0, h1) of the plane's columns [w0, w0 + K), kept in
// registers across the rows (one vector for K = 16 on AVX-512); inlined into the ISA clones.
template <int K>
__attribute__((always_inline)) inline void row_segment_sum(const float* __restrict plane,
                                                           int64_t sH, int64_t h0, int64_t h1,
                                                           int64_t w0, float* __restrict dst) {
  float a[K];
  const float* __restrict row = plane + h0 * sH + w0;
  for (int l = 0; l < K; ++l) a[l] = row[l];
  for (int64_t h = h0 + 1; h < h1; ++h) {
    row += sH;
    for (int l = 0; l < K; ++l) a[l] += row[l];
  }
  for (int l = 0; l < K; ++l) dst[w0 + l] = a[l];
}

// dst[0, W) = sum over rows [h0, h1) of the plane, 16, 8, 4 and 1 columns at a time. Inlined
// where W is a compile-time constant too (large_nested_planes), where the branches fold away.
__attribute__((always_inline)) inline void rows_sum(const float* __restrict plane, int64_t sH,
                                                    int64_t h0, int64_t h1, int64_t W,
                                                    float* __restrict dst) {
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) row_segment_sum<16>(plane, sH, h0, h1, w, dst);
  if (w + 8 <= W) {
    row_segment_sum<8>(plane, sH, h0, h1, w, dst);
    w += 8;
  }
  if (w + 4 <= W) {
    row_segment_sum<4>(plane, sH, h0, h1, w, dst);
    w += 4;
  }
  for (; w < W; ++w) row_segment_sum<1>(plane, sH, h0, h1, w, dst);
}

// Planes [p0, p1) of the flattened N * C; plane p starts at x + (p / C) * sN + (p % C) * sC.
// buf: [Rh * W] row buffer, sums: [t.scratch] cell and grid sums.
// Aligned to 64 bytes so that its loops' placement does not move with other code of this file:
// 64x64x32x32 (before planes_32x32 took it) measured ~7% slower (0.47-0.52 vs 0.45-0.49 ms,
// one thread, same machine code) when an edit elsewhere moved its start from 16 to 48 bytes
// past a 64-byte boundary.
AUTOKD_CLONES __attribute__((aligned(64))) void pool_planes_f32(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, const PoolTablesF32& t, float* __restrict y, float* __restrict buf,
    float* __restrict sums) {
  const int64_t W = t.W, Rh = t.Rh, Rw = t.Rw, S = t.S;
  const int64_t* __restrict row_begin = t.row_begin.data();
  const int64_t* __restrict col_begin = t.col_begin.data();
  const int64_t* __restrict bin_off = t.bin_off.data();
  const int64_t* __restrict bin_cell = t.bin_cell.data();
  const float* __restrict inv = t.inv.data();
  float* __restrict cells = sums;
  PlaneWalk planes(p0, C, sN, sC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict plane = x + planes.next();
    for (int64_t r = 0; r < Rh; ++r) {
      float* __restrict b = buf + r * W;
      const int64_t h0 = row_begin[r], h1 = row_begin[r + 1];
      rows_sum(plane, sH, h0, h1, W, b);
    }
    for (int64_t r = 0; r < Rh; ++r) {
      const float* __restrict b = buf + r * W;
      for (int64_t c = 0; c < Rw; ++c) {
        float s = 0.0f;
        for (int64_t w = col_begin[c]; w < col_begin[c + 1]; ++w) s += b[w];
        cells[r * Rw + c] = s;
      }
    }
    float* __restrict out = y + p * S;
    if (t.nested) {
      for (const auto& st : t.steps) {
        const float* __restrict src = sums + st.src_off;
        float* __restrict dst = sums + st.dst_off;
        const int64_t side = st.src_side, f = st.f;
        for (int64_t i = 0; i < st.g; ++i) {
          for (int64_t j = 0; j < st.g; ++j) {
            const float* __restrict blk = src + i * f * side + j * f;
            float s = 0.0f;
            if (f == 2) {
              s = (blk[0] + blk[1]) + (blk[side] + blk[side + 1]);
            } else {
              for (int64_t a = 0; a < f; ++a) {
                for (int64_t b = 0; b < f; ++b) s += blk[a * side + b];
              }
            }
            dst[i * st.g + j] = s;
          }
        }
      }
      for (const auto& o : t.outs) {
        const float* __restrict src = sums + o[0];
        const int64_t off = o[1], n = o[2] * o[2];
        for (int64_t q = 0; q < n; ++q) out[off + q] = src[q] * inv[off + q];
      }
    } else {
      for (int64_t k = 0; k < S; ++k) {
        float s = 0.0f;
        for (int64_t j = bin_off[k]; j < bin_off[k + 1]; ++j) s += cells[bin_cell[j]];
        out[k] = s * inv[k];
      }
    }
  }
}

void forward_planes_f32(const at::Tensor& input, const PoolGeometry& geo, at::Tensor& out) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const PoolTablesF32 t(geo);
  const float* x = input.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  // Work items of at least ~32K pixels, so small planes come many to a task.
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(t.Rh * W), sums(t.scratch);
    pool_planes_f32(x, begin, end, C, input.stride(0), input.stride(1), input.stride(2), t, y,
                    buf.data(), sums.data());
  });
}

// Channels-last inputs (stride of C is 1): each pixel's channels are contiguous, so a block of
// channels is accumulated into its elementary cell as one vector add.
template <typename scalar_t>
void forward_channels_last(const at::Tensor& input, const PoolGeometry& geo, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t sN = input.stride(0), sH = input.stride(2), sW = input.stride(3);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t S = geo.S, Rw = geo.cols.nseg;
  constexpr int64_t kBlock = 64;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cells(geo.ncells() * kBlock), sum;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kBlock;
      const int64_t L = std::min(kBlock, C - c0);
      std::fill(cells.begin(), cells.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        acc_t* cellrow = cells.data() + geo.rows.seg_of[h] * Rw * L;
        const scalar_t* row = x + n * sN + h * sH + c0;
        for (int64_t w = 0; w < W; ++w) {
          acc_t* cell = cellrow + geo.cols.seg_of[w] * L;
          const scalar_t* px = row + w * sW;
          for (int64_t l = 0; l < L; ++l) cell[l] += static_cast<acc_t>(px[l]);
        }
      }
      bins_from_cells<scalar_t, acc_t>(geo, cells.data(), L, y + (n * C + c0) * S, S, sum);
    }
  });
}

// From the F x F cell sums at sums + (F == 4 ? 5 : 1): grid 2 (2 x 2 blocks of cells when
// F = 4) at sums + 1, grid 1 at sums[0], then out[k] = sums[idx[k]] * inv[k].
template <int F>
__attribute__((always_inline)) inline void nested_bins_out(float* __restrict sums, int64_t S,
                                                           const int64_t* __restrict idx,
                                                           const float* __restrict inv,
                                                           bool identity, float* __restrict out) {
  constexpr int kSums = F == 4 ? 21 : 5;
  if constexpr (F == 4) {
    const float* __restrict cells = sums + 5;
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const float* c = cells + 2 * i * 4 + 2 * j;
        sums[1 + 2 * i + j] = (c[0] + c[1]) + (c[4] + c[5]);
      }
    }
  }
  sums[0] = (sums[1] + sums[2]) + (sums[3] + sums[4]);
  if (identity) {
    for (int k = 0; k < kSums; ++k) out[k] = sums[k] * inv[k];
  } else {
    for (int64_t k = 0; k < S; ++k) out[k] = sums[idx[k]] * inv[k];
  }
}

// Grids 1, 2, 4 of a plane from its 16 cell sums (4 x 4 grid, row-major) as two 8-float
// vectors, cell rows 0-1 (`a`) and 2-3 (`b`): grid 2 adds the two cell rows of each half,
// then neighbouring columns; grid 1 adds the four. Stored scaled (`head_scale`: grid 1, grid 2
// and 3 spare lanes; `cell_scale`: grid 4) as `head` at out, then the cells at out + 5 over the
// spare floats. Other grid orders (idx, inv as in nested_bins_out) go through a 24-float
// buffer. Shared by planes_8x8 and planes_32x32.
__attribute__((always_inline)) inline void grids_124_out(f32x8 a, f32x8 b, f32x8 head_scale,
                                                         float cell_scale, int64_t S,
                                                         const int64_t* __restrict idx,
                                                         const float* __restrict inv,
                                                         bool identity, float* __restrict out) {
  const f32x16 cells =
      __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // cell columns summed over cell rows 0-1 (top) and 2-3 (bottom), then column pairs
  const f32x4 top = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                    __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f32x4 bottom = __builtin_shufflevector(b, b, 0, 1, 2, 3) +
                       __builtin_shufflevector(b, b, 4, 5, 6, 7);
  const f32x4 g2 = __builtin_shufflevector(top, bottom, 0, 2, 4, 6) +
                   __builtin_shufflevector(top, bottom, 1, 3, 5, 7);
  const f32x4 half = g2 + __builtin_shufflevector(g2, g2, 2, 3, 0, 1);
  const f32x4 g1 = half + __builtin_shufflevector(half, half, 1, 0, 3, 2);
  const f32x8 head = __builtin_shufflevector(g1, g2, 0, 4, 5, 6, 7, 0, 0, 0);
  if (identity) {
    const f32x8 h = head * head_scale;
    const f32x16 c = cells * cell_scale;
    std::memcpy(out, &h, sizeof(h));
    std::memcpy(out + 5, &c, sizeof(c));
  } else {
    float sums[24];
    std::memcpy(sums, &head, sizeof(head));
    std::memcpy(sums + 5, &cells, sizeof(cells));
    for (int64_t k = 0; k < S; ++k) out[k] = sums[idx[k]] * inv[k];
  }
}

// 16 lanes from the 32 of (u, v): lane i < 8 adds u's lanes 2i, 2i + 1, lane 8 + i v's.
__attribute__((always_inline)) inline f32x16 add_pairs(f32x16 u, f32x16 v) {
  return __builtin_shufflevector(u, v, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(u, v, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                 31);
}

// 32 x 32 float32 planes (rows sH floats apart), grids 1, 2, 4 in any order: each 8-row
// segment's rows are summed as two 16-float vectors (columns 0-15, 16-31; 16 loads, 14 adds),
// each holding two cells' 8 column sums. add_pairs on a segment's two vectors leaves its 4
// cells with 4 partial sums each, on two such segments 8 cells with 2, on those two results the
// 16 cells in row-major order (7 adds, 14 two-source shuffles); grids_124_out does the rest.
// One thread, thread time: ~50 ns per plane with the planes in L2 where pool_planes_f32, with
// W a runtime value and scalar column and bin sums, took ~120; ~70 vs ~120 ns with them in L3
// (64 x 64 x 32 x 32). Software prefetch of the plane two ahead measured no gain.
__attribute__((always_inline)) inline void planes_32x32_walk(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict y) {
  const f32x8 head_scale = {1.0f / 1024, 1.0f / 256, 1.0f / 256, 1.0f / 256, 1.0f / 256,
                            0, 0, 0};
  PlaneWalk planes(p0, C, sN, sC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict pl = x + planes.next();
    f32x16 seg[4];  // add_pairs of segment r's column halves: cells (r, 0..3), 4 partials each
    for (int r = 0; r < 4; ++r) {
      const float* __restrict row = pl + 8 * r * sH;
      // pairwise over the 8 rows: 3 dependent adds instead of 7
      f32x16 lo[4], hi[4];
      for (int u = 0; u < 4; ++u) {
        lo[u] = load16(row + 2 * u * sH) + load16(row + (2 * u + 1) * sH);
        hi[u] = load16(row + 2 * u * sH + 16) + load16(row + (2 * u + 1) * sH + 16);
      }
      seg[r] = add_pairs((lo[0] + lo[1]) + (lo[2] + lo[3]), (hi[0] + hi[1]) + (hi[2] + hi[3]));
    }
    const f32x16 cells = add_pairs(add_pairs(seg[0], seg[1]), add_pairs(seg[2], seg[3]));
    const f32x8 a = __builtin_shufflevector(cells, cells, 0, 1, 2, 3, 4, 5, 6, 7);
    const f32x8 b = __builtin_shufflevector(cells, cells, 8, 9, 10, 11, 12, 13, 14, 15);
    grids_124_out(a, b, head_scale, 1.0f / 64, S, idx, inv, identity, y + p * S);
  }
}

// Contiguous planes are walked as one image of p1 - p0 planes 1024 floats apart (constant
// strides, as planes_8x8 does).
__attribute__((always_inline)) inline void planes_32x32(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict y) {
  if (sH == 32 && sC == 1024 && sN == 1024 * C) {
    planes_32x32_walk(x + p0 * 1024, 0, p1 - p0, 1, 1024, 0, 32, S, idx, inv, identity,
                      y + p0 * S);
  } else {
    planes_32x32_walk(x, p0, p1, C, sN, sC, sH, S, idx, inv, identity, y);
  }
}

// Large planes (>= kPerPlaneMinPixels) with the same power-of-two grids nested in F x F cells
// KW pixels wide: the per-plane kernel's row pass with W = F * KW known at compile time, the
// column segments as constant-width sums, and the bins of nested_bins_out (on 28 x 28 planes
// the runtime column and bin stages were about half the time).
template <int F, int KW>
__attribute__((always_inline)) inline void large_nested_planes(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t KH, int64_t S, const int64_t* __restrict idx,
    const float* __restrict inv, bool identity, float* __restrict y, float* __restrict buf) {
  constexpr int kSums = F == 4 ? 21 : 5;
  constexpr int64_t W = F * KW;
  PlaneWalk planes(p0, C, sN, sC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict plane = x + planes.next();
    for (int r = 0; r < F; ++r) {
      float* __restrict b = buf + r * W;
      const int64_t h0 = r * KH, h1 = h0 + KH;
      rows_sum(plane, sH, h0, h1, W, b);
    }
    float sums[kSums];
    float* __restrict cells = sums + (F == 4 ? 5 : 1);
    for (int r = 0; r < F; ++r) {
      for (int c = 0; c < F; ++c) {
        const float* __restrict b = buf + r * W + c * KW;
        float a = b[0];
        for (int v = 1; v < KW; ++v) a += b[v];
        cells[r * F + c] = a;
      }
    }
    nested_bins_out<F>(sums, S, idx, inv, identity, y + p * S);
  }
}

AUTOKD_CLONES void large_nested_planes_f32(int code, const float* x, int64_t p0, int64_t p1,
                                           int64_t C, int64_t sN, int64_t sC, int64_t sH,
                                           int64_t KH, int64_t S, const int64_t* idx,
                                           const float* inv, bool identity, float* y,
                                           float* buf) {
#define AUTOKD_LARGE_CASE(F, KW)                                                         \
  case F * 100 + KW:                                                                     \
    large_nested_planes<F, KW>(x, p0, p1, C, sN, sC, sH, KH, S, idx, inv, identity, y, \
                               buf);                                                     \
    break;
  switch (code) {
    AUTOKD_LARGE_CASE(4, 2)
    AUTOKD_LARGE_CASE(4, 4)
    AUTOKD_LARGE_CASE(4, 7)
    case 408:  // 32 x 32 only (large_nested_code)
      planes_32x32(x, p0, p1, C, sN, sC, sH, S, idx, inv, identity, y);
      break;
    AUTOKD_LARGE_CASE(4, 14)
    AUTOKD_LARGE_CASE(4, 16)
    AUTOKD_LARGE_CASE(2, 4)
    AUTOKD_LARGE_CASE(2, 7)
    AUTOKD_LARGE_CASE(2, 14)
    AUTOKD_LARGE_CASE(2, 16)
    default:
      break;
  }
#undef AUTOKD_LARGE_CASE
}

// 8 x 8 float32 planes (rows sH floats apart), grids 1, 2, 4 in any order: per plane, the
// eight rows are 8-float vectors. Row pairs added give each cell row's column sums; the even
// and odd columns of two such pairs added give 8 cells (4 x 4 grid, 2 x 2 pixels a cell) in
// row-major order, so the 16 cells are grid 4 as the output lays it out; grids_124_out does
// the rest. Per plane this is 8 loads, ~15 adds and shuffles and 2 stores. ~4.2 ns per plane
// where the per-cell scalar sums of small_nested_planes took ~11 (the copy of the same bytes:
// ~3.7).
__attribute__((always_inline)) inline void planes_8x8_walk(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict y) {
  const f32x8 head_scale = {1.0f / 64, 1.0f / 16, 1.0f / 16, 1.0f / 16, 1.0f / 16, 0, 0, 0};
  PlaneWalk planes(p0, C, sN, sC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict pl = x + planes.next();
    // s_i[w]: rows 2i, 2i + 1 at column w
    const f32x8 s0 = load8(pl) + load8(pl + sH);
    const f32x8 s1 = load8(pl + 2 * sH) + load8(pl + 3 * sH);
    const f32x8 s2 = load8(pl + 4 * sH) + load8(pl + 5 * sH);
    const f32x8 s3 = load8(pl + 6 * sH) + load8(pl + 7 * sH);
    // [c00 c01 c02 c03 c10 c11 c12 c13] and cell rows 2, 3
    const f32x8 a = __builtin_shufflevector(s0, s1, 0, 2, 4, 6, 8, 10, 12, 14) +
                    __builtin_shufflevector(s0, s1, 1, 3, 5, 7, 9, 11, 13, 15);
    const f32x8 b = __builtin_shufflevector(s2, s3, 0, 2, 4, 6, 8, 10, 12, 14) +
                    __builtin_shufflevector(s2, s3, 1, 3, 5, 7, 9, 11, 13, 15);
    grids_124_out(a, b, head_scale, 0.25f, S, idx, inv, identity, y + p * S);
  }
}

// Contiguous planes are walked as one image of p1 - p0 planes 64 floats apart: with the strides
// constants GCC folds the addressing (64 x 256 x 8 x 8, one thread: ~0.083 vs ~0.097 ms).
__attribute__((always_inline)) inline void planes_8x8(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict y) {
  if (sH == 8 && sC == 64 && sN == 64 * C) {
    planes_8x8_walk(x + p0 * 64, 0, p1 - p0, 1, 64, 0, 8, S, idx, inv, identity, y + p0 * S);
  } else {
    planes_8x8_walk(x, p0, p1, C, sN, sC, sH, S, idx, inv, identity, y);
  }
}

// Small planes whose grids are powers of two nested in F x F (F = 2 or 4) and whose cells
// are KH x KW pixels with KH, KW in {1, 2, 4} (1, 2, 4 on 8 x 8, 4 x 4 or 16 x 8 planes): the
// blocked and per-plane kernels spend more on bookkeeping than on the 16-64 pixels, so these
// geometries get fully unrolled code. `sums` holds grid 1, grid 2, grid 4 (as far as F) in
// that order; out[k] = sums[idx[k]] * inv[k]. 8 x 8 planes (F = 4, 2 x 2 cells) take the
// vector kernel planes_8x8.
template <int F, int KH, int KW>
__attribute__((always_inline)) inline void small_nested_planes(
    const float* __restrict x, int64_t p0, int64_t p1, int64_t C, int64_t sN, int64_t sC,
    int64_t sH, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict y) {
  if constexpr (F == 4 && KH == 2 && KW == 2) {
    planes_8x8(x, p0, p1, C, sN, sC, sH, S, idx, inv, identity, y);
  } else {
    constexpr int kSums = F == 4 ? 21 : 5;
    PlaneWalk planes(p0, C, sN, sC);
    for (int64_t p = p0; p < p1; ++p) {
      const float* __restrict plane = x + planes.next();
      float sums[kSums];
      float* __restrict cells = sums + (F == 4 ? 5 : 1);
      for (int i = 0; i < F; ++i) {
        for (int j = 0; j < F; ++j) {
          float a = 0.0f;
          for (int u = 0; u < KH; ++u) {
            const float* __restrict row = plane + (i * KH + u) * sH + j * KW;
            for (int v = 0; v < KW; ++v) a += row[v];
          }
          cells[i * F + j] = a;
        }
      }
      nested_bins_out<F>(sums, S, idx, inv, identity, y + p * S);
    }
  }
}

// The small nested geometries with unrolled kernels, as (F, KH, KW): an F x F finest grid of
// KH x KW-pixel cells. One list for the forward, the backward and small_nested_code().
#define AUTOKD_SMALL_GEOMETRIES(X) \
  X(4, 1, 1) X(4, 1, 2) X(4, 2, 1) X(4, 2, 2) X(4, 2, 4) X(4, 4, 2) X(4, 4, 4) \
  X(2, 1, 1) X(2, 2, 2) X(2, 4, 4)

// F * 100 + KH * 10 + KW selects the instantiation; compiled for AVX-512 (x86-64-v4), AVX2
// and baseline.
AUTOKD_CLONES void small_nested_planes_f32(int code, const float* x, int64_t p0, int64_t p1,
                                           int64_t C, int64_t sN, int64_t sC, int64_t sH,
                                           int64_t S, const int64_t* idx, const float* inv,
                                           bool identity, float* y) {
#define AUTOKD_SMALL_CASE(F, KH, KW)                                                        \
  case F * 100 + KH * 10 + KW:                                                            \
    small_nested_planes<F, KH, KW>(x, p0, p1, C, sN, sC, sH, S, idx, inv, identity, y); \
    break;
  switch (code) {
    AUTOKD_SMALL_GEOMETRIES(AUTOKD_SMALL_CASE)
    default:
      break;
  }
#undef AUTOKD_SMALL_CASE
}

// The code of small_nested_planes_f32 for this geometry, or 0 when it has none.
int small_nested_code(const PoolGeometry& geo) {
  if (!pool_grids_nest(geo)) return 0;
  const int64_t H = geo.rows.seg_begin.back(), W = geo.cols.seg_begin.back();
  const int64_t F = *std::max_element(geo.grids.begin(), geo.grids.end());
  if (F != 2 && F != 4) return 0;
  for (int64_t g : geo.grids) {
    if (g != 1 && g != 2 && g != 4) return 0;
  }
  const int64_t code = F * 100 + (H / F) * 10 + W / F;
#define AUTOKD_SMALL_CODE(F, KH, KW) \
  if (code == F * 100 + KH * 10 + KW) return static_cast<int>(code);
  AUTOKD_SMALL_GEOMETRIES(AUTOKD_SMALL_CODE)
#undef AUTOKD_SMALL_CODE
  return 0;
}

// Output index k <-> position in the kernels' sums (grid 1 | grid 2 | grid 4 as far as F),
// and 1 / area per k. identity: the grids are exactly 1, 2 (, 4) in that order.
struct SmallNestedMap {
  std::vector<int64_t> idx;
  std::vector<float> inv;
  bool identity = false;

  SmallNestedMap(const PoolGeometry& geo, int code, int64_t H, int64_t W)
      : idx(geo.S), inv(geo.S) {
    const int64_t F = code / 100;
    identity = geo.S == (F == 4 ? 21 : 5);
    for (size_t e = 0; e < geo.grids.size(); ++e) {
      const int64_t g = geo.grids[e];
      const int64_t base = g == 1 ? 0 : g == 2 ? 1 : 5;
      for (int64_t q = 0; q < g * g; ++q) {
        const int64_t k = geo.offset[e] + q;
        idx[k] = base + q;
        inv[k] = 1.0f / static_cast<float>((H / g) * (W / g));
        identity = identity && idx[k] == k;
      }
    }
  }
};

// The code of large_nested_planes_f32 (F * 100 + KW) for planes of >= kPerPlaneMinPixels with
// power-of-two grids nested in F x F cells, or 0. 32 x 32 planes (408) take planes_32x32;
// other 8-wide cells are left to pool_planes_f32, which measured faster than
// large_nested_planes<4, 8> on 32 x 32 (0.47-0.50 vs 0.56-0.68 ms for 64x64x32x32, one
// thread); the others measured faster unrolled (8 x 512 x 28 x 28 0.28 vs
// 0.49 ms, 8 x 128 x 56 x 56 0.28 vs 0.32, 64 x 64 x 32 x 8 0.10 vs 0.31, 8 x 128 x 64 x 64
// 0.54 vs 0.59) or equal (64 x 128 x 16 x 16 0.37).
int large_nested_code(const PoolGeometry& geo) {
  if (!pool_grids_nest(geo)) return 0;
  const int64_t H = geo.rows.seg_begin.back(), W = geo.cols.seg_begin.back();
  if (H * W < kPerPlaneMinPixels) return 0;
  const int64_t F = *std::max_element(geo.grids.begin(), geo.grids.end());
  if (F != 2 && F != 4) return 0;
  for (int64_t g : geo.grids) {
    if (g != 1 && g != 2 && g != 4) return 0;
  }
  const int64_t code = F * 100 + W / F;
  if (code == 408 && H == 32) return static_cast<int>(code);
  for (int64_t c : {402, 404, 407, 414, 416, 204, 207, 214, 216}) {
    if (c == code) return static_cast<int>(code);
  }
  return 0;
}

void forward_large_nested_f32(const at::Tensor& input, const PoolGeometry& geo, int code,
                              at::Tensor& out) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const SmallNestedMap map(geo, code, H, W);
  const int64_t KH = H / (code / 100);
  const float* x = input.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(W * (code / 100));
    large_nested_planes_f32(code, x, begin, end, C, input.stride(0), input.stride(1),
                            input.stride(2), KH, geo.S, map.idx.data(), map.inv.data(),
                            map.identity, y, buf.data());
  });
}

void forward_small_nested_f32(const at::Tensor& input, const PoolGeometry& geo, int code,
                              at::Tensor& out) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t S = geo.S;
  const SmallNestedMap map(geo, code, H, W);
  const float* x = input.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    small_nested_planes_f32(code, x, begin, end, C, input.stride(0), input.stride(1),
                            input.stride(2), S, map.idx.data(), map.inv.data(), map.identity,
                            y);
  });
}

// MEASUREMENT ONLY (removed after): AUTOKD_POOL_GENERIC lists the paths to bypass.
bool off(const char* name) {
  const char* v = std::getenv("AUTOKD_POOL_GENERIC");
  return v != nullptr && std::strstr(v, name) != nullptr;
}

at::Tensor multiscale_pool_cpu(const at::Tensor& input, c10::IntArrayRef grids) {
  check_multiscale_pool_inputs(input, grids);
  const PoolGeometry geo(input.size(2), input.size(3), grids);
  at::Tensor out = at::empty({input.size(0), input.size(1), geo.S}, input.options());
  const bool rows_contiguous = input.size(3) == 1 || input.stride(3) == 1;
  const bool channels_inner = input.size(1) > 1 && input.stride(1) == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "multiscale_pool_cpu", [&] {
                                    int code = 0, large = 0;
                                    if constexpr (std::is_same_v<scalar_t, float>) {
                                      if (rows_contiguous) {
                                        code = small_nested_code(geo);
                                        large = large_nested_code(geo);
                                      }
                                    }
                                    // MEASUREMENT ONLY (removed after): force generic paths.
                                    if (code == 422 && off("s8x8")) code = 0;
                                    if (code != 0 && code != 422 && off("ssmall")) code = 0;
                                    if (large == 408 && off("l32x32")) large = 0;
                                    if (large != 0 && large != 408 && off("llarge")) large = 0;
                                    const bool pf32 = !off("pf32");
                                    if (!rows_contiguous && channels_inner && !off("chlast")) {
                                      forward_channels_last<scalar_t>(input, geo, out);
                                    } else if (code != 0) {
                                      forward_small_nested_f32(input, geo, code, out);
                                    } else if (large != 0) {
                                      forward_large_nested_f32(input, geo, large, out);
                                    } else if (std::is_same_v<scalar_t, float> && pf32 &&
                                               rows_contiguous &&
                                               input.size(2) * input.size(3) >=
                                                   kPerPlaneMinPixels) {
                                      forward_planes_f32(input, geo, out);
                                    } else {
                                      forward_planes<scalar_t>(input, geo, out);
                                    }
                                  });
  return out;
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
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W * kLanes));
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

// Backward of small_nested_planes: per plane the grid gradients (times 1 / area) are gathered
// into grid 1 | grid 2 | cells, pushed down (each cell adds its grid-2 bin and grid 1), and
// each cell's value is written to its KH x KW pixels with constant offsets. grad_input is a
// fresh contiguous [N, C, F * KH, F * KW] tensor.
template <int F, int KH, int KW>
__attribute__((always_inline)) inline void small_nested_planes_backward(
    const float* __restrict g, int64_t p0, int64_t p1, int64_t C, int64_t gN, int64_t gC,
    int64_t gS, int64_t S, const int64_t* __restrict idx, const float* __restrict inv,
    bool identity, float* __restrict gi) {
  constexpr int kSums = F == 4 ? 21 : 5;
  constexpr int W = F * KW, HW = F * KH * F * KW;
  PlaneWalk planes(p0, C, gN, gC);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict gp = g + planes.next();
    float sums[kSums];
    if (identity) {
      for (int k = 0; k < kSums; ++k) sums[k] = gp[k * gS] * inv[k];
    } else {
      for (int k = 0; k < kSums; ++k) sums[k] = 0.0f;
      for (int64_t k = 0; k < S; ++k) sums[idx[k]] += gp[k * gS] * inv[k];
    }
    float* __restrict cells = sums + (F == 4 ? 5 : 1);
    for (int q = 0; q < 4; ++q) sums[1 + q] += sums[0];
    if constexpr (F == 4) {
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) cells[i * 4 + j] += sums[1 + (i / 2) * 2 + j / 2];
      }
    }
    float* __restrict out = gi + p * HW;
    for (int i = 0; i < F; ++i) {
      for (int u = 0; u < KH; ++u) {
        float* __restrict row = out + (i * KH + u) * W;
        for (int j = 0; j < F; ++j) {
          for (int v = 0; v < KW; ++v) row[j * KW + v] = cells[i * F + j];
        }
      }
    }
  }
}

AUTOKD_CLONES void small_nested_planes_backward_f32(int code, const float* g, int64_t p0,
                                                    int64_t p1, int64_t C, int64_t gN,
                                                    int64_t gC, int64_t gS, int64_t S,
                                                    const int64_t* idx, const float* inv,
                                                    bool identity, float* gi) {
#define AUTOKD_SMALL_CASE(F, KH, KW)                                                  \
  case F * 100 + KH * 10 + KW:                                                      \
    small_nested_planes_backward<F, KH, KW>(g, p0, p1, C, gN, gC, gS, S, idx, inv,  \
                                            identity, gi);                          \
    break;
  switch (code) {
    AUTOKD_SMALL_GEOMETRIES(AUTOKD_SMALL_CASE)
    default:
      break;
  }
#undef AUTOKD_SMALL_CASE
}

void backward_small_nested_f32(const at::Tensor& grad, const PoolGeometry& geo, int code,
                               at::Tensor& grad_input) {
  const int64_t N = grad_input.size(0), C = grad_input.size(1);
  const int64_t H = grad_input.size(2), W = grad_input.size(3);
  const SmallNestedMap map(geo, code, H, W);
  const float* g = grad.const_data_ptr<float>();
  float* gi = grad_input.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (H * W));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    small_nested_planes_backward_f32(code, g, begin, end, C, grad.stride(0), grad.stride(1),
                                     grad.stride(2), geo.S, map.idx.data(), map.inv.data(),
                                     map.identity, gi);
  });
}

at::Tensor multiscale_pool_backward_cpu(const at::Tensor& grad, c10::IntArrayRef input_size,
                                        c10::IntArrayRef grids) {
  check_multiscale_pool_backward_inputs(grad, input_size, grids);
  const PoolGeometry geo(input_size[2], input_size[3], grids);
  at::Tensor grad_input = at::empty(input_size, grad.options());
  const int code = grad.scalar_type() == at::kFloat ? small_nested_code(geo) : 0;
  if (code != 0 && !off("bsmall")) {
    backward_small_nested_f32(grad, geo, code, grad_input);
    return grad_input;
  }
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
