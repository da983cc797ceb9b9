#include "engine/mcts/mcts.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <thread>

#include "engine/testing.h"

using autokd::mcts::Design;
using autokd::mcts::Level;
using autokd::mcts::MCTS;
using autokd::mcts::OnRepeat;
using autokd::mcts::Options;
using autokd::mcts::Selection;

namespace {

// The Auto-KD space of DESIGN.md: temperature and logit weight exist only with a logit distance.
std::vector<Level> autokd_levels() {
  std::vector<Level> L = {
      {"global_transform", {"original", "attention", "mask"}, {}},
      {"intra_spatial", {"original", "multi_scale", "local"}, {}},
      {"inter_spatial", {"original", "sample_wise", "channel_wise"}, {}},
      {"feature_distance", {"l2", "kl", "gram_l2"}, {}},
      {"feature_weight", {"1", "5", "25", "50"}, {}},
      {"logit_distance", {"none", "kl", "pearson"}, {}},
      {"tau", {"1", "2", "4", "8"}, {{"logit_distance", {"kl", "pearson"}}}},
      {"logit_weight", {"0.1", "0.5", "1", "5"}, {{"logit_distance", {"kl", "pearson"}}}},
  };
  return L;
}

Options opts(std::vector<Level> L, uint64_t seed = 0) {
  Options o;
  o.levels = std::move(L);
  o.seed = seed;
  return o;
}

// Toy reward with a unique optimum at option index 2 everywhere.
double toy_reward(const Design& d) {
  double r = 0;
  for (int32_t v : d)
    if (v >= 0) r += (v == 2) ? 1.0 : 0.1 * v;
  return r;
}

void check_invariants(const MCTS& m) {
  auto t = m.tree();
  AUTOKD_EXPECT(t[0].visits == m.num_told() + m.num_reused());
  AUTOKD_EXPECT(t[0].pending == m.num_pending());
  for (const auto& n : t) {
    if (n.parent < 0) continue;
    AUTOKD_EXPECT(n.visits <= t[size_t(n.parent)].visits);
  }
}

}  // namespace

AUTOKD_TEST(autokd_space_size) {
  MCTS m(opts(autokd_levels()));
  AUTOKD_EXPECT(m.num_designs() == "10692");  // 3^4 * 4 * (1 + 2 * 4 * 4)
  AUTOKD_EXPECT(m.num_designs_u64() == 10692);
}

AUTOKD_TEST(huge_space_is_exact) {
  std::vector<Level> L;
  for (int i = 0; i < 40; ++i) L.push_back({"l" + std::to_string(i), {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}, {}});
  MCTS m(opts(L));
  AUTOKD_EXPECT(m.num_designs() == "1" + std::string(40, '0'));
  AUTOKD_EXPECT(m.num_designs_u64() == std::numeric_limits<uint64_t>::max());
}

AUTOKD_TEST(entangled_space_has_unknown_size_but_searches) {
  std::vector<Level> L;
  std::vector<std::pair<std::string, std::vector<std::string>>> all_a;
  for (int i = 0; i < 17; ++i) {
    L.push_back({"b" + std::to_string(i), {"a", "b"}, {}});
    all_a.push_back({"b" + std::to_string(i), {"a"}});
  }
  L.push_back({"last", {"z"}, all_a});
  MCTS m(opts(L));
  AUTOKD_EXPECT(m.num_designs().empty());
  AUTOKD_EXPECT(m.ask(2).size() == 2);
}

AUTOKD_TEST(designs_from_names) {
  MCTS m(opts(autokd_levels()));
  std::vector<std::pair<std::string, std::string>> d = {
      {"global_transform", "mask"}, {"intra_spatial", "local"}, {"inter_spatial", "original"},
      {"feature_distance", "kl"},   {"feature_weight", "50"},   {"logit_distance", "none"}};
  Design x = m.design_from_names(d);
  AUTOKD_EXPECT(x[0] == 2 && x[4] == 3 && x[6] == -1 && x[7] == -1);
  auto extra = d;
  extra.push_back({"tau", "4"});  // tau does not exist without a logit distance
  AUTOKD_EXPECT_THROWS(m.design_from_names(extra), std::invalid_argument);
  auto missing = d;
  missing.pop_back();
  AUTOKD_EXPECT_THROWS(m.design_from_names(missing), std::invalid_argument);
  auto bad = d;
  bad[0].second = "rotate";
  AUTOKD_EXPECT_THROWS(m.design_from_names(bad), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell_design(Design{0, 0}, 1.0), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell_design(x, std::nan("")), std::invalid_argument);
  m.tell_design(x, 0.5);
  AUTOKD_EXPECT(m.num_told() == 1 && m.ask(1)[0].id == 1);
}

