// The Python reference replays these formulas bit for bit, so no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
// sqrt never sees a negative argument here; without errno it stays one instruction.
#pragma GCC optimize("no-math-errno")
#endif

#include "engine/mcts/mcts.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <tuple>

namespace autokd::mcts {
namespace {

constexpr char kMagic[8] = {'A', 'K', 'D', 'M', 'C', 'T', 'S', '\0'};
constexpr uint32_t kVersion = 2;  // 2: selection, prior strength, pair statistics
constexpr double kInf = std::numeric_limits<double>::infinity();

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string quoted(const std::string& s) { return "'" + s + "'"; }

std::string join_quoted(const std::vector<std::string>& xs) {
  std::string out;
  for (size_t i = 0; i < xs.size(); ++i) out += (i ? ", " : "") + quoted(xs[i]);
  return out;
}

std::string num(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// Unsigned big integer (base 2^32, little endian) for the exact size of the space.
using Big = std::vector<uint32_t>;

void big_add(Big* a, const Big& b) {
  if (a->size() < b.size()) a->resize(b.size(), 0);
  uint64_t carry = 0;
  for (size_t i = 0; i < a->size(); ++i) {
    uint64_t s = uint64_t((*a)[i]) + (i < b.size() ? b[i] : 0) + carry;
    (*a)[i] = uint32_t(s);
    carry = s >> 32;
  }
  if (carry) a->push_back(uint32_t(carry));
}

void big_mul(Big* a, uint32_t m) {
  uint64_t carry = 0;
  for (auto& d : *a) {
    uint64_t p = uint64_t(d) * m + carry;
    d = uint32_t(p);
    carry = p >> 32;
  }
  if (carry) a->push_back(uint32_t(carry));
}

std::string big_str(Big a) {
  while (!a.empty() && a.back() == 0) a.pop_back();
  if (a.empty()) return "0";
  std::string out;
  while (!a.empty()) {
    uint64_t rem = 0;
    for (size_t i = a.size(); i-- > 0;) {
      uint64_t cur = (rem << 32) | a[i];
      a[i] = uint32_t(cur / 1000000000u);
      rem = cur % 1000000000u;
    }
    while (!a.empty() && a.back() == 0) a.pop_back();
    for (int k = 0; k < 9; ++k) {
      out.push_back(char('0' + rem % 10));
      rem /= 10;
      if (a.empty() && rem == 0) break;
    }
  }
  std::reverse(out.begin(), out.end());
  return out;
}

uint64_t big_u64(const Big& a) {
  for (size_t i = 2; i < a.size(); ++i)
    if (a[i]) return std::numeric_limits<uint64_t>::max();
  return (a.size() > 0 ? a[0] : 0) | (a.size() > 1 ? uint64_t(a[1]) << 32 : 0);
}

uint64_t fnv1a(const char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ uint8_t(p[i])) * 0x100000001b3ull;
  return h;
}

struct Writer {
  std::string out;
  template <class T>
  void put(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(const std::string& s) {
    put<uint32_t>(uint32_t(s.size()));
    out += s;
  }
};

struct Reader {
  const char* p;
  size_t n, at = 0;
  void need(size_t k) {
    if (k > n - at) fail("MCTS.deserialize: corrupt blob: truncated payload");
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + at, sizeof v);
    at += sizeof v;
    return v;
  }
  uint64_t count(uint64_t max_items, const char* what) {
    uint64_t c = get<uint64_t>();
    if (c > max_items)
      fail(std::string("MCTS.deserialize: corrupt blob: implausible number of ") + what);
    return c;
  }
  std::string str() {
    uint32_t len = get<uint32_t>();
    need(len);
    std::string s(p + at, len);
    at += len;
    return s;
  }
};

}  // namespace

MCTS::MCTS(Options options) : opt_(std::move(options)) {
  validate_and_index();
  rng_state_ = opt_.seed;
  stride_ = opt_.levels.size() + 1;
  // A search of a few thousand iterations grows a few thousand nodes: no reallocation (and
  // copy) of the node array below 4,096 nodes.
  nodes_.reserve(size_t(std::min<uint64_t>(opt_.max_nodes, 4096)));
  path_.reserve(stride_);
  design_.reserve(opt_.levels.size());
  nodes_.push_back(Node{-1, -1, -1, -1, 0, 0, 0, 0, 0.0, -kInf});
}

MCTS::MCTS(MCTS&& o) noexcept
    : opt_(std::move(o.opt_)),
      reqs_(std::move(o.reqs_)),
      level_by_name_(std::move(o.level_by_name_)),
      num_designs_str_(std::move(o.num_designs_str_)),
      num_designs_u64_(o.num_designs_u64_),
      rng_state_(o.rng_state_),
      nodes_(std::move(o.nodes_)),
      entries_(std::move(o.entries_)),
      entry_designs_(std::move(o.entry_designs_)),
      index_hash_(std::move(o.index_hash_)),
      index_entry_(std::move(o.index_entry_)),
      pend_(std::move(o.pend_)),
      pend_paths_(std::move(o.pend_paths_)),
      free_slots_(std::move(o.free_slots_)),
      slot_of_(std::move(o.slot_of_)),
      stride_(o.stride_),
      path_(std::move(o.path_)),
      design_(std::move(o.design_)),
      two_ln_(std::move(o.two_ln_)),
      scores_(std::move(o.scores_)),
      stats_(std::move(o.stats_)),
      pairs_(std::move(o.pairs_)),
      tell_sum_(o.tell_sum_),
      tell_sumsq_(o.tell_sumsq_),
      next_id_(o.next_id_),
      num_told_(o.num_told_),
      num_reused_(o.num_reused_),
      num_pending_(o.num_pending_),
      have_reward_(o.have_reward_),
      lo_(o.lo_),
      hi_(o.hi_) {}

void MCTS::validate_and_index() {
  const auto& L = opt_.levels;
  if (L.empty()) fail("MCTS: expected at least one level, got none");
  if (L.size() > 65535) fail("MCTS: expected at most 65535 levels, got " + std::to_string(L.size()));
  if (!std::isfinite(opt_.exploration) || opt_.exploration < 0)
    fail("MCTS: expected exploration finite and >= 0, got " + num(opt_.exploration));
  if (!std::isfinite(opt_.virtual_loss) || opt_.virtual_loss < 0)
    fail("MCTS: expected virtual_loss finite and >= 0, got " + num(opt_.virtual_loss));
  if (opt_.max_nodes < 1 || opt_.max_nodes > uint64_t(std::numeric_limits<int32_t>::max()))
    fail("MCTS: expected max_nodes in [1, 2147483647], got " + std::to_string(opt_.max_nodes));
  if (opt_.on_repeat != OnRepeat::kReuse && opt_.on_repeat != OnRepeat::kAverage)
    fail("MCTS: expected on_repeat 'reuse' or 'average'");
  if (opt_.selection != Selection::kUct && opt_.selection != Selection::kThompson)
    fail("MCTS: expected selection 'uct' or 'thompson'");
  if (!std::isfinite(opt_.prior_strength) || opt_.prior_strength <= 0)
    fail("MCTS: expected prior_strength finite and > 0, got " + num(opt_.prior_strength));

  level_by_name_.clear();
  reqs_.assign(L.size(), {});
  std::vector<std::string> names;
  for (size_t l = 0; l < L.size(); ++l) {
    const Level& lv = L[l];
    if (lv.name.empty()) fail("MCTS: level " + std::to_string(l) + " has an empty name");
    if (level_by_name_.count(lv.name)) fail("MCTS: duplicate level name " + quoted(lv.name));
    if (lv.options.empty()) fail("MCTS: level " + quoted(lv.name) + " has no options");
    if (lv.options.size() > 65535)
      fail("MCTS: level " + quoted(lv.name) + " has more than 65535 options");
    for (size_t i = 0; i < lv.options.size(); ++i)
      for (size_t j = 0; j < i; ++j)
        if (lv.options[i] == lv.options[j])
          fail("MCTS: level " + quoted(lv.name) + " has duplicate option " + quoted(lv.options[i]));
    for (const auto& [rname, allowed] : lv.requires_) {
      auto it = level_by_name_.find(rname);
      if (it == level_by_name_.end()) {
        bool later = false;
        for (size_t k = l; k < L.size(); ++k) later |= L[k].name == rname;
        if (later)
          fail("MCTS: level " + quoted(lv.name) + " requires level " + quoted(rname) +
               ", which is not an earlier level (requirements may only name earlier levels)");
        fail("MCTS: level " + quoted(lv.name) + " requires unknown level " + quoted(rname) +
             " (earlier levels: " + join_quoted(names) + ")");
      }
      const Level& target = L[it->second];
      Req req{it->second, std::vector<uint8_t>(target.options.size(), 0)};
      for (const auto& r : reqs_[l])
        if (r.level == it->second)
          fail("MCTS: level " + quoted(lv.name) + " names level " + quoted(rname) + " twice in requires");
      if (allowed.empty())
        fail("MCTS: level " + quoted(lv.name) + " requires level " + quoted(rname) +
             " with no allowed options (the level could never exist)");
      for (const auto& a : allowed) {
        auto o = std::find(target.options.begin(), target.options.end(), a);
        if (o == target.options.end())
          fail("MCTS: level " + quoted(lv.name) + " requires unknown option " + quoted(a) +
               " of level " + quoted(rname) + " (options: " + join_quoted(target.options) + ")");
        req.allowed[size_t(o - target.options.begin())] = 1;
      }
      reqs_[l].push_back(std::move(req));
    }
    level_by_name_.emplace(lv.name, int32_t(l));
    names.push_back(lv.name);
  }

  // Size of the space: DP over the choices of levels that later levels depend on. Options no
  // requirement tells apart share one state, and a choice leaves the state after the last
  // level that reads it, so realistic spaces keep a handful of states.
  std::vector<int32_t> last_reader(L.size(), -1);
  std::vector<std::vector<std::string>> sig(L.size());
  for (size_t l = 0; l < L.size(); ++l) sig[l].assign(L[l].options.size(), std::string());
  for (size_t l = 0; l < L.size(); ++l)
    for (const Req& r : reqs_[l]) {
      last_reader[size_t(r.level)] = int32_t(l);
      for (size_t o = 0; o < r.allowed.size(); ++o) sig[size_t(r.level)][o].push_back(char(r.allowed[o]));
    }
  std::vector<std::vector<std::pair<int32_t, uint32_t>>> groups(L.size());  // (representative, size)
  for (size_t l = 0; l < L.size(); ++l) {
    std::map<std::string, size_t> at;
    for (size_t o = 0; o < L[l].options.size(); ++o) {
      auto [it, fresh] = at.emplace(sig[l][o], groups[l].size());
      if (fresh) groups[l].emplace_back(int32_t(o), 0);
      groups[l][it->second].second += 1;
    }
  }
  constexpr size_t kMaxStates = size_t(1) << 16;
  bool counted = true;
  std::map<Design, Big> states{{Design(L.size(), -1), Big{1}}};
  for (size_t l = 0; l < L.size() && counted; ++l) {
    std::map<Design, Big> next;
    for (auto& [d, c] : states) {
      if (!level_exists(int32_t(l), d)) {
        big_add(&next[d], c);
      } else if (last_reader[l] >= 0) {
        for (const auto& [rep, size] : groups[l]) {
          Design d2 = d;
          d2[l] = rep;
          Big c2 = c;
          big_mul(&c2, size);
          big_add(&next[d2], c2);
        }
      } else {
        Big c2 = c;
        big_mul(&c2, uint32_t(L[l].options.size()));
        big_add(&next[d], c2);
      }
    }
    std::map<Design, Big> kept;
    for (auto& [d, c] : next) {
      Design d2 = d;
      for (size_t j = 0; j <= l; ++j)
        if (last_reader[j] >= 0 && size_t(last_reader[j]) <= l) d2[j] = -1;
      big_add(&kept[d2], c);
    }
    states.swap(kept);
    counted = states.size() <= kMaxStates;
  }
  Big total;
  for (auto& [d, c] : states) big_add(&total, c);
  num_designs_str_ = counted ? big_str(total) : std::string();
  num_designs_u64_ = counted ? big_u64(total) : std::numeric_limits<uint64_t>::max();

  stats_.assign(L.size(), {});
  for (size_t l = 0; l < L.size(); ++l) stats_[l].assign(L[l].options.size(), OptionStats{});
}

int32_t MCTS::level_index(const std::string& name) const {
  auto it = level_by_name_.find(name);
  return it == level_by_name_.end() ? -1 : it->second;
}

bool MCTS::level_exists(int32_t level, const Design& design) const {
  for (const Req& r : reqs_[size_t(level)]) {
    int32_t o = design[size_t(r.level)];
    if (o < 0 || !r.allowed[size_t(o)]) return false;
  }
  return true;
}

void MCTS::check_design(const Design& design, const std::string& who) const {
  const size_t L = opt_.levels.size();
  if (design.size() != L)
    fail(who + ": expected a design of " + std::to_string(L) + " levels, got " + std::to_string(design.size()));
  Design check(L, -1);
  for (size_t l = 0; l < L; ++l) {
    const int32_t v = design[l];
    const bool exists = level_exists(int32_t(l), check);
    if (exists && (v < 0 || v >= int32_t(opt_.levels[l].options.size())))
      fail(who + ": design has no valid option for level " + quoted(opt_.levels[l].name));
    if (!exists && v != -1)
      fail(who + ": design chooses level " + quoted(opt_.levels[l].name) +
           ", which does not exist given its other choices (its requirements are not met)");
    check[l] = v;
  }
}

int32_t MCTS::next_level(int32_t after, const Design& design) const {
  for (int32_t l = after + 1; l < int32_t(opt_.levels.size()); ++l)
    if (level_exists(l, design)) return l;
  return -1;
}

uint64_t MCTS::next_u64() {  // splitmix64
  uint64_t z = (rng_state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t MCTS::below(uint64_t n) {
  if (n <= 1) return 0;
  const uint64_t threshold = (0 - n) % n;  // (2^64 - n) mod n
  for (;;) {
    uint64_t x = next_u64();
    if (x >= threshold) return x % n;
  }
}

double MCTS::two_ln(double np) {
  constexpr double kTableSize = double(1 << 18);
  if (np < kTableSize && np == double(uint32_t(np))) {
    const size_t n = size_t(np);
    if (n >= two_ln_.size()) {
      size_t from = two_ln_.size();
      two_ln_.resize(n + 1);  // each entry computed once, when first needed
      for (size_t i = from; i < two_ln_.size(); ++i) {
        const double x = double(i);
        two_ln_[i] = 2.0 * std::log(x > 1.0 ? x : 1.0);
      }
    }
    return two_ln_[n];
  }
  return 2.0 * std::log(np > 1.0 ? np : 1.0);
}

int32_t MCTS::ucb_pick(const Node& parent, bool any_open) {
  const double vl = opt_.virtual_loss;
  const double np = double(parent.visits) + vl * double(parent.pending);
  const double two_ln = this->two_ln(np);
  const bool spread = opt_.normalize_rewards && hi_ > lo_;
  const double inv_range = spread ? 1.0 / (hi_ - lo_) : 0.0;
  const double lo = lo_, c_explore = opt_.exploration;
  const uint32_t m = parent.num_children;
  if (scores_.size() < m) scores_.resize(m);
  double* score = scores_.data();
  const Node* child = nodes_.data() + parent.first_child;
  // Scores first, argmax after: no data-dependent branch between the divisions and square
  // roots of different children, so they overlap. N_i = 0 makes inv_n infinite and the
  // formula NaN; the select replaces it by +inf.
  for (uint32_t i = 0; i < m; ++i) {
    const Node& c = child[i];
    const double n = double(c.visits) + vl * double(c.pending);
    const double inv_n = 1.0 / n;
    double s;
    if (!opt_.normalize_rewards) s = c.sum;
    else if (spread) s = (c.sum - double(c.visits) * lo) * inv_range;
    else s = 0.0;
    const double v = s * inv_n + c_explore * std::sqrt(two_ln * inv_n);
    score[i] = n == 0.0 ? kInf : v;
  }
  double best = 0.0;
  int32_t pick = -1;
  for (uint32_t i = 0; i < m; ++i) {
    if (any_open && child[i].closed) continue;
    if (pick < 0 || score[i] > best) {
      best = score[i];
      pick = parent.first_child + int32_t(i);
    }
  }
  return pick;
}

double MCTS::normal() {
  // u1 in (0, 1] (no log(0)), u2 in [0, 1), 53 random bits each; the sine of the pair is unused.
  const double u1 = double((next_u64() >> 11) + 1) * 0x1.0p-53;
  const double u2 = double(next_u64() >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

int32_t MCTS::thompson_pick(int32_t parent, int32_t lvl, int32_t prev_lvl, int32_t prev_opt, bool any_open,
                            double gm, double sigma) {
  const double k = opt_.prior_strength;
  const uint32_t m = uint32_t(opt_.levels[size_t(lvl)].options.size());
  const Node* child = parent >= 0 ? nodes_.data() + nodes_[size_t(parent)].first_child : nullptr;
  int32_t pick = -1;
  double best = 0.0;
  for (uint32_t o = 0; o < m; ++o) {
    if (child && any_open && child[o].closed) continue;
    const OptionStats& st = stats_[size_t(lvl)][o];
    double q = (st.sum + k * gm) / (double(st.visits) + k);
    if (prev_lvl >= 0) {
      auto it = pairs_.find(pair_key(prev_lvl, prev_opt, lvl, int32_t(o)));
      if (it != pairs_.end()) q = (it->second.second + k * q) / (double(it->second.first) + k);
    }
    const double n = child ? double(child[o].visits) : 0.0;
    const double sum = child ? child[o].sum : 0.0;
    const double mean = (sum + k * q) / (n + k);
    const double draw = mean + sigma / std::sqrt(n + k) * normal();
    if (pick < 0 || draw > best) {
      best = draw;
      pick = int32_t(o);
    }
  }
  return pick;
}

bool MCTS::descend_thompson(std::vector<int32_t>* path, Design* design) {
  design->assign(opt_.levels.size(), -1);
  path->assign(1, 0);
  const double n_all = double(num_told_);
  const double gm = num_told_ > 0 ? tell_sum_ / n_all : 0.0;
  const double var = num_told_ > 1 ? tell_sumsq_ / n_all - gm * gm : 0.0;
  const double sigma = var > 0.0 ? std::sqrt(var) : 1.0;
  int32_t node = 0, after = -1, prev_lvl = -1, prev_opt = -1;
  bool in_tree = true;
  for (;;) {
    const int32_t lvl = next_level(after, *design);
    if (lvl < 0) break;
    if (in_tree && nodes_[size_t(node)].first_child < 0) {
      const size_t n = opt_.levels[size_t(lvl)].options.size();
      if (nodes_.size() + n > opt_.max_nodes) {
        in_tree = false;  // budget reached: the rest is chosen as unvisited children would be
      } else {
        nodes_[size_t(node)].first_child = int32_t(nodes_.size());
        nodes_[size_t(node)].num_children = uint32_t(n);
        for (size_t o = 0; o < n; ++o)
          nodes_.push_back(Node{node, -1, lvl, int32_t(o), 0, 0, 0, 0, 0.0, -kInf});
      }
    }
    int32_t o;
    if (in_tree) {
      const Node& nd = nodes_[size_t(node)];
      bool any_open = false;
      for (uint32_t i = 0; i < nd.num_children; ++i) any_open |= !nodes_[size_t(nd.first_child) + i].closed;
      o = thompson_pick(node, lvl, prev_lvl, prev_opt, any_open, gm, sigma);
      node = nd.first_child + o;
      path->push_back(node);
    } else {
      o = thompson_pick(-1, lvl, prev_lvl, prev_opt, false, gm, sigma);
    }
    (*design)[size_t(lvl)] = o;
    after = prev_lvl = lvl;
    prev_opt = o;
  }
  return in_tree;
}

bool MCTS::descend(std::vector<int32_t>* path, Design* design) {
  design->assign(opt_.levels.size(), -1);
  path->assign(1, 0);
  int32_t node = 0, after = -1;
  for (;;) {
    const int32_t lvl = next_level(after, *design);
    if (lvl < 0) break;
    if (nodes_[size_t(node)].first_child < 0) {
      const size_t n = opt_.levels[size_t(lvl)].options.size();
      if (nodes_.size() + n > opt_.max_nodes) break;  // budget reached: rollout from here
      nodes_[size_t(node)].first_child = int32_t(nodes_.size());
      nodes_[size_t(node)].num_children = uint32_t(n);
      for (size_t o = 0; o < n; ++o)
        nodes_.push_back(Node{node, -1, lvl, int32_t(o), 0, 0, 0, 0, 0.0, -kInf});
    }
    const Node& nd = nodes_[size_t(node)];
    uint32_t open = 0, fresh = 0, fresh_open = 0;  // fresh: neither told nor pending
    for (uint32_t i = 0; i < nd.num_children; ++i) {
      const Node& c = nodes_[size_t(nd.first_child) + i];
      const bool f = c.visits == 0 && c.pending == 0;
      open += !c.closed;
      fresh += f;
      fresh_open += f && !c.closed;
    }
    const bool any_open = open > 0;
    const uint32_t unvisited = any_open ? fresh_open : fresh;
    int32_t child = -1;
    if (unvisited > 0) {
      uint64_t j = below(unvisited);
      for (uint32_t i = 0; i < nd.num_children; ++i) {
        const Node& c = nodes_[size_t(nd.first_child) + i];
        if (c.visits == 0 && c.pending == 0 && !(any_open && c.closed) && j-- == 0) {
          child = nd.first_child + int32_t(i);
          break;
        }
      }
    } else {
      child = ucb_pick(nd, any_open);
    }
    path->push_back(child);
    (*design)[size_t(lvl)] = nodes_[size_t(child)].option;
    after = lvl;
    if (unvisited > 0) break;  // expansion ends the walk in the tree
    node = child;
  }
  const bool leaf = next_level(after, *design) < 0;
  for (int32_t l = after + 1; l < int32_t(opt_.levels.size()); ++l)
    if (level_exists(l, *design)) (*design)[size_t(l)] = int32_t(below(opt_.levels[size_t(l)].options.size()));
  return leaf;
}

void MCTS::close(int32_t node) {
  for (int32_t i = node; i >= 0;) {
    Node& nd = nodes_[size_t(i)];
    if (nd.first_child >= 0)
      for (uint32_t k = 0; k < nd.num_children; ++k)
        if (!nodes_[size_t(nd.first_child) + k].closed) return;
    nd.closed = 1;
    i = nd.parent;
  }
}

void MCTS::add_pending(const int32_t* path, size_t len, int delta) {
  for (size_t k = 0; k < len; ++k) nodes_[size_t(path[k])].pending += uint32_t(delta);
}

void MCTS::backprop(const int32_t* path, size_t len, double reward) {
  for (size_t k = 0; k < len; ++k) {
    Node& nd = nodes_[size_t(path[k])];
    nd.visits += 1;
    nd.sum += reward;
    if (reward > nd.best) nd.best = reward;
  }
}

uint64_t MCTS::hash_of(const int32_t* design, size_t levels) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (size_t l = 0; l < levels; ++l) h = (h ^ uint64_t(uint32_t(design[l]))) * 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 31);
}

int64_t MCTS::find_entry(const int32_t* design, uint64_t hash) const {
  if (index_entry_.empty()) return -1;
  const size_t L = opt_.levels.size(), mask = index_entry_.size() - 1;
  for (size_t i = size_t(hash) & mask;; i = (i + 1) & mask) {
    const uint32_t e = index_entry_[i];
    if (e == 0) return -1;
    if (index_hash_[i] == hash && std::equal(design, design + L, entry_design(e - 1))) return int64_t(e - 1);
  }
}

uint32_t MCTS::add_entry(const int32_t* design, uint64_t hash) {
  const uint32_t e = uint32_t(entries_.size());
  if ((size_t(e) + 1) * 2 > index_entry_.size()) {
    std::vector<uint64_t> hashes = std::move(index_hash_);
    std::vector<uint32_t> ents = std::move(index_entry_);
    const size_t cap = std::max<size_t>(64, 2 * ents.size());
    index_hash_.assign(cap, 0);
    index_entry_.assign(cap, 0);
    for (size_t k = 0; k < ents.size(); ++k) {
      if (!ents[k]) continue;
      size_t i = size_t(hashes[k]) & (cap - 1);
      while (index_entry_[i]) i = (i + 1) & (cap - 1);
      index_hash_[i] = hashes[k];
      index_entry_[i] = ents[k];
    }
  }
  const size_t mask = index_entry_.size() - 1;
  size_t i = size_t(hash) & mask;
  while (index_entry_[i]) i = (i + 1) & mask;
  index_hash_[i] = hash;
  index_entry_[i] = e + 1;
  entries_.push_back(Entry{0, 0, 0.0});
  entry_designs_.insert(entry_designs_.end(), design, design + opt_.levels.size());
  return e;
}

uint32_t MCTS::entry_for(const Design& design) {
  const uint64_t h = hash_of(design.data(), design.size());
  const int64_t e = find_entry(design.data(), h);
  return e >= 0 ? uint32_t(e) : add_entry(design.data(), h);
}

void MCTS::record_tell(uint32_t entry, double reward) {
  if (!have_reward_) {
    lo_ = hi_ = reward;
    have_reward_ = true;
  } else {
    lo_ = std::min(lo_, reward);
    hi_ = std::max(hi_, reward);
  }
  Entry& e = entries_[entry];
  e.count += 1;
  e.sum += reward;
  tell_sum_ += reward;
  tell_sumsq_ += reward * reward;
  const int32_t* d = entry_design(entry);
  int32_t prev = -1;
  for (size_t l = 0; l < opt_.levels.size(); ++l) {
    if (d[l] < 0) continue;
    OptionStats& s = stats_[l][size_t(d[l])];
    s.visits += 1;
    s.sum += reward;
    if (reward > s.best) s.best = reward;
    if (prev >= 0) {
      auto& ps = pairs_[pair_key(prev, d[prev], int32_t(l), d[l])];
      ps.first += 1;
      ps.second += reward;
    }
    prev = int32_t(l);
  }
  ++num_told_;
}

int64_t MCTS::IdSlots::find(uint64_t id) const {
  const uint64_t key = id + 1;
  if (key == 0 || keys_.empty()) return -1;  // id 2^64 - 1 is never given
  const size_t mask = keys_.size() - 1;
  for (size_t i = home(id);; i = (i + 1) & mask) {
    if (keys_[i] == key) return slots_[i];
    if (keys_[i] == 0) return -1;
  }
}

bool MCTS::IdSlots::insert(uint64_t id, uint32_t slot) {
  if ((size_ + 1) * 2 > keys_.size()) grow();
  const size_t mask = keys_.size() - 1;
  for (size_t i = home(id);; i = (i + 1) & mask) {
    if (keys_[i] == id + 1) return false;
    if (keys_[i] == 0) {
      keys_[i] = id + 1;
      slots_[i] = slot;
      ++size_;
      return true;
    }
  }
}

void MCTS::IdSlots::erase(uint64_t id) {
  const size_t mask = keys_.size() - 1;
  size_t i = home(id);
  while (keys_[i] != id + 1) i = (i + 1) & mask;
  // Backward shift: later entries of the probe run move into the hole unless their home lies
  // cyclically in (hole, their position], so every entry stays reachable from its home.
  for (size_t j = i;;) {
    j = (j + 1) & mask;
    if (keys_[j] == 0) break;
    const size_t h = home(keys_[j] - 1);
    const bool stays = i <= j ? (h > i && h <= j) : (h > i || h <= j);
    if (!stays) {
      keys_[i] = keys_[j];
      slots_[i] = slots_[j];
      i = j;
    }
  }
  keys_[i] = 0;
  --size_;
}

std::vector<uint64_t> MCTS::IdSlots::ids() const {
  std::vector<uint64_t> out;
  out.reserve(size_);
  for (uint64_t k : keys_)
    if (k) out.push_back(k - 1);
  return out;
}

void MCTS::IdSlots::grow() {
  std::vector<uint64_t> keys = std::move(keys_);
  std::vector<uint32_t> slots = std::move(slots_);
  bits_ = std::max(4, bits_ + 1);
  const size_t cap = size_t(1) << bits_;
  keys_.assign(cap, 0);
  slots_.assign(cap, 0);
  size_ = 0;
  for (size_t i = 0; i < keys.size(); ++i)
    if (keys[i]) insert(keys[i] - 1, slots[i]);
}

uint64_t MCTS::ask_one(int32_t* design_out) {
  uint64_t hash = 0;
  std::vector<std::vector<int32_t>> held;  // temporary virtual losses on pending repeats
  int64_t known = -1;                      // entry of the final proposal when already seen
  for (uint32_t attempt = 0;; ++attempt) {
    const bool leaf = opt_.selection == Selection::kThompson ? descend_thompson(&path_, &design_)
                                                             : descend(&path_, &design_);
    if (leaf && opt_.on_repeat == OnRepeat::kReuse) close(path_.back());
    hash = hash_of(design_.data(), design_.size());
    known = find_entry(design_.data(), hash);
    if (known < 0 || opt_.on_repeat == OnRepeat::kAverage ||
        attempt == opt_.max_retries || entries_.size() >= num_designs_u64_)
      break;
    const Entry& e = entries_[size_t(known)];
    if (e.count > 0) {
      backprop(path_.data(), path_.size(), e.sum / double(e.count));
      ++num_reused_;
    } else {
      add_pending(path_.data(), path_.size(), +1);
      held.push_back(path_);
    }
  }
  for (const auto& p : held) add_pending(p.data(), p.size(), -1);
  add_pending(path_.data(), path_.size(), +1);
  const uint32_t entry = known >= 0 ? uint32_t(known) : add_entry(design_.data(), hash);
  entries_[entry].pending += 1;
  std::copy(design_.begin(), design_.end(), design_out);
  return add_pending_trial(entry, path_.data(), path_.size());
}

uint64_t MCTS::add_pending_trial(uint32_t entry, const int32_t* path, size_t len) {
  uint32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = uint32_t(pend_.size());
    pend_.emplace_back();
    pend_paths_.resize(pend_paths_.size() + stride_);
  }
  const uint64_t id = next_id_++;
  pend_[slot] = Pending{id, entry, uint32_t(len)};
  std::copy(path, path + len, pend_paths_.begin() + ptrdiff_t(size_t(slot) * stride_));
  slot_of_.insert(id, slot);
  ++num_pending_;
  return id;
}

std::vector<Trial> MCTS::ask(uint64_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Trial> out;
  out.reserve(size_t(std::min<uint64_t>(k, 1u << 20)));
  for (uint64_t i = 0; i < k; ++i) {
    Design d(opt_.levels.size());
    const uint64_t id = ask_one(d.data());
    out.push_back(Trial{id, std::move(d)});
  }
  return out;
}

void MCTS::ask_many(uint64_t k, uint64_t* ids, int32_t* designs) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t L = opt_.levels.size();
  for (uint64_t i = 0; i < k; ++i) ids[i] = ask_one(designs + size_t(i) * L);
}

void MCTS::tell_slot(uint32_t slot, double reward) {  // the caller removed its id from slot_of_
  const Pending p = pend_[slot];
  const int32_t* path = pend_paths_.data() + size_t(slot) * stride_;
  for (uint32_t k = 0; k < p.len; ++k) {  // the pending mark goes, the reward comes
    Node& nd = nodes_[size_t(path[k])];
    nd.pending -= 1;
    nd.visits += 1;
    nd.sum += reward;
    if (reward > nd.best) nd.best = reward;
  }
  entries_[p.entry].pending -= 1;
  record_tell(p.entry, reward);
  free_slots_.push_back(slot);
  --num_pending_;
}

void MCTS::tell(uint64_t trial_id, double reward) {
  if (!std::isfinite(reward))
    fail("MCTS.tell: expected a finite reward, got " + num(reward) + " for trial " + std::to_string(trial_id));
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t slot = slot_of_.find(trial_id);
  if (slot < 0)
    fail("MCTS.tell: unknown trial id " + std::to_string(trial_id) +
         (trial_id < next_id_ ? " (already told)" : " (never asked)"));
  slot_of_.erase(trial_id);
  tell_slot(uint32_t(slot), reward);
}

void MCTS::tell_many(const uint64_t* ids, const double* rewards, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(rewards[i]))
      fail("MCTS.tell_many: expected finite rewards, got " + num(rewards[i]) + " at index " +
           std::to_string(i) + " (trial " + std::to_string(ids[i]) + "); nothing was told");
  std::lock_guard<std::mutex> lock(mu_);
  // Every id is looked up and its slot marked before the first tell, so an id twice in the
  // batch is caught without telling anything.
  batch_slots_.resize(n);
  if (marked_.size() < pend_.size()) marked_.resize(pend_.size(), 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t slot = slot_of_.find(ids[i]);
    std::string err;
    if (slot < 0)
      err = "MCTS.tell_many: unknown trial id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
            (ids[i] < next_id_ ? " (already told)" : " (never asked)") + "; nothing was told";
    else if (marked_[size_t(slot)])
      err = "MCTS.tell_many: trial id " + std::to_string(ids[i]) + " appears twice in the batch (index " +
            std::to_string(i) + "); nothing was told";
    if (!err.empty()) {
      for (size_t k = 0; k < i; ++k) marked_[batch_slots_[k]] = 0;
      fail(err);
    }
    batch_slots_[i] = uint32_t(slot);
    marked_[size_t(slot)] = 1;
  }
  for (size_t i = 0; i < n; ++i) {
    marked_[batch_slots_[i]] = 0;
    slot_of_.erase(ids[i]);
    tell_slot(batch_slots_[i], rewards[i]);
  }
}

