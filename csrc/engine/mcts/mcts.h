// Monte Carlo tree search over a tree-structured space of designs (the Auto-KD search engine).
// References: Kocsis & Szepesvari, "Bandit based Monte-Carlo planning" (ECML 2006); Browne et
// al., "A survey of Monte Carlo tree search methods" (IEEE TCIAIG 2012); Chaslot et al.,
// "Parallel Monte-Carlo tree search" (virtual loss, CG 2008); Auto-KD paper (seed text).
//
// Space
//   Ordered levels, each a list of named options. A level may carry requirements on earlier
//   levels: {earlier level -> allowed options}, ANDed. The level exists in a design only when
//   every named earlier level exists and was chosen with one of its allowed options; otherwise
//   it is skipped (absent from the design). A requirement on a skipped level is not met. A
//   design is one option for every existing level, so the tree is not a plain product (the
//   Auto-KD temperature level exists only when a logit distance other than "none" is chosen).
//
// Tree
//   The root is the empty design; a node's children are the options of the next existing level
//   given the choices on the path to it. Children are created as one block (one node per
//   option) the first time the search expands their parent.
//
// One proposal (ask). Two selection rules (Options::selection):
//
// kThompson (the default): Thompson sampling down the tree with priors shared across it.
//   Measured on the synthetic search-quality benchmark (benchmarks/studies/search_quality.py:
//   24 problems over the Auto-KD space), it returns better designs than UCT, uniform random
//   search and Optuna's TPE at 50, 100 and 300 evaluations; UCT spends most of a 100-trial
//   budget visiting every unvisited sibling once, and learns nothing across branches.
//   Every told reward also updates the statistics of each option it chose (n_o, S_o per level
//   and option) and of each pair of consecutive choices (n_p, S_p per (previous existing level,
//   its option, level, option)). At a node whose next level is l, with previous choice (l', o'):
//     g      = mean of all told rewards (0 before the first)
//     sigma  = their standard deviation (population), 1 while it is 0 or undefined
//     q_o    = (S_o + k g) / (n_o + k)                   option prior, shrunk to g
//     q_p    = (S_p + k q_o) / (n_p + k)                 pair prior, when (l', o', l, o) was told
//     m_i    = (S_i + k q) / (N_i + k)                   child i (option o): its own rewards (N_i
//                                                        visits, sum S_i, reused rewards
//                                                        included) shrunk to its prior q
//     draw_i = m_i + sigma / sqrt(N_i + k) * z_i,   z_i ~ N(0, 1)
//   and the walk moves to the child of largest draw (closed children skipped unless all are),
//   creating child blocks as it goes, down to a complete design: one walk expands the whole
//   path. Where the node budget stops the tree, the remaining levels are chosen by the same
//   draw with N_i = S_i = 0. k = prior_strength. Pending asks do not enter the draws (the
//   draws themselves spread concurrent asks; a pending repeat is retried, see Repeats). The
//   rule is invariant to the rewards' scale and offset, so normalize_rewards, exploration and
//   virtual_loss are not read. References: Thompson (1933); Bai, Wu & Chen, "Bayesian mixture
//   modelling and inference based Thompson sampling in Monte-Carlo tree search" (NIPS 2013);
//   shared option statistics in the spirit of RAVE/MAST (Gelly & Silver 2007; Finnsson &
//   Bjornsson 2008), here as hierarchical shrinkage priors instead of a blended score.
//
// kUct: the Auto-KD paper's rule, four phases:
//   1. Selection: from the root, while the node has a next level, its children exist and every
//      child has been visited (told or pending), move to the child of largest
//        v_i = Q_i + C * sqrt(2 ln max(1, N_p) / N_i)            (the Auto-KD paper's UCB)
//      with N_i = n_i + L * p_i (n_i tells through the child, p_i pending asks through it, L the
//      virtual loss), Q_i = (sum of the child's normalised rewards) / N_i, N_p the same count
//      for the parent. A pending ask counts as L visits of normalised reward 0, so concurrent
//      workers are steered to other branches; the virtual visits vanish at tell. A child with
//      N_i = 0 (only possible when L = 0) scores +inf. Ties go to the lowest option index.
//   2. Expansion: at the first node with an unvisited child (n_i + p_i = 0), create the child
//      block if absent (when the node budget allows), pick one unvisited child uniformly at
//      random and stop there. When the budget forbids creating the block, stop at the node.
//   3. Simulation: every remaining level that exists given the choices so far gets a uniform
//      random option (uniform per level, not per design). The reward comes later from tell.
//   4. Backpropagation (tell): every node on the proposal's path gets n += 1, sum += r,
//      best = max(best, r); the pending count added at ask is removed.
//
// Reward normalisation (normalize_rewards): rewards are kept raw in the tree and mapped by the
//   running min-max of all told rewards at selection: r' = (r - lo) / (hi - lo), so the
//   balance of Q and the exploration term does not depend on the reward's scale or offset.
//   While hi == lo every Q is 0. Without normalisation Q is the raw mean.
//
// Repeats (on_repeat), when a proposal is a design already told or pending:
//   kReuse:   a told design's mean reward is fed back along the new path (counted in
//             num_reused, not in num_told) and the proposal is retried; a pending design gets a
//             temporary virtual loss on its path and is retried. A walk that ends at a complete
//             design in the tree closes that node (its design is now told or pending); a node
//             whose children are all closed is closed too, and selection and expansion skip
//             closed children (unless all are closed). So the tree steers away from evaluated
//             designs instead of exploiting them again: UCT alone keeps re-selecting the best
//             leaf, which a deterministic design search must not evaluate twice. After
//             max_retries retries, or at once when every design of the space is told or pending,
//             the repeat is returned. When max_nodes stops the tree before complete designs,
//             nothing is closed and repeats are only bounded by max_retries.
//   kAverage: the repeat is returned to be evaluated again; designs keep the mean of their
//             rewards (best() ranks by that mean). Nothing is closed.
//   Invariant: root visits == num_told + num_reused (num_reused is 0 under kAverage).
//
// Randomness: one splitmix64 stream [Steele et al. 2014] seeded with `seed`. below(n) draws
//   nothing for n <= 1; otherwise it draws x until x >= (2^64 - n) mod n and returns x mod n
//   (unbiased). A normal draw is Box-Muller on two draws: u1 = ((x1 >> 11) + 1) 2^-53,
//   u2 = (x2 >> 11) 2^-53, z = sqrt(-2 ln u1) cos(2 pi u2). Draw order: UCT, the
//   unvisited-child pick, then the rollout levels in level order; Thompson, one z per
//   candidate child in option order, level by level.
//   tests/engine/mcts_reference.py implements the same algorithm in Python; both propose the
//   identical sequence of designs for the same seed and the same sequence of calls.
//
// Floating point: every formula is evaluated in the order written above without fused
//   multiply-add (mcts.cc turns contraction off), so the Python reference reproduces it bit for
//   bit.
//
// Node budget (max_nodes, root included): child blocks are created whole; a block that would
//   exceed the budget is not created and the walk rolls out from that node, so the tree stops
//   growing and the search continues (max_nodes = 1 is a uniform random search).
//
// Limits: at most 65,535 levels and 65,535 options per level; max_nodes >= 1 nodes (about 56
//   bytes each); num_designs() is exact (big integer), computed by dynamic programming over the
//   choices that later levels depend on (options no requirement tells apart merged, choices
//   dropped after their last reader); beyond 2^16 such states the size is reported unknown
//   (and "every design told or pending" is never assumed). Thread-safe: every public call takes one mutex (the Python binding
//   releases the GIL for ask(k >= 8), serialisation, deserialisation, history replay and tree
//   export; a short call is cheaper than a GIL release). Serialised blobs are little-endian.
//
// Batches: ask_many(k) is ask(k) written into flat arrays (no per-design allocation);
//   tell_many(ids, rewards) checks the whole batch (finite rewards, known ids, no id twice)
//   before it changes anything, then tells in the given order, so it equals that sequence of
//   tell calls. A run of ask_many(1)/tell_many of one trial is the serial algorithm exactly.
//
// Cost (Auto-KD space, 8 levels, 2,048 iterations from an empty tree): one ask+tell is about
//   0.3 us of C++ under kAverage, 0.4 us under kReuse (its retries walk the tree again) with
//   UCT; Thompson draws a normal per candidate child and looks up pair statistics in a hash
//   table, a few microseconds per ask, which no search whose trials train a network notices. Per
//   ask the only allocations are new tree nodes and a new design's record: a pending trial's
//   path lives in a slot pool reused after its tell, found by id in a flat hash table. The UCB score of each child needs one division and one square root, all
//   children's scores are computed before the argmax so they overlap; 2 ln N_p comes from a
//   table for integral N_p (every N_p when L is an integer), filled with the same expression.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace autokd::mcts {

