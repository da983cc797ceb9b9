// Autograd of softmax_kl, registered in C++ for the Autograd dispatch key (all devices: the
// backward is one device-agnostic multiply). Math and layouts: softmax_kl.h.
//
// Why C++ and not torch.library.register_autograd in autokd/ops/softmax_kl.py like the other
// ops: the cost per call at small sizes. softmax_kl is also the logit-KD loss, called once per
// step on inputs such as [128, 100] logits. There the Python autograd glue (setup_context in
// the forward, the backward function and its context in the backward) cost ~11 + ~18 us per
// call, more than the kernel (~21 us then), and held forward+backward at 1.8x the eager
// reference; this node costs ~2 us (benchmarks/results/ops-kl.md). It does the same work
// without leaving C++:
// - forward: the op below autograd; with with_grad its second result, d loss / d student for
//   a unit upstream gradient, is saved (without with_grad the inputs are saved instead);
// - backward: grad * saved gradient (or the gradient recomputed by the op when it was not
//   saved); the teacher is a constant and gets no gradient; the second result is
//   non-differentiable and gets no zero-filled gradient (materialize_grads off).
// When grad mode is off or no input requires grad, the op runs below autograd with no node.
// The fake (meta) kernel stays in Python (autokd/ops/softmax_kl.py). torch.func transforms
// that differentiate (grad, vjp) refuse C++ autograd Functions; they did not support the
// Python registration either (no vmap rule), and vmap without gradients still works.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace autokd {
namespace {

using KlOutput = std::tuple<at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<KlOutput(const at::Tensor&, const at::Tensor&, double, bool)>&
softmax_kl_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("autokd::softmax_kl", "")
                             .typed<KlOutput(const at::Tensor&, const at::Tensor&, double, bool)>();
  return op;
}

KlOutput softmax_kl_below_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                   double tau, bool with_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return softmax_kl_op().call(student, teacher, tau, with_grad);
}

class SoftmaxKlFunction : public torch::autograd::Function<SoftmaxKlFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& student,
                                                const at::Tensor& teacher, double tau,
                                                bool with_grad) {
    auto [loss, student_grad] = softmax_kl_below_autograd(student, teacher, tau, with_grad);
    ctx->mark_non_differentiable({student_grad});
    ctx->set_materialize_grads(false);
    // What was saved tells the backward which case it is in (one tensor: the gradient).
    if (with_grad) {
      ctx->save_for_backward({student_grad});
    } else {  // called without the gradient (not through autokd.ops.softmax_kl): recompute it
      ctx->save_for_backward({student, teacher});
      ctx->saved_data["tau"] = tau;
    }
    return {loss, student_grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& grad = grads[0];  // [] upstream gradient of the loss
    at::Tensor grad_student;
    if (ctx->needs_input_grad(0) && grad.defined()) {
      const auto saved = ctx->get_saved_variables();
      at::Tensor student_grad;
      if (saved.size() == 1) {
        student_grad = saved[0];
      } else {
        student_grad =
            std::get<1>(softmax_kl_op().call(saved[0], saved[1],
                                             ctx->saved_data["tau"].toDouble(), true));
      }
      grad_student = at::mul(grad, student_grad);
    }
    return {grad_student, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

KlOutput softmax_kl_autograd(const at::Tensor& student, const at::Tensor& teacher, double tau,
                             bool with_grad) {
  // Same condition as for any autograd op: a node only when something requires grad. (The
  // teacher alone requiring grad still gets a node, so the loss requires grad as it would
  // with an eager loss; its gradient stays None.)
  if (!at::GradMode::is_enabled() || !(student.requires_grad() || teacher.requires_grad())) {
    return softmax_kl_below_autograd(student, teacher, tau, with_grad);
  }
  auto out = SoftmaxKlFunction::apply(student, teacher, tau, with_grad);
  return {std::move(out[0]), std::move(out[1])};
}

}  // namespace

TORCH_LIBRARY_IMPL(autokd, Autograd, m) { m.impl("softmax_kl", &softmax_kl_autograd); }

}  // namespace autokd
