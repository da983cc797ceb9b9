"""MCTS engine (autokd.search.mcts over csrc/engine/mcts) against its Python reference."""

import pickle
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcts_reference import ReferenceMCTS

from autokd.search.mcts import MCTS

AUTOKD_LEVELS = [
    {"name": "global_transform", "options": ["original", "attention", "mask"]},
    {"name": "intra_spatial", "options": ["original", "multi_scale", "local"]},
    {"name": "inter_spatial", "options": ["original", "sample_wise", "channel_wise"]},
    {"name": "feature_distance", "options": ["l2", "kl", "gram_l2"]},
    {"name": "feature_weight", "options": ["1", "5", "25", "50"]},
    {"name": "logit_distance", "options": ["none", "kl", "pearson"]},
    {
        "name": "tau",
        "options": ["1", "2", "4", "8"],
        "requires": {"logit_distance": ["kl", "pearson"]},
    },
    {
        "name": "logit_weight",
        "options": ["0.1", "0.5", "1", "5"],
        "requires": {"logit_distance": ["kl", "pearson"]},
    },
]

TOY = [
    {"name": "a", "options": ["0", "1", "2", "3"]},
    {"name": "b", "options": ["0", "1", "2", "3"]},
    {"name": "c", "options": ["0", "1", "2"]},
    {"name": "d", "options": ["0", "1", "2"], "requires": {"c": ["1", "2"]}},
    {"name": "e", "options": ["0", "1", "2", "3", "4"]},
]


def enumerate_designs(levels):
    """Every complete design of a space, by brute force (the spec of num_designs)."""
    out = [{}]
    for lv in levels:
        nxt = []
        for d in out:
            req = lv.get("requires") or {}
            if all(k in d and d[k] in v for k, v in req.items()):
                nxt.extend({**d, lv["name"]: o} for o in lv["options"])
            else:
                nxt.append(d)
        out = nxt
    return out


def toy_reward(design):
    """Additive; on TOY the unique optimum is every level at its highest option (d present).
    Non-numeric options (the Auto-KD space) count by their length."""
    return sum(int(v) if v.isdigit() else len(v) for v in design.values()) / 14.0


def drive(engines, iters, seed=0, max_k=4, max_lag=5):
    """Same random schedule of ask(k) and out-of-order tells on every engine; returns the
    proposals of the first (asserting the others agree)."""
    rng = random.Random(seed)
    pending, log = [], []
    for _ in range(iters):
        k = rng.choice([1, 1, 2, max_k])
        got = [e.ask(k) for e in engines]
        for g in got[1:]:
            assert g == got[0]
        log += got[0]
        pending += got[0]
        rng.shuffle(pending)
        while len(pending) > rng.randint(0, max_lag):
            tid, design = pending.pop()
            r = toy_reward(design) + rng.random() * 0.1
            for e in engines:
                e.tell(tid, r)
    for tid, design in pending:
        for e in engines:
            e.tell(tid, toy_reward(design))
    return log


def check_invariants(eng):
    tree = eng.tree()
    assert tree[0]["visits"] == eng.num_told + eng.num_reused
    assert tree[0]["pending"] == eng.num_pending
    by_id = {n["id"]: n for n in tree}
    kids = {}
    for n in tree[1:]:
        kids.setdefault(n["parent"], []).append(n)
    for pid, cs in kids.items():
        assert sum(c["pending"] for c in cs) <= by_id[pid]["pending"]
        assert sum(c["visits"] for c in cs) <= by_id[pid]["visits"]


# -- parity with the reference ----------------------------------------------------------------
OPTION_SETS = [
    {},
    {"on_repeat": "average"},
    {"max_nodes": 25},
    {"virtual_loss": 0.25, "exploration": 2.0},
    {"virtual_loss": 0.0},
    {"normalize_rewards": False, "seed": 2**64 - 1},
    {"max_retries": 0, "seed": 12345},
]


SELECTIONS = [
    {"selection": "uct"},
    {"selection": "thompson"},
    {"selection": "thompson", "prior_strength": 0.5},
]


