// CPU kernel of softmax_kl (formula and layout in softmax_kl.h). Rows run in parallel.
//
// A row of at most kRowCap elements runs "buffered": when it is strided or low precision, it
// is first gathered into a per-thread scratch row in the accumulation type. The row maxima come
// first (exact, no rescaling), then one vectorised loop does the exps and sums. With with_grad
// the same loop keeps exp(x - mx) and exp(y - my) in the scratch row and a last loop writes the
// gradient from them: loss and gradient together cost 2 exps per element pair (the autograd
// backward only scales the saved gradient).
// float rows of at least 16 elements run this on 16-float vectors (kl_segments_vec): short rows
// such as [128, 100] logits would otherwise spend as long in the scalar tail of each loop
// (4 of 100 elements, two exps each, one lane at a time) and in the horizontal sums as in the
// vector body. float rows made of contiguous segments of 16+ elements (the channel view: N
// planes of H*W) are read in place, segment by segment, instead of gathered. A whole row is
// one call, and the per-row log is taken once per group of rows.
// Small inputs run on the calling thread (at::parallel_for opens no parallel region below
// the grain), so a logit-sized call pays no OpenMP start-up.
//
// Longer rows stream in chunks of kChunk elements with an online (max, sum): a chunk's max is
// found first so the running pair is rescaled once per chunk, not once per element; with
// with_grad a second sweep recomputes the exps for the gradient. Contiguous rows of the
// accumulation type longer than kChunk also stream when no gradient is wanted (one read of
// each input).
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

// 16-float vectors are passed between always_inline helpers below (see fast_exp.h); GCC's
// -Wpsabi note about their calling convention without AVX-512 concerns no real call. GCC
// reports it at the end of the file, so it is silenced for the whole file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

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

// Loops run over whole blocks of kVec elements (one AVX-512 register of floats, two AVX2 ones):
// the last n % kVec elements of a row of n >= kVec go through one more block of kVec elements
// ending at n, overlapping the previous one, whose first lanes are masked out of the sums. A
// scalar loop for those few elements costs as much as the vector loop over a 100-element row
// (logits), because each of its iterations runs two exps one lane at a time.
constexpr int64_t kVec = 16;

// Maxima of x and y over [0, n), in one sweep.
template <typename acc_t>
__attribute__((always_inline)) inline void chunk_max2(const acc_t* x, const acc_t* y, int64_t n,
                                                      acc_t& mx_out, acc_t& my_out) {
  acc_t mx = x[0], my = y[0];
  const int64_t nv = n < kVec ? n : n - n % kVec;
#pragma omp simd reduction(max : mx, my)
  for (int64_t j = 0; j < nv; ++j) {
    mx = x[j] > mx ? x[j] : mx;
    my = y[j] > my ? y[j] : my;
  }
  if (nv < n) {  // n >= kVec here; lanes seen twice do not change a max
    const acc_t* xt = x + n - kVec;
    const acc_t* yt = y + n - kVec;
#pragma omp simd reduction(max : mx, my)
    for (int64_t j = 0; j < kVec; ++j) {
      mx = xt[j] > mx ? xt[j] : mx;
      my = yt[j] > my ? yt[j] : my;
    }
  }
  mx_out = mx;
  my_out = my;
}

