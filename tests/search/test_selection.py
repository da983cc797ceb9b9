"""The selection stage: successive halving of the search's best designs and the classic
distillers; the search never hands back a design its own evaluation ranks below the best
classic; every run is journaled and a rerun reuses them. Trained runs are replaced by a
scripted scorer here (tests/search/test_cli.py runs the stage for real)."""

import math

import pytest

from autokd.errors import PipelineError
from autokd.search.journal import Journal
from autokd.search.selection import (
    SelectionConfig,
    SelectionResult,
    candidates,
    plan,
    run_selection,
    stage_cost,
)
from autokd.space import load_space

SPACE = load_space("autokd")
BASE = {
    "global_transform": "original",
    "intra_spatial": "original",
    "inter_spatial": "original",
    "feature_distance": "l2",
    "feature_weight": "1",
    "logit_distance": "kl",
    "temperature": "4",
    "logit_weight": "1",
}


class FakeTrial:
    def __init__(self, i, design, reward):
        self.id, self.design, self.reward, self.status = i, design, reward, "ok"


def _trials():
    weights = ["1", "5", "25", "50"]
    return [
        FakeTrial(i, dict(BASE, feature_weight=w, temperature=t), 1.0 - 0.1 * i)
        for i, (w, t) in enumerate((w, t) for t in ("1", "2", "4") for w in weights)
    ]


def _scorer(scores, calls):
    """run(tasks) that scores each task by its candidate (spec without name), plus the seed's
    noise of +-0.001, and records every call."""

    def run(tasks, on_result):
        for t in tasks:
            calls.append(t)
            key = tuple(sorted((k, str(v)) for k, v in t.spec.items() if k != "name"))
            score = scores.get(key, 0.0) + 0.001 * (t.seed % 3)
            on_result(
                t,
                {
                    "status": "ok",
                    "reward": score,
                    "seconds": 0.5,
                    # the default metric (CE after temperature scaling, lower is better)
                    # orders candidates as the reward does
                    "metrics": {"val_acc": 0.5, "val_ce": 1.0, "val_ce_ts": 2.0 - score},
                },
            )

    return run


def _key(spec):
    return tuple(sorted((k, str(v)) for k, v in spec.items() if k != "name"))


def test_plan_halves_the_finalists_to_one_and_the_anchors_meet_it_at_the_fidelity_asked():
    cfg = SelectionConfig(fidelity=0.5, seeds=2)
    # the default: 3 finalists, 5 anchors
    assert plan(3, 5, cfg) == [(3, 1, 0.25), (6, 2, 0.5)]
    assert stage_cost(3, 5, cfg) == pytest.approx(13.5 * 0.5)
    assert plan(8, 2, cfg) == [(8, 1, 0.0625), (4, 2, 0.125), (2, 2, 0.25), (3, 2, 0.5)]
    assert plan(1, 5, cfg) == [(6, 2, 0.5)]  # the deciding round has every seed
    assert plan(2, 0, cfg) == [(2, 1, 0.25), (1, 2, 0.5)]


def test_bad_settings_are_refused_by_name():
    with pytest.raises(PipelineError, match="unknown anchor.*'kdd'.*known classic distillers"):
        SelectionConfig(anchors=("kdd",))
    with pytest.raises(PipelineError, match="metric one of reward, val_acc, val_ce, val_ce_ts"):
        SelectionConfig(metric="acc")
    with pytest.raises(PipelineError, match=r"fidelity in \[0, 1\]"):
        SelectionConfig(fidelity=1.5)
    with pytest.raises(PipelineError, match=r"max_seeds an integer >= seeds \(3\), got 2"):
        SelectionConfig(seeds=3, max_seeds=2)


def test_candidates_are_the_best_estimates_and_the_anchors_once_each():
    cfg = SelectionConfig(finalists=2, anchors=("kd", "none"))
    cands = candidates(SPACE, _trials(), cfg)
    assert [c.label for c in cands] == ["search #1", "search #2", "kd", "none"]
    assert cands[0].design is not None and cands[2].design is None
    assert cands[0].spec["feature_weight"] == 1.0  # the best estimate: the highest rewards


