// autokd._engine.MCTS: the C++ MCTS engine (csrc/engine/mcts/mcts.h) seen from Python with
// designs as {level: option} dicts. autokd/search/mcts.py is the public face.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <stdexcept>

#include "bindings/registry.h"
#include "engine/mcts/mcts.h"

namespace py = pybind11;
using autokd::mcts::Design;
using autokd::mcts::MCTS;

namespace {

// The engine plus interned Python strings for level and option names, so a proposal's dict is
// built from existing objects (no string allocation per ask).
class PyMCTS {
 public:
  explicit PyMCTS(std::unique_ptr<MCTS> engine) : e_(std::move(engine)) {
    for (const auto& lv : e_->options().levels) {
      names_.emplace_back(lv.name);
      std::vector<py::str> opts;
      for (const auto& o : lv.options) opts.emplace_back(o);
      options_.push_back(std::move(opts));
    }
  }

  py::dict design_dict(const Design& d) const {
    auto out = py::reinterpret_steal<py::dict>(_PyDict_NewPresized(Py_ssize_t(d.size())));
    if (!out) throw py::error_already_set();
    for (size_t l = 0; l < d.size(); ++l)
      if (d[l] >= 0 && PyDict_SetItem(out.ptr(), names_[l].ptr(), options_[l][size_t(d[l])].ptr()) != 0)
        throw py::error_already_set();
    return out;
  }

  Design design_of(const py::handle& obj, const std::string& where) const {
    if (!py::isinstance<py::dict>(obj))
      throw std::invalid_argument(where + ": expected a design dict {level: option}, got " +
                                  std::string(py::str(py::type::of(obj).attr("__name__"))));
    std::vector<std::pair<std::string, std::string>> items;
    for (auto kv : py::reinterpret_borrow<py::dict>(obj)) {
      if (!py::isinstance<py::str>(kv.first) || !py::isinstance<py::str>(kv.second))
        throw std::invalid_argument(where + ": design keys and values must be strings, got " +
                                    std::string(py::repr(kv.first)) + ": " + std::string(py::repr(kv.second)));
      items.emplace_back(kv.first.cast<std::string>(), kv.second.cast<std::string>());
    }
    try {
      return e_->design_from_names(items);
    } catch (const std::invalid_argument& err) {
      throw std::invalid_argument(where + ": " + err.what());
    }
  }

  MCTS& engine() { return *e_; }
  const std::vector<py::str>& names() const { return names_; }
  const std::vector<std::vector<py::str>>& option_names() const { return options_; }