// Sums of a chunk whose maxima mx, my (of x * it, y * it) are known: sum exp(x * it - mx),
// sum exp(y * it - my), sum exp(y * it - my) (y - x) * it. With store, the exps go to ex, ey,
// which may alias x, y.
template <typename acc_t, bool store>
__attribute__((always_inline)) inline void exp_sums(const acc_t* x, const acc_t* y, int64_t n,
                                                    acc_t it, acc_t mx, acc_t my, acc_t* ex,
                                                    acc_t* ey, acc_t& sx_out, acc_t& sy_out,
                                                    acc_t& sa_out) {
  acc_t sx = 0, sy = 0, sa = 0;
  const int64_t nv = n < kVec ? n : n - n % kVec;
#pragma omp simd reduction(+ : sx, sy, sa)
  for (int64_t j = 0; j < nv; ++j) {
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
  if (nv < n) {
    // The first `skip` lanes were done above; with store they may already hold exps (ex
    // aliasing x), so they are selected out of the sums (not multiplied by 0) and keep their
    // stored exps.
    const int64_t o = n - kVec, skip = kVec - (n - nv);
    const acc_t* xt = x + o;
    const acc_t* yt = y + o;
#pragma omp simd reduction(+ : sx, sy, sa)
    for (int64_t j = 0; j < kVec; ++j) {
      const acc_t xs = xt[j] * it, ys = yt[j] * it;
      const acc_t e = fast_exp(xs - mx), f = fast_exp(ys - my);
      const bool live = j >= skip;
      sx += live ? e : acc_t(0);
      sy += live ? f : acc_t(0);
      sa += live ? f * (ys - xs) : acc_t(0);
      if constexpr (store) {  // a blend rather than a branch
        ex[o + j] = live ? e : ex[o + j];
        ey[o + j] = live ? f : ey[o + j];
      }
    }
  }
  sx_out = sx;
  sy_out = sy;
  sa_out = sa;
}

// Folds one chunk of raw student (x) and teacher (y) values into the row state.
template <typename acc_t>
__attribute__((always_inline)) inline void kl_chunk_body(const acc_t* x, const acc_t* y,
                                                         int64_t n, acc_t it, KlState& st) {
  acc_t cmx, cmy;
  chunk_max2(x, y, n, cmx, cmy);
  // it > 0, so max(x * it) == max(x) * it exactly (rounding is monotone).
  const double nmx = std::max(st.mx, static_cast<double>(cmx * it));
  const double nmy = std::max(st.my, static_cast<double>(cmy * it));
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
  acc_t sx, sy, sa;
  exp_sums<acc_t, false>(x, y, n, it, static_cast<acc_t>(nmx), static_cast<acc_t>(nmy), nullptr,
                         nullptr, sx, sy, sa);
  st.zx += sx;
  st.zy += sy;
  st.a += sa;
}

// A row's KL = lin + log(ratio). The log is left to the caller, which takes it of products of
// many rows' ratios (see softmax_kl_cpu): one libm log per row costs a tenth of a short row.
struct RowKl {
  double lin, ratio;
};

inline RowKl row_kl(const KlState& st) {
  return {st.a / st.zy - st.my + st.mx, st.zx / st.zy};  // zx, zy in [1, L]
}

// KL of one buffered row: x, y are its L contiguous student and teacher values. With grad, the
// exps are kept in ex, ey (L each, may alias x, y) and g (L, may alias ex) receives
// c * (softmax(x * it) - softmax(y * it)). Maxima first (exact, no rescaling), then the exps.
template <typename acc_t, bool grad>
__attribute__((always_inline)) inline RowKl kl_row_body(const acc_t* x, const acc_t* y,
                                                         int64_t L, acc_t it, acc_t c, acc_t* ex,
                                                         acc_t* ey, acc_t* g) {
  acc_t rmx, rmy;
  chunk_max2(x, y, L, rmx, rmy);
  const acc_t mx = rmx * it, my = rmy * it;
  KlState st;
  st.mx = mx;
  st.my = my;
  // Chunks keep the float partial sums short on long rows.
  for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
    const int64_t n = std::min(kChunk, L - j0);
    acc_t sx, sy, sa;
    exp_sums<acc_t, grad>(x + j0, y + j0, n, it, mx, my, ex + j0, ey + j0, sx, sy, sa);
    st.zx += sx;
    st.zy += sy;
    st.a += sa;
  }
  if constexpr (grad) {
    const acc_t fx = static_cast<acc_t>(c / st.zx), fy = static_cast<acc_t>(c / st.zy);
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) g[j] = fx * ex[j] - fy * ey[j];
  }
  return row_kl(st);
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