AUTOKD_TEST(bad_spaces_throw) {
  AUTOKD_EXPECT_THROWS(MCTS(opts({})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {}, {}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x", "x"}, {}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x"}, {}}, {"a", {"y"}, {}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x"}, {{"zz", {"x"}}}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x"}, {{"b", {"y"}}}}, {"b", {"y"}, {}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x"}, {}}, {"b", {"y"}, {{"a", {"nope"}}}}})), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS(opts({{"a", {"x"}, {}}, {"b", {"y"}, {{"a", {}}}}})), std::invalid_argument);
  Options o = opts(autokd_levels());
  o.exploration = std::nan("");
  AUTOKD_EXPECT_THROWS(MCTS(std::move(o)), std::invalid_argument);
  o = opts(autokd_levels());
  o.max_nodes = 0;
  AUTOKD_EXPECT_THROWS(MCTS(std::move(o)), std::invalid_argument);
  o = opts(autokd_levels());
  o.virtual_loss = -1;
  AUTOKD_EXPECT_THROWS(MCTS(std::move(o)), std::invalid_argument);
}

AUTOKD_TEST(zero_and_one_iteration) {
  MCTS m(opts(autokd_levels()));
  AUTOKD_EXPECT(m.ask(0).empty());
  Design d;
  double r;
  AUTOKD_EXPECT(!m.best(&d, &r));
  check_invariants(m);
  auto t = m.ask(1);
  AUTOKD_EXPECT(t.size() == 1 && m.num_pending() == 1);
  m.tell(t[0].id, 0.5);
  AUTOKD_EXPECT(m.num_told() == 1 && m.num_pending() == 0);
  AUTOKD_EXPECT(m.best(&d, &r) && d == t[0].design && r == 0.5);
  check_invariants(m);
}

AUTOKD_TEST(designs_respect_requirements) {
  MCTS m(opts(autokd_levels(), 3));
  for (int i = 0; i < 300; ++i) {
    auto t = m.ask(1)[0];
    const bool logits = t.design[5] != 0;
    AUTOKD_EXPECT((t.design[6] >= 0) == logits && (t.design[7] >= 0) == logits);
    for (int l = 0; l < 6; ++l) AUTOKD_EXPECT(t.design[size_t(l)] >= 0);
    m.tell(t.id, toy_reward(t.design));
  }
  check_invariants(m);
}

AUTOKD_TEST(bad_tells_throw) {
  MCTS m(opts(autokd_levels()));
  auto t = m.ask(2);
  AUTOKD_EXPECT_THROWS(m.tell(t[0].id, std::nan("")), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell(t[0].id, std::numeric_limits<double>::infinity()), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell(99, 1.0), std::invalid_argument);
  m.tell(t[1].id, 1.0);  // out of order
  AUTOKD_EXPECT_THROWS(m.tell(t[1].id, 1.0), std::invalid_argument);
  m.tell(t[0].id, 0.0);  // still pending after the rejected NaN
  AUTOKD_EXPECT(m.num_told() == 2 && m.num_pending() == 0);
}

AUTOKD_TEST(virtual_loss_spreads_and_vanishes) {
  Options o = opts(autokd_levels());
  o.selection = Selection::kUct;  // the virtual loss is UCT's; Thompson's draws spread asks
  MCTS m(std::move(o));
  auto t = m.ask(3);  // root has 3 global transforms: three pending asks take all three
  AUTOKD_EXPECT(t[0].design[0] != t[1].design[0] && t[1].design[0] != t[2].design[0] &&
                t[0].design[0] != t[2].design[0]);
  AUTOKD_EXPECT(m.tree()[0].pending == 3);
  for (auto& x : t) m.tell(x.id, toy_reward(x.design));
  for (const auto& n : m.tree()) AUTOKD_EXPECT(n.pending == 0);
}

