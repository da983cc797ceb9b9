// CPU kernel of softmax_kl (formula and layout in softmax_kl.h). Rows run in parallel.
//
// A row of at most kRowCap elements runs "buffered": when it is strided, split into segments
// (the channel view: N segments of H*W) or low precision, it is first gathered into a
// per-thread scratch row in the accumulation type, so short segments cost one copy rather
// than one chunk each. The row maxima come first (exact, no rescaling), then one vectorised
// loop does the exps and sums. With with_grad the same loop keeps exp(x - mx) and exp(y - my)
// in the scratch row and a last loop writes the gradient from them: loss and gradient together
// cost 2 exps per element pair (the autograd backward only scales the saved gradient).
//
// Longer rows stream in chunks of kChunk elements with an online (max, sum): a chunk's max is
// found first so the running pair is rescaled once per chunk, not once per element; with
// with_grad a second sweep recomputes the exps for the gradient. Contiguous rows of the
// accumulation type also stream when no gradient is wanted (one read of each input).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "softmax_kl.h"

namespace autokd {
namespace {

constexpr int64_t kChunk = 2048;
// Two float scratch rows of this length take 1 MiB, half of one core's L2.
constexpr int64_t kRowCap = int64_t{1} << 17;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Running normalisers of one row: m = max, z = sum exp(. - m), a = sum exp(y - my) (y - x).
struct KlState {
  double mx = kNegInf, zx = 0, my = kNegInf, zy = 0, a = 0;
};

template <typename acc_t>
__attribute__((always_inline)) inline acc_t chunk_max(const acc_t* x, int64_t n) {
  acc_t m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 1; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Folds one chunk of raw student (x) and teacher (y) values into the row state.
template <typename acc_t>
__attribute__((always_inline)) inline void kl_chunk_body(const acc_t* x, const acc_t* y,
                                                         int64_t n, acc_t it, KlState& st) {
  // it > 0, so max(x * it) == max(x) * it exactly (rounding is monotone).
  const double nmx = std::max(st.mx, static_cast<double>(chunk_max(x, n) * it));
  const double nmy = std::max(st.my, static_cast<double>(chunk_max(y, n) * it));
  // Once a row's maxima are found, later chunks rarely move them: skip the rescaling exps.
  // The first chunk has nothing to rescale (and no libm call is needed for it).
  if (nmx != st.mx) {
    if (st.zx != 0) st.zx *= std::exp(st.mx - nmx);
    st.mx = nmx;
  }
  if (nmy != st.my) {
    if (st.zy != 0) {
      const double ry = std::exp(st.my - nmy);
      st.zy *= ry;
      st.a *= ry;
    }
    st.my = nmy;
  }
  const acc_t mx = static_cast<acc_t>(nmx), my = static_cast<acc_t>(nmy);
  acc_t sx = 0, sy = 0, sa = 0;
#pragma omp simd reduction(+ : sx, sy, sa)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t xs = x[j] * it, ys = y[j] * it;
    const acc_t ex = fast_exp(xs - mx), ey = fast_exp(ys - my);
    sx += ex;
    sy += ey;
    sa += ey * (ys - xs);
  }
  st.zx += sx;
  st.zy += sy;
  st.a += sa;
}

// Sums of one chunk of a buffered row whose maxima mx, my (of x * it, y * it) are final;
// with store, exp(x * it - mx) and exp(y * it - my) go to ex, ey (which may alias x, y).
template <typename acc_t, bool store>
__attribute__((always_inline)) inline void kl_sums_body(const acc_t* x, const acc_t* y,
                                                        int64_t n, acc_t it, acc_t mx, acc_t my,
                                                        acc_t* ex, acc_t* ey, KlState& st) {
  acc_t sx = 0, sy = 0, sa = 0;
#pragma omp simd reduction(+ : sx, sy, sa)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t xs = x[j] * it, ys = y[j] * it;
    const acc_t e = fast_exp(xs - mx), f = fast_exp(ys - my);
    sx += e;
    sy += f;
    sa += f * (ys - xs);
    if constexpr (store) {
      ex[j] = e;
      ey[j] = f;
    }
  }
  st.zx += sx;
  st.zy += sy;
  st.a += sa;
}

// out = fx * ex - fy * ey (out may alias ex).
template <typename acc_t>
__attribute__((always_inline)) inline void kl_diff_body(const acc_t* ex, const acc_t* ey,
                                                        int64_t n, acc_t fx, acc_t fy,
                                                        acc_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = fx * ex[j] - fy * ey[j];
}

template <typename acc_t>
__attribute__((always_inline)) inline void kl_grad_body(const acc_t* x, const acc_t* y,
                                                        int64_t n, acc_t it, acc_t mx, acc_t my,
                                                        acc_t izx, acc_t izy, acc_t c,
                                                        acc_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = c * (fast_exp(x[j] * it - mx) * izx - fast_exp(y[j] * it - my) * izy);
  }
}