@pytest.mark.parametrize("classic_wins", [False, True])
def test_the_best_classic_meets_the_search_in_the_last_round(tmp_path, classic_wins):
    cfg = SelectionConfig(finalists=3, anchors=("kd", "dkd", "none"), fidelity=0.4, seeds=2)
    cands = candidates(SPACE, _trials(), cfg)
    scores = {_key(c.spec): s for c, s in zip(cands, [0.9, 0.5, 0.4, 0.6, 0.7, 0.1])}
    if classic_wins:  # dkd (0.7) beats the search's best (here lowered to 0.65)
        scores[_key(cands[0].spec)] = 0.65
    calls = []
    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        res = run_selection(
            SPACE, _trials(), j, _scorer(scores, calls), cfg, epochs=60, seed=0, log=lambda _m: None
        )
        # the finalists halve alone; every classic meets the search's best in the last round
        assert sorted(res.rounds[0].scores) == ["search #1", "search #2", "search #3"]
        last = res.rounds[-1]
        assert sorted(last.scores) == sorted(["search #1", "kd", "dkd", "none"])
        assert res.best_classic.label == "dkd"
        assert res.winner.label == ("dkd" if classic_wins else "search #1")
        assert res.winner.is_anchor == classic_wins
        # fidelity doubles per round, later rounds have two seeds, the same for every candidate
        assert [len(r.seeds) for r in res.rounds] == [1, 2]
        assert res.rounds[1].fidelity == pytest.approx(2 * res.rounds[0].fidelity)
        assert res.work == pytest.approx(stage_cost(3, 3, cfg))
        assert res.rounds[-1].fidelity == pytest.approx(0.4)
        n_runs = len(calls)
        # a rerun of the same stage trains nothing: every run is found in the journal
        again = run_selection(
            SPACE, _trials(), j, _scorer(scores, calls), cfg, epochs=60, seed=0, log=lambda _m: None
        )
        assert len(calls) == n_runs and again.reused == n_runs
        assert again.winner.label == res.winner.label
        # and the report rebuilds the same result from the journal alone
        rebuilt = SelectionResult.from_evaluations(j.evaluations(), j.selection())
        assert rebuilt.winner.label == res.winner.label
        assert [sorted(r.scores) for r in rebuilt.rounds] == [sorted(r.scores) for r in res.rounds]


def test_a_lead_inside_the_seed_noise_after_every_seed_hands_back_the_classic(tmp_path):
    cfg = SelectionConfig(finalists=1, anchors=("kd",), fidelity=0.5, seeds=2, max_seeds=4)
    cands = candidates(SPACE, _trials(), cfg)
    # the searched design leads kd by 0.0005; a seed's noise is 0.001 x (seed % 3) for both
    scores = {_key(cands[0].spec): 0.7005, _key(cands[1].spec): 0.7}
    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        res = run_selection(
            SPACE, _trials(), j, _scorer(scores, []), cfg, epochs=60, seed=0, log=lambda _m: None
        )
    last = res.rounds[-1]
    assert last.mean("search #1") < last.mean("kd")  # lower CE: ahead
    # the close call raced to max_seeds and stayed inside the noise: the classic goes back
    assert len(last.scores["search #1"]) == len(last.scores["kd"]) == 4
    assert res.winner.label == "kd" and res.best_classic.label == "kd"


def test_a_close_call_gets_more_seeds_until_the_lead_is_beyond_the_noise(tmp_path):
    cfg = SelectionConfig(finalists=2, anchors=("kd", "none"), fidelity=0.5, seeds=2)
    cands = candidates(SPACE, _trials(), cfg)
    by = {c.label: _key(c.spec) for c in cands}
    # search #1 leads kd by 0.001: inside the margin on 2 seeds (noise 0.002, 0.000), beyond
    # it on 3 (0.002, 0.000, 0.001)
    scores = {by["search #1"]: 0.701, by["search #2"]: 0.5, by["kd"]: 0.7, by["none"]: 0.6}
    calls, lines = [], []
    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        res = run_selection(
            SPACE, _trials(), j, _scorer(scores, calls), cfg, epochs=60, seed=0, log=lines.append
        )
        last = res.rounds[-1]
        # one more seed for the two the decision is between, none for the rest
        assert {k: len(v) for k, v in last.scores.items()} == {
            "search #1": 3,
            "kd": 3,
            "none": 2,
        }
        assert res.winner.label == "search #1"
        assert any("search #1 and kd are apart by less than the seed noise" in m for m in lines)
        assert res.work == pytest.approx(stage_cost(2, 2, cfg) + 2 * 0.5)
        assert "search #1 " in res.summary() and "(3 seeds)" in res.summary()
        # resumed or rebuilt, the stage is the same: nothing retrained, the same winner and runs
        n = len(calls)
        again = run_selection(
            SPACE, _trials(), j, _scorer(scores, calls), cfg, epochs=60, seed=0, log=lambda _m: None
        )
        assert len(calls) == n and again.winner.label == "search #1"
        rebuilt = SelectionResult.from_evaluations(j.evaluations(), j.selection())
        assert rebuilt.winner.label == "search #1"
        assert {k: len(v) for k, v in rebuilt.rounds[-1].scores.items()} == {
            k: len(v) for k, v in last.scores.items()
        }
    # a classic ahead inside the noise is raced too: more seeds either way, then decided
    behind = {**scores, by["search #1"]: 0.699}
    with Journal(str(tmp_path / "j3.sqlite"), {"x": 1}) as j:
        res = run_selection(
            SPACE, _trials(), j, _scorer(behind, []), cfg, epochs=60, seed=0, log=lambda _m: None
        )
        assert len(res.rounds[-1].scores["search #1"]) == len(res.rounds[-1].scores["kd"]) == 3
        assert res.winner.label == "kd"
        assert "search #1 behind kd by 0.0010 val_ce_ts" in res.summary()
    # with the race off (max_seeds = seeds) the same lead hands back the classic
    off = SelectionConfig(finalists=2, anchors=("kd", "none"), fidelity=0.5, seeds=2, max_seeds=2)
    with Journal(str(tmp_path / "j2.sqlite"), {"x": 1}) as j:
        res = run_selection(
            SPACE, _trials(), j, _scorer(scores, []), off, epochs=60, seed=0, log=lambda _m: None
        )
        assert res.winner.label == "kd"