struct Level {
  std::string name;
  std::vector<std::string> options;
  // (earlier level name, allowed options of it); all must hold for this level to exist.
  std::vector<std::pair<std::string, std::vector<std::string>>> requires_;
};

enum class OnRepeat : int { kReuse = 0, kAverage = 1 };
enum class Selection : int { kUct = 0, kThompson = 1 };

// Every option of the engine; validated by MCTS's constructor (std::invalid_argument).
struct Options {
  std::vector<Level> levels;
  Selection selection = Selection::kThompson;
  double prior_strength = 4.0;  // k: pseudo-observations of a node's shared-statistics prior
  double exploration = 0.7071067811865476;  // C; 1/sqrt(2) suits rewards in [0, 1]
  uint64_t seed = 0;
  bool normalize_rewards = true;
  OnRepeat on_repeat = OnRepeat::kReuse;
  uint64_t max_nodes = 1000000;  // root included; the tree stops growing at this size
  double virtual_loss = 1.0;     // L: virtual visits per pending ask, >= 0
  uint32_t max_retries = 100;    // kReuse: retries of a repeated proposal per ask
};

// A proposed (or told) design: the option index per level, -1 where the level is absent.
using Design = std::vector<int32_t>;

struct Trial {
  uint64_t id;
  Design design;
};

