// autokd._engine is one pybind11 module assembled from independent parts (MCTS engine, feature
// store, ...). Each part registers a binder with AUTOKD_ENGINE_BINDING in its own .cc file, so
// parts can be added without editing a central list; module.cc runs the binders in name order.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <map>
#include <string>

namespace autokd::bindings {

using Binder = std::function<void(pybind11::module_&)>;

inline std::map<std::string, Binder>& binders() {
  static std::map<std::string, Binder> registry;
  return registry;
}

struct Register {
  Register(const char* name, Binder fn) { binders().emplace(name, std::move(fn)); }
};

}  // namespace autokd::bindings

#define AUTOKD_ENGINE_CONCAT2(a, b) a##b
#define AUTOKD_ENGINE_CONCAT(a, b) AUTOKD_ENGINE_CONCAT2(a, b)
// Usage (at namespace scope): AUTOKD_ENGINE_BINDING(mcts, [](pybind11::module_& m) { ... });
#define AUTOKD_ENGINE_BINDING(name, fn)                                             \
  static ::autokd::bindings::Register AUTOKD_ENGINE_CONCAT(autokd_binding_, name)( \
      #name, fn)