@pytest.mark.parametrize(
    "sel", SELECTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
@pytest.mark.parametrize(
    "kw", OPTION_SETS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
def test_same_proposals_as_reference(kw, sel):
    kw = {**kw, **sel}
    seed = kw.pop("seed", 7)
    eng = MCTS(AUTOKD_LEVELS, seed=seed, **kw)
    ref = ReferenceMCTS(AUTOKD_LEVELS, seed=seed, **kw)
    drive([eng, ref], 300)
    assert eng.num_told == ref.num_told and eng.num_reused == ref.num_reused
    assert eng.num_nodes == len(ref.nodes)
    check_invariants(eng)


@pytest.mark.parametrize("selection", ["uct", "thompson"])
def test_same_proposals_on_toy_until_exhausted(selection):
    # Past the size of the space (144 designs), under reuse and average.
    for mode in ("reuse", "average"):
        kw = {"seed": 3, "on_repeat": mode, "selection": selection}
        eng, ref = MCTS(TOY, **kw), ReferenceMCTS(TOY, **kw)
        drive([eng, ref], 200)
        assert eng.num_told == ref.num_told


@pytest.mark.parametrize("selection", ["uct", "thompson"])
def test_same_proposals_with_many_pending_repeats(selection):
    # Large batches on a small space: pending repeats, held virtual losses, closing, exhaustion.
    for mode in ("reuse", "average"):
        kw = {"seed": 8, "on_repeat": mode, "max_retries": 5, "selection": selection}
        eng, ref = MCTS(TOY, **kw), ReferenceMCTS(TOY, **kw)
        drive([eng, ref], 60, seed=1, max_k=16, max_lag=40)
        assert eng.num_reused == ref.num_reused and eng.tree()[0]["visits"] == ref.nodes[0].visits
        check_invariants(eng)


@st.composite
def spaces(draw):
    n = draw(st.integers(1, 5))
    levels = []
    for i in range(n):
        opts = [f"o{j}" for j in range(draw(st.integers(1, 4)))]
        lv = {"name": f"l{i}", "options": opts}
        if i and draw(st.booleans()):
            reqs = {}
            for j in draw(st.sets(st.integers(0, i - 1), min_size=1, max_size=2)):
                prev = levels[j]["options"]
                reqs[f"l{j}"] = draw(
                    st.lists(st.sampled_from(prev), min_size=1, max_size=len(prev), unique=True)
                )
            lv["requires"] = reqs
        levels.append(lv)
    return levels


@settings(max_examples=25, deadline=None)
@given(
    levels=spaces(),
    seed=st.integers(0, 2**64 - 1),
    mode=st.sampled_from(["reuse", "average"]),
    selection=st.sampled_from(["uct", "thompson"]),
)
def test_random_spaces_match_reference_and_count(levels, seed, mode, selection):
    eng = MCTS(levels, seed=seed, on_repeat=mode, selection=selection)
    ref = ReferenceMCTS(levels, seed=seed, on_repeat=mode, selection=selection)
    assert eng.num_designs() == ref.size == len(enumerate_designs(levels))
    log = drive([eng, ref], 40, seed=seed % 1000)
    valid = enumerate_designs(levels)
    for _, design in log:
        assert design in valid
    check_invariants(eng)


# -- the Auto-KD space ------------------------------------------------------------------------
def test_autokd_space_is_expressible_and_counted():
    eng = MCTS(AUTOKD_LEVELS)
    assert eng.num_designs() == len(enumerate_designs(AUTOKD_LEVELS)) == 3**4 * 4 * (1 + 2 * 4 * 4)
    for tid, design in eng.ask(200):
        has_logits = design["logit_distance"] != "none"
        assert ("tau" in design) == has_logits and ("logit_weight" in design) == has_logits
        eng.tell(tid, toy_reward({k: "0" for k in design}))
    assert eng.levels[6] == AUTOKD_LEVELS[6]


def test_num_designs_is_exact_beyond_64_bits():
    levels = [{"name": f"l{i}", "options": [str(j) for j in range(10)]} for i in range(30)]
    levels.append({"name": "x", "options": ["a", "b"], "requires": {"l0": ["0"]}})
    assert MCTS(levels).num_designs() == 10**30 + 10**29


def test_num_designs_of_long_dependency_chains_and_entangled_spaces():
    chain = [{"name": "l0", "options": ["on", "off", "x"]}]
    for i in range(1, 40):  # each level exists only when the previous one is "on"
        chain.append(
            {"name": f"l{i}", "options": ["on", "off", "x"], "requires": {f"l{i - 1}": ["on"]}}
        )
    assert MCTS(chain).num_designs() == len(enumerate_designs(chain)) == 2 * 39 + 3
    knots = [{"name": f"b{i}", "options": ["a", "b"]} for i in range(17)]
    knots.append(
        {"name": "last", "options": ["z"], "requires": {f"b{i}": ["a"] for i in range(17)}}
    )
    eng = MCTS(knots)  # 2^17 dependency states: the size is unknown, the search still works
    with pytest.raises(ValueError, match="too entangled"):
        eng.num_designs()
    assert len(eng.ask(3)) == 3 and "designs=?" in repr(eng)


# -- search quality ---------------------------------------------------------------------------
def evals_to_reach(propose_and_tell, target, budget):
    for i in range(1, budget + 1):
        if propose_and_tell() >= target:
            return i
    return budget + 1


def test_finds_known_optimum_within_budget():
    optimum = max(toy_reward(d) for d in enumerate_designs(TOY))
    for seed in range(10):
        eng = MCTS(TOY, seed=seed)
        for _ in range(eng.num_designs()):  # the budget: one pass over the space's size
            ((tid, d),) = eng.ask()
            eng.tell(tid, toy_reward(d))
        assert eng.best()[1] == optimum
        assert eng.best()[0] == {"a": "3", "b": "3", "c": "2", "d": "2", "e": "4"}


def test_reaches_target_in_fewer_evaluations_than_random_search():
    designs = enumerate_designs(AUTOKD_LEVELS)
    rank = {
        lv["name"]: {o: i / (len(lv["options"]) - 1) for i, o in enumerate(lv["options"])}
        for lv in AUTOKD_LEVELS
    }

    def reward(d):  # smooth, with a unique optimum
        return sum(rank[k][v] for k, v in d.items()) / 8.0

    target = sorted(reward(d) for d in designs)[-10]  # a top-10 design of 10,692
    mcts_n, rand_n = [], []
    for seed in range(12):
        eng = MCTS(AUTOKD_LEVELS, seed=seed)

        def step():
            ((tid, d),) = eng.ask()
            r = reward(d)
            eng.tell(tid, r)
            return r

        mcts_n.append(evals_to_reach(step, target, 3000))
        rng = random.Random(seed)
        rand_n.append(evals_to_reach(lambda: reward(rng.choice(designs)), target, 3000))
    assert sum(mcts_n) < sum(rand_n) / 2, (mcts_n, rand_n)


# -- invariants -------------------------------------------------------------------------------
def test_zero_and_one_iterations():
    eng = MCTS(AUTOKD_LEVELS)
    assert eng.ask(0) == [] and eng.best() is None and eng.num_told == 0
    assert len(eng.tree()) == 1 and eng.tree()[0]["mean_reward"] is None
    assert all(
        s["visits"] == 0 and s["mean"] is None
        for lv in eng.level_stats().values()
        for s in lv.values()
    )
    check_invariants(eng)
    ((tid, design),) = eng.ask(1)
    assert eng.num_pending == 1
    eng.tell(tid, 0.25)
    assert eng.best() == (design, 0.25) and eng.num_told == 1 and eng.num_pending == 0
    check_invariants(eng)


def test_root_visits_equal_tells_and_virtual_loss_vanishes():
    eng = MCTS(AUTOKD_LEVELS, on_repeat="average", seed=1)
    drive([eng], 150)
    tree = eng.tree()
    assert tree[0]["visits"] == eng.num_told and eng.num_reused == 0
    assert all(n["pending"] == 0 for n in tree)
    eng2 = MCTS(TOY, seed=1)  # reuse past exhaustion: fed-back rewards are counted apart
    drive([eng2], 200)
    assert eng2.tree()[0]["visits"] == eng2.num_told + eng2.num_reused
    assert all(n["pending"] == 0 for n in eng2.tree())


def test_virtual_loss_spreads_concurrent_asks():
    eng = MCTS(AUTOKD_LEVELS, selection="uct")
    firsts = {d["global_transform"] for _, d in eng.ask(3)}
    assert len(firsts) == 3
    assert eng.tree()[0]["pending"] == 3


def test_same_seed_same_tree_other_seed_other_tree():
    trees = []
    for seed in (5, 5, 6):
        eng = MCTS(AUTOKD_LEVELS, seed=seed)
        drive([eng], 100)
        trees.append(eng.tree())
    assert trees[0] == trees[1] and trees[0] != trees[2]


def test_normalisation_makes_search_scale_free():
    def run(scale, normalize, selection="uct"):
        eng = MCTS(AUTOKD_LEVELS, seed=4, normalize_rewards=normalize, selection=selection)
        log = []
        for _ in range(150):
            ((tid, d),) = eng.ask()
            log.append(d)
            eng.tell(tid, toy_reward(d) * scale)
        return log

    assert run(1.0, True) == run(1024.0, True)  # power-of-two scale: bit-exact normalised values
    assert run(1.0, False) != run(1024.0, False)
    # Thompson selection scales its draws by the rewards' own spread: scale-free without the
    # normalisation (which only UCT reads)
    assert run(1.0, False, "thompson") == run(1024.0, False, "thompson")


def test_node_budget():
    eng = MCTS(AUTOKD_LEVELS, max_nodes=40)
    drive([eng], 200)
    assert 4 <= eng.num_nodes <= 40
    check_invariants(eng)
    flat = MCTS(AUTOKD_LEVELS, max_nodes=1)  # root only: a uniform random search
    assert len(flat.ask(5)) == 5 and flat.num_nodes == 1


def test_level_stats_aggregate_tells():
    eng = MCTS(AUTOKD_LEVELS, seed=9)
    told = []
    for _ in range(60):
        ((tid, d),) = eng.ask()
        r = toy_reward(d) + 0.01 * len(told)
        eng.tell(tid, r)
        told.append((d, r))
    stats = eng.level_stats()
    for lv in AUTOKD_LEVELS:
        for o in lv["options"]:
            rs = [r for d, r in told if d.get(lv["name"]) == o]
            s = stats[lv["name"]][o]
            assert s["visits"] == len(rs)
            if rs:
                assert s["mean"] == pytest.approx(sum(rs) / len(rs)) and s["best"] == max(rs)


def test_average_mode_returns_repeats_and_averages():
    eng = MCTS([{"name": "a", "options": ["x", "y"]}], on_repeat="average")
    seen = []
    for i in range(6):
        ((tid, d),) = eng.ask()
        seen.append(d["a"])
        eng.tell(tid, 1.0 if (d["a"] == "x" and i % 2) else 0.5)
    assert len(seen) == 6 and eng.num_told == 6
    best, r = eng.best()
    assert r in (0.5, 0.75, 1.0) and eng.tree()[0]["visits"] == 6


def test_reuse_mode_does_not_return_known_designs_before_exhaustion():
    eng = MCTS(TOY, seed=2)
    seen = set()
    for _ in range(eng.num_designs()):
        ((tid, d),) = eng.ask()
        key = tuple(sorted(d.items()))
        assert key not in seen
        seen.add(key)
        eng.tell(tid, toy_reward(d))
    ((tid, d),) = eng.ask()  # space exhausted: a repeat comes back
    assert tuple(sorted(d.items())) in seen


# -- persistence ------------------------------------------------------------------------------
def test_serialize_round_trip_gives_identical_future():
    a = MCTS(AUTOKD_LEVELS, seed=21, virtual_loss=0.5)
    drive([a], 80)
    pend = a.ask(3)
    blob = a.serialize()
    b = MCTS.deserialize(blob)
    c = pickle.loads(pickle.dumps(a))
    assert isinstance(b, MCTS) and b.serialize() == blob and c.serialize() == blob
    assert b.options == a.options and b.levels == a.levels and b.tree() == a.tree()
    for tid, d in pend:
        for e in (a, b, c):
            e.tell(tid, toy_reward(d))
    drive([a, b, c], 60, seed=3)


def test_from_history_reproduces_statistics():
    for mode in ("average", "reuse"):
        eng = MCTS(AUTOKD_LEVELS, seed=13, on_repeat=mode)
        journal = []
        for _ in range(120):
            ((tid, d),) = eng.ask()
            r = toy_reward(d)
            eng.tell(tid, r)
            journal.append((d, r))
        back = MCTS.from_history(AUTOKD_LEVELS, journal, seed=13, on_repeat=mode)
        assert back.num_told == eng.num_told and back.best() == eng.best()
        assert back.level_stats() == eng.level_stats()
        if mode == "average":  # nothing fed back internally: the very same tree
            assert back.tree() == eng.tree()
        assert back.ask(1)[0][0] == 120


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "levels, match",
    [
        ([], "at least one level"),
        ([{"name": "a", "options": []}], "no options"),
        ([{"name": "a", "options": ["x", "x"]}], "duplicate option 'x'"),
        (
            [{"name": "a", "options": ["x"]}, {"name": "a", "options": ["y"]}],
            "duplicate level name 'a'",
        ),
        ([{"name": "a", "options": ["x"], "requires": {"zz": ["x"]}}], "unknown level 'zz'"),
        (
            [
                {"name": "a", "options": ["x"], "requires": {"b": ["y"]}},
                {"name": "b", "options": ["y"]},
            ],
            "not an earlier level",
        ),
        (
            [
                {"name": "a", "options": ["x"]},
                {"name": "b", "options": ["y"], "requires": {"a": ["q"]}},
            ],
            "unknown option 'q'",
        ),
        (
            [
                {"name": "a", "options": ["x"]},
                {"name": "b", "options": ["y"], "requires": {"a": []}},
            ],
            "no allowed options",
        ),
        ([{"name": "a", "options": [1, 2]}], "as strings"),
        ([{"name": "a", "options": ["x"], "weights": [1]}], "unknown keys"),
        ("abc", "list of dicts"),
    ],
)
def test_bad_spaces(levels, match):
    with pytest.raises(ValueError, match=match):
        MCTS(levels)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"exploration": float("nan")}, "exploration"),
        ({"exploration": -1.0}, "exploration"),
        ({"virtual_loss": -0.5}, "virtual_loss"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"seed": -1}, "seed"),
        ({"on_repeat": "skip"}, "on_repeat"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        MCTS(AUTOKD_LEVELS, **kw)


def test_bad_tells():
    eng = MCTS(AUTOKD_LEVELS)
    (t0, _), (t1, _) = eng.ask(2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            eng.tell(t0, bad)
    with pytest.raises(ValueError, match="never asked"):
        eng.tell(99, 1.0)
    with pytest.raises(ValueError, match="never asked"):
        eng.tell(-1, 1.0)
    eng.tell(t1, 1.0)
    with pytest.raises(ValueError, match="already told"):
        eng.tell(t1, 1.0)
    eng.tell(t0, 0.5)  # a rejected reward left the trial pending
    assert eng.num_told == 2 and eng.num_pending == 0
    with pytest.raises(ValueError, match="k >= 0"):
        eng.ask(-1)


def test_ask_tell_arguments():
    # ask and tell are plain pybind11 methods: keywords, arity and types as a Python method,
    # pybind11's TypeError naming the signature for a wrong argument.
    eng = MCTS(AUTOKD_LEVELS)
    (t0, d0), (t1, _) = eng.ask(k=2)
    eng.tell(trial_id=t0, reward=1)  # an int reward is a number
    eng.tell(t1, reward=0.5)
    assert eng.num_told == 2
    for call, exc, match in [
        (lambda: eng.ask("2"), TypeError, r"(?s)ask\(\): incompatible function arguments.*k: "),
        (lambda: eng.ask(1, 2), TypeError, r"ask\(\): incompatible"),
        (lambda: eng.ask(n=1), TypeError, r"ask\(\): incompatible"),
        (lambda: eng.tell(0), TypeError, r"(?s)tell\(\): incompatible.*reward"),
        (lambda: eng.tell(0, 1.0, reward=1.0), TypeError, r"tell\(\): incompatible"),
        (lambda: eng.tell(0.0, 1.0), TypeError, r"(?s)tell\(\): incompatible.*trial_id: int"),
        (lambda: eng.tell(0, "1.0"), TypeError, r"tell\(\): incompatible"),
        (lambda: eng.tell(2**70, 1.0), ValueError, "never asked"),
        (lambda: eng.tell(-1, 1.0), ValueError, "never asked"),
        (lambda: eng.ask(-1), ValueError, "k >= 0"),
        (lambda: eng.ask(2**64), TypeError, r"ask\(\): incompatible"),
    ]:
        with pytest.raises(exc, match=match):
            call()

    class Mixin:
        pass

    class Mixed(Mixin, MCTS):  # another base in the MRO
        pass

    m = Mixed(AUTOKD_LEVELS)
    ((tid, design),) = m.ask()
    m.tell(tid, 0.5)
    assert m.num_told == 1 and design == d0


def test_corrupt_blobs():
    eng = MCTS(AUTOKD_LEVELS)
    drive([eng], 10)
    eng.ask(2)
    blob = eng.serialize()
    rng = random.Random(0)
    for i in sorted(rng.sample(range(len(blob)), 200)) + [0, 8, 12, len(blob) - 1]:
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        with pytest.raises(ValueError, match="corrupt blob"):
            MCTS.deserialize(bytes(bad))
    for n in (0, 7, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError, match="corrupt blob"):
            MCTS.deserialize(blob[:n])
    with pytest.raises(ValueError, match="corrupt blob"):
        MCTS.deserialize(blob + b"\0")
    with pytest.raises(ValueError, match="version"):
        MCTS.deserialize(blob[:8] + (99).to_bytes(4, "little") + blob[12:])
    with pytest.raises(ValueError, match="bytes"):
        MCTS.deserialize("not bytes")


@pytest.mark.parametrize(
    "design, match",
    [
        ({"global_transform": "original"}, "lacks level"),
        (
            {
                **dict.fromkeys(["global_transform", "intra_spatial", "inter_spatial"], "original"),
                "feature_distance": "l2",
                "feature_weight": "1",
                "logit_distance": "none",
                "tau": "4",
            },
            "does not exist",
        ),
        ({"nope": "x"}, "unknown level 'nope'"),
        ({"global_transform": "rotate"}, "unknown option 'rotate'"),
        ("not a dict", "design dict"),
    ],
)
def test_bad_history(design, match):
    with pytest.raises(ValueError, match=match):
        MCTS.from_history(AUTOKD_LEVELS, [(design, 1.0)])


def test_bad_history_reward():
    d = {
        "global_transform": "original",
        "intra_spatial": "original",
        "inter_spatial": "original",
        "feature_distance": "l2",
        "feature_weight": "1",
        "logit_distance": "none",
    }
    MCTS.from_history(AUTOKD_LEVELS, [(d, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        MCTS.from_history(AUTOKD_LEVELS, [(d, float("nan"))])


# -- threads ----------------------------------------------------------------------------------
def run_threads(work, n=4):
    """Runs work(rng) on n threads, each with its own seeded RNG; the errors any of them raised."""
    errors = []

    def worker(w):
        try:
            work(random.Random(w))
        except Exception as e:  # pragma: no cover - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_ask_and_tell_concurrently():
    eng = MCTS(AUTOKD_LEVELS, seed=3)

    def work(rng):
        for i in range(300):
            for tid, d in eng.ask(rng.choice([1, 2, 16])):  # 16: the GIL-free path
                eng.tell(tid, toy_reward(d))

    assert not run_threads(work)
    assert eng.num_pending == 0 and all(n["pending"] == 0 for n in eng.tree())
    check_invariants(eng)
    back = MCTS.deserialize(eng.serialize())  # deserialize re-checks every count
    assert back.num_told == eng.num_told
