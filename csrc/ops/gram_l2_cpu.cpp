// CPU kernels of autokd::gram_l2 (see gram_l2.h for the math): Grams by at::mm/at::bmm, then
// two parallel passes over them with double accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "fast_exp.h"  // AUTOKD_CLONES
#include "gram_l2.h"

namespace autokd {
namespace {

// Rows of this many Gram entries or more are worth a task of their own.
constexpr int64_t kGrainElems = 16384;

// Sums over one Gram row of the student (a) and teacher (b) entries: out = (ss, tt, st).
template <typename T>
__attribute__((always_inline)) inline void moments_row(const T* __restrict a,
                                                       const T* __restrict b, int64_t M,
                                                       double* out) {
  double ss = 0, tt = 0, st = 0;
  // simd reduction: lets the compiler reorder the sums into vector lanes.
#pragma omp simd reduction(+ : ss, tt, st)
  for (int64_t j = 0; j < M; ++j) {
    const double x = a[j], y = b[j];
    ss += x * x;
    tt += y * y;
    st += x * y;
  }
  out[0] = ss;
  out[1] = tt;
  out[2] = st;
}

// One row of gram_grad (g may alias a: each entry is read before it is written); returns the
// row's sum of squared differences of the normalised Grams.
template <typename T>
__attribute__((always_inline)) inline double grad_row(const T* a, const T* __restrict b,
                                                      int64_t M, double inv_ns, double inv_nt,
                                                      double k, double gscale, T* g) {
  double l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < M; ++j) {
    const double ns = a[j] * inv_ns;
    const double d = ns - b[j] * inv_nt;
    l += d * d;
    g[j] = static_cast<T>((d - ns * k) * gscale);
  }
  return l;
}

// float rows compiled for several ISAs (fast_exp.h): 8 doubles a vector on AVX-512 where the
// baseline build has 2 (on 64 x 256 x 8 x 8 channel Grams the two passes took a fifth of the
// forward). double rows run the same bodies, baseline only.
AUTOKD_CLONES void moments_row_f32(const float* a, const float* b, int64_t M, double* out) {
  moments_row<float>(a, b, M, out);
}
AUTOKD_CLONES double grad_row_f32(const float* a, const float* b, int64_t M, double inv_ns,
                                  double inv_nt, double k, double gscale, float* g) {
  return grad_row<float>(a, b, M, inv_ns, inv_nt, k, gscale, g);
}

// Reduces B Grams of M x M (contiguous) and writes gram_grad; returns the loss. gram_grad may
// alias gs: each entry is read before it is overwritten.
template <typename T>
double gram_l2_reduce_cpu(const T* gs, const T* gt, T* gram_grad, int64_t B, int64_t M) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const int64_t rows = B * M;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / M);
  std::vector<double> part(rows * 3);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (f32) {
        moments_row_f32(gs + r * M, gt + r * M, M, part.data() + 3 * r);
      } else {
        moments_row<T>(gs + r * M, gt + r * M, M, part.data() + 3 * r);
      }
    }
  });
  std::vector<GramL2Scalars<double>> sc(B);
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0, tt = 0, st = 0;
    for (int64_t r = b * M; r < (b + 1) * M; ++r) {
      ss += part[3 * r];
      tt += part[3 * r + 1];
      st += part[3 * r + 2];
    }
    sc[b] = gram_l2_scalars<double>(ss, tt, st);
  }
  // The loss is a mean over the B Grams, so each gradient carries 1/B.
  const double inv_b = 1.0 / static_cast<double>(B);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto s = sc[r / M];
      const double gscale = 2.0 * s.inv_ns * inv_b;
      if constexpr (f32) {
        part[r] = grad_row_f32(gs + r * M, gt + r * M, M, s.inv_ns, s.inv_nt, s.k, gscale,
                               gram_grad + r * M);
      } else {
        part[r] = grad_row<T>(gs + r * M, gt + r * M, M, s.inv_ns, s.inv_nt, s.k, gscale,
                              gram_grad + r * M);
      }
    }
  });
  double loss = 0;
  for (int64_t r = 0; r < rows; ++r) loss += part[r];
  return loss * inv_b;
}

at::Tensor gram(const at::Tensor& f, GramMode m) {
  return m == GramMode::kSample ? at::mm(f, f.t()) : at::bmm(f, f.transpose(1, 2));
}

std::tuple<at::Tensor, at::Tensor> gram_l2_cpu(const at::Tensor& student,
                                               const at::Tensor& teacher,
                                               c10::string_view mode) {
  const GramMode m = check_gram_l2_inputs(student, teacher, mode);
  const auto acc = gram_acc_type(student.scalar_type());
  // [N, N] or [N, C, C]
  const at::Tensor gs = gram(student.to(acc), m).contiguous();
  const at::Tensor gt = gram(teacher.to(acc), m).contiguous();
  const int64_t B = m == GramMode::kSample ? 1 : gs.size(0);
  const int64_t M = gs.size(-1);
  // gram_grad takes over G_S's buffer: one Gram-sized buffer less at the peak.
  at::Tensor gram_grad = gs;
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "gram_l2_cpu", [&] {
    loss = gram_l2_reduce_cpu<scalar_t>(gs.const_data_ptr<scalar_t>(),
                                        gt.const_data_ptr<scalar_t>(),
                                        gram_grad.mutable_data_ptr<scalar_t>(), B, M);
  });
  return {at::scalar_tensor(loss, student.options()), gram_grad};
}

at::Tensor gram_l2_backward_cpu(const at::Tensor& grad, const at::Tensor& gram_grad,
                                const at::Tensor& student) {
  check_gram_l2_backward_inputs(grad, gram_grad, student);
  const auto acc = gram_grad.scalar_type();
  // On the CPU reading the incoming gradient costs no synchronisation; as the GEMM's alpha it
  // needs neither a scaled copy of gram_grad nor a pass over the result.
  const double alpha = 2.0 * grad.item<double>();
  const at::Tensor f = student.to(acc);
  at::Tensor out = at::empty(f.sizes(), f.options());
  if (student.dim() == 2) {
    out.addmm_(gram_grad, f, /*beta=*/0, alpha);  // beta = 0: out's contents are never read
  } else {
    out.baddbmm_(gram_grad, f, /*beta=*/0, alpha);
  }
  return out.to(student.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, CPU, m) {
  m.impl("gram_l2", &gram_l2_cpu);
  m.impl("gram_l2_backward", &gram_l2_backward_cpu);
}

}  // namespace autokd
