// CPU kernels of pearson (formulas in pearson.h). Rows are split into one contiguous range per
// thread; each range keeps its own column sums, merged afterwards in a fixed order, so results
// do not depend on scheduling. A row is gathered into a K-long buffer in the accumulation type
// (the only per-thread temporaries), turned into its softmax in place, and feeds the row and
// column moments in the same loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "pearson.h"

// 16-float vectors are passed between always_inline helpers below (see fast_exp.h); GCC's
// -Wpsabi note about their calling convention without AVX-512 concerns no real call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace autokd {
namespace {

// Moment sums: sum u, sum v, sum uv, sum uu, sum vv. Rows shift by their exact mean 1/K;
// columns by the first row's (P, Q), a value of the same column, so that columns of tiny
// probabilities (a class nobody predicts) or of a confident class do not cancel in
// suu - su^2 / N. Column sums are double even for float rows.
enum { kSu = 0, kSv, kSuv, kSuu, kSvv, kMoments };

template <typename acc_t>
__attribute__((always_inline)) inline void softmax_inplace_body(acc_t* b, int64_t n, acc_t it) {
  acc_t m = b[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 1; j < n; ++j) m = b[j] > m ? b[j] : m;
  m *= it;
  acc_t z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) {
    b[j] = fast_exp(b[j] * it - m);
    z += b[j];
  }
  const acc_t iz = acc_t(1) / z;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) b[j] *= iz;
}

// Row sums (su, sv, suv, suu, svv) of u = p - c, v = q - c, and those of u = p - cp[j],
// v = q - cq[j] added to the per-column sums col[kMoments][n].
template <typename acc_t>
__attribute__((always_inline)) inline void moments_body(const acc_t* p, const acc_t* q,
                                                        int64_t n, acc_t c, const acc_t* cp,
                                                        const acc_t* cq, double* col,
                                                        acc_t* row) {
  acc_t su = 0, sv = 0, suv = 0, suu = 0, svv = 0;
  double* cu = col + kSu * n;
  double* cv = col + kSv * n;
  double* cuv = col + kSuv * n;
  double* cuu = col + kSuu * n;
  double* cvv = col + kSvv * n;
#pragma omp simd reduction(+ : su, sv, suv, suu, svv)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t u = p[j] - c, v = q[j] - c;
    su += u;
    sv += v;
    suv += u * v;
    suu += u * u;
    svv += v * v;
    const double ud = p[j] - cp[j], vd = q[j] - cq[j];
    cu[j] += ud;
    cv[j] += vd;
    cuv[j] += ud * vd;
    cuu[j] += ud * ud;
    cvv[j] += vd * vd;
  }
  row[kSu] = su;
  row[kSv] = sv;
  row[kSuv] = suv;
  row[kSuu] = suu;
  row[kSvv] = svv;
}