void MCTS::tell_design(const Design& design, double reward) {
  if (!std::isfinite(reward)) fail("MCTS.tell_design: expected a finite reward, got " + num(reward));
  check_design(design, "MCTS.tell_design");
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int32_t> path{0};
  int32_t node = 0, after = -1;
  for (;;) {
    const int32_t lvl = next_level(after, design);
    if (lvl < 0) break;
    if (nodes_[size_t(node)].first_child < 0) {
      const size_t n = opt_.levels[size_t(lvl)].options.size();
      if (nodes_.size() + n > opt_.max_nodes) break;
      nodes_[size_t(node)].first_child = int32_t(nodes_.size());
      nodes_[size_t(node)].num_children = uint32_t(n);
      for (size_t o = 0; o < n; ++o)
        nodes_.push_back(Node{node, -1, lvl, int32_t(o), 0, 0, 0, 0, 0.0, -kInf});
    }
    const int32_t child = nodes_[size_t(node)].first_child + design[size_t(lvl)];
    path.push_back(child);
    after = lvl;
    // UCT's walk ends at the first unvisited child (expansion); Thompson's walks the whole design.
    if (opt_.selection == Selection::kUct && nodes_[size_t(child)].visits == 0 &&
        nodes_[size_t(child)].pending == 0)
      break;
    node = child;
  }
  if (opt_.on_repeat == OnRepeat::kReuse && next_level(after, design) < 0) close(path.back());
  backprop(path.data(), path.size(), reward);
  record_tell(entry_for(design), reward);
  ++next_id_;
}

