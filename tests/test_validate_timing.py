"""Statistics and step timing of moeplan.validate.timing, on numbers worked by hand."""

import math

import pytest

from moeplan.validate import timing
from moeplan.validate.timing import (
    coefficient_of_variation,
    median,
    median_abs_relative_error,
    ranks,
    relative_errors,
    round_figures,
    spearman,
    time_steps,
    top1_regret,
)


def test_median_odd_and_even():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5  # mean of the middle pair 2 and 3
    with pytest.raises(ValueError):
        median([])


def test_coefficient_of_variation_by_hand():
    # mean 4; deviations -2, 0, 2; sample variance (4 + 0 + 4) / 2 = 4; sd 2; cv 0.5
    assert coefficient_of_variation([2.0, 4.0, 6.0]) == pytest.approx(0.5)
    assert coefficient_of_variation([5.0]) == 0.0
    assert coefficient_of_variation([3.0, 3.0, 3.0]) == 0.0


def test_ranks_share_ties():
    # sorted: 10 (rank 1), 20 20 (ranks 2 and 3 -> 2.5 each), 30 (rank 4)
    assert ranks([20.0, 10.0, 30.0, 20.0]) == [2.5, 1.0, 4.0, 2.5]


def test_spearman_perfect_and_reversed():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # monotone but nonlinear: ranks agree, so rho is 1 (Pearson's r would not be)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)


def test_spearman_without_ties_matches_textbook_formula():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(x), ranks(y)))  # 1+1+1+1+0 = 4
    assert d2 == 4
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * (25 - 1)))  # 0.8


def test_spearman_with_ties_by_hand():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]; centred x: -1.5, 0, 0, 1.5;
    # centred y: -1.5, -0.5, 0.5, 1.5; sxy = 2.25 + 2.25 = 4.5; sxx = 4.5; syy = 5
    # rho = 4.5 / sqrt(4.5 * 5) = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_undefined_cases_are_nan():
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_relative_errors_and_median_abs():
    pred, meas = [1.1, 0.5, 2.0], [1.0, 1.0, 1.0]
    assert relative_errors(pred, meas) == pytest.approx([0.1, -0.5, 1.0])
    assert median_abs_relative_error(pred, meas) == pytest.approx(0.5)  # median of 0.1, 0.5, 1.0


def test_top1_regret():
    # planner picks index 1 (predicted 1.0); it measured 12 while the best measured 10
    assert top1_regret([2.0, 1.0, 3.0], [10.0, 12.0, 11.0]) == pytest.approx(0.2)
    assert top1_regret([1.0, 2.0], [5.0, 6.0]) == 0.0
    # tied predictions go to the first, as the planner ranks them
    assert top1_regret([1.0, 1.0], [8.0, 4.0]) == pytest.approx(1.0)


def test_round_figures_pair_the_rounds():
    # planner picks index 0; the measured best by median is index 1 (10.5 against 11)
    per_round = [[11.0, 9.0, 12.0], [10.0, 10.5, 11.0], [20.0, 21.0, 22.0]]
    r = round_figures([1.0, 2.0, 3.0], per_round)
    assert r.rounds == 3
    assert r.pick_slower_rounds == 2  # rounds 1 and 3; in round 2 the pick was faster
    # round 2 ranks as predicted (9 < 10.5 < 21), rounds 1 and 3 swap the first two
    assert r.spearman == pytest.approx([0.5, 1.0, 0.5])


def test_round_figures_when_the_pick_is_the_best_or_rounds_are_missing():
    assert round_figures([1.0, 2.0], [[1.0, 1.2], [2.0, 2.1]]).pick_slower_rounds == 0
    assert round_figures([1.0, 2.0], [[1.0], [2.0]]) is None  # one round
    assert round_figures([1.0, 2.0], [[1.0, 1.1], [2.0]]) is None  # rounds of unequal length
    assert round_figures([1.0], [[1.0, 1.1]]) is None  # one candidate


def test_time_steps_times_only_the_timed_steps(monkeypatch):
    clock = {"t": 0.0}
    durations = iter([0.5, 0.5, 1.0, 3.0, 2.0])  # 2 warm-up steps, then 3 timed
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def run():
        clock["t"] += next(durations)
        return "result"

    synced, progress = [], []
    result = time_steps(run, steps=3, warmup=2, sync=synced.append, on_step=lambda d, t: progress.append((d, t)))
    assert result.times_s == (1.0, 3.0, 2.0)
    assert result.median_s == 2.0
    assert result.cv == pytest.approx(coefficient_of_variation([1.0, 3.0, 2.0]))
    assert synced == ["result"] * 5  # every step, warm-up included, is waited for
    assert progress == [(i, 5) for i in range(1, 6)]


def test_time_steps_rejects_bad_counts():
    with pytest.raises(ValueError):
        time_steps(lambda: None, steps=0, warmup=1, sync=lambda x: x)
    with pytest.raises(ValueError):
        time_steps(lambda: None, steps=1, warmup=-1, sync=lambda x: x)


def test_rounds_settle_steps_run_untimed_at_the_start_of_each_round(monkeypatch):
    from moeplan.validate import rounds

    clock = {"t": 0.0}
    monkeypatch.setattr(rounds.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(rounds.time, "process_time", lambda: clock["t"])
    calls: list[str] = []
    last: dict[str, str | None] = {"ran": None}

    def candidate(name: str, base: float):
        def run():
            # the first step after another candidate ran is 10x slower (a cold switch)
            clock["t"] += base * (10.0 if last["ran"] != name else 1.0)
            last["ran"] = name
            calls.append(name)
        return run

    runs = {"a": candidate("a", 1.0), "b": candidate("b", 2.0)}
    settled = rounds.measure(runs, rounds=2, steps=2, max_cv=1.0, remeasure=0, clock="wall",
                             sync=lambda x: x, settle=1)
    assert calls.count("a") == calls.count("b") == 2 * (1 + 2)  # per round: 1 settle + 2 timed
    assert settled["a"].times_s == [1.0, 1.0] and settled["b"].times_s == [2.0, 2.0]
    calls.clear()
    last["ran"] = None
    cold = rounds.measure(runs, rounds=2, steps=2, max_cv=1.0, remeasure=0, clock="wall", sync=lambda x: x)
    assert calls.count("a") == 2 * 2
    assert cold["a"].times_s == [5.5, 5.5]  # median of a cold 10 and a warm 1