struct NodeInfo {
  int64_t id, parent;  // parent -1 for the root
  int32_t level, option;  // -1 for the root
  uint64_t visits;
  uint32_t pending;
  double sum_reward, best_reward;  // raw rewards; best is -inf while unvisited
};

struct OptionStats {
  uint64_t visits = 0;  // tells whose design chose this option
  double sum = 0.0;
  double best = -1.0 / 0.0;
};

// Tells whose design chose option `option` at level `level` right after option `prev_option`
// at level `prev_level` (the previous level the design has).
struct PairStats {
  int32_t prev_level, prev_option, level, option;
  uint64_t visits;
  double sum;
};

class MCTS {
 public:
  explicit MCTS(Options options);

  const Options& options() const { return opt_; }
  // k proposals (k >= 0), each marked pending until told.
  std::vector<Trial> ask(uint64_t k);
  // Finite reward for a pending trial id; any order.
  void tell(uint64_t trial_id, double reward);
  // ask(k) into ids[k] and designs[k * num_levels] (row-major, -1 for an absent level).
  void ask_many(uint64_t k, uint64_t* ids, int32_t* designs);
  // tell(ids[i], rewards[i]) for i in order, after checking the whole batch: a bad reward, an
  // unknown or already told id, or an id twice in the batch throws and tells nothing.
  void tell_many(const uint64_t* ids, const double* rewards, size_t n);
  size_t num_levels() const { return opt_.levels.size(); }

