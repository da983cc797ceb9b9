// multiscale_pool: adaptive average pooling of [N, C, H, W] to several s x s grids at once,
// each flattened row-major and concatenated in the order of `grids` -> [N, C, sum s^2].
//
// Bins are those of adaptive average pooling: along an axis of length L split into s bins,
// bin i covers [floor(i * L / s), ceil((i + 1) * L / s)). When s does not divide L neighbouring
// bins overlap, and bins of different grids need not nest (H = 7: grid 2 has edges 0,4 | 3,7,
// grid 3 has 0,3 | 2,5 | 4,7), so a coarse cell is in general NOT a union of finer cells.
//
// One read of the input: every bin edge of every grid is a breakpoint; the breakpoints cut
// each axis into "elementary segments", and all pixels of one elementary cell (a row segment x
// a column segment) belong to exactly the same set of bins. The forward sums each plane into
// its elementary cells (one pass over the pixels), builds a 2-D prefix sum over the few cells,
// and reads every bin of every grid from it with four lookups. When the grids nest (e.g.
// 1, 2, 4 on 32 x 32) there are only finest-grid cells; in the worst case there is one cell per
// pixel and the cost is still one pass plus O(H * W) on a small scratch.
//
// Backward: grad_input[h, w] = sum over grids, over bins (i, j) containing (h, w) of
// grad[i * s + j] / area(i, j). It is constant over an elementary cell, so it is computed per
// cell (2-D difference array + prefix sum) and written out once per pixel.
//
// Limits: 1 <= s <= min(H, W) for every s, at most kMaxGrids entries (the CUDA kernels take the
// grids by value). Accumulation in float (double for float64 inputs).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace autokd {

constexpr int64_t kMultiscalePoolMaxGrids = 16;

// Bin edges of adaptive pooling; the CUDA kernels use the same formulas.
#if defined(__CUDACC__)
#define AUTOKD_HOST_DEVICE __host__ __device__
#else
#define AUTOKD_HOST_DEVICE
#endif
AUTOKD_HOST_DEVICE inline int64_t pool_bin_start(int64_t i, int64_t len, int64_t s) {
  return (i * len) / s;
}
AUTOKD_HOST_DEVICE inline int64_t pool_bin_end(int64_t i, int64_t len, int64_t s) {
  return ((i + 1) * len + s - 1) / s;
}

inline int64_t multiscale_pool_out_size(c10::IntArrayRef grids) {
  int64_t total = 0;
  for (int64_t s : grids) total += s * s;
  return total;
}

inline void check_multiscale_pool_grids(const char* op, c10::IntArrayRef grids, int64_t H,
                                        int64_t W) {
  AUTOKD_CHECK(!grids.empty(), op, "expected grids to be a non-empty list of grid sizes, got []");
  AUTOKD_CHECK(static_cast<int64_t>(grids.size()) <= kMultiscalePoolMaxGrids, op,
               "expected grids to have at most ", kMultiscalePoolMaxGrids, " entries, got ",
               grids.size());
  for (int64_t s : grids) {
    AUTOKD_CHECK(s >= 1 && s <= H && s <= W, op, "expected grids entries in [1, min(H, W)] = [1, ",
                 std::min(H, W), "], got ", s, " (input of ", H, " x ", W, ")");
  }
}

inline void check_multiscale_pool_inputs(const at::Tensor& input, c10::IntArrayRef grids) {
  constexpr const char* op = "multiscale_pool";
  check_defined(op, "input", input);
  check_floating(op, "input", input);
  check_dim(op, "input", input, 4, "[N, C, H, W]");
  check_nonempty(op, "input", input);
  check_multiscale_pool_grids(op, grids, input.size(2), input.size(3));
}

inline void check_multiscale_pool_backward_inputs(const at::Tensor& grad,
                                                  c10::IntArrayRef input_size,
                                                  c10::IntArrayRef grids) {
  constexpr const char* op = "multiscale_pool_backward";
  check_defined(op, "grad", grad);
  check_floating(op, "grad", grad);
  AUTOKD_CHECK(input_size.size() == 4, op, "expected input_size of length 4 ([N, C, H, W]), got ",
               input_size);
  for (int64_t d : input_size) {
    AUTOKD_CHECK(d >= 1, op, "expected input_size entries >= 1, got ", input_size);
  }
  check_multiscale_pool_grids(op, grids, input_size[2], input_size[3]);
  const int64_t S = multiscale_pool_out_size(grids);
  AUTOKD_CHECK(grad.dim() == 3 && grad.size(0) == input_size[0] && grad.size(1) == input_size[1] &&
                   grad.size(2) == S,
               op, "expected grad of shape [", input_size[0], ", ", input_size[1], ", ", S,
               "], got ", shape_str(grad));
}

// Elementary segments of one axis of length `len` for a list of grids.
struct PoolAxis {
  std::vector<int64_t> seg_of;   // [len] elementary segment of each position
  std::vector<int64_t> seg_lo;   // [sum s] first elementary segment of each bin, grid by grid
  std::vector<int64_t> seg_hi;   // [sum s] one past the last elementary segment of each bin
  std::vector<int64_t> bin_len;  // [sum s] number of positions in each bin
  std::vector<int64_t> seg_begin;  // [nseg + 1] first position of each segment
  int64_t nseg = 0;

  PoolAxis(int64_t len, c10::IntArrayRef grids) {
    std::vector<char> cut(len + 1, 0);
    for (int64_t s : grids) {
      for (int64_t i = 0; i < s; ++i) {
        cut[pool_bin_start(i, len, s)] = 1;
        cut[pool_bin_end(i, len, s)] = 1;
      }
    }
    std::vector<int64_t> seg_at(len + 1, 0);  // segment index starting at each cut position
    for (int64_t p = 0; p <= len; ++p) {
      if (cut[p]) {
        seg_at[p] = static_cast<int64_t>(seg_begin.size());
        seg_begin.push_back(p);
      }
    }
    nseg = static_cast<int64_t>(seg_begin.size()) - 1;  // the cut at `len` closes the last one
    seg_of.resize(len);
    for (int64_t k = 0; k < nseg; ++k) {
      for (int64_t p = seg_begin[k]; p < seg_begin[k + 1]; ++p) seg_of[p] = k;
    }
    for (int64_t s : grids) {
      for (int64_t i = 0; i < s; ++i) {
        const int64_t a = pool_bin_start(i, len, s), b = pool_bin_end(i, len, s);
        seg_lo.push_back(seg_at[a]);
        seg_hi.push_back(seg_at[b]);
        bin_len.push_back(b - a);
      }
    }
  }
};

}  // namespace autokd