def test_no_stage_without_budget_or_without_a_working_trial(tmp_path):
    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        assert (
            run_selection(
                SPACE, _trials(), j, _scorer({}, []), SelectionConfig(fidelity=0), epochs=60, seed=0
            )
            is None
        )
        assert (
            run_selection(SPACE, [], j, _scorer({}, []), SelectionConfig(), epochs=60, seed=0)
            is None
        )


def test_calibrated_ce_is_the_ce_at_the_best_temperature_and_ignores_the_logits_scale():
    import torch
    import torch.nn.functional as F

    from autokd.search.reward import calibrated_ce

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (300,), generator=g)
    z = torch.randn(300, 10, generator=g)
    z[torch.arange(300), y] += 2.0
    # the truth by brute force over the scale
    grid = torch.linspace(0.0, 4.0, 8001, dtype=torch.float64)
    best = min(float(F.cross_entropy(z.double() * s, y)) for s in grid)
    for scale in (0.05, 1.0, 30.0):  # under-, well- and over-confident copies of one student
        got = calibrated_ce(z * scale, y)
        assert got == pytest.approx(best, abs=1e-6)
        assert got <= float(F.cross_entropy(z * scale, y)) + 1e-9
    # logits that carry nothing: the best scale is 0, uniform guessing
    assert calibrated_ce(torch.zeros(50, 10), y[:50]) == pytest.approx(math.log(10))
    # a student whose ranking is wrong scores worse at every scale
    assert calibrated_ce(-z, y) > calibrated_ce(z, y)


def test_the_cli_offers_the_selection_metrics_and_anchors_the_stage_knows():
    from autokd import cli
    from autokd.search import selection

    assert cli.SELECT_METRICS == tuple(selection.METRICS)
    assert cli.DEFAULT_ANCHORS == selection.DEFAULT_ANCHORS


def test_an_interrupted_round_keeps_the_runs_it_finished(tmp_path):
    cfg = SelectionConfig(finalists=2, anchors=("kd", "none"), fidelity=0.5, seeds=2)
    calls = []
    scorer = _scorer({}, calls)

    def dies_after_three(tasks, on_result):
        if len(calls) + len(tasks) > 3:  # the machine goes down during a round
            scorer(tasks[: 3 - len(calls)], on_result)
            raise KeyboardInterrupt
        scorer(tasks, on_result)

    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        with pytest.raises(KeyboardInterrupt):
            run_selection(SPACE, _trials(), j, dies_after_three, cfg, 60, 0, lambda _m: None)
        assert len(j.evaluations()) == 3  # journaled as they finished
        done = len(calls)
        res = run_selection(SPACE, _trials(), j, scorer, cfg, 60, 0, lambda _m: None)
    assert res.reused == 3 and len(calls) - done == stage_runs(res) - 3


def stage_runs(res):
    return sum(len(v) for r in res.rounds for v in r.scores.values())