// g_k = a_row (q_k - mq) + b_row (p_k - mp) + ac_k (q_k - mb_k) + bc_k (p_k - ma_k);
// out_k = p_k (g_k - <g, p>) / tau. cols = [ac | bc | ma | mb], each n long.
template <typename acc_t>
__attribute__((always_inline)) inline void grad_row_body(const acc_t* p, const acc_t* q,
                                                         int64_t n, const acc_t* cols,
                                                         acc_t a_row, acc_t b_row, acc_t mp,
                                                         acc_t mq, acc_t itau, acc_t* g,
                                                         acc_t* out) {
  const acc_t* ac = cols;
  const acc_t* bc = cols + n;
  const acc_t* ma = cols + 2 * n;
  const acc_t* mb = cols + 3 * n;
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t gj = a_row * (q[j] - mq) + b_row * (p[j] - mp) + ac[j] * (q[j] - mb[j]) +
                     bc[j] * (p[j] - ma[j]);
    g[j] = gj;
    dot += gj * p[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * (g[j] - dot) * itau;
}

AUTOKD_CLONES void softmax_inplace_f32(float* b, int64_t n, float it) {
  softmax_inplace_body<float>(b, n, it);
}
AUTOKD_CLONES void moments_f32(const float* p, const float* q, int64_t n, float c,
                               const float* cp, const float* cq, double* col, float* row) {
  moments_body<float>(p, q, n, c, cp, cq, col, row);
}
AUTOKD_CLONES void grad_row_f32(const float* p, const float* q, int64_t n, const float* cols,
                                float a_row, float b_row, float mp, float mq, float itau,
                                float* g, float* out) {
  grad_row_body<float>(p, q, n, cols, a_row, b_row, mp, mq, itau, g, out);
}

template <typename acc_t>
inline void softmax_inplace(acc_t* b, int64_t n, acc_t it) {
  if constexpr (std::is_same_v<acc_t, float>) {
    softmax_inplace_f32(b, n, it);
  } else {
    softmax_inplace_body<acc_t>(b, n, it);
  }
}
template <typename acc_t>
inline void moments(const acc_t* p, const acc_t* q, int64_t n, acc_t c, const acc_t* cp,
                    const acc_t* cq, double* col, acc_t* row) {
  if constexpr (std::is_same_v<acc_t, float>) {
    moments_f32(p, q, n, c, cp, cq, col, row);
  } else {
    moments_body<acc_t>(p, q, n, c, cp, cq, col, row);
  }
}
template <typename acc_t>
inline void grad_row(const acc_t* p, const acc_t* q, int64_t n, const acc_t* cols, acc_t a_row,
                     acc_t b_row, acc_t mp, acc_t mq, acc_t itau, acc_t* g, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    grad_row_f32(p, q, n, cols, a_row, b_row, mp, mq, itau, g, out);
  } else {
    grad_row_body<acc_t>(p, q, n, cols, a_row, b_row, mp, mq, itau, g, out);
  }
}

// One float32 row pair of at least 16 elements with unit column stride, fused: the maxima from
// the inputs, then one loop of exps (unnormalised, into pb/qb) and their sums, then the moments
// loop with the normalisation folded in (p = e_p / z_p). Against load + softmax + moments this
// drops a copy and a scaling sweep of both rows. The column sums go to float partial sums `col`
// (kept in L1 for K up to ~1500), which the caller adds into the double sums every kColBlock
// rows: float error over so few shifted terms stays ~1e-6 relative, and the double
// read-modify-writes per element (five, 8 lanes each) were the largest cost after the exps.
// With `keep`, the normalised rows are written back to pb/qb for the backward.
// On 16-float vectors laid out as RowVectors (fast_exp.h): the last vector's new lanes count in
// the row sums, and its other lanes add 0 to their column sums. Its exps stay in registers,
// since with `keep` the lanes it shares with the vector before are normalised in place first.
// Shorter rows take the unfused pass.
template <bool keep>
__attribute__((always_inline)) inline void fused_row_vec(const float* __restrict s,
                                                         const float* __restrict t, int64_t n,
                                                         float it, float c, const float* cp,
                                                         const float* cq, float* col,
                                                         float* __restrict pb,
                                                         float* __restrict qb, float* row) {
  constexpr int64_t kVec = 16;
  const RowVectors vec(n);
  const int64_t nv = vec.nv, o = vec.o;
  const i32x16 live = vec.live;
  const f32x16 zero = {};
  f32x16 vms = load16(s), vmt = load16(t);
  max16_row(s, t, vec, vms, vmt);
  const float ms = hmax16(vms) * it, mt = hmax16(vmt) * it;
  f32x16 zp = zero, zq = zero;
  for (int64_t j = 0; j < nv; j += kVec) {
    const f32x16 e = fast_exp(load16(s + j) * it - ms), f = fast_exp(load16(t + j) * it - mt);
    store16(pb + j, e);
    store16(qb + j, f);
    zp += e;
    zq += f;
  }
  const f32x16 et = fast_exp(load16(s + o) * it - ms), ft = fast_exp(load16(t + o) * it - mt);
  if (vec.overlap()) {
    zp += live ? et : zero;
    zq += live ? ft : zero;
  }
  const float izp = 1.0f / hsum16(zp), izq = 1.0f / hsum16(zq);
  f32x16 su = zero, sv = zero, suv = zero, suu = zero, svv = zero;
  float* __restrict cu = col + kSu * n;
  float* __restrict cv = col + kSv * n;
  float* __restrict cuv = col + kSuv * n;
  float* __restrict cuu = col + kSuu * n;
  float* __restrict cvv = col + kSvv * n;
  // One vector of p, q at j into the row sums and the column sums; masked, only its lanes in
  // `live` count. Inlined: as a call it would be compiled for the baseline ISA and receive
  // the vectors from an AVX-512 clone under another calling convention.
  const auto moments = [&](int64_t j, f32x16 pj, f32x16 qj,
                           bool masked) __attribute__((always_inline)) {
    f32x16 u = pj - c, v = qj - c;
    f32x16 ud = pj - load16(cp + j), vd = qj - load16(cq + j);
    if (masked) {
      u = live ? u : zero;
      v = live ? v : zero;
      ud = live ? ud : zero;
      vd = live ? vd : zero;
    }
    su += u;
    sv += v;
    suv += u * v;
    suu += u * u;
    svv += v * v;
    store16(cu + j, load16(cu + j) + ud);
    store16(cv + j, load16(cv + j) + vd);
    store16(cuv + j, load16(cuv + j) + ud * vd);
    store16(cuu + j, load16(cuu + j) + ud * ud);
    store16(cvv + j, load16(cvv + j) + vd * vd);
  };
  for (int64_t j = 0; j < nv; j += kVec) {
    const f32x16 pj = load16(pb + j) * izp, qj = load16(qb + j) * izq;
    if constexpr (keep) {
      store16(pb + j, pj);
      store16(qb + j, qj);
    }
    moments(j, pj, qj, false);
  }
  if (vec.overlap()) {
    const f32x16 pj = et * izp, qj = ft * izq;
    if constexpr (keep) {  // rewrites lanes of the vector before with the same values
      store16(pb + o, pj);
      store16(qb + o, qj);
    }
    moments(o, pj, qj, true);
  }
  row[kSu] = hsum16(su);
  row[kSv] = hsum16(sv);
  row[kSuv] = hsum16(suv);
  row[kSuu] = hsum16(suu);
  row[kSvv] = hsum16(svv);
}