Design MCTS::design_from_names(const std::vector<std::pair<std::string, std::string>>& items) const {
  const auto& L = opt_.levels;
  Design d(L.size(), -1);
  std::vector<uint8_t> given(L.size(), 0);
  for (const auto& [name, option] : items) {
    const int32_t l = level_index(name);
    if (l < 0) {
      std::vector<std::string> names;
      for (const auto& lv : L) names.push_back(lv.name);
      fail("MCTS: design names unknown level " + quoted(name) + " (levels: " + join_quoted(names) + ")");
    }
    const auto& opts = L[size_t(l)].options;
    auto o = std::find(opts.begin(), opts.end(), option);
    if (o == opts.end())
      fail("MCTS: design chooses unknown option " + quoted(option) + " for level " + quoted(name) +
           " (options: " + join_quoted(opts) + ")");
    d[size_t(l)] = int32_t(o - opts.begin());
    given[size_t(l)] = 1;
  }
  // Existence is decided on the given choices, level by level, as a proposal would be.
  Design check(L.size(), -1);
  for (size_t l = 0; l < L.size(); ++l) {
    const bool exists = level_exists(int32_t(l), check);
    if (exists && !given[l]) fail("MCTS: design lacks level " + quoted(L[l].name));
    if (!exists && given[l])
      fail("MCTS: design chooses level " + quoted(L[l].name) +
           ", which does not exist given its other choices (its requirements are not met)");
    check[l] = d[l];
  }
  return d;
}

