// autokd._engine.MCTS: the C++ MCTS engine (csrc/engine/mcts/mcts.h) seen from Python, with
// designs as {level: option} dicts (ask, tell) or as numpy rows of option indices (ask_many,
// tell_many, decode). autokd/search/mcts.py is the public face.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
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

  py::dict design_dict(const int32_t* d) const {
    py::dict out;
    for (size_t l = 0; l < names_.size(); ++l)
      if (d[l] >= 0) out[names_[l]] = options_[l][size_t(d[l])];
    return out;
  }
  py::dict design_dict(const Design& d) const { return design_dict(d.data()); }

  // Names of a caller's row of option indices: each an option of its level or -1; the levels'
  // requirements are not checked (rows from ask_many always meet them).
  py::dict decode_row(const int64_t* row, size_t i) const {
    const size_t L = names_.size();
    std::vector<int32_t> d(L);
    for (size_t l = 0; l < L; ++l) {
      const int64_t v = row[l];
      if (v < -1 || v >= int64_t(options_[l].size()))
        throw std::invalid_argument("MCTS.decode: design " + std::to_string(i) + " has option index " +
                                    std::to_string(v) + " for level '" + std::string(py::str(names_[l])) +
                                    "', expected -1 (absent) or 0.." + std::to_string(options_[l].size() - 1));
      d[l] = int32_t(v);
    }
    return design_dict(d.data());
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

// numpy.asarray(obj), without the import and call when obj is an array already.
py::array as_array(const py::object& obj) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  return py::module_::import("numpy").attr("asarray")(obj);
}

py::object maybe(bool ok, double v) { return ok ? py::object(py::float_(v)) : py::object(py::none()); }

