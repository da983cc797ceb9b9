"""Batched MCTS API: ask_many(k) -> (ids, option-index rows), tell_many(ids, rewards), decode."""

import random

import numpy as np
import pytest
from mcts_reference import ReferenceMCTS
from test_mcts import AUTOKD_LEVELS, TOY, check_invariants, run_threads, toy_reward

from autokd.search.mcts import MCTS


def drive_batched(eng, ref, iters, seed=0, max_k=4, max_lag=5):
    """The drive() schedule of test_mcts, with eng on ask_many/tell_many and ref on ask/tell:
    same proposals, same out-of-order tells (each tell batch is one tell_many call)."""
    rng = random.Random(seed)
    pending = []
    for _ in range(iters):
        k = rng.choice([1, 1, 2, max_k])
        ids, rows = eng.ask_many(k)
        got = ref.ask(k)
        assert [int(i) for i in ids] == [t for t, _ in got]
        assert eng.decode(rows) == [d for _, d in got]
        pending += got
        rng.shuffle(pending)
        batch = []
        while len(pending) > rng.randint(0, max_lag):
            tid, design = pending.pop()
            batch.append((tid, toy_reward(design) + rng.random() * 0.1))
        for tid, r in batch:
            ref.tell(tid, r)
        eng.tell_many(np.array([t for t, _ in batch], dtype=np.int64), [r for _, r in batch])
    for tid, design in pending:
        ref.tell(tid, toy_reward(design))
    eng.tell_many([t for t, _ in pending], [toy_reward(d) for _, d in pending])


@pytest.mark.parametrize(
    "kw", [{}, {"on_repeat": "average"}, {"virtual_loss": 0.25, "max_nodes": 40}]
)
def test_batched_api_proposes_the_reference_sequence(kw):
    eng, ref = MCTS(AUTOKD_LEVELS, seed=7, **kw), ReferenceMCTS(AUTOKD_LEVELS, seed=7, **kw)
    drive_batched(eng, ref, 200)
    assert eng.num_told == ref.num_told and eng.num_reused == ref.num_reused
    assert eng.num_nodes == len(ref.nodes)
    check_invariants(eng)


def test_batched_on_small_space_past_exhaustion():
    for mode in ("reuse", "average"):
        eng, ref = (
            MCTS(TOY, seed=8, on_repeat=mode, max_retries=5),
            ReferenceMCTS(TOY, seed=8, on_repeat=mode, max_retries=5),
        )
        drive_batched(eng, ref, 60, seed=1, max_k=16, max_lag=40)
        assert eng.num_reused == ref.num_reused and eng.tree()[0]["visits"] == ref.nodes[0].visits


def test_k1_batches_are_the_serial_algorithm():
    serial, batched = MCTS(AUTOKD_LEVELS, seed=3), MCTS(AUTOKD_LEVELS, seed=3)
    for _ in range(300):
        ((tid, design),) = serial.ask(1)
        ids, rows = batched.ask_many(1)
        assert int(ids[0]) == tid and batched.decode(rows[0]) == design
        serial.tell(tid, toy_reward(design))
        batched.tell_many(ids, [toy_reward(design)])
    assert serial.serialize() == batched.serialize()
    assert serial.tree() == batched.tree()


def test_shapes_dtypes_and_absent_levels():
    eng = MCTS(AUTOKD_LEVELS, seed=1)
    ids, rows = eng.ask_many(0)
    assert (
        ids.shape == (0,)
        and ids.dtype == np.int64
        and rows.shape == (0, 8)
        and rows.dtype == np.int32
    )
    ids, rows = eng.ask_many(64)
    assert ids.tolist() == list(range(64)) and rows.shape == (64, 8)
    absent = rows[:, 5] == 0  # logit_distance "none": tau and logit_weight do not exist
    assert absent.any() and (rows[absent][:, 6:] == -1).all() and (rows[~absent][:, 6:] >= 0).all()
    assert eng.num_pending == 64
    eng.tell_many(ids, np.linspace(0, 1, 64))
    assert eng.num_pending == 0 and eng.num_told == 64


