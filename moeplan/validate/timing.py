"""Time compiled steps, and the statistics that judge predictions against measurements.

Timing follows nanoGPT's `bench.py`: run a few warm-up steps (first-call allocation, caches,
thread pools), then time each further step separately, waiting with `block_until_ready` so
that asynchronous dispatch does not hide the work; report the median, which one slow step
(a page fault, another process on the core) cannot move, and the coefficient of variation so
a reader can tell a quiet measurement from a noisy one.

The statistics are pure functions of plain sequences (no jax), so they are tested on numbers
worked by hand: median, coefficient of variation, Spearman rank correlation with ties,
median absolute relative error, and top-1 regret.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class StepTiming:
    """Wall-clock seconds of the timed steps (warm-up steps excluded)."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return median(self.times_s)

    @property
    def cv(self) -> float:
        return coefficient_of_variation(self.times_s)


def block(tree: Any) -> Any:
    """Wait until every array in `tree` is computed (jax dispatch is asynchronous)."""
    import jax

    return jax.block_until_ready(tree)


def time_compile(compile_fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run `compile_fn` (lower + compile) once; return its result and the seconds it took."""
    start = time.perf_counter()
    out = compile_fn()
    return out, time.perf_counter() - start


def time_steps(
    run: Callable[[], Any],
    *,
    steps: int,
    warmup: int,
    sync: Callable[[Any], Any] = block,
    on_step: Callable[[int, int], None] | None = None,
) -> StepTiming:
    """Call `run` `warmup` times untimed, then `steps` times timed one by one.

    Each timed call is followed by `sync` on its result, so a time covers the whole step and
    never the tail of the previous one. `on_step(done, total)` reports progress.
    """
    if steps < 1 or warmup < 0:
        raise ValueError("need steps >= 1 and warmup >= 0")
    total = warmup + steps
    for i in range(warmup):
        sync(run())
        if on_step:
            on_step(i + 1, total)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
        if on_step:
            on_step(warmup + i + 1, total)
    return StepTiming(tuple(times))


def median(xs: Sequence[float]) -> float:
    """Middle value (mean of the two middle values for an even count)."""
    if not xs:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(xs))


def coefficient_of_variation(xs: Sequence[float]) -> float:
    """Sample standard deviation (n-1) divided by the mean; 0 for a single value."""
    if not xs:
        raise ValueError("coefficient of variation of an empty sequence")
    if len(xs) < 2:
        return 0.0
    mean = statistics.fmean(xs)
    return float(statistics.stdev(xs) / mean) if mean else math.nan


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span ("fractional ranking")."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        shared = (i + j) / 2 + 1  # mean of ranks i+1 .. j+1
        for k in range(i, j + 1):
            out[order[k]] = shared
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of the fractional ranks.

    With ties the shortcut 1 - 6*sum(d^2)/(n(n^2-1)) is wrong, so this takes Pearson's r of
    the ranks (Spearman 1904; see Kendall & Gibbons, "Rank Correlation Methods", ch. 3).
    NaN when fewer than two pairs or when either side is constant.
    """
    if len(xs) != len(ys):
        raise ValueError("spearman needs two sequences of the same length")
    if len(xs) < 2:
        return math.nan
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """predicted/measured - 1 for each pair (positive: the model predicts too slow)."""
    return [p / m - 1 for p, m in zip(predicted, measured)]


def median_abs_relative_error(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Median of |predicted/measured - 1| over the pairs."""
    return median([abs(e) for e in relative_errors(predicted, measured)])


def top1_regret(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """How much slower the predicted-best candidate measured than the measured-best one.

    measured[argmin predicted] / min(measured) - 1; 0 when the planner's pick is truly the
    fastest. Ties in the prediction go to the first candidate, as the planner ranks them.
    """
    if not predicted or len(predicted) != len(measured):
        raise ValueError("top1_regret needs two non-empty sequences of the same length")
    pick = min(range(len(predicted)), key=lambda i: predicted[i])
    return measured[pick] / min(measured) - 1


@dataclass(frozen=True)
class RoundFigures:
    """The rank figures round by round, for candidates timed in interleaved rounds.

    Why: top-1 regret and Spearman compare medians, and two candidates a few percent apart
    swap places from one run to the next on a shared host. Each round times every candidate
    within seconds of the others, so the rounds are paired samples: a pick that measured
    slower than the measured best in every round is a real miss of the planner, one slower
    in half of them is a tie the host's noise decides.
    """

    rounds: int
    spearman: list[float]  # one per round (NaN where a round's times are all equal)
    pick_slower_rounds: int  # rounds in which the planner's pick was slower than the measured best


def round_figures(predicted: Sequence[float], per_round: Sequence[Sequence[float]]) -> RoundFigures | None:
    """`RoundFigures` from each candidate's per-round median times (all of one length, at
    least two rounds and two candidates; None otherwise). The measured best is the
    candidate with the lowest median over its rounds, as top1_regret takes it."""
    if len(per_round) != len(predicted) or len(per_round) < 2:
        return None
    rounds = {len(ts) for ts in per_round}
    if len(rounds) != 1 or min(rounds) < 2:
        return None
    n = rounds.pop()
    pick = min(range(len(predicted)), key=lambda i: predicted[i])
    best = min(range(len(per_round)), key=lambda i: median(per_round[i]))
    columns = [[ts[r] for ts in per_round] for r in range(n)]
    slower = sum(col[pick] > col[best] for col in columns)
    return RoundFigures(n, [spearman(predicted, col) for col in columns], slower)