AUTOKD_TEST(thompson_learns_across_branches) {
  // Additive reward over two levels of 8 options: after 24 tells (most of the 64 pairs still
  // untried) Thompson proposes the best options of both levels far more often than chance,
  // and than UCT, which learns each branch on its own (measured: 14-17 of 20 against 1-4 for
  // UCT, seeds 0-4). kAverage, so that a good design may be proposed again.
  std::vector<Level> L = {{"a", {"0", "1", "2", "3", "4", "5", "6", "7"}, {}},
                          {"b", {"0", "1", "2", "3", "4", "5", "6", "7"}, {}}};
  Options o = opts(L, 3);
  o.on_repeat = OnRepeat::kAverage;
  MCTS m(std::move(o));
  auto reward = [](const Design& d) { return double(d[0]) + double(d[1]); };
  for (int i = 0; i < 24; ++i) {
    auto t = m.ask(1);
    m.tell(t[0].id, reward(t[0].design));
  }
  int top = 0;
  for (int i = 0; i < 20; ++i) {
    auto t = m.ask(1);
    top += t[0].design[0] >= 6 && t[0].design[1] >= 6;
    m.tell(t[0].id, reward(t[0].design));
  }
  AUTOKD_EXPECT(top >= 10);  // chance: 20 * (2/8)^2 = 1.25
}

AUTOKD_TEST(finds_known_optimum) {
  std::vector<Level> L = {{"a", {"0", "1", "2", "3"}, {}}, {"b", {"0", "1", "2", "3"}, {}}, {"c", {"0", "1", "2"}, {}}};
  MCTS m(opts(L, 7));
  double best = -1;
  for (int i = 0; i < 48; ++i) {  // space of 48 designs
    auto t = m.ask(1)[0];
    double r = toy_reward(t.design);
    best = std::max(best, r);
    m.tell(t.id, r);
  }
  AUTOKD_EXPECT(best == 3.0);
  check_invariants(m);
}

AUTOKD_TEST(exhausted_space_repeats) {
  std::vector<Level> L = {{"a", {"x", "y"}, {}}};
  MCTS m(opts(L));
  for (int i = 0; i < 5; ++i) {
    auto t = m.ask(1)[0];
    m.tell(t.id, t.design[0]);
  }
  AUTOKD_EXPECT(m.num_told() == 5);
  check_invariants(m);
}

AUTOKD_TEST(serialize_round_trip_and_same_future) {
  MCTS a(opts(autokd_levels(), 11));
  for (int i = 0; i < 50; ++i) {
    auto t = a.ask(1)[0];
    a.tell(t.id, toy_reward(t.design));
  }
  auto pend = a.ask(2);
  std::string blob = a.serialize();
  MCTS b = MCTS::deserialize(blob);
  AUTOKD_EXPECT(b.serialize() == blob);
  for (auto& x : pend) {
    a.tell(x.id, 1.0);
    b.tell(x.id, 1.0);
  }
  for (int i = 0; i < 30; ++i) {
    auto ta = a.ask(1)[0], tb = b.ask(1)[0];
    AUTOKD_EXPECT(ta.id == tb.id && ta.design == tb.design);
    a.tell(ta.id, toy_reward(ta.design));
    b.tell(tb.id, toy_reward(tb.design));
  }
}