def test_invariants_after_batches():
    eng = MCTS(AUTOKD_LEVELS, seed=2)
    rng = np.random.default_rng(0)
    held = []
    for _ in range(30):
        ids, _ = eng.ask_many(int(rng.integers(1, 20)))
        held += ids.tolist()
        rng.shuffle(held)
        cut = int(rng.integers(0, len(held) + 1))
        eng.tell_many(held[:cut], rng.random(cut))
        held = held[cut:]
        assert eng.tree()[0]["pending"] == eng.num_pending == len(held)
    eng.tell_many(held, rng.random(len(held)))
    tree = eng.tree()
    assert tree[0]["visits"] == eng.num_told + eng.num_reused
    assert all(n["pending"] == 0 for n in tree)
    check_invariants(eng)


def test_same_seed_same_tree():
    def run(seed):
        eng = MCTS(AUTOKD_LEVELS, seed=seed)
        for _ in range(20):
            ids, rows = eng.ask_many(8)
            eng.tell_many(ids[::-1], [toy_reward(d) for d in eng.decode(rows[::-1])])
        return eng.tree()

    assert run(5) == run(5) and run(5) != run(6)


def test_bad_tell_many_tells_nothing():
    eng = MCTS(AUTOKD_LEVELS)
    ids, _ = eng.ask_many(3)
    before = eng.serialize()
    bad = [
        (ids, [0.1, float("nan"), 0.3], "finite"),
        (ids, [0.1, 0.2, float("inf")], "finite"),
        ([ids[0], ids[1], 99], [0.1, 0.2, 0.3], "unknown trial id 99 at index 2 .never asked"),
        ([ids[0], -1], [0.1, 0.2], "unknown trial id -1"),
        ([ids[0], ids[1], ids[0]], [0.1, 0.2, 0.3], "appears twice"),
        (ids, [0.1, 0.2], "as many rewards as ids, got 3 ids and 2 rewards"),
        (ids[:2], [0.1, 0.2, 0.3], "as many rewards as ids"),
        (ids.astype(np.float64), [0.1, 0.2, 0.3], "integers"),
        (ids.reshape(1, 3), [[0.1, 0.2, 0.3]], "1-D"),
        (ids, ["a", "b", "c"], "numbers"),
        (ids, [True, False, True], "numbers"),
    ]
    for i, r, match in bad:
        with pytest.raises(ValueError, match=match):
            eng.tell_many(i, r)
        assert eng.serialize() == before, match  # the whole batch was rejected
    eng.tell_many(ids[1:2], [0.5])
    with pytest.raises(ValueError, match="already told"):
        eng.tell_many(ids, [0.1, 0.2, 0.3])
    assert eng.num_told == 1 and eng.num_pending == 2
    eng.tell_many([], [])
    eng.tell_many(np.array([ids[2], ids[0]], dtype=np.uint64), np.array([1, 0], dtype=np.int32))
    assert eng.num_told == 3 and eng.num_pending == 0
    with pytest.raises(ValueError, match="k >= 0"):
        eng.ask_many(-1)


def test_decode():
    eng = MCTS(AUTOKD_LEVELS)
    ((tid, design),) = MCTS(AUTOKD_LEVELS).ask(1)
    _, rows = eng.ask_many(1)
    assert eng.decode(rows[0]) == design and eng.decode(rows) == [design]
    assert eng.decode(rows[0].tolist()) == design
    for bad, match in [
        (np.zeros((1, 7), np.int32), "shape"),
        (np.zeros(8), "integer"),
        ([0, 0, 0, 0, 0, 0, 4, 0], "option index 4 for level 'tau'"),
        ([0, 0, 0, 0, 0, 0, -2, 0], "option index -2"),
    ]:
        with pytest.raises(ValueError, match=match):
            eng.decode(bad)


def test_threads_ask_many_and_tell_many():
    eng = MCTS(AUTOKD_LEVELS, seed=3)

    def work(rng):
        for _ in range(100):
            ids, rows = eng.ask_many(rng.choice([1, 4, 16, 64]))  # >= 8: GIL released
            eng.tell_many(ids, (rows[:, 0] == 2).astype(np.float64))

    assert not run_threads(work)
    assert eng.num_pending == 0 and all(n["pending"] == 0 for n in eng.tree())
    check_invariants(eng)
    assert MCTS.deserialize(eng.serialize()).num_told == eng.num_told