  uint64_t num_told() const;
  uint64_t num_pending() const;
  uint64_t num_reused() const;
  uint64_t num_nodes() const;
  // Design of highest mean reward (first told wins ties); false when nothing was told.
  bool best(Design* design, double* reward) const;
  std::vector<NodeInfo> tree() const;
  // [level][option]
  std::vector<std::vector<OptionStats>> level_stats() const;
  // Every pair of consecutive choices told so far, ordered by (level, option, prev_level,
  // prev_option).
  std::vector<PairStats> pair_stats() const;
  // Exact size of the space as a decimal string, empty when the dependencies are too entangled
  // to count (over 2^16 DP states); saturating 64-bit count below (UINT64_MAX when unknown).
  std::string num_designs() const { return num_designs_str_; }
  uint64_t num_designs_u64() const { return num_designs_u64_; }

  // Whole state (options, tree, designs, pending trials, rng) as bytes: magic, format version,
  // payload length, payload, FNV-1a 64 checksum. deserialize validates every field and index
  // and throws std::invalid_argument on a corrupt blob.
  std::string serialize() const;
  static MCTS deserialize(const std::string& blob);

  // Tells a design directly, as if it had been proposed and told: the path follows the design
  // down the tree with the same stopping rule as ask (expansion included), so a sequential run
  // replayed from its (design, reward) journal rebuilds the same tree and statistics.
  void tell_design(const Design& design, double reward);

  // Name-based conversions with validation (unknown level / option, missing or extra level).
  Design design_from_names(const std::vector<std::pair<std::string, std::string>>& items) const;
  int32_t level_index(const std::string& name) const;  // -1 when unknown

  MCTS(MCTS&& other) noexcept;
  MCTS& operator=(MCTS&&) = delete;
  MCTS(const MCTS&) = delete;

 private:
  struct Node {
    int32_t parent;
    int32_t first_child;  // -1 until the child block exists
    int32_t level;
    int32_t option;
    uint32_t num_children;
    uint32_t pending;
    uint32_t closed;  // kReuse: every design below is told or pending
    uint64_t visits;
    double sum;
    double best;
  };
  struct Req {
    int32_t level;
    std::vector<uint8_t> allowed;  // per option of `level`
  };
  struct Entry {  // one distinct design seen (told or pending); design in entry_designs_
    uint64_t count = 0;
    uint32_t pending = 0;
    double sum = 0.0;
  };
  struct Pending {  // a slot of the pending pool; path: pend_paths_[slot * stride_ + (0 .. len)]
    uint64_t id;
    uint32_t entry;
    uint32_t len;
  };

  // Pending id -> pool slot. Open addressing with linear probing from a Fibonacci hash of the
  // id (consecutive ids land far apart, so probe runs stay short), load at most 1/2,
  // backward-shift deletion; it allocates only when it grows.
  class IdSlots {
   public:
    int64_t find(uint64_t id) const;          // the slot, -1 when absent
    bool insert(uint64_t id, uint32_t slot);  // false when present
    void erase(uint64_t id);                  // id must be present
    size_t size() const { return size_; }
    std::vector<uint64_t> ids() const;        // in table order

   private:
    void grow();
    size_t home(uint64_t id) const { return size_t((id * 0x9E3779B97F4A7C15ull) >> (64 - bits_)); }
    int bits_ = 0;                // capacity 2^bits_ (home() is used only when bits_ >= 4)
    std::vector<uint64_t> keys_;  // id + 1; 0 = empty
    std::vector<uint32_t> slots_;
    size_t size_ = 0;
  };

