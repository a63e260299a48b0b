"""Predicted against measured, per candidate mesh and over all of them.

Per candidate: step time ratio (predicted / measured), collective bytes per kind (predicted
by `moeplan/cost/traffic.py`, found in the compiled HLO; these must agree exactly, since both
sides count the same buffers), FLOPs against XLA's cost_analysis and memory against its
memory_analysis. Over candidates: the median absolute error of step time, Spearman's rank
correlation (does the planner order meshes as the hardware does?) and top-1 regret (how much
the planner's favourite loses against the measured best), the figures the issue sets
targets for.

Pure Python on plain numbers (no jax), so it is tested without compiling anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moeplan.validate.timing import (
    RoundFigures,
    median,
    median_abs_relative_error,
    round_figures,
    spearman,
    top1_regret,
)

KINDS = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter")
BYTES_REL_TOL = 1e-9  # float rounding of wire_factor (n-1)/n; a byte off is a real mismatch
BYTES_ABS_TOL = 1e-6


@dataclass(frozen=True)
class Predicted:
    """The numbers of one plan's estimate that have a measured counterpart."""

    step_s: float
    comm_bytes: dict[str, float]
    flops_per_device: float
    memory_bytes_per_device: float
    hbm_bytes_per_device: float | None = None  # memory traffic of the compute roofline
    first_touch_bytes_per_device: float | None = None  # scratch paged in afresh (CPU runtimes)

    @classmethod
    def from_estimates(cls, est: Any, i: int) -> Predicted:
        """Plan `i` of a `moeplan.cost.step.Estimates`."""
        traffic = getattr(est, "bytes_detail", None)
        return cls(
            step_s=float(est.step_s[i]),
            comm_bytes={k: float(v[i]) for k, v in est.comm_bytes.items()},
            flops_per_device=float(est.flops_per_device[i]),
            memory_bytes_per_device=float(est.memory_bytes_per_device[i]),
            hbm_bytes_per_device=float(sum(v[i] for v in traffic.values())) if traffic else None,
            first_touch_bytes_per_device=float(est.first_touch_bytes[i]) if getattr(est, "_host_memory", False) else None,
        )


@dataclass(frozen=True)
class Measured:
    """What compiling and timing one candidate gave (the JSON `measured` record)."""

    step_time_s: float
    step_time_cv: float
    compile_s: float
    comm_bytes_per_device: dict[str, float]
    flops_per_device: float | None
    memory_bytes_per_device: float | None
    extra: dict = field(default_factory=dict)  # further detail (per-step times, memory fields)

    def record(self) -> dict:
        return {
            "step_time_s": self.step_time_s,
            "step_time_cv": self.step_time_cv,
            "compile_s": self.compile_s,
            "comm_bytes_per_device": dict(self.comm_bytes_per_device),
            "flops_per_device": self.flops_per_device,
            "memory_bytes_per_device": self.memory_bytes_per_device,
            **self.extra,
        }

    @classmethod
    def from_record(cls, rec: dict) -> Measured:
        known = [k for k in cls.__dataclass_fields__ if k != "extra"]
        return cls(**{k: rec.get(k) for k in known}, extra={k: v for k, v in rec.items() if k not in known})


def bytes_match(predicted: float, measured: float) -> bool:
    """Exact agreement up to float rounding of the (n-1)/n wire factors."""
    return math.isclose(predicted, measured, rel_tol=BYTES_REL_TOL, abs_tol=BYTES_ABS_TOL)


def ratio(predicted: float | None, measured: float | None) -> float | None:
    """predicted / measured, or None when either is missing or measured is zero."""
    if predicted is None or measured is None or measured == 0:
        return None
    return predicted / measured


