"""`moeplan regress`: predict, compile and time a suite, and judge it against a baseline.

Three kinds of check, kept apart because they fail for different reasons:

* Against the compiled program (deterministic, no baseline needed): every collective kind's
  predicted wire bytes equal the compiled HLO's exactly (`compare.Comparison.comm_match`);
  predicted FLOPs and memory stay within the suite's bounds of XLA's own analyses.
* Against the baseline, deterministic: each candidate's *fingerprint* (hash of its inputs)
  and predicted figures. Same fingerprint but a different prediction means the cost model
  changed under unchanged inputs: a failure until re-baselined on purpose. A different
  fingerprint means the inputs changed (a new hardware profile, say): "re-baseline".
* Against the baseline, timing: the suite's median absolute step-time error and Spearman
  rank correlation may not get worse by more than the stated tolerances. Times are ratios
  inside one run (`rounds.py`) and the error is scale-free: predicted and measured ratios
  are each divided by their geometric mean before comparing, which fits the one unknown
  (how fast this machine is against the calibrated profile) and leaves the part a cost
  model is responsible for, the relative cost of candidates.

Timing never decides a deterministic check, and the deterministic checks run with
`--no-timing` in seconds.
"""

from __future__ import annotations

import copy
import math
import platform
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeplan import __version__
from moeplan.validate import baseline as baseline_io
from moeplan.validate.compare import Comparison, Measured, Predicted, bytes_match
from moeplan.validate.rounds import RatioTiming, scale_free
from moeplan.validate.suite import Candidate, Suite, mesh_label
from moeplan.validate.timing import median, median_abs_relative_error, spearman

# Exit codes (documented in docs/ci.md; most severe wins).
EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2  # bad suite / baseline / options: MoeplanError's default
EXIT_INPUTS_CHANGED = 3
EXIT_INCONCLUSIVE = 4
EXIT_MEANING = {
    EXIT_OK: "pass",
    EXIT_REGRESSION: "regression: a check failed",
    EXIT_USAGE: "usage error",
    EXIT_INPUTS_CHANGED: "inputs changed: re-baseline with --update",
    EXIT_INCONCLUSIVE: "timing inconclusive: too few quiet candidates",
}

# Check statuses and the exit code each forces.
FAIL, CHANGED, NOISY, NOTE, PASS, SKIP = "fail", "changed", "noisy", "note", "pass", "skip"
STATUS_EXIT = {FAIL: EXIT_REGRESSION, CHANGED: EXIT_INPUTS_CHANGED, NOISY: EXIT_INCONCLUSIVE}
SUITE = "(suite)"

PREDICTED_TIMES = (
    "step_s", "step_lower_s", "step_upper_s", "compute_s", "all_to_all_s", "model_axis_s", "data_axis_s",
)


@dataclass
class Observation:
    """What one run saw of one candidate: prediction, compiled facts, timing, or an error."""

    candidate: Candidate
    predicted: dict[str, Any] | None = None
    compiled: dict[str, Any] | None = None
    timing: RatioTiming | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        return self.candidate.id

    def comparison(self) -> Comparison | None:
        """The profile's Comparison of this candidate (None until prediction and compile ran)."""
        if self.predicted is None or self.compiled is None:
            return None
        p = self.predicted
        pred = Predicted(p["step_s"], dict(p["comm_bytes"]), p["flops_per_device"], p["memory_bytes_per_device"])
        meas = Measured(
            step_time_s=self.timing.wall_time_s if self.timing else math.nan,
            step_time_cv=self.timing.time_cv if self.timing else math.nan,
            compile_s=self.compiled.get("compile_s", math.nan),
            comm_bytes_per_device=dict(self.compiled["comm_bytes"]),
            flops_per_device=self.compiled.get("flops"),
            memory_bytes_per_device=self.compiled.get("memory"),
        )
        return Comparison(mesh=mesh_label(self.candidate.mesh), predicted=pred, measured=meas)