constexpr int64_t kColBlock = 32;

AUTOKD_CLONES void fused_row_f32(const float* s, const float* t, int64_t n, float it, float c,
                                 const float* cp, const float* cq, float* col, float* pb,
                                 float* qb, float* row, bool keep) {
  if (keep) {
    fused_row_vec<true>(s, t, n, it, c, cp, cq, col, pb, qb, row);
  } else {
    fused_row_vec<false>(s, t, n, it, c, cp, cq, col, pb, qb, row);
  }
}

template <typename acc_t, typename scalar_t>
inline void load_row(const scalar_t* p, int64_t stride, int64_t n, acc_t* buf) {
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(p[j * stride]);
}

// Ranges of rows, one per thread (at most one per row).
inline std::vector<int64_t> row_ranges(int64_t rows) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<int64_t> bounds(parts + 1);
  for (int64_t i = 0; i <= parts; ++i) bounds[i] = rows * i / parts;
  return bounds;
}

// Everything the gradient and the losses need from one pass over (P, Q).
struct PearsonMoments {
  std::vector<double> row;     // [N][kMoments], shifted by 1/K
  std::vector<double> col;     // [kMoments][K], shifted by shift
  std::vector<double> shift;   // [2][K]: P[0, :], Q[0, :]
};

// keep_p, keep_q: when given ([N, K] each), the rows of P and Q are left there for the
// backward, which then skips recomputing both softmaxes.
template <typename scalar_t>
PearsonMoments pearson_moments(const at::Tensor& s, const at::Tensor& t, double tau,
                               at::opmath_type<scalar_t>* keep_p = nullptr,
                               at::opmath_type<scalar_t>* keep_q = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), K = s.size(1);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const acc_t it = static_cast<acc_t>(1.0 / tau), c = static_cast<acc_t>(1.0 / K);
  const auto bounds = row_ranges(N);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  PearsonMoments m;
  m.row.assign(N * kMoments, 0.0);
  std::vector<acc_t> cp(K), cq(K);
  load_row(sp, s.stride(1), K, cp.data());
  load_row(tp, t.stride(1), K, cq.data());
  softmax_inplace(cp.data(), K, it);
  softmax_inplace(cq.data(), K, it);
  m.shift.resize(2 * K);
  for (int64_t k = 0; k < K; ++k) {
    m.shift[k] = cp[k];
    m.shift[K + k] = cq[k];
  }
  std::vector<std::vector<double>> cols(parts);
  const bool fused =
      std::is_same_v<scalar_t, float> && s.stride(1) == 1 && t.stride(1) == 1 && K >= 16;
  at::parallel_for(0, parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> pb(K), qb(K);
    std::vector<float> fcol(fused ? kMoments * K : 0);
    for (int64_t i = i0; i < i1; ++i) {
      cols[i].assign(kMoments * K, 0.0);
      for (int64_t n = bounds[i]; n < bounds[i + 1]; ++n) {
        acc_t* pr = keep_p != nullptr ? keep_p + n * K : pb.data();
        acc_t* qr = keep_q != nullptr ? keep_q + n * K : qb.data();
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (fused) {
            float row[kMoments];
            fused_row_f32(sp + n * s.stride(0), tp + n * t.stride(0), K, it, c, cp.data(),
                          cq.data(), fcol.data(), pr, qr, row, keep_p != nullptr);
            for (int j = 0; j < kMoments; ++j) m.row[n * kMoments + j] = row[j];
            if ((n - bounds[i] + 1) % kColBlock == 0 || n + 1 == bounds[i + 1]) {
              double* col = cols[i].data();
              for (int64_t j = 0; j < kMoments * K; ++j) {
                col[j] += fcol[j];
                fcol[j] = 0.0f;
              }
            }
            continue;
          }
        }
        load_row(sp + n * s.stride(0), s.stride(1), K, pr);
        load_row(tp + n * t.stride(0), t.stride(1), K, qr);
        softmax_inplace(pr, K, it);
        softmax_inplace(qr, K, it);
        acc_t row[kMoments];
        moments(pr, qr, K, c, cp.data(), cq.data(), cols[i].data(), row);
        for (int j = 0; j < kMoments; ++j) m.row[n * kMoments + j] = row[j];
      }
    }
  });
  m.col.assign(kMoments * K, 0.0);
  for (int64_t i = 0; i < parts; ++i) {
    for (int64_t j = 0; j < kMoments * K; ++j) m.col[j] += cols[i][j];
  }
  return m;
}