@dataclass
class Comparison:
    """One candidate mesh: its prediction, and its measurement or the reason there is none."""

    mesh: str
    predicted: Predicted
    predicted_row: dict = field(default_factory=dict)
    measured: Measured | None = None
    error: str | None = None
    routing: dict | None = None  # routing skew, predicted vs measured (profile --routing; validate/skew.py)

    @property
    def ok(self) -> bool:
        return self.measured is not None and self.error is None

    @property
    def step_ratio(self) -> float | None:
        return ratio(self.predicted.step_s, self.measured.step_time_s) if self.ok else None

    @property
    def flops_ratio(self) -> float | None:
        return ratio(self.predicted.flops_per_device, self.measured.flops_per_device) if self.ok else None

    @property
    def hbm_bytes_ratio(self) -> float | None:
        """Predicted memory traffic / XLA's cost_analysis 'bytes accessed' (a diagnostic)."""
        if not self.ok:
            return None
        return ratio(self.predicted.hbm_bytes_per_device, self.measured.extra.get("bytes_accessed_per_device"))

    @property
    def memory_ratio(self) -> float | None:
        if not self.ok:
            return None
        return ratio(self.predicted.memory_bytes_per_device, self.measured.memory_bytes_per_device)

    @property
    def first_touch_bytes(self) -> dict | None:
        """Bytes per device paged in afresh per step, predicted and counted (CPU devices)."""
        if not self.ok or self.predicted.first_touch_bytes_per_device is None:
            return None
        got = self.measured.extra.get("first_touch_bytes_per_device")
        return None if got is None else {"predicted": self.predicted.first_touch_bytes_per_device, "measured": got}

    def comm_match(self) -> dict[str, bool]:
        """Per collective kind: do predicted and compiled bytes agree? (kinds either side has)."""
        if not self.ok:
            return {}
        got = self.measured.comm_bytes_per_device
        want = self.predicted.comm_bytes
        kinds = [k for k in KINDS if want.get(k, 0) or got.get(k, 0)]
        kinds += sorted(set(got) - set(KINDS))  # kinds the cost model does not know at all
        return {k: bytes_match(want.get(k, 0.0), got.get(k, 0.0)) for k in kinds}

    def record(self) -> dict:
        """The JSON `results[]` entry (schema_version 1)."""
        return {
            "mesh": self.mesh,
            "predicted": self.predicted_row,
            "measured": self.measured.record() if self.measured else None,
            "error": self.error,
            "routing": self.routing,
            "comparison": {
                "step_time_ratio": self.step_ratio,
                "flops_ratio": self.flops_ratio,
                "memory_ratio": self.memory_ratio,
                "hbm_bytes_ratio": self.hbm_bytes_ratio,
                **({"first_touch_bytes": self.first_touch_bytes} if self.first_touch_bytes else {}),
                "comm_bytes_predicted": {k: self.predicted.comm_bytes.get(k, 0.0) for k in self.comm_match()},
                "comm_bytes_match": self.comm_match(),
            } if self.ok else None,
        }


@dataclass(frozen=True)
class Summary:
    """Accuracy over the candidates that were measured (failed ones are counted, not scored)."""

    measured: int
    failed: int
    median_abs_error: float | None
    spearman: float | None
    top1_regret: float | None
    comm_bytes_exact: bool | None
    flops_median_abs_error: float | None
    memory_median_abs_error: float | None
    by_round: RoundFigures | None = None  # candidates timed in interleaved rounds only

    def record(self) -> dict:
        rounds = self.by_round
        return {
            "median_abs_error": self.median_abs_error,
            "spearman": self.spearman,
            "top1_regret": self.top1_regret,
            "comm_bytes_exact": self.comm_bytes_exact,
            "flops_median_abs_error": self.flops_median_abs_error,
            "memory_median_abs_error": self.memory_median_abs_error,
            "measured": self.measured,
            "failed": self.failed,
            "rounds": None if rounds is None else {
                "rounds": rounds.rounds,
                "spearman": [_finite(x) for x in rounds.spearman],
                "pick_slower_rounds": rounds.pick_slower_rounds,
            },
        }


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _median_abs_ratio_error(ratios: list[float | None]) -> float | None:
    vals = [abs(r - 1) for r in ratios if r is not None]
    return median(vals) if vals else None


def summarize(comparisons: list[Comparison], rounds: bool = False) -> Summary:
    """Accuracy figures over the measured candidates.

    Spearman and top-1 regret need at least two measured candidates (None otherwise); top-1
    regret picks the lowest *predicted* step time among the measured candidates. `rounds`:
    the candidates were timed in interleaved rounds (their `step_times_s` are per-round
    medians, paired across candidates), so the rank figures are also given round by round.
    """
    done = [c for c in comparisons if c.ok]
    failed = len(comparisons) - len(done)
    if not done:
        return Summary(0, failed, None, None, None, None, None, None)
    pred = [c.predicted.step_s for c in done]
    meas = [c.measured.step_time_s for c in done]  # type: ignore[union-attr]
    many = len(done) >= 2
    return Summary(
        measured=len(done),
        failed=failed,
        median_abs_error=median_abs_relative_error(pred, meas),
        spearman=_finite(spearman(pred, meas)) if many else None,
        top1_regret=top1_regret(pred, meas) if many else None,
        comm_bytes_exact=all(all(c.comm_match().values()) for c in done),
        flops_median_abs_error=_median_abs_ratio_error([c.flops_ratio for c in done]),
        memory_median_abs_error=_median_abs_ratio_error([c.memory_ratio for c in done]),
        by_round=round_figures(pred, [c.measured.extra.get("step_times_s", []) for c in done])  # type: ignore[union-attr]
        if rounds else None,
    )
