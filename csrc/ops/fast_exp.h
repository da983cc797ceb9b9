// Vectorisable exp for the fused softmax losses on CPU.
//
// The CPU kernels of softmax_kl and pearson spend most of their time in exp. std::exp is an
// opaque libm call that the compiler cannot vectorise (glibc only exposes SIMD variants under
// -ffast-math), so float rows use a branch-free Cephes-style expf instead:
//   exp(x) = 2^n * e^r,  n = round(x / ln 2),  r = x - n ln 2 (split in two constants),
//   e^r ~ 1 + r + r^2 P(r) (degree-5 minimax P), |rel. error| < 2 ulp on [-87.3, 0].
// Arguments are clamped below at -87.3 (the result stays a normal float, ~1e-38, which is
// negligible in every sum it enters); callers only pass x - max(x) <= 0.
// Double rows use std::exp: they are the accuracy path, not the speed path.
//
// Hot loops that call fast_exp are compiled for several ISAs through AUTOKD_CLONES (x86-64-v4,
// AVX2, baseline), dispatched once at load time, because setup.py builds for the baseline ISA.
// x86-64-v4 is AVX-512 F/VL/DQ/BW: with "avx512f" alone (no VL) GCC builds each two-source
// shuffle of 8 floats from two permutes and a blend (measured on a former 8 x 8 multiscale_pool
// kernel: ~5.1 vs ~4.2 ns per plane).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AUTOKD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define AUTOKD_CLONES
#endif

namespace autokd {

// exp(x) for x already clamped to [-87.3, 0] (or NaN), for F = float with U = uint32_t and for
// the 16-lane vectors below: one reduction and polynomial for both. (-Wpsabi: see below.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename F, typename U>
__attribute__((always_inline)) inline F fast_exp_clamped(F x) {
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (floor would need SSE4.1). The magic number
  // also carries the exponent bias 127, so the low 9 bits of `shifted` are n + 127, the biased
  // exponent of 2^n (n in [-126, 0] here): one shift builds 2^n, no subtraction.
  constexpr float kMagic = 12582912.0f + 127.0f;
  const F shifted = x * 1.44269504088896341f + kMagic;
  const F n = shifted - kMagic;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F er = p * r * r + r + 1.0f;
  const U bits = __builtin_bit_cast(U, shifted) << 23;
  return er * __builtin_bit_cast(F, bits);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

__attribute__((always_inline)) inline float fast_exp(float x) {
  // Clamp as a bit blend: a float max or a ternary turns into a branch that stops the
  // vectoriser on AVX2 and the baseline ISA.
  constexpr float kLo = -87.3f;
  int32_t xi, lo;
  std::memcpy(&xi, &x, sizeof(xi));
  std::memcpy(&lo, &kLo, sizeof(lo));
  const int32_t keep = -static_cast<int32_t>(x > kLo);
  xi = (xi & keep) | (lo & ~keep);
  std::memcpy(&x, &xi, sizeof(x));
  return fast_exp_clamped<float, uint32_t>(x);
}

__attribute__((always_inline)) inline double fast_exp(double x) { return std::exp(x); }

// 16 floats as one GCC vector: one AVX-512 register, two AVX2 or four SSE ones, whichever ISA
// the caller is compiled for (AUTOKD_CLONES). Loops written over whole vectors with this type
// need no scalar tail: the last, partial vector of a row is a masked one (softmax_kl's
// short-row kernel), where an auto-vectorised loop runs its tail one exp per element.
//
// These vectors only live inside always_inline functions and the cloned functions that inline
// them, never crossing a call, so GCC's note that passing them changes the ABI without
// AVX-512 (-Wpsabi) does not apply; files defining such functions silence it around them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
using f32x16 = float __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
using u32x16 = uint32_t __attribute__((vector_size(64)));

// fast_exp(float) above on 16 lanes: the same clamp, reduction and polynomial.
__attribute__((always_inline)) inline f32x16 fast_exp(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.3f;
  x = x > lo ? x : lo;  // a lane select; NaN lanes become lo, as in the scalar version
  return fast_exp_clamped<f32x16, u32x16>(x);
}

// Unaligned loads and stores, lane-wise max, and horizontal sum and max of 16 floats.
__attribute__((always_inline)) inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

using f32x8 = float __attribute__((vector_size(32)));
using f32x4 = float __attribute__((vector_size(16)));

__attribute__((always_inline)) inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store16(float* p, f32x16 v) {
  std::memcpy(p, &v, sizeof(v));
}

__attribute__((always_inline)) inline f32x16 max16(f32x16 a, f32x16 b) { return b > a ? b : a; }

// Pairwise by halves: 4 dependent steps instead of 15.
__attribute__((always_inline)) inline float hsum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                  __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

__attribute__((always_inline)) inline float hmax16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 a2 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x8 m8 = a2 > a ? a2 : a;
  const f32x4 b = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
  const f32x4 b2 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const f32x4 m4 = b2 > b ? b2 : b;
  const float m0 = m4[2] > m4[0] ? m4[2] : m4[0];
  const float m1 = m4[3] > m4[1] ? m4[3] : m4[1];
  return m1 > m0 ? m1 : m0;
}

// A row of n >= 16 floats as whole vectors over [0, nv) and, when nv < n, one last vector at
// o = n - 16 that overlaps the one before: only its lanes in `live` (the row's last n - nv
// elements) are new, and sums select them. Loops over whole vectors then need no scalar tail,
// which on a logits row (n = 100) costs as much as the vector loop: each of its iterations
// runs the exps one lane at a time.
struct RowVectors {
  int64_t nv, o;
  i32x16 live;
  explicit RowVectors(int64_t n) : nv(n - n % 16), o(n - 16) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    live = lane >= static_cast<int32_t>(nv - o);
  }
  bool overlap() const { return nv - o < 16; }
};

// Folds the row x, y (laid out as v) into the lane-wise maxima mx, my; lanes of the last vector
// seen twice do not change a max.
__attribute__((always_inline)) inline void max16_row(const float* x, const float* y,
                                                     const RowVectors& v, f32x16& mx,
                                                     f32x16& my) {
  for (int64_t j = 0; j < v.nv; j += 16) {
    mx = max16(mx, load16(x + j));
    my = max16(my, load16(y + j));
  }
  mx = max16(mx, load16(x + v.o));
  my = max16(my, load16(y + v.o));
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace autokd