// Centred sums (suv, suu, svv) from sums shifted by a common constant over n values.
inline CorrTerms centred_terms(const double* su, const double* sv, const double* suv,
                               const double* suu, const double* svv, double n) {
  return corr_terms(*suv - *su * *sv / n, *suu - *su * *su / n, *svv - *sv * *sv / n);
}

inline CorrTerms row_terms(const PearsonMoments& m, int64_t n, int64_t K) {
  const double* r = m.row.data() + n * kMoments;
  return centred_terms(r + kSu, r + kSv, r + kSuv, r + kSuu, r + kSvv, static_cast<double>(K));
}

inline CorrTerms col_terms(const PearsonMoments& m, int64_t k, int64_t K, int64_t N) {
  const double* c = m.col.data() + k;
  return centred_terms(c + kSu * K, c + kSv * K, c + kSuv * K, c + kSuu * K, c + kSvv * K,
                       static_cast<double>(N));
}

std::tuple<at::Tensor, at::Tensor> pearson_cpu(const at::Tensor& student,
                                               const at::Tensor& teacher, double tau) {
  check_pearson_inputs("pearson", student, teacher, tau);
  const int64_t N = student.size(0), K = student.size(1);
  PearsonMoments m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "pearson_cpu",
                                  [&] { m = pearson_moments<scalar_t>(student, teacher, tau); });
  double inter = 0, intra = 0;
  for (int64_t n = 0; n < N; ++n) inter += 1.0 - row_terms(m, n, K).corr;
  for (int64_t k = 0; k < K; ++k) intra += 1.0 - col_terms(m, k, K, N).corr;
  const double t2 = tau * tau;
  return {at::scalar_tensor(t2 * inter / N, student.options()),
          at::scalar_tensor(t2 * intra / K, student.options())};
}

