// The one place where the schemas of torch.ops.autokd live. Kernels register their CPU and CUDA
// implementations next to their code (<op>_cpu.cpp, <op>_cuda.cu) with TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd are registered from Python in autokd/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(autokd, m) {
  // softmax_kl: tau^2 * mean over rows of KL(softmax(teacher/tau) || softmax(student/tau)).
  // Rows are dim 0 and the softmax runs over all remaining dims jointly: [R, L] or [R, A, B]
  // (L = A*B), any strides, never copied (logits, N*C x H*W, N x C*H*W, and the channel view
  // f.view(N, C, H*W).transpose(0, 1)). The backward returns the student's gradient only.
  m.def("softmax_kl(Tensor student, Tensor teacher, float tau) -> Tensor");
  m.def("softmax_kl_backward(Tensor grad, Tensor student, Tensor teacher, float tau) -> Tensor");

  // pearson: DIST-style (inter, intra) = mean 1 - Pearson of softmax(x/tau) per row and per
  // column of [N, K] (any strides), each times tau^2; eps 1e-8 on the product of the norms.
  // The backward returns the student's gradient only.
  m.def("pearson(Tensor student, Tensor teacher, float tau) -> (Tensor, Tensor)");
  m.def(
      "pearson_backward(Tensor grad_inter, Tensor grad_intra, Tensor student, Tensor teacher, "
      "float tau) -> Tensor");

  // gram_l2: || G_S/||G_S|| - G_T/||G_T|| ||^2 with G = F F^T; mode "sample" ([N, D] -> N x N)
  // or "channel" ([N, C, L] -> one C x C Gram per sample, mean over samples).
  m.def("gram_l2(Tensor student, Tensor teacher, str mode) -> Tensor");
  m.def("gram_l2_backward(Tensor grad, Tensor student, Tensor teacher, str mode) -> Tensor");

  // cka: linear CKA between [N, Dx] and [N, Dy]; biased or debiased HSIC.
  m.def("cka(Tensor x, Tensor y, bool debiased) -> Tensor");
  m.def("cka_backward(Tensor grad, Tensor x, Tensor y, bool debiased) -> (Tensor, Tensor)");

  // multiscale_pool: adaptive average pool [N, C, H, W] to each s x s grid in `grids`,
  // concatenated to [N, C, sum s^2].
  m.def("multiscale_pool(Tensor input, int[] grids) -> Tensor");
  m.def("multiscale_pool_backward(Tensor grad, SymInt[] input_size, int[] grids) -> Tensor");
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