// KL of one float row made of A segments of B >= kVec contiguous elements, sax / say apart in
// x / y, on 16-float vectors (fast_exp.h) with each segment laid out as RowVectors: the maxima
// over every segment, then the exps. A contiguous row is one segment (A = 1). The channel view
// has a sample's H*W plane per segment, read in place: gathering the row into scratch first
// cost one memcpy per segment, a third of the forward on 8 x 8 planes.
// With grad, the exps go to ex, ey (A * B each, contiguous; they may alias x, y when A = 1)
// and c * (softmax(x) - softmax(y)) to g's segments, sag apart (g may alias ex). Sums run in the
// same order with and without grad, so both give the same loss to the bit; float partial sums
// are flushed to double about every kChunk elements.
template <bool grad>
__attribute__((always_inline)) inline RowKl kl_segments_vec(const float* x, const float* y,
                                                            int64_t A, int64_t B, int64_t sax,
                                                            int64_t say, float it, float c,
                                                            float* ex, float* ey, float* g,
                                                            int64_t sag) {
  const RowVectors v(B);
  const int64_t nv = v.nv, o = v.o;
  const f32x16 zero = {};
  f32x16 vmx = load16(x), vmy = load16(y);
  for (int64_t a = 0; a < A; ++a) max16_row(x + a * sax, y + a * say, v, vmx, vmy);
  const float mx = hmax16(vmx) * it, my = hmax16(vmy) * it;  // it > 0: max(x) * it = max(x * it)
  KlState st;
  st.mx = mx;
  st.my = my;
  f32x16 sx = zero, sy = zero, sa = zero;
  int64_t pending = 0;  // elements in the float partial sums
  const auto flush = [&]() __attribute__((always_inline)) {
    st.zx += hsum16(sx);
    st.zy += hsum16(sy);
    st.a += static_cast<double>(hsum16(sa)) * it;
    sx = sy = sa = zero;
    pending = 0;
  };
  for (int64_t a = 0; a < A; ++a) {
    const float* xa = x + a * sax;
    const float* ya = y + a * say;
    float* ea = ex + a * B;
    float* fa = ey + a * B;
    // The last vector first, while x and y are intact (ex, ey may alias them); its exps are
    // stored once the whole vectors have read their inputs.
    f32x16 et = zero, ft = zero;
    if (v.overlap()) {
      const f32x16 xv = load16(xa + o), yv = load16(ya + o);
      et = fast_exp(xv * it - mx);
      ft = fast_exp(yv * it - my);
      sx += v.live ? et : zero;
      sy += v.live ? ft : zero;
      sa += v.live ? ft * (yv - xv) : zero;
      pending += B - nv;
    }
    for (int64_t j0 = 0; j0 < nv; j0 += kChunk) {
      const int64_t j1 = std::min(j0 + kChunk, nv);
      for (int64_t j = j0; j < j1; j += kVec) {
        // sa sums f (y - x) and takes its factor it at the flush.
        const f32x16 xv = load16(xa + j), yv = load16(ya + j);
        const f32x16 e = fast_exp(xv * it - mx), f = fast_exp(yv * it - my);
        sx += e;
        sy += f;
        sa += f * (yv - xv);
        if constexpr (grad) {
          store16(ea + j, e);
          store16(fa + j, f);
        }
      }
      pending += j1 - j0;
      if (pending >= kChunk) flush();
    }
    if constexpr (grad) {
      if (v.overlap()) {  // rewrites lanes of the vector before with the same exps
        store16(ea + o, et);
        store16(fa + o, ft);
      }
    }
  }
  flush();
  if constexpr (grad) {
    const float fx = static_cast<float>(c / st.zx), fy = static_cast<float>(c / st.zy);
    for (int64_t a = 0; a < A; ++a) {
      const float* ea = ex + a * B;
      const float* fa = ey + a * B;
      float* ga = g + a * sag;
      // The last vector's gradient first, while ex is intact (g may alias it).
      const f32x16 gt = v.overlap() ? fx * load16(ea + o) - fy * load16(fa + o) : zero;
      for (int64_t j = 0; j < nv; j += kVec) {
        store16(ga + j, fx * load16(ea + j) - fy * load16(fa + j));
      }
      if (v.overlap()) store16(ga + o, gt);
    }
  }
  return row_kl(st);
}