@dataclass(frozen=True)
class Check:
    """One row of the verdict: which candidate, which check, and what was expected and seen."""

    candidate: str
    check: str
    status: str
    expected: str = ""
    got: str = ""
    detail: str = ""

    def record(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TimingSummary:
    """Suite-wide timing figures over the quiet candidates."""

    judged: list[str]
    noisy: list[str]
    median_abs_error: float | None
    spearman: float | None
    abs_median_abs_error: float | None  # against absolute wall times: machine-dependent, not gated
    clock: str = "cpu"
    ratio_cvs: dict[str, float] = field(default_factory=dict)  # judged clock, per candidate
    wall_ratio_cvs: dict[str, float] = field(default_factory=dict)
    rel_errors: dict[str, float] = field(default_factory=dict)  # signed, scale-free, per candidate

    def record(self) -> dict:
        cvs = list(self.ratio_cvs.values())
        wcv = list(self.wall_ratio_cvs.values())
        return {
            "clock": self.clock,
            "median_abs_error": self.median_abs_error,
            "spearman": self.spearman,
            "abs_median_abs_error": self.abs_median_abs_error,
            "judged": len(self.judged),
            "noisy": list(self.noisy),
            "ratio_cv_median": median(cvs) if cvs else None,
            "ratio_cv_max": max(cvs) if cvs else None,
            "wall_ratio_cv_median": median(wcv) if wcv else None,
            "wall_ratio_cv_max": max(wcv) if wcv else None,
        }


@dataclass
class Verdict:
    """Everything a report needs: the checks, the timing summary, and the exit code."""

    suite: Suite
    observations: list[Observation]
    checks: list[Check]
    timing: TimingSummary | None
    baseline_timing: dict | None
    wall_s: float = 0.0
    updated: bool = False
    diff: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        codes = {STATUS_EXIT.get(c.status, EXIT_OK) for c in self.checks}
        for code in (EXIT_REGRESSION, EXIT_INPUTS_CHANGED, EXIT_INCONCLUSIVE):
            if code in codes:
                return code
        return EXIT_OK

    def problems(self) -> list[Check]:
        """Rows that are not plain passes, most severe first."""
        order = {FAIL: 0, CHANGED: 1, NOISY: 2, NOTE: 3}
        return sorted((c for c in self.checks if c.status in order), key=lambda c: order[c.status])


# ---- prediction (numpy only) ------------------------------------------------------------


def predict(c: Candidate) -> dict[str, Any]:
    """The cost model's figures for one candidate, as plain floats (the baseline's `predicted`)."""
    from moeplan.cost.layout import Plans
    from moeplan.cost.step import estimate

    est = estimate(c.model, c.train, c.hardware, Plans.single(c.mesh, c.train))
    out: dict[str, Any] = {k: float(getattr(est, k)[0]) for k in PREDICTED_TIMES}
    out["flops_per_device"] = float(est.flops_per_device[0])
    out["memory_bytes_per_device"] = float(est.memory_bytes_per_device[0])
    out["comm_bytes"] = {k: float(v[0]) for k, v in est.comm_bytes.items()}
    return out


# ---- compile and time (jax) -------------------------------------------------------------


def observe(
    suite: Suite,
    *,
    timing: bool = True,
    only: Callable[[Candidate], bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[Observation]:
    """Predict, compile and (for timed backends) time every candidate of the suite."""
    from moeplan.validate import regress_run

    cands = [c for c in suite.candidates if only is None or only(c)]
    obs = [Observation(c) for c in cands]
    for o in obs:
        try:
            o.predicted = predict(o.candidate)
        except Exception as e:  # a cost-model crash is a regression row, not a traceback
            o.error = f"predict: {type(e).__name__}: {e}"
    built = regress_run.compile_all(suite, obs, log=log)
    if timing:
        regress_run.time_all(suite, obs, built, log=log)
    return obs


# ---- judging (pure) ---------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def check_compiled(o: Observation, suite: Suite) -> list[Check]:
    """Predicted bytes, FLOPs and memory against the compiled program of the same run."""
    if o.error:
        return [Check(o.id, "build", FAIL, "compiles", o.error.splitlines()[0][:200])]
    cmp = o.comparison()
    if cmp is None:
        return [Check(o.id, "build", FAIL, "compiles", "no compiled program")]
    rows = []
    want, got = cmp.predicted.comm_bytes, cmp.measured.comm_bytes_per_device  # type: ignore[union-attr]
    for kind, same in cmp.comm_match().items():
        status = PASS if same else FAIL
        rows.append(Check(o.id, f"bytes {kind}", status, f"compiled {_fmt(got.get(kind, 0.0))}",
                          f"predicted {_fmt(want.get(kind, 0.0))}", "wire bytes per device per step"))
    b = suite.bounds
    for name, r, (lo, hi) in (("flops", cmp.flops_ratio, b.flops_ratio), ("memory", cmp.memory_ratio, b.memory_ratio)):
        if r is None:
            rows.append(Check(o.id, f"{name} bounds", SKIP, f"[{lo}, {hi}]", "-", "compiler gave no figure"))
            continue
        status = PASS if lo <= r <= hi else FAIL
        rows.append(Check(o.id, f"{name} bounds", status, f"ratio in [{lo}, {hi}]", f"ratio {r:.3f}",
                          "predicted / compiled"))
    return rows


def _close(a: float, b: float, rel: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def _flat(pred: dict) -> dict[str, float]:
    out = {k: v for k, v in pred.items() if not isinstance(v, dict)}
    out.update({f"bytes {k}": v for k, v in pred.get("comm_bytes", {}).items()})
    return out


def check_against_baseline(o: Observation, base: dict | None, suite: Suite) -> list[Check]:
    """Fingerprint and predicted figures against the baseline entry of the same candidate."""
    fp = o.candidate.fingerprint()
    if base is None:
        return [Check(o.id, "inputs", CHANGED, "in baseline", "new candidate", "re-baseline with --update")]
    if base.get("fingerprint") != fp:
        return [Check(o.id, "inputs", CHANGED, f"fingerprint {str(base.get('fingerprint'))[:12]}",
                      f"fingerprint {fp[:12]}", "inputs changed (model, train, hardware or mesh): re-baseline")]
    rows = [Check(o.id, "inputs", PASS, "unchanged", "unchanged")]
    if o.predicted is None:
        return rows
    rel = suite.tolerances.prediction_rel
    old, new = _flat(base.get("predicted") or {}), _flat(o.predicted)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        same = a is not None and b is not None and _close(float(a), float(b), rel)
        if not same:
            rows.append(Check(o.id, f"predicted {key}", FAIL, f"baseline {_fmt(a)}", f"now {_fmt(b)}",
                              "prediction changed with unchanged inputs (cost model changed?)"))
    if len(rows) == 1:
        rows.append(Check(o.id, "predicted figures", PASS, "unchanged", "unchanged"))
    if o.compiled is not None and base.get("compiled"):
        old_c, new_c = _flat_compiled(base["compiled"]), _flat_compiled(o.compiled)
        moved = [k for k in sorted(set(old_c) | set(new_c)) if not _same_num(old_c.get(k), new_c.get(k), rel)]
        for k in moved:
            rows.append(Check(o.id, f"compiled {k}", NOTE, f"baseline {_fmt(old_c.get(k))}",
                              f"now {_fmt(new_c.get(k))}", "compiled program changed (step or XLA)"))
    return rows


def _flat_compiled(comp: dict) -> dict[str, float | None]:
    out = {f"bytes {k}": v for k, v in comp.get("comm_bytes", {}).items()}
    out["flops"], out["memory"] = comp.get("flops"), comp.get("memory")
    return out


def _same_num(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None:
        return a is b
    return _close(float(a), float(b), rel) or bytes_match(float(a), float(b))


def timing_summary(obs: list[Observation], max_cv: float, clock: str = "cpu") -> TimingSummary | None:
    """Scale-free error and rank correlation over the quiet timed candidates."""
    timed = [o for o in obs if o.timing is not None and o.predicted is not None and not o.error]
    if not timed:
        return None
    quiet = [o for o in timed if o.timing.cv <= max_cv]  # type: ignore[union-attr]
    noisy = [o.id for o in timed if o.timing.cv > max_cv]  # type: ignore[union-attr]
    summary = TimingSummary(
        judged=[o.id for o in quiet], noisy=noisy, median_abs_error=None, spearman=None, abs_median_abs_error=None,
        clock=clock, ratio_cvs={o.id: o.timing.cv for o in timed},  # type: ignore[union-attr]
        wall_ratio_cvs={o.id: o.timing.wall_ratio_cv for o in timed},  # type: ignore[union-attr]
    )
    if len(quiet) < 2:
        return summary
    pred = [o.predicted["step_s"] for o in quiet]  # type: ignore[index]
    meas = [o.timing.ratio for o in quiet]  # type: ignore[union-attr]
    p_norm, m_norm = scale_free(pred), scale_free(meas)
    summary.rel_errors = {o.id: p / m - 1 for o, p, m in zip(quiet, p_norm, m_norm)}
    summary.median_abs_error = median_abs_relative_error(p_norm, m_norm)
    rho = spearman(pred, meas)
    summary.spearman = None if math.isnan(rho) else rho
    summary.abs_median_abs_error = median_abs_relative_error(pred, [o.timing.wall_time_s for o in quiet])  # type: ignore[union-attr]
    return summary


def check_timing(summary: TimingSummary | None, base: dict | None, suite: Suite) -> list[Check]:
    """Suite error and rank correlation against the baseline's, within the tolerances."""
    if summary is None:
        return []
    t, tol = suite.timing, suite.tolerances
    rows = [Check(cid, "timing spread", NOTE, f"ratio CV <= {t.max_cv:.0%}",
                  f"CV {summary.ratio_cvs[cid]:.1%}", f"still noisy after {t.remeasure} re-measurements")
            for cid in summary.noisy]
    if len(summary.judged) < t.min_judged:
        rows.append(Check(SUITE, "timing", NOISY, f">= {t.min_judged} quiet candidates",
                          f"{len(summary.judged)} quiet", "machine too noisy to judge timing; deterministic checks stand"))
        return rows
    if not base or base.get("median_abs_error") is None:
        if base is None:
            return rows
        rows.append(Check(SUITE, "timing", SKIP, "baseline timing", "none", "baseline has no timing figures"))
        return rows
    limit = base["median_abs_error"] + tol.median_abs_error_pp / 100
    err = summary.median_abs_error
    ok = err is not None and err <= limit
    rows.append(Check(SUITE, "median abs error", PASS if ok else FAIL, f"<= {_pct(limit)} (baseline "
                      f"{_pct(base['median_abs_error'])} + {tol.median_abs_error_pp:g}pp)", _pct(err),
                      "scale-free step-time error over quiet candidates"))
    if base.get("spearman") is not None:
        floor = base["spearman"] - tol.spearman_drop
        rho = summary.spearman
        ok = rho is not None and rho >= floor
        rows.append(Check(SUITE, "spearman", PASS if ok else FAIL, f">= {floor:.3f} (baseline "
                          f"{base['spearman']:.3f} - {tol.spearman_drop:g})", _fmt(rho), "rank correlation, "
                          "predicted vs measured"))
    return rows


def judge(suite: Suite, obs: list[Observation], base: dict | None, *, timed: bool = True) -> Verdict:
    """All checks of one run against `base` (a loaded baseline, or None for no baseline)."""
    cands = (base or {}).get("candidates", {})
    checks: list[Check] = []
    for o in obs:
        checks += check_compiled(o, suite)
        if base is not None:
            checks += check_against_baseline(o, cands.get(o.id), suite)
    if base is not None:
        seen = {o.id for o in obs}
        ran = {o.candidate.backend for o in obs}
        checks += [Check(cid, "inputs", CHANGED, "in suite", "removed", "candidate left the suite: re-baseline")
                   for cid in sorted(set(cands) - seen) if cands[cid].get("backend") in ran]
    summary = timing_summary(obs, suite.timing.max_cv, suite.timing.clock) if timed else None
    base_timing = (base or {}).get("timing")
    checks += check_timing(summary, base_timing, suite)
    return Verdict(suite, obs, checks, summary, base_timing)


# ---- baseline -----------------------------------------------------------------------------


def machine() -> dict:
    """Where the baseline was measured (for readers; never compared)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "load_1min": load, "moeplan": __version__}


def make_baseline(verdict: Verdict, old: dict | None) -> dict:
    """The baseline document for this run (timing kept from `old` when this run was untimed)."""
    cands = {}
    for o in verdict.observations:
        entry: dict[str, Any] = {"fingerprint": o.candidate.fingerprint(), "backend": o.candidate.backend,
                                 "predicted": copy.deepcopy(o.predicted),
                                 "compiled": _compiled_record(o.compiled)}
        if o.timing is not None:
            entry["measured"] = o.timing.record(verdict.suite.timing.max_cv)
        elif old and o.id in old.get("candidates", {}):
            entry["measured"] = old["candidates"][o.id].get("measured")
        cands[o.id] = entry
    ran = {o.candidate.backend for o in verdict.observations}
    for cid, entry in (old or {}).get("candidates", {}).items():
        if cid not in cands and entry.get("backend") not in ran:  # e.g. tpu-aot without libtpu
            cands[cid] = entry
    timing = verdict.timing.record() if verdict.timing is not None else (old or {}).get("timing")
    return {"schema_version": baseline_io.SCHEMA_VERSION, "suite": verdict.suite.spec.name,
            "machine": machine(), "candidates": cands, "timing": timing}


def _compiled_record(comp: dict | None) -> dict | None:
    if comp is None:
        return None
    return {"comm_bytes": dict(comp["comm_bytes"]), "flops": comp.get("flops"), "memory": comp.get("memory")}


def can_update(verdict: Verdict) -> list[Check]:
    """Rows that forbid writing a baseline: failures against the compiled program or noise."""
    blockers = [c for c in verdict.checks if c.status == FAIL and not c.check.startswith("predicted")
                and c.check not in ("median abs error", "spearman")]
    blockers += [c for c in verdict.checks if c.status == NOISY]
    return blockers
