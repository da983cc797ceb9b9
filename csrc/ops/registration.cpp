// The one place where the schemas of torch.ops.autokd live. Kernels register their CPU and CUDA
// implementations next to their code (<op>_cpu.cpp, <op>_cuda.cu) with TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd are registered from Python in autokd/ops/<op>.py, except
// softmax_kl's autograd, which is C++ (softmax_kl_autograd.cpp): at logit sizes the Python
// glue cost more than the kernel.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(autokd, m) {
  // softmax_kl: tau^2 * mean over rows of KL(softmax(teacher/tau) || softmax(student/tau)).
  // Rows are dim 0 and the softmax runs over all remaining dims jointly: [R, L] or [R, A, B]
  // (L = A*B), any strides, never copied (logits, N*C x H*W, N x C*H*W, and the channel view
  // f.view(N, C, H*W).transpose(0, 1)). Returns (loss, student_grad): with with_grad,
  // student_grad = d loss / d student for a unit upstream gradient (the autograd backward
  // scales it; the teacher gets none), else an empty [0] tensor. Unlike the other ops, its
  // autograd is registered in C++ (softmax_kl_autograd.cpp): at logit sizes the Python
  // autograd glue cost more than the kernel. Its fake kernel stays in Python.
  m.def(
      "softmax_kl(Tensor student, Tensor teacher, float tau, bool with_grad) -> "
      "(Tensor, Tensor)");

  // pearson: DIST-style (inter, intra) = mean 1 - Pearson of softmax(x/tau) per row and per
  // column of [N, K] (any strides), each times tau^2; eps 1e-8 on the product of the norms.
  // The backward returns the student's gradient only.
  m.def("pearson(Tensor student, Tensor teacher, float tau) -> (Tensor, Tensor)");
  m.def(
      "pearson_backward(Tensor grad_inter, Tensor grad_intra, Tensor student, Tensor teacher, "
      "float tau) -> Tensor");

  // gram_l2: || G_S/||G_S|| - G_T/||G_T|| ||^2 with G = F F^T; mode "sample" ([N, D] -> N x N)
  // or "channel" ([N, C, L] -> one C x C Gram per sample, mean over samples). Returns the loss
  // (0-dim) and gram_grad = dloss/dG_S, which the backward turns into the student's gradient
  // with one GEMM (see csrc/ops/gram_l2.h). The teacher gets no gradient.
  m.def("gram_l2(Tensor student, Tensor teacher, str mode) -> (Tensor, Tensor)");
  m.def("gram_l2_backward(Tensor grad, Tensor gram_grad, Tensor student) -> Tensor");

  // cka: linear CKA between [N, Dx] and [N, Dy]; biased or debiased HSIC. Returns the value
  // (0-dim) and gram_grad [2, N, N] = (dCKA/dK, dCKA/dL), which the backward turns into the
  // gradients of x and y with one GEMM each (see csrc/ops/cka.h).
  m.def("cka(Tensor x, Tensor y, bool debiased) -> (Tensor, Tensor)");
  m.def("cka_backward(Tensor grad, Tensor gram_grad, Tensor x, Tensor y) -> (Tensor, Tensor)");

  // multiscale_pool: adaptive average pool [N, C, H, W] to each s x s grid in `grids`,
  // concatenated to [N, C, sum s^2].
  m.def("multiscale_pool(Tensor input, int[] grids) -> Tensor");
  m.def("multiscale_pool_backward(Tensor grad, SymInt[] input_size, int[] grids) -> Tensor");

  // masked_sgd_step: in-place SGD (momentum, dampening, weight decay, Nesterov) over a list of
  // parameters; masks[i] is None (dense) or a bool keep-mask of params[i]'s shape. Pruned
  // weights and their momentum end exactly zero. momentum_buffers may be empty when momentum == 0;
  // first_step makes the buffers start from the current update (torch.optim.SGD's first step).
  m.def(
      "masked_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor?[] masks, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool first_step) -> ()");

  // masked_adamw_step: in-place AdamW with bias correction for step count `step` (>= 1, after
  // this step) over a list of parameters with optional bool keep-masks; pruned weights,
  // exp_avg and exp_avg_sq end exactly zero.
  m.def(
      "masked_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor?[] masks, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, int step, float lr, float beta1, "
      "float beta2, float eps, float weight_decay) -> ()");
}

// autokd._C is imported for its side effect (registering the ops above); it also tells Python
// whether the CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {
      PyModuleDef_HEAD_INIT, "_C", "autokd compiled kernels (see torch.ops.autokd)", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod != nullptr) PyModule_AddIntConstant(mod, "WITH_CUDA", AUTOKD_WITH_CUDA);
  return mod;
}