// float versions compiled for several ISAs (see fast_exp.h); double runs the generic bodies.
AUTOKD_CLONES float max_f32(const float* x, int64_t n) { return chunk_max(x, n); }
AUTOKD_CLONES void kl_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                KlState& st) {
  kl_chunk_body<float>(x, y, n, it, st);
}
AUTOKD_CLONES void kl_sums_f32(const float* x, const float* y, int64_t n, float it, float mx,
                               float my, KlState& st) {
  kl_sums_body<float, false>(x, y, n, it, mx, my, nullptr, nullptr, st);
}
AUTOKD_CLONES void kl_sums_store_f32(const float* x, const float* y, int64_t n, float it,
                                     float mx, float my, float* ex, float* ey, KlState& st) {
  kl_sums_body<float, true>(x, y, n, it, mx, my, ex, ey, st);
}
AUTOKD_CLONES void kl_diff_f32(const float* ex, const float* ey, int64_t n, float fx, float fy,
                               float* out) {
  kl_diff_body<float>(ex, ey, n, fx, fy, out);
}
AUTOKD_CLONES void kl_grad_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                     float mx, float my, float izx, float izy, float c,
                                     float* out) {
  kl_grad_body<float>(x, y, n, it, mx, my, izx, izy, c, out);
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return max_f32(x, n);
  } else {
    return chunk_max(x, n);
  }
}

template <typename acc_t>
inline void kl_chunk(const acc_t* x, const acc_t* y, int64_t n, acc_t it, KlState& st) {
  if constexpr (std::is_same_v<acc_t, float>) {
    kl_chunk_f32(x, y, n, it, st);
  } else {
    kl_chunk_body<acc_t>(x, y, n, it, st);
  }
}

template <typename acc_t>
inline void kl_sums(const acc_t* x, const acc_t* y, int64_t n, acc_t it, acc_t mx, acc_t my,
                    acc_t* ex, acc_t* ey, KlState& st) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (ex != nullptr) {
      kl_sums_store_f32(x, y, n, it, mx, my, ex, ey, st);
    } else {
      kl_sums_f32(x, y, n, it, mx, my, st);
    }
  } else if (ex != nullptr) {
    kl_sums_body<acc_t, true>(x, y, n, it, mx, my, ex, ey, st);
  } else {
    kl_sums_body<acc_t, false>(x, y, n, it, mx, my, ex, ey, st);
  }
}

template <typename acc_t>
inline void kl_diff(const acc_t* ex, const acc_t* ey, int64_t n, acc_t fx, acc_t fy,
                    acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    kl_diff_f32(ex, ey, n, fx, fy, out);
  } else {
    kl_diff_body<acc_t>(ex, ey, n, fx, fy, out);
  }
}

template <typename acc_t>
inline void kl_grad_chunk(const acc_t* x, const acc_t* y, int64_t n, acc_t it, acc_t mx,
                          acc_t my, acc_t izx, acc_t izy, acc_t c, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    kl_grad_chunk_f32(x, y, n, it, mx, my, izx, izy, c, out);
  } else {
    kl_grad_body<acc_t>(x, y, n, it, mx, my, izx, izy, c, out);
  }
}

// Calls fn(p, m, k) for the runs of row elements [j0, j0 + n): p points at the first of m
// consecutive elements (stride l.sb) that are row elements j0 + k ... of a row starting at row.
template <typename T, typename Fn>
inline void for_each_run(T* row, const RowLayout& l, int64_t j0, int64_t n, Fn&& fn) {
  int64_t a = j0 / l.B, b = j0 - a * l.B;
  for (int64_t k = 0; k < n; ++a, b = 0) {
    const int64_t m = std::min(n - k, l.B - b);
    fn(row + a * l.sa + b * l.sb, m, k);
    k += m;
  }
}

// Row elements [j0, j0 + n) as n contiguous acc_t values: the input itself when it already is
// such a run, else a converted copy in buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* row_span(const scalar_t* row, const RowLayout& l, int64_t j0, int64_t n,
                             acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (l.A == 1 && l.sb == 1) return row + j0;
  }
  const int64_t sb = l.sb;
  for_each_run(row, l, j0, n, [&](const scalar_t* p, int64_t m, int64_t k) {
    acc_t* q = buf + k;
    if (sb == 1) {
      for (int64_t j = 0; j < m; ++j) q[j] = static_cast<acc_t>(p[j]);
    } else {
      for (int64_t j = 0; j < m; ++j) q[j] = static_cast<acc_t>(p[j * sb]);
    }
  });
  return buf;
}