std::unique_ptr<PyMCTS> make(const py::list& levels, const std::string& selection, double prior_strength,
                             double exploration, uint64_t seed, bool normalize,
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
  if (selection == "uct") o.selection = autokd::mcts::Selection::kUct;
  else if (selection == "thompson") o.selection = autokd::mcts::Selection::kThompson;
  else throw std::invalid_argument("MCTS: expected selection 'uct' or 'thompson', got '" + selection + "'");
  o.prior_strength = prior_strength;
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

// ask(k) as [(trial_id, {level: option})].
py::list ask_list(PyMCTS& self, int64_t k) {
  if (k < 0) throw std::invalid_argument("MCTS.ask: expected k >= 0, got " + std::to_string(k));
  const size_t L = self.engine().num_levels();
  // The proposals land in local buffers first: building the Python objects can run arbitrary
  // Python code (a collection's finalizers), which may ask again on this engine.
  const size_t n = static_cast<size_t>(k);
  std::vector<uint64_t> ids(n);
  std::vector<int32_t> rows(n * L);
  if (k < kReleaseGilFrom) {
    self.engine().ask_many(uint64_t(k), ids.data(), rows.data());
  } else {
    py::gil_scoped_release nogil;
    self.engine().ask_many(uint64_t(k), ids.data(), rows.data());
  }
  py::list out(n);
  for (size_t i = 0; i < n; ++i) out[i] = py::make_tuple(ids[i], self.design_dict(rows.data() + i * L));
  return out;
}

// tell(trial_id, reward): a Python int of any size; negative or over 2^64 is an id no ask gave.
void tell_one(PyMCTS& self, const py::int_& id_obj, double reward) {
  const unsigned long long id = PyLong_AsUnsignedLongLong(id_obj.ptr());
  if (id == (unsigned long long)-1 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    throw std::invalid_argument("MCTS.tell: unknown trial id " + std::string(py::str(id_obj)) + " (never asked)");
  }
  self.engine().tell(uint64_t(id), reward);  // ~0.3 us: cheaper than a GIL release
}

void bind(py::module_& m) {
  // Base class of autokd.search.mcts.MCTS, which adds argument parsing; ask and tell stay
  // methods of this class so a search loop pays no extra Python call.
  py::class_<PyMCTS> cls(m, "MCTS", "C++ MCTS engine; use autokd.search.mcts.MCTS");
  cls
      .def(py::init(&make), py::arg("levels"), py::arg("selection"), py::arg("prior_strength"),
           py::arg("exploration"), py::arg("seed"),
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
      .def("ask", &ask_list, py::arg("k") = 1,
           "ask(k=1): k proposals [(trial_id, {level: option})], each pending until told.")
      .def("tell", &tell_one, py::arg("trial_id"), py::arg("reward"),
           "tell(trial_id, reward): reward of a pending trial, in any order; NaN/Inf or an unknown or "
           "already told id -> ValueError.")
      .def("ask_many",
           [](PyMCTS& self, int64_t k) {
             if (k < 0) throw std::invalid_argument("MCTS.ask_many: expected k >= 0, got " + std::to_string(k));
             const size_t L = self.engine().num_levels();
             py::array_t<int64_t> ids(k);
             py::array_t<int32_t> designs({size_t(k), L});
             // int64 ids of a uint64 counter: 2^63 asks are out of reach.
             auto* id_at = reinterpret_cast<uint64_t*>(ids.mutable_data());
             int32_t* row_at = designs.mutable_data();
             if (k < kReleaseGilFrom) {
               self.engine().ask_many(uint64_t(k), id_at, row_at);
             } else {
               py::gil_scoped_release nogil;
               self.engine().ask_many(uint64_t(k), id_at, row_at);
             }
             return py::make_tuple(std::move(ids), std::move(designs));
           },
           py::arg("k"),
           "k proposals as (ids int64[k], designs int32[k, levels]): option index per level, -1 "
           "where the level is absent. The same proposals as ask(k); each pending until told.")
      .def("tell_many",
           [](PyMCTS& self, const py::object& ids_obj, const py::object& rewards_obj) {
             py::array ids_any = as_array(ids_obj), rewards_any = as_array(rewards_obj);
             const char ik = ids_any.dtype().kind(), rk = rewards_any.dtype().kind();
             if (ids_any.ndim() != 1 || (ik != 'i' && ik != 'u' && !(ik == 'f' && ids_any.size() == 0)))
               throw std::invalid_argument("MCTS.tell_many: expected ids as a 1-D sequence of integers, got " +
                                           std::string(py::str(ids_any.dtype())) + " of " +
                                           std::to_string(ids_any.ndim()) + " dimension(s)");
             if (rewards_any.ndim() != 1 || (rk != 'f' && rk != 'i' && rk != 'u'))
               throw std::invalid_argument("MCTS.tell_many: expected rewards as a 1-D sequence of numbers, got " +
                                           std::string(py::str(rewards_any.dtype())) + " of " +
                                           std::to_string(rewards_any.ndim()) + " dimension(s)");
             if (ids_any.size() != rewards_any.size())
               throw std::invalid_argument("MCTS.tell_many: expected as many rewards as ids, got " +
                                           std::to_string(ids_any.size()) + " ids and " +
                                           std::to_string(rewards_any.size()) + " rewards; nothing was told");
             const size_t n = size_t(ids_any.size());
             std::vector<uint64_t> ids(n);
             if (ik == 'u') {
               auto a = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(ids_any);
               std::copy(a.data(), a.data() + n, ids.begin());
             } else {
               auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(ids_any);
               for (size_t i = 0; i < n; ++i) {
                 if (a.data()[i] < 0)
                   throw std::invalid_argument("MCTS.tell_many: unknown trial id " + std::to_string(a.data()[i]) +
                                               " at index " + std::to_string(i) + " (never asked); nothing was told");
                 ids[i] = uint64_t(a.data()[i]);
               }
             }
             auto rewards = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(rewards_any);
             if (!rewards) throw py::error_already_set();
             if (n < size_t(kReleaseGilFrom)) {
               self.engine().tell_many(ids.data(), rewards.data(), n);
             } else {
               py::gil_scoped_release nogil;
               self.engine().tell_many(ids.data(), rewards.data(), n);
             }
           },
           py::arg("ids"), py::arg("rewards"),
           "Rewards of pending trials, in the given order; the whole batch is checked first (NaN/Inf, "
           "unknown, already told or repeated ids, mismatched lengths -> ValueError, nothing told).")
      .def("decode",
           [](PyMCTS& self, const py::object& designs_obj) -> py::object {
             py::array any = as_array(designs_obj);
             const size_t L = self.engine().num_levels();
             const char kind = any.dtype().kind();
             if ((kind != 'i' && kind != 'u') || (any.ndim() != 1 && any.ndim() != 2) ||
                 size_t(any.shape(any.ndim() - 1)) != L)
               throw std::invalid_argument("MCTS.decode: expected integer option indices of shape [" +
                                           std::to_string(L) + "] or [k, " + std::to_string(L) + "], got " +
                                           std::string(py::str(any.dtype())) + " " +
                                           std::string(py::str(py::tuple(any.attr("shape")))));
             auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
             if (any.ndim() == 1) return self.decode_row(a.data(), 0);
             const size_t k = size_t(a.shape(0));
             py::list out(k);
             for (size_t i = 0; i < k; ++i) out[i] = self.decode_row(a.data() + i * L, i);
             return out;
           },
           py::arg("designs"),
           "{level: option} dict of one row of option indices, or a list of dicts of a [k, levels] array.")
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
      .def("pair_stats",
           [](PyMCTS& s) {
             py::list out;
             for (const auto& p : s.engine().pair_stats()) {
               py::dict e;
               e["prev_level"] = s.names()[size_t(p.prev_level)];
               e["prev_option"] = s.option_names()[size_t(p.prev_level)][size_t(p.prev_option)];
               e["level"] = s.names()[size_t(p.level)];
               e["option"] = s.option_names()[size_t(p.level)][size_t(p.option)];
               e["visits"] = p.visits;
               e["mean"] = p.sum / double(p.visits);
               out.append(std::move(e));
             }
             return out;
           },
           "Statistics of consecutive choices: [{prev_level, prev_option, level, option, visits, mean}].")
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
             d["selection"] = o.selection == autokd::mcts::Selection::kUct ? "uct" : "thompson";
             d["prior_strength"] = o.prior_strength;
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