// float versions compiled for several ISAs (see fast_exp.h); double runs the generic bodies.
// A buffered row is one call, so short rows pay one dispatch per row, not one per loop.
AUTOKD_CLONES void kl_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                KlState& st) {
  kl_chunk_body<float>(x, y, n, it, st);
}
AUTOKD_CLONES RowKl kl_row_f32(const float* x, const float* y, int64_t L, float it) {
  if (L < kVec) return kl_row_body<float, false>(x, y, L, it, 0.0f, nullptr, nullptr, nullptr);
  return kl_segments_vec<false>(x, y, 1, L, 0, 0, it, 0.0f, nullptr, nullptr, nullptr, 0);
}
AUTOKD_CLONES RowKl kl_row_grad_f32(const float* x, const float* y, int64_t L, float it,
                                     float c, float* ex, float* ey, float* g) {
  if (L < kVec) return kl_row_body<float, true>(x, y, L, it, c, ex, ey, g);
  return kl_segments_vec<true>(x, y, 1, L, 0, 0, it, c, ex, ey, g, 0);
}
AUTOKD_CLONES RowKl kl_segments_f32(const float* x, const float* y, int64_t A, int64_t B,
                                     int64_t sax, int64_t say, float it, float c, float* ex,
                                     float* ey, float* g, int64_t sag) {
  if (g == nullptr) {
    return kl_segments_vec<false>(x, y, A, B, sax, say, it, c, ex, ey, g, sag);
  }
  return kl_segments_vec<true>(x, y, A, B, sax, say, it, c, ex, ey, g, sag);
}
AUTOKD_CLONES void kl_grad_chunk_f32(const float* x, const float* y, int64_t n, float it,
                                     float mx, float my, float izx, float izy, float c,
                                     float* out) {
  kl_grad_body<float>(x, y, n, it, mx, my, izx, izy, c, out);
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
inline RowKl kl_row(const acc_t* x, const acc_t* y, int64_t L, acc_t it, acc_t c, acc_t* ex,
                     acc_t* ey, acc_t* g) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (g != nullptr) return kl_row_grad_f32(x, y, L, it, c, ex, ey, g);
    return kl_row_f32(x, y, L, it);
  } else {
    if (g != nullptr) return kl_row_body<acc_t, true>(x, y, L, it, c, ex, ey, g);
    return kl_row_body<acc_t, false>(x, y, L, it, c, ex, ey, g);
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

// Per-row KL (its two parts, see RowKl) into kl[r]; with grad != nullptr also d loss / d student
// into *grad, where c = tau / R is the loss's factor on softmax(x) - softmax(y).
template <typename scalar_t>
void kl_rows(const at::Tensor& s, const at::Tensor& t, double tau, at::Tensor* grad,
             std::vector<RowKl>& kl) {
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
  // float rows of contiguous segments (the channel view): read in place; with a gradient the
  // exps go to per-thread scratch and the gradient straight to its segments.
  const bool segments = std::is_same_v<scalar_t, float> && l[0].A > 1 && l[0].sb == 1 &&
                        l[1].sb == 1 && (gp == nullptr || l[2].sb == 1) && l[0].B >= kVec &&
                        L <= kRowCap;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (segments) {
      at::parallel_for(0, rows, row_grain(L), [&](int64_t r0, int64_t r1) {
        float* ex = gp != nullptr ? thread_scratch<float>(2 * L) : nullptr;
        float* ey = gp != nullptr ? ex + L : nullptr;
        for (int64_t r = r0; r < r1; ++r) {
          float* g = gp != nullptr ? gp + r * l[2].sr : nullptr;
          kl[r] = kl_segments_f32(sp + r * l[0].sr, tp + r * l[1].sr, l[0].A, l[0].B, l[0].sa,
                                  l[1].sa, it, c, ex, ey, g, l[2].sa);
        }
      });
      return;
    }
  }
  // Contiguous rows without gradient stream (one read of each input) unless they are short
  // enough to sit in L1 between the max and the exp sweep.
  const bool buffered = L <= kRowCap && (gp != nullptr || !direct_in || L <= kChunk);
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
          acc_t* g = nullptr;
          if (gp != nullptr) {
            g = xr;
            if constexpr (same_type) {
              if (direct_out) g = gp + r * l[2].sr;
            }
          }
          kl[r] = kl_row<acc_t>(x, y, L, it, c, xr, yr, g);
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

// Sum of the rows' KL in a fixed order: the result does not depend on the thread count. Each
// ratio is in [1/L, L] with L < 2^bits, so a product of `group` of them stays within 2^+-960,
// far inside the double range, and one log serves the whole group.
double sum_kl(const std::vector<RowKl>& kl, int64_t L) {
  const int64_t rows = static_cast<int64_t>(kl.size());
  const int64_t bits = 64 - __builtin_clzll(static_cast<uint64_t>(L));
  const int64_t group = std::max<int64_t>(1, 960 / bits);
  double sum = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += group) {
    double product = 1;
    for (int64_t r = r0; r < std::min(rows, r0 + group); ++r) {
      sum += kl[r].lin;
      product *= kl[r].ratio;
    }
    sum += std::log(product);
  }
  return sum;
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_cpu(const at::Tensor& student,
                                                  const at::Tensor& teacher, double tau,
                                                  bool with_grad) {
  check_softmax_kl_inputs("softmax_kl", student, teacher, tau);
  const int64_t rows = student.size(0);
  std::vector<RowKl> kl(rows);
  // Same strides as the student where it is dense (e.g. the channel view), so the gradient
  // flows back through views without a copy.
  at::Tensor grad = with_grad ? at::empty_like(student) : student.new_empty({0});
  at::Tensor loss = at::empty({}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_cpu", [&] {
        kl_rows<scalar_t>(student, teacher, tau, with_grad ? &grad : nullptr, kl);
        // Written in place: at::scalar_tensor would cost one more dispatched op (fill_).
        const double value = sum_kl(kl, student.numel() / rows) * tau * tau / rows;
        *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
      });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) { m.impl("softmax_kl", &softmax_kl_cpu); }

}  // namespace autokd