uint64_t MCTS::num_told() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_told_;
}
uint64_t MCTS::num_pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_pending_;
}
uint64_t MCTS::num_reused() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_reused_;
}
uint64_t MCTS::num_nodes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return nodes_.size();
}

bool MCTS::best(Design* design, double* reward) const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t top = -1;
  double top_mean = 0.0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (e.count == 0) continue;
    const double m = e.sum / double(e.count);
    if (top < 0 || m > top_mean) {
      top = int64_t(i);
      top_mean = m;
    }
  }
  if (top < 0) return false;
  const int32_t* d = entry_design(size_t(top));
  design->assign(d, d + opt_.levels.size());
  *reward = top_mean;
  return true;
}

std::vector<NodeInfo> MCTS::tree() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<NodeInfo> out;
  out.reserve(nodes_.size());
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& n = nodes_[i];
    out.push_back(NodeInfo{int64_t(i), n.parent, n.level, n.option, n.visits, n.pending, n.sum, n.best});
  }
  return out;
}

std::vector<std::vector<OptionStats>> MCTS::level_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

std::vector<PairStats> MCTS::pair_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<PairStats> out;
  out.reserve(pairs_.size());
  for (const auto& [key, st] : pairs_)
    out.push_back(PairStats{int32_t((key >> 48) & 0xFFFF), int32_t((key >> 32) & 0xFFFF),
                            int32_t((key >> 16) & 0xFFFF), int32_t(key & 0xFFFF), st.first, st.second});
  std::sort(out.begin(), out.end(), [](const PairStats& a, const PairStats& b) {
    return std::tie(a.level, a.option, a.prev_level, a.prev_option) <
           std::tie(b.level, b.option, b.prev_level, b.prev_option);
  });
  return out;
}

