// masked_sgd_step: one fused, in-place SGD step over a list of parameters, each with an optional
// boolean keep-mask (sparse training with dense-stored weights).
//
// Per element, with g the gradient, p the weight, b the momentum buffer, m the mask:
//   d = g + weight_decay * p
//   b = d                                       (first_step)
//   b = momentum * b + (1 - dampening) * d      (later steps)
//   u = nesterov ? d + momentum * b : b         (u = d when momentum == 0: no buffer)
//   p = m ? p - lr * u : 0,   b = m ? b : 0
// With every mask true (or absent) this is torch.optim.SGD (maximize=False). Pruned weights and
// their momentum end the step exactly zero whatever their gradient holds (NaN or Inf included),
// so the gradients of pruned weights are ignored.
//
// Inputs: params, grads, momentum_buffers: same length, one device, one floating dtype (the
// optimizer groups by device and dtype); masks: same length, each None (dense) or bool with the
// param's shape. params and momentum_buffers must be contiguous (they are written in place);
// grads and masks may be any layout (a contiguous copy is read). momentum_buffers may be empty
// when momentum == 0. Reads 4 + 1 (mask) + 4 + 4 bytes and writes 8 bytes per fp32 element.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace autokd {

// Validates the shared contract of the masked optimizer steps (lists, devices, dtypes, shapes).
// `states` are the per-parameter state lists written in place (momentum buffers, exp_avg...);
// an empty state list is accepted when `state_optional` (SGD without momentum).
inline void check_masked_step_lists(const char* op, const at::TensorList params,
                                    const at::TensorList grads,
                                    const c10::List<std::optional<at::Tensor>>& masks,
                                    const std::vector<std::pair<const char*, at::TensorList>>& states,
                                    bool state_optional) {
  const size_t n = params.size();
  AUTOKD_CHECK(grads.size() == n, op, "expected grads of length ", n, " (as params), got ",
               grads.size());
  AUTOKD_CHECK(masks.size() == n, op, "expected masks of length ", n, " (as params), got ",
               masks.size());
  for (const auto& [name, list] : states) {
    AUTOKD_CHECK(list.size() == n || (state_optional && list.empty()), op, "expected ", name,
                 " of length ", n, " (as params)", state_optional ? " or empty" : "", ", got ",
                 list.size());
  }
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  for (size_t i = 0; i < n; ++i) {
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string gi = "grads[" + std::to_string(i) + "]";
    const at::Tensor& p = params[i];
    check_defined(op, pi.c_str(), p);
    check_floating(op, pi.c_str(), p);
    AUTOKD_CHECK(p.layout() == at::kStrided, op, "expected ", pi, " to be a dense (strided) tensor, got ",
                 p.layout());
    AUTOKD_CHECK(p.is_contiguous(), op, "expected ", pi,
                 " to be contiguous (it is updated in place), got strides ", p.strides());
    check_same_dtype_device(op, "params[0]", p0, pi.c_str(), p);
    const at::Tensor& g = grads[i];
    check_defined(op, gi.c_str(), g);
    AUTOKD_CHECK(g.layout() == at::kStrided, op, "expected ", gi, " to be a dense (strided) tensor, got ",
                 g.layout());
    check_same_dtype_device(op, pi.c_str(), p, gi.c_str(), g);
    check_same_shape(op, pi.c_str(), p, gi.c_str(), g);
    const std::optional<at::Tensor> m = masks[i];
    if (m.has_value() && m->defined()) {
      const std::string mi = "masks[" + std::to_string(i) + "]";
      AUTOKD_CHECK(m->scalar_type() == at::kBool, op, "expected ", mi, " of dtype Bool, got ",
                   m->scalar_type());
      AUTOKD_CHECK(m->device() == p.device(), op, "expected ", mi, " on the same device as ", pi,
                   " (", p.device(), "), got ", m->device());
      check_same_shape(op, pi.c_str(), p, mi.c_str(), *m);
    }
    for (const auto& [name, list] : states) {
      if (list.empty()) continue;
      const std::string si = std::string(name) + "[" + std::to_string(i) + "]";
      const at::Tensor& s = list[i];
      check_defined(op, si.c_str(), s);
      check_same_dtype_device(op, pi.c_str(), p, si.c_str(), s);
      check_same_shape(op, pi.c_str(), p, si.c_str(), s);
      AUTOKD_CHECK(s.is_contiguous(), op, "expected ", si,
                   " to be contiguous (it is updated in place), got strides ", s.strides());
      AUTOKD_CHECK(!s.is_same(p), op, "expected ", si, " to be a tensor distinct from ", pi,
                   ", got the same tensor");
    }
  }
}

inline void check_masked_sgd_step_inputs(const at::TensorList params, const at::TensorList grads,
                                         const c10::List<std::optional<at::Tensor>>& masks,
                                         const at::TensorList momentum_buffers, double lr,
                                         double momentum, double dampening, double weight_decay,
                                         bool nesterov) {
  const char* op = "masked_sgd_step";
  check_masked_step_lists(op, params, grads, masks, {{"momentum_buffers", momentum_buffers}},
                          /*state_optional=*/momentum == 0.0);
  AUTOKD_CHECK(std::isfinite(lr) && lr >= 0, op, "expected lr >= 0 and finite, got ", lr);
  AUTOKD_CHECK(std::isfinite(momentum) && momentum >= 0, op,
               "expected momentum >= 0 and finite, got ", momentum);
  AUTOKD_CHECK(std::isfinite(dampening), op, "expected dampening finite, got ", dampening);
  AUTOKD_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op,
               "expected weight_decay >= 0 and finite, got ", weight_decay);
  AUTOKD_CHECK(!nesterov || (momentum > 0 && dampening == 0), op,
               "expected momentum > 0 and dampening == 0 with nesterov=True, got momentum=",
               momentum, ", dampening=", dampening);
}

}  // namespace autokd