template <typename acc_t, typename scalar_t>
inline void row_store(const acc_t* v, scalar_t* row, const RowLayout& l, int64_t j0,
                      int64_t n) {
  const int64_t sb = l.sb;
  for_each_run(row, l, j0, n, [&](scalar_t* p, int64_t m, int64_t k) {
    const acc_t* q = v + k;
    if (sb == 1) {
      for (int64_t j = 0; j < m; ++j) p[j] = static_cast<scalar_t>(q[j]);
    } else {
      for (int64_t j = 0; j < m; ++j) p[j * sb] = static_cast<scalar_t>(q[j]);
    }
  });
}

// Copy rows r0 .. r0 + k - 1 (each A segments of B) between a tensor and k contiguous rows of
// length A * B, pitch elements apart, in buf, segment by segment across the rows: in the
// channel view the segments of neighbouring rows are neighbours in memory (the H*W planes of
// one sample), so this walks k * H*W contiguous elements at a time instead of jumping C*H*W
// elements every H*W.
template <typename acc_t, typename scalar_t>
inline void load_rows(const scalar_t* base, const RowLayout& l, int64_t r0, int64_t k,
                      acc_t* buf, int64_t pitch) {
  const int64_t B = l.B, sb = l.sb;
  for (int64_t a = 0; a < l.A; ++a) {
    for (int64_t i = 0; i < k; ++i) {
      const scalar_t* p = base + (r0 + i) * l.sr + a * l.sa;
      acc_t* q = buf + i * pitch + a * B;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        if (sb == 1) {
          std::memcpy(q, p, B * sizeof(acc_t));
          continue;
        }
      }
      if (sb == 1) {
        for (int64_t j = 0; j < B; ++j) q[j] = static_cast<acc_t>(p[j]);
      } else {
        for (int64_t j = 0; j < B; ++j) q[j] = static_cast<acc_t>(p[j * sb]);
      }
    }
  }
}

template <typename acc_t, typename scalar_t>
inline void store_rows(const acc_t* buf, int64_t pitch, scalar_t* base, const RowLayout& l,
                       int64_t r0, int64_t k) {
  const int64_t B = l.B, sb = l.sb;
  for (int64_t a = 0; a < l.A; ++a) {
    for (int64_t i = 0; i < k; ++i) {
      scalar_t* p = base + (r0 + i) * l.sr + a * l.sa;
      const acc_t* q = buf + i * pitch + a * B;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        if (sb == 1) {
          std::memcpy(p, q, B * sizeof(acc_t));
          continue;
        }
      }
      if (sb == 1) {
        for (int64_t j = 0; j < B; ++j) p[j] = static_cast<scalar_t>(q[j]);
      } else {
        for (int64_t j = 0; j < B; ++j) p[j * sb] = static_cast<scalar_t>(q[j]);
      }
    }
  }
}

// Per-thread scratch kept between calls, uninitialised: a fresh megabyte per call would be
// zeroed and page-faulted in every time, which costs as much as gathering into it.
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::unique_ptr<T[]> buf;
  thread_local int64_t size = 0;
  if (size < n) {
    buf.reset(new T[n]);
    size = n;
  }
  return buf.get();
}

inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1));
}

inline double row_kl(const KlState& st) {
  return st.a / st.zy - (st.my + std::log(st.zy)) + (st.mx + std::log(st.zx));
}