std::string MCTS::serialize() const {
  std::lock_guard<std::mutex> lock(mu_);
  Writer w;
  w.put<uint8_t>(uint8_t(opt_.selection));
  w.put(opt_.prior_strength);
  w.put(opt_.exploration);
  w.put(opt_.seed);
  w.put<uint8_t>(opt_.normalize_rewards);
  w.put<uint8_t>(uint8_t(opt_.on_repeat));
  w.put(opt_.max_nodes);
  w.put(opt_.virtual_loss);
  w.put(opt_.max_retries);
  w.put<uint64_t>(opt_.levels.size());
  for (const Level& lv : opt_.levels) {
    w.str(lv.name);
    w.put<uint64_t>(lv.options.size());
    for (const auto& o : lv.options) w.str(o);
    w.put<uint64_t>(lv.requires_.size());
    for (const auto& [name, allowed] : lv.requires_) {
      w.str(name);
      w.put<uint64_t>(allowed.size());
      for (const auto& a : allowed) w.str(a);
    }
  }
  w.put(rng_state_);
  w.put(next_id_);
  w.put(num_told_);
  w.put(num_reused_);
  w.put<uint8_t>(have_reward_);
  w.put(lo_);
  w.put(hi_);
  w.put(tell_sum_);
  w.put(tell_sumsq_);
  w.put<uint64_t>(nodes_.size());
  for (const Node& n : nodes_) {
    w.put(n.parent);
    w.put(n.first_child);
    w.put(n.level);
    w.put(n.option);
    w.put(n.num_children);
    w.put(n.pending);
    w.put(n.closed);
    w.put(n.visits);
    w.put(n.sum);
    w.put(n.best);
  }
  w.put<uint64_t>(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    for (size_t l = 0; l < opt_.levels.size(); ++l) w.put(entry_design(i)[l]);
    w.put(e.count);
    w.put(e.pending);
    w.put(e.sum);
  }
  // Pending trials in id order so equal engines give equal bytes.
  std::vector<uint64_t> ids = slot_of_.ids();
  std::sort(ids.begin(), ids.end());
  w.put<uint64_t>(ids.size());
  for (uint64_t id : ids) {
    const uint32_t slot = uint32_t(slot_of_.find(id));
    const Pending& p = pend_[slot];
    w.put(id);
    w.put(p.entry);
    w.put<uint64_t>(p.len);
    for (uint32_t k = 0; k < p.len; ++k) w.put(pend_paths_[size_t(slot) * stride_ + k]);
  }
  for (const auto& lvl : stats_)
    for (const OptionStats& s : lvl) {
      w.put(s.visits);
      w.put(s.sum);
      w.put(s.best);
    }
  // Pair statistics sorted by key, so equal engines give equal bytes.
  std::vector<std::pair<uint64_t, std::pair<uint64_t, double>>> pairs(pairs_.begin(), pairs_.end());
  std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  w.put<uint64_t>(pairs.size());
  for (const auto& [key, st] : pairs) {
    w.put(key);
    w.put(st.first);
    w.put(st.second);
  }
  std::string out(kMagic, sizeof kMagic);
  Writer head;
  head.put(kVersion);
  head.put<uint64_t>(w.out.size());
  out += head.out;
  out += w.out;
  Writer tail;
  tail.put(fnv1a(w.out.data(), w.out.size()));
  out += tail.out;
  return out;
}

