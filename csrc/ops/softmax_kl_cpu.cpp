// CPU kernels of softmax_kl (formula and layout in softmax_kl.h). Rows run in parallel; each
// row is consumed in chunks of kChunk elements: a chunk's max is found first so the running
// (max, sum) pair is rescaled once per chunk rather than once per element, and the chunk's
// exps then run as one vectorised loop. Strided or low-precision chunks are first gathered
// into a small on-stack buffer in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "softmax_kl.h"

namespace autokd {
namespace {

constexpr int64_t kChunk = 512;
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
template <typename acc_t, bool with_a>
__attribute__((always_inline)) inline void kl_chunk_body(const acc_t* x, const acc_t* y,
                                                         int64_t n, acc_t it, KlState& st) {
  // it > 0, so max(x * it) == max(x) * it exactly (rounding is monotone).
  const double nmx = std::max(st.mx, static_cast<double>(chunk_max(x, n) * it));
  const double nmy = std::max(st.my, static_cast<double>(chunk_max(y, n) * it));
  // Once a row's maxima are found, later chunks rarely move them: skip the rescaling exps,
  // which cost as much as a short chunk's own (short segments, e.g. H*W = 64, are chunks).
  if (nmx != st.mx) {
    st.zx *= std::exp(st.mx - nmx);
    st.mx = nmx;
  }
  if (nmy != st.my) {
    const double ry = std::exp(st.my - nmy);
    st.zy *= ry;
    st.a *= ry;
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
    if constexpr (with_a) sa += ey * (ys - xs);
  }
  st.zx += sx;
  st.zy += sy;
  if constexpr (with_a) st.a += sa;
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

AUTOKD_CLONES void kl_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                KlState& st) {
  kl_chunk_body<float, true>(x, y, n, it, st);
}
AUTOKD_CLONES void kl_stats_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                      KlState& st) {
  kl_chunk_body<float, false>(x, y, n, it, st);
}
AUTOKD_CLONES void kl_grad_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                     float mx, float my, float izx, float izy, float c,
                                     float* out) {
  kl_grad_body<float>(x, y, n, it, mx, my, izx, izy, c, out);
}

template <bool with_a, typename acc_t>
inline void kl_chunk(const acc_t* x, const acc_t* y, int64_t n, acc_t it, KlState& st) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if constexpr (with_a) {
      kl_chunk_f32(x, y, n, it, st);
    } else {
      kl_stats_chunk_f32(x, y, n, it, st);
    }
  } else {
    kl_chunk_body<acc_t, with_a>(x, y, n, it, st);
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

// Pointer to n accumulation-type values starting at p with stride s: p itself when it already
// is a contiguous run of acc_t, else a converted copy in buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* gather(const scalar_t* p, int64_t s, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (s == 1) return p;
  }
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(p[j * s]);
  return buf;
}

// Walks the chunks of row r of (student, teacher), calling fn(x, y, n, offset, seg_index).
template <typename acc_t, typename scalar_t, typename Fn>
inline void for_each_chunk(const scalar_t* sp, const scalar_t* tp, const RowLayout& ls,
                           const RowLayout& lt, int64_t r, acc_t* xb, acc_t* yb, Fn&& fn) {
  for (int64_t a = 0; a < ls.A; ++a) {
    const scalar_t* xs = sp + r * ls.sr + a * ls.sa;
    const scalar_t* ys = tp + r * lt.sr + a * lt.sa;
    for (int64_t off = 0; off < ls.B; off += kChunk) {
      const int64_t n = std::min(kChunk, ls.B - off);
      const acc_t* x = gather<acc_t>(xs + off * ls.sb, ls.sb, n, xb);
      const acc_t* y = gather<acc_t>(ys + off * lt.sb, lt.sb, n, yb);
      fn(x, y, n, a, off);
    }
  }
}

inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1));
}