AUTOKD_TEST(corrupt_blobs_throw) {
  MCTS a(opts(autokd_levels()));
  for (int i = 0; i < 5; ++i) {
    auto t = a.ask(1)[0];
    a.tell(t.id, 0.1 * i);
  }
  a.ask(1);
  const std::string blob = a.serialize();
  for (size_t i = 0; i < blob.size(); ++i) {
    std::string bad = blob;
    bad[i] = char(bad[i] ^ 0x5a);
    AUTOKD_EXPECT_THROWS(MCTS::deserialize(bad), std::invalid_argument);
  }
  for (size_t n = 0; n < blob.size(); n += 7)
    AUTOKD_EXPECT_THROWS(MCTS::deserialize(blob.substr(0, n)), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(MCTS::deserialize(blob + "x"), std::invalid_argument);
}

AUTOKD_TEST(node_budget_stops_growth) {
  Options o = opts(autokd_levels());
  o.max_nodes = 10;
  MCTS m(std::move(o));
  for (int i = 0; i < 200; ++i) {
    auto t = m.ask(1)[0];
    m.tell(t.id, toy_reward(t.design));
  }
  AUTOKD_EXPECT(m.num_nodes() <= 10 && m.num_nodes() >= 4);
  check_invariants(m);
  Options one = opts(autokd_levels());
  one.max_nodes = 1;  // root only: pure random search
  MCTS r(std::move(one));
  auto t = r.ask(4);
  AUTOKD_EXPECT(r.num_nodes() == 1 && t.size() == 4);
}

AUTOKD_TEST(replay_matches_sequential_run) {
  Options o = opts(autokd_levels(), 5);
  o.on_repeat = OnRepeat::kAverage;
  MCTS a(o);
  MCTS b(o);
  for (int i = 0; i < 80; ++i) {
    auto t = a.ask(1)[0];
    a.tell(t.id, toy_reward(t.design));
    b.tell_design(t.design, toy_reward(t.design));
  }
  auto ta = a.tree(), tb = b.tree();
  AUTOKD_EXPECT(ta.size() == tb.size());
  for (size_t i = 0; i < ta.size() && i < tb.size(); ++i)
    AUTOKD_EXPECT(ta[i].visits == tb[i].visits && ta[i].sum_reward == tb[i].sum_reward && ta[i].option == tb[i].option);
}

AUTOKD_TEST(threads_do_not_corrupt_state) {
  MCTS m(opts(autokd_levels(), 1));
  std::vector<std::thread> ts;
  for (int w = 0; w < 4; ++w)
    ts.emplace_back([&m, w] {
      for (int i = 0; i < 500; ++i) {
        auto t = m.ask(1 + (i + w) % 3);
        for (auto& x : t) m.tell(x.id, toy_reward(x.design));
      }
    });
  for (auto& t : ts) t.join();
  AUTOKD_EXPECT(m.num_pending() == 0);
  check_invariants(m);
  MCTS back = MCTS::deserialize(m.serialize());  // deserialize re-checks every count
  AUTOKD_EXPECT(back.num_told() == m.num_told());
}

int main() { return autokd::testing::run_all(); }

AUTOKD_TEST(ask_many_equals_ask_and_tell_many_equals_tells) {
  // One engine through ask/tell, one through ask_many/tell_many with the same batch sizes and
  // the same order of tells: same ids, designs, and byte-identical state.
  MCTS a(opts(autokd_levels(), 5)), b(opts(autokd_levels(), 5));
  const size_t L = b.num_levels();
  const uint64_t sizes[] = {1, 3, 0, 1, 7, 16, 2, 1};
  for (int round = 0; round < 20; ++round) {
    const uint64_t k = sizes[round % 8];
    auto ta = a.ask(k);
    std::vector<uint64_t> ids(k);
    std::vector<int32_t> rows(k * L);
    b.ask_many(k, ids.data(), rows.data());
    std::vector<double> rewards;
    for (uint64_t i = 0; i < k; ++i) {
      AUTOKD_EXPECT(ta[i].id == ids[i]);
      AUTOKD_EXPECT(Design(rows.begin() + ptrdiff_t(i * L), rows.begin() + ptrdiff_t((i + 1) * L)) == ta[i].design);
      rewards.push_back(toy_reward(ta[i].design));
    }
    // Tell in reverse order to exercise out-of-order tells in both.
    std::vector<uint64_t> rid(ids.rbegin(), ids.rend());
    std::vector<double> rr(rewards.rbegin(), rewards.rend());
    for (uint64_t i = 0; i < k; ++i) a.tell(rid[i], rr[i]);
    b.tell_many(rid.data(), rr.data(), rid.size());
    AUTOKD_EXPECT(a.serialize() == b.serialize());
  }
  AUTOKD_EXPECT(b.num_pending() == 0 && b.tree()[0].visits == b.num_told() + b.num_reused());
}

AUTOKD_TEST(tell_many_checks_the_whole_batch_first) {
  MCTS m(opts(autokd_levels()));
  const size_t L = m.num_levels();
  uint64_t ids[3];
  std::vector<int32_t> rows(3 * L);
  m.ask_many(3, ids, rows.data());
  const std::string before = m.serialize();
  const double good[3] = {0.1, 0.2, 0.3};
  const double nan_last[3] = {0.1, 0.2, std::nan("")};
  const double inf_first[3] = {std::numeric_limits<double>::infinity(), 0.2, 0.3};
  AUTOKD_EXPECT_THROWS(m.tell_many(ids, nan_last, 3), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell_many(ids, inf_first, 3), std::invalid_argument);
  const uint64_t unknown[3] = {ids[0], ids[1], 99};
  AUTOKD_EXPECT_THROWS(m.tell_many(unknown, good, 3), std::invalid_argument);
  const uint64_t twice[3] = {ids[0], ids[1], ids[0]};
  AUTOKD_EXPECT_THROWS(m.tell_many(twice, good, 3), std::invalid_argument);
  AUTOKD_EXPECT(m.serialize() == before);  // nothing was told by a rejected batch
  m.tell_many(ids, good, 0);
  m.tell_many(ids + 1, good, 1);
  AUTOKD_EXPECT_THROWS(m.tell_many(ids, good, 2), std::invalid_argument);  // ids[1] already told
  const uint64_t rest[2] = {ids[2], ids[0]};
  m.tell_many(rest, good, 2);
  AUTOKD_EXPECT(m.num_told() == 3 && m.num_pending() == 0);
  for (const auto& n : m.tree()) AUTOKD_EXPECT(n.pending == 0);
}

AUTOKD_TEST(pending_slots_are_reused_and_serialised_in_id_order) {
  // Many trials pending at once, told out of order, then a round trip with some still pending.
  MCTS a(opts(autokd_levels(), 9));
  const size_t L = a.num_levels();
  std::vector<uint64_t> ids(40);
  std::vector<int32_t> rows(40 * L);
  a.ask_many(40, ids.data(), rows.data());
  for (size_t i = 0; i < 40; i += 3) a.tell(ids[i], double(i));
  a.ask_many(10, ids.data(), rows.data());  // reuses freed slots
  const std::string blob = a.serialize();
  MCTS b = MCTS::deserialize(blob);
  AUTOKD_EXPECT(b.serialize() == blob);
  AUTOKD_EXPECT(a.num_pending() == 40 - 14 + 10 && b.num_pending() == a.num_pending());
}

AUTOKD_TEST(pending_ids_found_under_any_tell_order) {
  // Thousands of pending ids told in a shuffled order while more are asked: every pending id
  // stays findable (the id table grows, wraps and shifts entries back on erase), told ids are
  // rejected, and a round trip keeps the pending set.
  MCTS m(opts(autokd_levels(), 4));
  const size_t L = m.num_levels();
  std::vector<uint64_t> pending;
  uint64_t rng = 12345;
  auto next = [&rng]() {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return rng >> 33;
  };
  std::vector<uint64_t> told;
  for (int round = 0; round < 40; ++round) {
    const uint64_t k = 1 + next() % 200;
    std::vector<uint64_t> ids(k);
    std::vector<int32_t> rows(k * L);
    m.ask_many(k, ids.data(), rows.data());
    pending.insert(pending.end(), ids.begin(), ids.end());
    for (size_t i = pending.size(); i > 1; --i) std::swap(pending[i - 1], pending[next() % i]);
    const size_t n = next() % (pending.size() + 1);
    std::vector<double> r(n, 0.5);
    m.tell_many(pending.data() + pending.size() - n, r.data(), n);
    told.insert(told.end(), pending.end() - ptrdiff_t(n), pending.end());
    pending.resize(pending.size() - n);
    AUTOKD_EXPECT(m.num_pending() == pending.size());
  }
  for (size_t i = 0; i < told.size(); i += 97) AUTOKD_EXPECT_THROWS(m.tell(told[i], 1.0), std::invalid_argument);
  AUTOKD_EXPECT_THROWS(m.tell(~uint64_t(0), 1.0), std::invalid_argument);
  MCTS b = MCTS::deserialize(m.serialize());
  for (uint64_t id : pending) {
    m.tell(id, 1.0);
    b.tell(id, 1.0);
  }
  AUTOKD_EXPECT(m.num_pending() == 0 && m.serialize() == b.serialize());
  for (const auto& nd : m.tree()) AUTOKD_EXPECT(nd.pending == 0);
}