MCTS MCTS::deserialize(const std::string& blob) {
  const std::string pre = "MCTS.deserialize: corrupt blob: ";
  if (blob.size() < sizeof kMagic + 4 + 8 + 8 || std::memcmp(blob.data(), kMagic, sizeof kMagic) != 0)
    fail(pre + "bad magic (not an autokd MCTS blob)");
  Reader head{blob.data() + sizeof kMagic, blob.size() - sizeof kMagic};
  const uint32_t version = head.get<uint32_t>();
  if (version != kVersion)
    fail(pre + "format version " + std::to_string(version) + ", expected " + std::to_string(kVersion));
  const uint64_t len = head.get<uint64_t>();
  const size_t start = sizeof kMagic + 4 + 8;
  if (len != blob.size() - start - 8) fail(pre + "length mismatch (truncated or padded)");
  uint64_t sum;
  std::memcpy(&sum, blob.data() + start + len, 8);
  if (sum != fnv1a(blob.data() + start, len)) fail(pre + "checksum mismatch");

  Reader r{blob.data() + start, size_t(len)};
  const uint64_t cap = len;  // no count can exceed the payload's byte length
  Options o;
  const uint8_t sel = r.get<uint8_t>();
  if (sel > 1) fail(pre + "bad selection");
  o.selection = Selection(sel);
  o.prior_strength = r.get<double>();
  o.exploration = r.get<double>();
  o.seed = r.get<uint64_t>();
  o.normalize_rewards = r.get<uint8_t>() != 0;
  const uint8_t rep = r.get<uint8_t>();
  if (rep > 1) fail(pre + "bad on_repeat");
  o.on_repeat = OnRepeat(rep);
  o.max_nodes = r.get<uint64_t>();
  o.virtual_loss = r.get<double>();
  o.max_retries = r.get<uint32_t>();
  o.levels.resize(size_t(r.count(cap, "levels")));
  for (Level& lv : o.levels) {
    lv.name = r.str();
    lv.options.resize(size_t(r.count(cap, "options")));
    for (auto& s : lv.options) s = r.str();
    lv.requires_.resize(size_t(r.count(cap, "requirements")));
    for (auto& [name, allowed] : lv.requires_) {
      name = r.str();
      allowed.resize(size_t(r.count(cap, "allowed options")));
      for (auto& a : allowed) a = r.str();
    }
  }
  MCTS m(std::move(o));  // validates options and levels
  const size_t L = m.opt_.levels.size();
  auto nopts = [&](int32_t l) { return int32_t(m.opt_.levels[size_t(l)].options.size()); };
  m.rng_state_ = r.get<uint64_t>();
  m.next_id_ = r.get<uint64_t>();
  m.num_told_ = r.get<uint64_t>();
  m.num_reused_ = r.get<uint64_t>();
  m.have_reward_ = r.get<uint8_t>() != 0;
  m.lo_ = r.get<double>();
  m.hi_ = r.get<double>();
  if (m.have_reward_ && !(std::isfinite(m.lo_) && std::isfinite(m.hi_) && m.lo_ <= m.hi_))
    fail(pre + "bad reward range");
  m.tell_sum_ = r.get<double>();
  m.tell_sumsq_ = r.get<double>();
  if (!std::isfinite(m.tell_sum_) || !std::isfinite(m.tell_sumsq_) || m.tell_sumsq_ < 0)
    fail(pre + "bad reward sums");

  const uint64_t nn = r.count(std::min<uint64_t>(cap, m.opt_.max_nodes), "nodes");
  if (nn < 1) fail(pre + "no root node");
  m.nodes_.resize(size_t(nn));
  for (Node& n : m.nodes_) {
    n.parent = r.get<int32_t>();
    n.first_child = r.get<int32_t>();
    n.level = r.get<int32_t>();
    n.option = r.get<int32_t>();
    n.num_children = r.get<uint32_t>();
    n.pending = r.get<uint32_t>();
    n.closed = r.get<uint32_t>();
    if (n.closed > 1) fail(pre + "bad node flag");
    n.visits = r.get<uint64_t>();
    n.sum = r.get<double>();
    n.best = r.get<double>();
  }
  // Structure: walk from the root with the design prefix; every child block must hold the
  // options of the next existing level, and every node must be reached exactly once.
  {
    const Node& root = m.nodes_[0];
    if (root.parent != -1 || root.level != -1 || root.option != -1) fail(pre + "bad root node");
    std::vector<uint8_t> seen(size_t(nn), 0);
    std::vector<std::pair<int32_t, Design>> stack{{0, Design(L, -1)}};
    seen[0] = 1;
    while (!stack.empty()) {
      auto [i, d] = std::move(stack.back());
      stack.pop_back();
      const Node& n = m.nodes_[size_t(i)];
      if (n.first_child == -1) {
        if (n.num_children != 0) fail(pre + "node without children has a child count");
        continue;
      }
      const int32_t lvl = m.next_level(n.level, d);
      if (lvl < 0 || n.first_child <= i || uint64_t(n.first_child) + n.num_children > nn ||
          int32_t(n.num_children) != nopts(lvl))
        fail(pre + "bad child block at node " + std::to_string(i));
      for (uint32_t k = 0; k < n.num_children; ++k) {
        const int32_t c = n.first_child + int32_t(k);
        const Node& cn = m.nodes_[size_t(c)];
        if (seen[size_t(c)] || cn.parent != i || cn.level != lvl || cn.option != int32_t(k))
          fail(pre + "bad node " + std::to_string(c));
        seen[size_t(c)] = 1;
        Design d2 = d;
        d2[size_t(lvl)] = int32_t(k);
        stack.emplace_back(c, std::move(d2));
      }
    }
    for (uint64_t i = 0; i < nn; ++i)
      if (!seen[size_t(i)]) fail(pre + "unreachable node " + std::to_string(i));
  }

  const uint64_t ne = r.count(cap, "designs");
  for (uint64_t e = 0; e < ne; ++e) {
    Design d(L);
    for (auto& v : d) v = r.get<int32_t>();
    Entry en;
    en.count = r.get<uint64_t>();
    en.pending = r.get<uint32_t>();
    en.sum = r.get<double>();
    m.check_design(d, pre + "design " + std::to_string(e));
    const uint64_t h = hash_of(d.data(), L);
    if (m.find_entry(d.data(), h) >= 0) fail(pre + "duplicate design " + std::to_string(e));
    m.entries_[m.add_entry(d.data(), h)] = en;
  }

  const uint64_t np = r.count(cap, "pending trials");
  std::vector<uint32_t> node_pending(size_t(nn), 0), entry_pending(size_t(ne), 0);
  std::vector<int32_t> path;
  for (uint64_t t = 0; t < np; ++t) {
    const uint64_t id = r.get<uint64_t>();
    const uint32_t entry = r.get<uint32_t>();
    path.resize(size_t(r.count(m.stride_, "path nodes")));
    for (auto& i : path) i = r.get<int32_t>();
    if (id >= m.next_id_ || entry >= ne || path.empty() || path[0] != 0)
      fail(pre + "bad pending trial");
    for (size_t k = 1; k < path.size(); ++k)
      if (path[k] <= 0 || uint64_t(path[k]) >= nn || m.nodes_[size_t(path[k])].parent != path[k - 1])
        fail(pre + "bad pending trial path");
    for (int32_t i : path) ++node_pending[size_t(i)];
    ++entry_pending[entry];
    const uint32_t slot = uint32_t(m.pend_.size());
    if (!m.slot_of_.insert(id, slot)) fail(pre + "duplicate pending trial");
    m.pend_.push_back(Pending{id, entry, uint32_t(path.size())});
    m.pend_paths_.resize(m.pend_paths_.size() + m.stride_);
    std::copy(path.begin(), path.end(), m.pend_paths_.end() - ptrdiff_t(m.stride_));
  }
  for (uint64_t i = 0; i < nn; ++i)
    if (node_pending[size_t(i)] != m.nodes_[size_t(i)].pending) fail(pre + "pending counts disagree");
  for (uint64_t e = 0; e < ne; ++e)
    if (entry_pending[size_t(e)] != m.entries_[size_t(e)].pending || (m.entries_[size_t(e)].count == 0 && entry_pending[size_t(e)] == 0))
      fail(pre + "design counts disagree");
  m.num_pending_ = np;
  if (m.nodes_[0].visits != m.num_told_ + m.num_reused_) fail(pre + "root visits disagree with tells");

  for (auto& lvl : m.stats_)
    for (OptionStats& s : lvl) {
      s.visits = r.get<uint64_t>();
      s.sum = r.get<double>();
      s.best = r.get<double>();
    }
  const uint64_t npairs = r.count(cap, "pair statistics");
  uint64_t last = 0;
  for (uint64_t i = 0; i < npairs; ++i) {
    const uint64_t key = r.get<uint64_t>();
    const uint64_t visits = r.get<uint64_t>();
    const double sum = r.get<double>();
    const int32_t pl = int32_t((key >> 48) & 0xFFFF), po = int32_t((key >> 32) & 0xFFFF);
    const int32_t l = int32_t((key >> 16) & 0xFFFF), o = int32_t(key & 0xFFFF);
    if ((i > 0 && key <= last) || pl >= l || size_t(l) >= L || po >= nopts(pl) || o >= nopts(l) ||
        visits == 0 || visits > m.num_told_ || !std::isfinite(sum))
      fail(pre + "bad pair statistics");
    m.pairs_.emplace(key, std::make_pair(visits, sum));
    last = key;
  }
  if (r.at != r.n) fail(pre + "trailing bytes");
  return m;
}

}  // namespace autokd::mcts