template <typename scalar_t>
void kl_forward_rows(const at::Tensor& s, const at::Tensor& t, double tau,
                     std::vector<double>& kl) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto l = row_layouts<2>({&s, &t});
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const acc_t it = static_cast<acc_t>(1.0 / tau);
  at::parallel_for(0, l[0].rows, row_grain(l[0].A * l[0].B), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t xb[kChunk];
    alignas(64) acc_t yb[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      KlState st;
      for_each_chunk<acc_t>(sp, tp, l[0], l[1], r, xb, yb,
                            [&](const acc_t* x, const acc_t* y, int64_t n, int64_t, int64_t) {
                              kl_chunk<true>(x, y, n, it, st);
                            });
      kl[r] = st.a / st.zy - (st.my + std::log(st.zy)) + (st.mx + std::log(st.zx));
    }
  });
}

template <typename scalar_t>
void kl_backward_rows(double grad, const at::Tensor& s, const at::Tensor& t, double tau,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto l = row_layouts<3>({&s, &t, &out});
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t it = static_cast<acc_t>(1.0 / tau);
  const acc_t c = static_cast<acc_t>(grad * tau / static_cast<double>(l[0].rows));
  const RowLayout& lo = l[2];
  at::parallel_for(0, l[0].rows, row_grain(l[0].A * l[0].B), [&](int64_t r0, int64_t r1) {
    alignas(64) acc_t xb[kChunk];
    alignas(64) acc_t yb[kChunk];
    alignas(64) acc_t gb[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      KlState st;
      for_each_chunk<acc_t>(sp, tp, l[0], l[1], r, xb, yb,
                            [&](const acc_t* x, const acc_t* y, int64_t n, int64_t, int64_t) {
                              kl_chunk<false>(x, y, n, it, st);
                            });
      const acc_t mx = static_cast<acc_t>(st.mx), my = static_cast<acc_t>(st.my);
      const acc_t izx = static_cast<acc_t>(1.0 / st.zx), izy = static_cast<acc_t>(1.0 / st.zy);
      for_each_chunk<acc_t>(
          sp, tp, l[0], l[1], r, xb, yb,
          [&](const acc_t* x, const acc_t* y, int64_t n, int64_t a, int64_t off) {
            scalar_t* o = op + r * lo.sr + a * lo.sa + off * lo.sb;
            if constexpr (std::is_same_v<acc_t, scalar_t>) {
              if (lo.sb == 1) {
                kl_grad_chunk(x, y, n, it, mx, my, izx, izy, c, o);
                return;
              }
            }
            kl_grad_chunk(x, y, n, it, mx, my, izx, izy, c, gb);
            for (int64_t j = 0; j < n; ++j) o[j * lo.sb] = static_cast<scalar_t>(gb[j]);
          });
    }
  });
}

at::Tensor softmax_kl_cpu(const at::Tensor& student, const at::Tensor& teacher, double tau) {
  check_softmax_kl_inputs("softmax_kl", student, teacher, tau);
  std::vector<double> kl(student.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "softmax_kl_cpu",
                                  [&] { kl_forward_rows<scalar_t>(student, teacher, tau, kl); });
  double sum = 0;  // fixed order: the result does not depend on the thread count
  for (double v : kl) sum += v;
  return at::scalar_tensor(sum * tau * tau / static_cast<double>(kl.size()), student.options());
}

at::Tensor softmax_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                   const at::Tensor& teacher, double tau) {
  check_softmax_kl_inputs("softmax_kl_backward", student, teacher, tau);
  check_softmax_kl_grad("softmax_kl_backward", grad, student);
  // Same strides as the student where it is dense (e.g. the channel view), so the gradient
  // flows back through views without a copy.
  at::Tensor out = at::empty_like(student);
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_backward_cpu",
      [&] { kl_backward_rows<scalar_t>(g, student, teacher, tau, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_cpu);
  m.impl("softmax_kl_backward", &softmax_kl_backward_cpu);
}

}  // namespace autokd