  struct Uninit {};
  explicit MCTS(Uninit) {}
  void validate_and_index();
  bool level_exists(int32_t level, const Design& design) const;
  void check_design(const Design& design, const std::string& who) const;
  int32_t next_level(int32_t after, const Design& design) const;
  uint64_t below(uint64_t n);
  uint64_t next_u64();
  int32_t ucb_pick(const Node& parent, bool any_open);
  // kThompson: the option of `lvl` (a child of `parent`, or of no node when parent < 0) whose
  // posterior draw is largest; see the header comment for the formulas.
  int32_t thompson_pick(int32_t parent, int32_t lvl, int32_t prev_lvl, int32_t prev_opt, bool any_open,
                        double gm, double sigma);
  double normal();  // one standard normal draw (Box-Muller on two uniforms)
  bool descend_thompson(std::vector<int32_t>* path, Design* design);
  bool descend(std::vector<int32_t>* path, Design* design);  // true when the path ends at a complete design
  void close(int32_t node);
  void add_pending(const int32_t* path, size_t len, int delta);
  void backprop(const int32_t* path, size_t len, double reward);
  double two_ln(double np);  // 2 ln max(1, np)
  // Distinct designs: an open-addressing table (load at most 1/2, never shrinks) of design
  // hashes to entries; a hit is confirmed against the stored design.
  static uint64_t hash_of(const int32_t* design, size_t levels);
  int64_t find_entry(const int32_t* design, uint64_t hash) const;  // -1 when unseen
  uint32_t add_entry(const int32_t* design, uint64_t hash);        // an unseen design
  uint32_t entry_for(const Design& design);                        // found or added
  void record_tell(uint32_t entry, double reward);
  uint64_t ask_one(int32_t* design_out);  // returns the trial id
  // Pending pool: a slot per pending trial, reused after its tell.
  uint64_t add_pending_trial(uint32_t entry, const int32_t* path, size_t len);  // the new id
  void tell_slot(uint32_t slot, double reward);

  Options opt_;
  std::vector<std::vector<Req>> reqs_;  // per level
  std::unordered_map<std::string, int32_t> level_by_name_;
  std::string num_designs_str_;
  uint64_t num_designs_u64_ = 0;

  mutable std::mutex mu_;
  uint64_t rng_state_ = 0;
  std::vector<Node> nodes_;
  std::vector<Entry> entries_;  // in order of first sight
  std::vector<int32_t> entry_designs_;  // [entries, levels]
  const int32_t* entry_design(size_t e) const { return entry_designs_.data() + e * opt_.levels.size(); }
  std::vector<uint64_t> index_hash_;   // design table: hash
  std::vector<uint32_t> index_entry_;  // entry + 1; 0 = empty
  std::vector<Pending> pend_;          // slots
  std::vector<int32_t> pend_paths_;    // stride_ ints per slot
  std::vector<uint32_t> free_slots_;
  IdSlots slot_of_;
  size_t stride_ = 1;                  // longest path: levels + 1 (root)
  std::vector<int32_t> path_, design_;  // ask scratch
  std::vector<double> two_ln_;         // two_ln_[n] = 2 ln max(1, n)
  std::vector<double> scores_;         // ucb_pick scratch
  std::vector<uint32_t> batch_slots_;  // tell_many scratch
  std::vector<uint8_t> marked_;        // tell_many: slot already in the batch
  std::vector<std::vector<OptionStats>> stats_;
  // (prev_level, prev_option, level, option), 16 bits each -> visits, sum (kThompson's prior)
  std::unordered_map<uint64_t, std::pair<uint64_t, double>> pairs_;
  static uint64_t pair_key(int32_t pl, int32_t po, int32_t l, int32_t o) {
    return (uint64_t(uint16_t(pl)) << 48) | (uint64_t(uint16_t(po)) << 32) | (uint64_t(uint16_t(l)) << 16) |
           uint64_t(uint16_t(o));
  }
  double tell_sum_ = 0.0, tell_sumsq_ = 0.0;  // of told rewards (kThompson's scale)
  uint64_t next_id_ = 0, num_told_ = 0, num_reused_ = 0, num_pending_ = 0;
  bool have_reward_ = false;
  double lo_ = 0.0, hi_ = 0.0;
};

}  // namespace autokd::mcts
