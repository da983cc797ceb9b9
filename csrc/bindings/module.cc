#include "bindings/registry.h"

PYBIND11_MODULE(_engine, m) {
  m.doc() = "autokd torch-free engine: MCTS search engine and memory-mapped feature store";
  for (auto& [name, bind] : autokd::bindings::binders()) bind(m);
}
