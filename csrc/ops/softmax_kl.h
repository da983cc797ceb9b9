// softmax_kl: temperature KL distillation over the rows of an [R, L] view.
//
//   loss = tau^2 / R * sum_r KL(softmax(t_r / tau) || softmax(s_r / tau))
//   KL_r = sum_j q_j (y_j - x_j) - (m_y + log Z_y) + (m_x + log Z_x),
//   x = s / tau, y = t / tau, q = softmax(y), m = row max, Z = sum_j exp(. - m)
//   d loss / d s_r = grad * tau / R * (softmax(x_r) - softmax(y_r)); the teacher is a constant.
//
// Rows are dim 0; the softmax runs over all remaining dims jointly, so student and teacher are
// [R, L] or [R, A, B] (L = A * B) with any strides. One kernel thus serves logit KD ([N, K]),
// channel-wise KD ([N*C, H*W]), sample-wise ([N, C*H*W]) and the channel view
// f.view(N, C, H*W).transpose(0, 1) = [C, N, H*W] without copying.
//
// with_grad: the forward also returns d loss / d student (for a unit upstream gradient, in the
// student's strides where it is dense), computed from the same exps as the loss; the autograd
// backward only scales it. Loss and gradient then cost one read of each input, one write of
// the gradient and 2 exps per element pair, where a separate backward would recompute the row
// normalisers. Without with_grad the second result is an empty [0] tensor.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "checks.h"

namespace autokd {

inline void check_softmax_kl_inputs(const char* op, const at::Tensor& student,
                                    const at::Tensor& teacher, double tau) {
  check_defined(op, "student", student);
  check_defined(op, "teacher", teacher);
  AUTOKD_CHECK(student.dim() == 2 || student.dim() == 3, op,
               "expected student of shape [R, L] or [R, A, B], got ", shape_str(student));
  check_same_shape(op, "student", student, "teacher", teacher);
  check_same_dtype_device(op, "student", student, "teacher", teacher);
  check_floating(op, "student", student);
  check_nonempty(op, "student", student);
  check_positive(op, "tau", tau);
}

// Rows of an [R, L] or [R, A, B] tensor as A segments of B elements each (strides in
// elements). Segments that lie back to back are merged into one, so contiguous rank-3 inputs
// run as a single segment per row.
struct RowLayout {
  int64_t rows, A, B;  // row r = A segments of B elements
  int64_t sr, sa, sb;  // strides of row, segment, element
};

inline RowLayout row_layout(const at::Tensor& t, bool merge) {
  RowLayout l{};
  l.rows = t.size(0);
  l.sr = t.stride(0);
  if (t.dim() == 2) {
    l.A = 1;
    l.B = t.size(1);
    l.sa = 0;
    l.sb = t.stride(1);
  } else {
    l.A = t.size(1);
    l.B = t.size(2);
    l.sa = t.stride(1);
    l.sb = t.stride(2);
  }
  if (l.B == 1) {  // [R, A, 1]: walk A instead of A segments of one element
    l.B = l.A;
    l.sb = l.sa;
    l.A = 1;
    l.sa = 0;
  }
  if (merge && l.A > 1 && l.sa == l.B * l.sb) {
    l.B *= l.A;
    l.A = 1;
    l.sa = 0;
  }
  return l;
}

// Layouts of several tensors of one shape walked together: segments merge only if they merge
// in all of them.
template <size_t n>
std::array<RowLayout, n> row_layouts(const std::array<const at::Tensor*, n>& ts) {
  std::array<RowLayout, n> out;
  bool same = true;
  for (size_t i = 0; i < n; ++i) {
    out[i] = row_layout(*ts[i], true);
    same = same && out[i].A == out[0].A;
  }
  if (!same) {
    for (size_t i = 0; i < n; ++i) out[i] = row_layout(*ts[i], false);
  }
  return out;
}

}  // namespace autokd