def test_the_report_rebuilds_the_last_stage_when_the_journal_holds_an_earlier_one(tmp_path):
    # A stage rerun with other settings reuses the runs that match and adds the rest; the
    # rebuild (report, compare) must show that stage and its winner, not a mix of both.
    cands = candidates(SPACE, _trials(), SelectionConfig(finalists=3, anchors=("kd", "none")))
    scores = {_key(c.spec): s for c, s in zip(cands, [0.9, 0.5, 0.4, 0.95, 0.1])}
    with Journal(str(tmp_path / "j.sqlite"), {"x": 1}) as j:
        for fidelity, winner in ((0.5, "kd"), (1.0, "kd")):
            cfg = SelectionConfig(finalists=3, anchors=("kd", "none"), fidelity=fidelity)
            res = run_selection(SPACE, _trials(), j, _scorer(scores, []), cfg, 60, 0, print)
            assert res.winner.label == winner
            rebuilt = SelectionResult.from_evaluations(j.evaluations(), j.selection())
            assert rebuilt.winner.label == res.winner.label
            assert [(r.fidelity, sorted(r.scores)) for r in rebuilt.rounds] == [
                (r.fidelity, sorted(r.scores)) for r in res.rounds
            ]
            assert [r.scores for r in rebuilt.rounds] == [r.scores for r in res.rounds]
            assert rebuilt.work == pytest.approx(res.work)
        # the second stage reused the first one's runs at half the schedule
        assert res.reused > 0


def test_a_journal_without_the_stage_record_keeps_the_best_yaml_the_search_wrote(tmp_path):
    # Journals written before the stage was recorded are rebuilt from their rows, which miss
    # the runs a stage rerun reused: report and compare must not rewrite best.yaml from that.
    from autokd.search.journal import Trial
    from autokd.search.report import write_outputs

    cfg = SelectionConfig(finalists=2, anchors=("kd", "none"), fidelity=0.5)
    cands = candidates(SPACE, _trials(), cfg)
    scores = {_key(c.spec): s for c, s in zip(cands, [0.9, 0.5, 0.6, 0.1])}
    trials = [Trial(t.id + 1, t.design, t.reward, "ok", {"val_acc": 0.5}) for t in _trials()]
    with Journal(str(tmp_path / "journal.sqlite"), {"x": 1}) as j:
        res = run_selection(SPACE, _trials(), j, _scorer(scores, []), cfg, 60, 0, lambda _m: None)
        assert res.winner.label == "search #1"
        evaluations, record = j.evaluations(), j.selection()
    # with the record, the rebuild writes the stage's choice, its verdict in the header's report
    write_outputs(
        str(tmp_path),
        trials,
        SPACE,
        log=lambda _m: None,
        evaluations=evaluations,
        selection_record=record,
    )
    best = (tmp_path / "best.yaml").read_text()
    assert "chosen by the selection stage: search #1" in best
    assert (
        "search #1 ahead of kd by 0.3000 val_ce_ts, beyond the seed noise"
        in (tmp_path / "report.html").read_text()
    )
    # without it, best.yaml stays as it was and the report says why
    (tmp_path / "best.yaml").write_text("# the stage's choice\nname: kd\n")
    lines = []
    out = write_outputs(str(tmp_path), trials, SPACE, log=lines.append, evaluations=evaluations)
    assert out["selection"].from_rows
    assert (tmp_path / "best.yaml").read_text() == "# the stage's choice\nname: kd\n"
    assert any("kept as the search wrote it" in m for m in lines)
    assert "Rebuilt from the journal's runs" in (tmp_path / "report.html").read_text()


def test_the_calibrated_trial_reward_swaps_the_ce_for_the_ce_after_temperature_scaling():
    import torch

    from autokd.models import build_model
    from autokd.search.reward import proxy_reward

    torch.manual_seed(0)
    student = build_model("digits_student", num_classes=10, in_channels=1).eval()
    images, labels = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    teacher = {"features": torch.randn(40, 16)}
    args = (student, images, labels, ["features"], teacher, ["features"])
    paper, m = proxy_reward(*args)
    cal, m2 = proxy_reward(*args, kind="calibrated")
    assert paper == pytest.approx(1 - (m["val_ce"] + 1 - m["val_cka"]))
    assert cal == pytest.approx(1 - (m2["val_ce_ts"] + 1 - m2["val_cka"]))
    # the metrics are the same either way; only the score differs, never below the paper's
    assert {k: v for k, v in m.items() if k != "raw_reward"} == {
        k: v for k, v in m2.items() if k != "raw_reward"
    }
    assert cal >= paper
    with pytest.raises(ValueError, match="kind one of paper, calibrated"):
        proxy_reward(*args, kind="calib")