 private:
  std::unique_ptr<MCTS> e_;
  std::vector<py::str> names_;
  std::vector<std::vector<py::str>> options_;
};

// A GIL release and re-acquire costs about as much as asking a few designs; short calls keep it
// (no deadlock: the engine's mutex is never held while the GIL is awaited).
constexpr int64_t kReleaseGilFrom = 8;

py::object maybe(bool ok, double v) { return ok ? py::object(py::float_(v)) : py::object(py::none()); }

std::unique_ptr<PyMCTS> make(const py::list& levels, double exploration, uint64_t seed, bool normalize,
                             const std::string& on_repeat, uint64_t max_nodes, double virtual_loss,
                             uint32_t max_retries) {
  autokd::mcts::Options o;
  for (auto item : levels) {
    // (name, [options], [(earlier level, [allowed options]), ...]); autokd/search/mcts.py
    // checks Python types before this point.
    auto t = item.cast<py::tuple>();
    autokd::mcts::Level lv;
    lv.name = t[0].cast<std::string>();
    lv.options = t[1].cast<std::vector<std::string>>();
    lv.requires_ = t[2].cast<std::vector<std::pair<std::string, std::vector<std::string>>>>();
    o.levels.push_back(std::move(lv));
  }
  o.exploration = exploration;
  o.seed = seed;
  o.normalize_rewards = normalize;
  if (on_repeat == "reuse") o.on_repeat = autokd::mcts::OnRepeat::kReuse;
  else if (on_repeat == "average") o.on_repeat = autokd::mcts::OnRepeat::kAverage;
  else throw std::invalid_argument("MCTS: expected on_repeat 'reuse' or 'average', got '" + on_repeat + "'");
  o.max_nodes = max_nodes;
  o.virtual_loss = virtual_loss;
  o.max_retries = max_retries;
  return std::make_unique<PyMCTS>(std::make_unique<MCTS>(std::move(o)));
}

void bind(py::module_& m) {
  // Base class of autokd.search.mcts.MCTS, which adds argument parsing; ask and tell stay
  // pybind11 methods so a search loop pays no extra Python call.
  py::class_<PyMCTS>(m, "MCTS", "C++ MCTS engine; use autokd.search.mcts.MCTS")
      .def(py::init(&make), py::arg("levels"), py::arg("exploration"), py::arg("seed"),
           py::arg("normalize_rewards"), py::arg("on_repeat"), py::arg("max_nodes"),
           py::arg("virtual_loss"), py::arg("max_retries"))
      .def(py::init([](const py::bytes& blob) {
             std::string data = blob;
             std::unique_ptr<MCTS> e;
             {
               py::gil_scoped_release nogil;
               e = std::make_unique<MCTS>(MCTS::deserialize(data));
             }
             return std::make_unique<PyMCTS>(std::move(e));
           }),
           py::arg("blob"))
      .def("ask",
           [](PyMCTS& self, int64_t k) {
             if (k < 0) throw std::invalid_argument("MCTS.ask: expected k >= 0, got " + std::to_string(k));
             std::vector<autokd::mcts::Trial> trials;
             if (k < kReleaseGilFrom) {
               trials = self.engine().ask(uint64_t(k));
             } else {
               py::gil_scoped_release nogil;
               trials = self.engine().ask(uint64_t(k));
             }
             py::list out(trials.size());
             for (size_t i = 0; i < trials.size(); ++i)
               out[i] = py::make_tuple(py::int_(trials[i].id), self.design_dict(trials[i].design));
             return out;
           },
           py::arg("k") = 1,
           "k proposals [(trial_id, {level: option})], each pending until told.")
      .def("tell",
           [](PyMCTS& self, int64_t id, double reward) {
             if (id < 0) throw std::invalid_argument("MCTS.tell: unknown trial id " + std::to_string(id) + " (never asked)");
             self.engine().tell(uint64_t(id), reward);  // ~0.3 us: cheaper than a GIL release
           },
           py::arg("trial_id"), py::arg("reward"),
           "Reward of a pending trial, in any order; NaN/Inf or an unknown or already told id -> ValueError.")
      .def("_tell_history",
           [](PyMCTS& self, const py::list& history) {
             std::vector<std::pair<Design, double>> items;
             for (size_t i = 0; i < history.size(); ++i) {
               const std::string where = "MCTS.from_history: entry " + std::to_string(i);
               py::handle h = history[i];
               if (!py::isinstance<py::tuple>(h) && !py::isinstance<py::list>(h))
                 throw std::invalid_argument(where + ": expected (design, reward)");
               auto seq = py::reinterpret_borrow<py::sequence>(h);
               if (seq.size() != 2) throw std::invalid_argument(where + ": expected (design, reward)");
               Design d = self.design_of(seq[0], where);
               double r = seq[1].cast<double>();
               if (!std::isfinite(r))
                 throw std::invalid_argument(where + ": expected a finite reward, got " + std::string(py::repr(seq[1])));
               items.emplace_back(std::move(d), r);
             }
             py::gil_scoped_release nogil;
             for (auto& [d, r] : items) self.engine().tell_design(d, r);
           })
      .def_property_readonly("num_told", [](PyMCTS& s) { return s.engine().num_told(); })
      .def_property_readonly("num_pending", [](PyMCTS& s) { return s.engine().num_pending(); })
      .def_property_readonly("num_reused", [](PyMCTS& s) { return s.engine().num_reused(); })
      .def_property_readonly("num_nodes", [](PyMCTS& s) { return s.engine().num_nodes(); })
      .def("num_designs",
           [](PyMCTS& s) {
             const std::string n = s.engine().num_designs();
             if (n.empty())
               throw std::invalid_argument(
                   "MCTS.num_designs: the space's dependencies are too entangled to count exactly "
                   "(more than 2^16 dependency states)");
             return py::reinterpret_steal<py::object>(PyLong_FromString(n.c_str(), nullptr, 10));
           })
      .def("best",
           [](PyMCTS& s) -> py::object {
             Design d;
             double r;
             if (!s.engine().best(&d, &r)) return py::none();
             return py::make_tuple(s.design_dict(d), r);
           })
      .def("tree",
           [](PyMCTS& s) {
             std::vector<autokd::mcts::NodeInfo> nodes;
             {
               py::gil_scoped_release nogil;
               nodes = s.engine().tree();
             }
             py::list out(nodes.size());
             for (size_t i = 0; i < nodes.size(); ++i) {
               const auto& n = nodes[i];
               py::dict d;
               const bool root = n.parent < 0;
               d["id"] = n.id;
               d["parent"] = root ? py::object(py::none()) : py::object(py::int_(n.parent));
               d["level"] = root ? py::object(py::none()) : py::object(s.names()[size_t(n.level)]);
               d["option"] = root ? py::object(py::none())
                                  : py::object(s.option_names()[size_t(n.level)][size_t(n.option)]);
               d["visits"] = n.visits;
               d["pending"] = n.pending;
               d["mean_reward"] = maybe(n.visits > 0, n.sum_reward / double(n.visits));
               d["best_reward"] = maybe(n.visits > 0, n.best_reward);
               out[i] = std::move(d);
             }
             return out;
           })
      .def("level_stats",
           [](PyMCTS& s) {
             auto stats = s.engine().level_stats();
             py::dict out;
             for (size_t l = 0; l < stats.size(); ++l) {
               py::dict lvl;
               for (size_t o = 0; o < stats[l].size(); ++o) {
                 const auto& st = stats[l][o];
                 py::dict e;
                 e["visits"] = st.visits;
                 e["mean"] = maybe(st.visits > 0, st.sum / double(st.visits));
                 e["best"] = maybe(st.visits > 0, st.best);
                 lvl[s.option_names()[l][o]] = std::move(e);
               }
               out[s.names()[l]] = std::move(lvl);
             }
             return out;
           })
      .def("_levels_list",
           [](PyMCTS& s) {
             py::list out;
             for (const auto& lv : s.engine().options().levels) {
               py::dict d;
               d["name"] = lv.name;
               d["options"] = lv.options;
               if (!lv.requires_.empty()) {
                 py::dict req;
                 for (const auto& [name, allowed] : lv.requires_) req[py::str(name)] = allowed;
                 d["requires"] = std::move(req);
               }
               out.append(std::move(d));
             }
             return out;
           })
      .def("_options_dict",
           [](PyMCTS& s) {
             const auto& o = s.engine().options();
             py::dict d;
             d["exploration"] = o.exploration;
             d["seed"] = o.seed;
             d["normalize_rewards"] = o.normalize_rewards;
             d["on_repeat"] = o.on_repeat == autokd::mcts::OnRepeat::kReuse ? "reuse" : "average";
             d["max_nodes"] = o.max_nodes;
             d["virtual_loss"] = o.virtual_loss;
             d["max_retries"] = o.max_retries;
             return d;
           })
      .def("serialize",
           [](PyMCTS& s) {
             std::string blob;
             {
               py::gil_scoped_release nogil;
               blob = s.engine().serialize();
             }
             return py::bytes(blob);
           })
      ;
}

}  // namespace

AUTOKD_ENGINE_BINDING(mcts, bind);