// Per-row KL into kl[r]; with grad != nullptr also d loss / d student into *grad, where
// c = tau / R is the loss's factor on softmax(x) - softmax(y).
template <typename scalar_t>
void kl_rows(const at::Tensor& s, const at::Tensor& t, double tau, at::Tensor* grad,
             std::vector<double>& kl) {
  using acc_t = at::opmath_type<scalar_t>;
  std::array<RowLayout, 3> l;
  if (grad != nullptr) {
    l = row_layouts<3>({&s, &t, grad});
  } else {
    const auto l2 = row_layouts<2>({&s, &t});
    l = {l2[0], l2[1], l2[0]};
  }
  const int64_t rows = l[0].rows, L = l[0].A * l[0].B;
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  scalar_t* gp = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t it = static_cast<acc_t>(1.0 / tau);
  const acc_t c = static_cast<acc_t>(tau / static_cast<double>(rows));
  constexpr bool same_type = std::is_same_v<acc_t, scalar_t>;
  const bool direct_in = same_type && l[0].A == 1 && l[0].sb == 1 && l[1].A == 1 &&
                         l[1].sb == 1;
  const bool direct_out = same_type && l[2].A == 1 && l[2].sb == 1;
  const bool buffered = L <= kRowCap && (gp != nullptr || !direct_in);
  // Rows gathered (or scattered) together per block; two scratch blocks stay within kRowCap.
  const int64_t block = buffered ? std::max<int64_t>(1, std::min<int64_t>(64, kRowCap / L)) : 1;
  // Scratch rows 64 bytes more than a multiple of 64 apart: rows a power of two apart would
  // share L1 sets, and a block's k rows are written side by side.
  const int64_t pitch = (L + 15) / 16 * 16 + 16;
  at::parallel_for(0, rows, row_grain(L), [&](int64_t r0, int64_t r1) {
    const int64_t kmax = std::min(block, r1 - r0);
    acc_t* xb = thread_scratch<acc_t>(buffered ? 2 * kmax * pitch : 3 * kChunk);
    acc_t* yb = xb + (buffered ? kmax * pitch : kChunk);
    acc_t* gb = yb + kChunk;  // streaming only
    if (buffered) {
      for (int64_t rb = r0; rb < r1; rb += kmax) {
        const int64_t k = std::min(kmax, r1 - rb);
        if (!direct_in) {
          load_rows(sp, l[0], rb, k, xb, pitch);
          load_rows(tp, l[1], rb, k, yb, pitch);
        }
        for (int64_t i = 0; i < k; ++i) {
          const int64_t r = rb + i;
          // [L] student and teacher of row r, contiguous; exps overwrite the scratch copies.
          acc_t* xr = xb + i * pitch;
          acc_t* yr = yb + i * pitch;
          const acc_t* x = xr;
          const acc_t* y = yr;
          if constexpr (same_type) {
            if (direct_in) {
              x = sp + r * l[0].sr;
              y = tp + r * l[1].sr;
            }
          }
          const acc_t mx = row_max(x, L) * it, my = row_max(y, L) * it;
          KlState st;
          st.mx = mx;
          st.my = my;
          for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
            const int64_t n = std::min(kChunk, L - j0);
            kl_sums<acc_t>(x + j0, y + j0, n, it, mx, my, gp ? xr + j0 : nullptr,
                           gp ? yr + j0 : nullptr, st);
          }
          kl[r] = row_kl(st);
          if (gp == nullptr) continue;
          const acc_t fx = static_cast<acc_t>(c / st.zx), fy = static_cast<acc_t>(c / st.zy);
          acc_t* g = xr;
          if constexpr (same_type) {
            if (direct_out) g = gp + r * l[2].sr;
          }
          kl_diff<acc_t>(xr, yr, L, fx, fy, g);
        }
        if (gp != nullptr && !direct_out) store_rows(xb, pitch, gp, l[2], rb, k);
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* srow = sp + r * l[0].sr;
      const scalar_t* trow = tp + r * l[1].sr;
      scalar_t* grow = gp != nullptr ? gp + r * l[2].sr : nullptr;
      KlState st;
      for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
        const int64_t n = std::min(kChunk, L - j0);
        kl_chunk<acc_t>(row_span<acc_t>(srow, l[0], j0, n, xb),
                        row_span<acc_t>(trow, l[1], j0, n, yb), n, it, st);
      }
      kl[r] = row_kl(st);
      if (grow == nullptr) continue;
      const acc_t mx = static_cast<acc_t>(st.mx), my = static_cast<acc_t>(st.my);
      const acc_t izx = static_cast<acc_t>(1.0 / st.zx), izy = static_cast<acc_t>(1.0 / st.zy);
      for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
        const int64_t n = std::min(kChunk, L - j0);
        const acc_t* x = row_span<acc_t>(srow, l[0], j0, n, xb);
        const acc_t* y = row_span<acc_t>(trow, l[1], j0, n, yb);
        if constexpr (same_type) {
          if (direct_out) {
            kl_grad_chunk<acc_t>(x, y, n, it, mx, my, izx, izy, c, grow + j0);
            continue;
          }
        }
        kl_grad_chunk<acc_t>(x, y, n, it, mx, my, izx, izy, c, gb);
        row_store(gb, grow, l[2], j0, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& student,
                                                  const at::Tensor& teacher, double tau,
                                                  bool with_grad) {
  check_softmax_kl_inputs("softmax_kl", student, teacher, tau);
  std::vector<double> kl(student.size(0));
  // Same strides as the student where it is dense (e.g. the channel view), so the gradient
  // flows back through views without a copy.
  at::Tensor grad = with_grad ? at::empty_like(student) : student.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "softmax_kl_cpu", [&] {
                                    kl_rows<scalar_t>(student, teacher, tau,
                                                      with_grad ? &grad : nullptr, kl);
                                  });
  double sum = 0;  // fixed order: the result does not depend on the thread count
  for (double v : kl) sum += v;
  at::Tensor loss =
      at::scalar_tensor(sum * tau * tau / static_cast<double>(kl.size()), student.options());
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) { m.impl("softmax_kl", &softmax_kl_cpu); }

}  // namespace autokd
