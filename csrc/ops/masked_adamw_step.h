// masked_adamw_step: one fused, in-place AdamW step (decoupled weight decay, Loshchilov & Hutter
// 2019) over a list of parameters, each with an optional boolean keep-mask.
//
// Per element, with t = step (the step count after this step, t >= 1):
//   p   = p * (1 - lr * weight_decay)
//   m1  = m1 + (1 - beta1) * (g - m1)                  (exp_avg, a lerp as in torch)
//   m2  = beta2 * m2 + (1 - beta2) * g * g             (exp_avg_sq)
//   p   = p - (lr / (1 - beta1^t)) * m1 / (sqrt(m2) / sqrt(1 - beta2^t) + eps)
//   mask false: p = m1 = m2 = 0 (gradient ignored)
// With every mask true (or absent) this is torch.optim.AdamW (amsgrad=False, maximize=False) for
// parameters that share one step count. All of one call share `step`; the optimizer groups
// parameters by step count, device and dtype.
//
// Inputs as masked_sgd_step: params, grads, exp_avgs, exp_avg_sqs of one device and floating
// dtype and equal shapes; masks None or bool of the param's shape; the written lists contiguous.
#pragma once

#include "masked_sgd_step.h"

namespace autokd {

inline void check_masked_adamw_step_inputs(const at::TensorList params,
                                           const at::TensorList grads,
                                           const c10::List<std::optional<at::Tensor>>& masks,
                                           const at::TensorList exp_avgs,
                                           const at::TensorList exp_avg_sqs, int64_t step,
                                           double lr, double beta1, double beta2, double eps,
                                           double weight_decay) {
  const char* op = "masked_adamw_step";
  check_masked_step_lists(op, params, grads, masks,
                          {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                          /*state_optional=*/false);
  AUTOKD_CHECK(step >= 1, op, "expected step >= 1 (the count after this step), got ", step);
  AUTOKD_CHECK(std::isfinite(lr) && lr >= 0, op, "expected lr >= 0 and finite, got ", lr);
  AUTOKD_CHECK(beta1 >= 0 && beta1 < 1, op, "expected beta1 in [0, 1), got ", beta1);
  AUTOKD_CHECK(beta2 >= 0 && beta2 < 1, op, "expected beta2 in [0, 1), got ", beta2);
  AUTOKD_CHECK(std::isfinite(eps) && eps >= 0, op, "expected eps >= 0 and finite, got ", eps);
  AUTOKD_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op,
               "expected weight_decay >= 0 and finite, got ", weight_decay);
}

}  // namespace autokd