template <typename scalar_t>
void pearson_backward_rows(double g_inter, double g_intra, const at::Tensor& s,
                           const at::Tensor& t, double tau, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.size(0), K = s.size(1);
  // P and Q, kept from the moments pass (allocated through torch so memory tools see them):
  // recomputing both softmaxes in the gradient pass cost more than the moments pass itself.
  const auto acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor pq = at::empty({2, N, K}, s.options().dtype(acc_type));
  acc_t* p_all = pq.mutable_data_ptr<acc_t>();
  acc_t* q_all = p_all + N * K;
  const PearsonMoments m = pearson_moments<scalar_t>(s, t, tau, p_all, q_all);
  const double t2 = tau * tau, c = 1.0 / K;
  // d loss / d P[n, k] per column: [ac | bc | ma | mb], see grad_row_body.
  // With one sample a column is its own mean: centring zeroes it and its gradient exactly;
  // the formula would instead amplify the rounding of (p - mean) by 1 / eps.
  const double gc = N > 1 ? g_intra : 0.0;
  std::vector<acc_t> cols(4 * K);
  for (int64_t k = 0; k < K; ++k) {
    const CorrTerms ct = col_terms(m, k, K, N);
    cols[k] = static_cast<acc_t>(-t2 * gc / K * ct.alpha);
    cols[K + k] = static_cast<acc_t>(t2 * gc / K * ct.beta);
    cols[2 * K + k] = static_cast<acc_t>(m.shift[k] + m.col[kSu * K + k] / N);
    cols[3 * K + k] = static_cast<acc_t>(m.shift[K + k] + m.col[kSv * K + k] / N);
  }
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t it = static_cast<acc_t>(1.0 / tau);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> gb(K), ob(K);
    for (int64_t n = n0; n < n1; ++n) {
      const acc_t* pr = p_all + n * K;
      const acc_t* qr = q_all + n * K;
      const CorrTerms rt = row_terms(m, n, K);
      const double* r = m.row.data() + n * kMoments;
      const acc_t a_row = static_cast<acc_t>(-t2 * g_inter / N * rt.alpha);
      const acc_t b_row = static_cast<acc_t>(t2 * g_inter / N * rt.beta);
      const acc_t mp = static_cast<acc_t>(c + r[kSu] / K), mq = static_cast<acc_t>(c + r[kSv] / K);
      scalar_t* o = op + n * out.stride(0);
      const int64_t os = out.stride(1);
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        if (os == 1) {
          grad_row(pr, qr, K, cols.data(), a_row, b_row, mp, mq, it, gb.data(), o);
          continue;
        }
      }
      grad_row(pr, qr, K, cols.data(), a_row, b_row, mp, mq, it, gb.data(), ob.data());
      for (int64_t k = 0; k < K; ++k) o[k * os] = static_cast<scalar_t>(ob[k]);
    }
  });
}

at::Tensor pearson_backward_cpu(const at::Tensor& grad_inter, const at::Tensor& grad_intra,
                                const at::Tensor& student, const at::Tensor& teacher,
                                double tau) {
  check_pearson_inputs("pearson_backward", student, teacher, tau);
  check_pearson_grads("pearson_backward", grad_inter, grad_intra, student);
  at::Tensor out = at::empty_like(student);
  const double gi = grad_inter.item<double>(), ga = grad_intra.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "pearson_backward_cpu",
      [&] { pearson_backward_rows<scalar_t>(gi, ga, student, teacher, tau, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) {
  m.impl("pearson", &pearson_cpu);
  m.impl("pearson_backward", &pearson_backward_cpu);
}

}  // namespace autokd
