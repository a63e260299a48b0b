"""Enumerate, filter and rank every way to shard one MoE training step over N devices.

Why exhaustive: the number of (data, expert, model) factorizations of N is small (153 for
N = 65,536), so with the two FSDP choices and three remat policies every candidate can be
scored by the analytical cost model, and the answer is the true optimum of that model rather
than of a heuristic. Why vectorised: the same code scores a million candidates per second
(expert-count sweeps, benchmarks), because candidates are numpy arrays (`Plans`) and every
filter and every cost term is an array expression, never a Python loop per candidate.

Why a reason per rejection: "no feasible mesh" must say why (heads not divisible, batch too
small, out of memory, ...), with counts and an example, so the user knows what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moeplan.cost import step as cost_step
from moeplan.cost.layout import REMAT_CODES, Plans, capacity, shared_hidden, tokens_per_microbatch
from moeplan.errors import MoeplanError
from moeplan.output import fmt_bytes
from moeplan.specs import HardwareProfile, Mesh, ModelSpec, TrainSpec

REMAT_NAMES = {code: name for name, code in REMAT_CODES.items()}
DEFAULT_EXPERT_COUNTS = (8, 16, 32, 64, 128, 256)
# arXiv 2405.15052 (Du et al., "Revisiting MoE and Dense Speed-Accuracy Comparisons"): with
# 3D sharding an MoE model's step time stays within ~20% of its dense backbone's.
DEFAULT_MAX_STEP_INCREASE = 0.2


@dataclass(frozen=True)
class SearchOptions:
    """Which memory savers the search may choose; each is tried with every mesh."""

    fsdp: tuple[bool, ...] = (False, True)
    """FSDP off and/or on (ZeRO-3 sharding of weights and optimizer state)."""
    remat: tuple[str, ...] = ("none", "selective", "full")
    """Rematerialisation policies to try (names as in TrainSpec.remat)."""
    top: int = 5
    """How many ranked plans to keep."""
    routing: object | None = None
    """Routing distribution (a moeplan.cost.balance.Routing): enters the cost model as drops
    and, dropless, as the busiest device's expert compute. None = capacity-padded uniform."""
    max_drop: float | None = None
    """Reject plans whose predicted dropped fraction exceeds this (with `routing`)."""

    def __post_init__(self) -> None:
        if not self.fsdp or not self.remat:
            raise MoeplanError("the search needs at least one fsdp and one remat choice")
        unknown = [r for r in self.remat if r not in REMAT_CODES]
        if unknown:
            raise MoeplanError(f"remat '{unknown[0]}' is unknown; choose one of {', '.join(REMAT_CODES)}")
        if self.top < 1:
            raise MoeplanError(f"top must be positive (got {self.top}): it is how many plans to show")


# ---- enumeration ------------------------------------------------------------------------


def divisors(n: int) -> np.ndarray:
    """All positive divisors of n, ascending (trial division up to sqrt(n), vectorised)."""
    if n < 1:
        raise MoeplanError(f"devices must be positive (got {n}): it is the number of accelerators")
    small = np.arange(1, int(np.sqrt(n)) + 1, dtype=np.int64)
    small = small[n % small == 0]
    large = (n // small)[::-1]  # ascending, each >= sqrt(n); the first is sqrt(n) when n is a square
    # not np.unique: it imports numpy.ma, ~10 ms of start-up that planning otherwise never needs
    return np.concatenate([small, large[1:] if large[0] == small[-1] else large])


def factorizations(n: int) -> np.ndarray:
    """Every ordered (data, expert, model) with data * expert * model = n, shape (k, 3).

    For n = p1^a1 ... pr^ar there are prod_i C(ai + 2, 2) of them (stars and bars per prime):
    10 for n = 8, 153 for n = 65,536.
    """
    divs = divisors(n)
    data, expert = np.meshgrid(divs, divs, indexing="ij")
    data, expert = data.ravel(), expert.ravel()
    keep = (n % (data * expert)) == 0
    data, expert = data[keep], expert[keep]
    return np.stack([data, expert, n // (data * expert)], axis=1)


def enumerate_plans(devices: int, options: SearchOptions = SearchOptions()) -> Plans:
    """All meshes of `devices` crossed with the allowed FSDP and remat choices."""
    meshes = factorizations(devices)
    fsdp = np.array(options.fsdp, dtype=bool)
    remat = np.array([REMAT_CODES[r] for r in options.remat], dtype=np.int64)
    k, f, r = len(meshes), len(fsdp), len(remat)
    mesh_idx = np.repeat(np.arange(k), f * r)
    return Plans(
        data=meshes[mesh_idx, 0],
        expert=meshes[mesh_idx, 1],
        model=meshes[mesh_idx, 2],
        fsdp=np.tile(np.repeat(fsdp, r), k),
        remat=np.tile(remat, k * f),
    )


# ---- filters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One reason to reject a plan: a vectorised test and a one-line explanation of plan i."""

    key: str
    label: str
    rejects: Callable[[ModelSpec, TrainSpec, Plans], np.ndarray]
    explain: Callable[[ModelSpec, TrainSpec, Plans, int], str]


def _model_axis_rule(key: str, field_name: str, size: Callable[[ModelSpec], int], applies) -> Rule:
    """Megatron tensor parallelism splits this dimension over the model axis (arXiv 1909.08053)."""
    return Rule(
        key,
        f"{field_name} not divisible by the model axis",
        lambda m, t, p: applies(m) & (size(m) % p.model != 0),
        lambda m, t, p, i: f"{field_name}={size(m)} is not divisible by model={int(p.model[i])}",
    )


def _experts(m: ModelSpec) -> int:
    return m.moe.num_experts if m.moe is not None else 0


def _tokens(t: TrainSpec, p: Plans) -> np.ndarray:
    return tokens_per_microbatch(t, p)


# Structural rules, checked in this order (a plan is counted under the first it breaks).
# Expert axis: experts are split evenly over it (GShard, arXiv 2006.16668, sec. 3.1), and
# outside MoE layers it only adds data parallelism, so a dense model gains nothing from it.
# Model axis: Megatron-LM splits heads, key/value heads (GQA groups) and FFN hidden over it
# (arXiv 1909.08053, sec. 3). Batch: whole sequences are split over (data, expert) and over
# grad_accum microbatches (the sharding rules in docs/step.md and moeplan/cost/layout.py).
RULES: tuple[Rule, ...] = (
    Rule(
        "dense_expert_axis",
        "dense model with expert axis > 1",
        lambda m, t, p: (m.moe is None) & (p.expert > 1),
        lambda m, t, p, i: f"{m.name} has no experts, so expert={int(p.expert[i])} would only "
        "duplicate data parallelism (use data instead)",
    ),
    Rule(
        "expert_axis_exceeds_experts",
        "expert axis larger than the number of experts",
        lambda m, t, p: (m.moe is not None) & (p.expert > _experts(m)),
        lambda m, t, p, i: f"expert={int(p.expert[i])} exceeds the {_experts(m)} experts",
    ),
    Rule(
        "experts_not_divisible",
        "experts not divisible by the expert axis",
        lambda m, t, p: (m.moe is not None) & (_experts(m) % p.expert != 0),
        lambda m, t, p, i: f"{_experts(m)} experts are not divisible by expert={int(p.expert[i])}",
    ),
    _model_axis_rule("heads_not_divisible", "heads", lambda m: m.heads, lambda m: True),
    _model_axis_rule("kv_heads_not_divisible", "kv_heads", lambda m: m.n_kv_heads, lambda m: True),
    _model_axis_rule(
        "ffn_hidden_not_divisible", "ffn_hidden", lambda m: m.ffn_hidden, lambda m: m.dense_layers > 0
    ),
    _model_axis_rule(
        "expert_hidden_not_divisible",
        "expert_hidden",
        lambda m: m.moe.expert_hidden if m.moe else 1,
        lambda m: m.moe is not None,
    ),
    _model_axis_rule(
        "shared_hidden_not_divisible",
        "shared expert hidden",
        lambda m: shared_hidden(m) or 1,
        lambda m: shared_hidden(m) > 0,
    ),
    Rule(
        "batch_not_divisible",
        "global batch not divisible by data*expert*grad_accum",
        lambda m, t, p: t.batch % (p.data * p.expert * t.grad_accum) != 0,
        lambda m, t, p, i: f"global batch {t.batch} sequences is not divisible by "
        f"data*expert*grad_accum = {int(p.data[i])}*{int(p.expert[i])}*{t.grad_accum}",
    ),
    Rule(
        "capacity_below_one",
        "expert capacity below one slot",
        lambda m, t, p: (m.moe is not None) & (capacity(m, _tokens(t, p)) < 1),
        lambda m, t, p, i: f"capacity ceil(cf*T*K/E) rounds to 0 slots for T={_tokens(t, p)[i]:g} "
        f"tokens per microbatch and {_experts(m)} experts",
    ),
)
OUT_OF_MEMORY = "out_of_memory"
OUT_OF_MEMORY_LABEL = "does not fit device memory"
TOO_MANY_DROPS = "too_many_drops"
TOO_MANY_DROPS_LABEL = "drops more tokens than --max-drop"
LABELS = {r.key: r.label for r in RULES} | {OUT_OF_MEMORY: OUT_OF_MEMORY_LABEL, TOO_MANY_DROPS: TOO_MANY_DROPS_LABEL}


def rejection_codes(model: ModelSpec, train: TrainSpec, plans: Plans) -> np.ndarray:
    """Per plan: 0 if every structural rule passes, else 1 + the index of the first failing rule."""
    codes = np.zeros(len(plans), dtype=np.int16)
    for i, rule in enumerate(RULES):
        fails = np.broadcast_to(rule.rejects(model, train, plans), codes.shape)
        codes = np.where((codes == 0) & fails, i + 1, codes)
    return codes


def mesh_problems(model: ModelSpec, train: TrainSpec, mesh: Mesh) -> list[str]:
    """Every structural rule one mesh breaks, explained (empty if the mesh is valid)."""
    plans = Plans.single(mesh, train)
    return [
        rule.explain(model, train, plans, 0)
        for rule in RULES
        if bool(np.broadcast_to(rule.rejects(model, train, plans), (1,))[0])
    ]


@dataclass
class Rejections:
    """How many candidates each reason rejected, with one explained example per reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One line per reason: label, count, an example plan and why it failed."""
        return [f"{LABELS[k]}: {n} (e.g. {self.examples[k]})" for k, n in self.counts.items()]


def _describe(plans: Plans, i: int) -> str:
    fsdp = "fsdp" if plans.fsdp[i] else "no fsdp"
    return f"{plans.mesh(i)} {fsdp} remat={REMAT_NAMES[int(plans.remat[i])]}"


def _count_structural(model: ModelSpec, train: TrainSpec, plans: Plans, codes: np.ndarray) -> Rejections:
    out = Rejections()
    counts = np.bincount(codes, minlength=len(RULES) + 1)
    for i, rule in enumerate(RULES):
        if counts[i + 1]:
            first = int(np.flatnonzero(codes == i + 1)[0])
            out.counts[rule.key] = int(counts[i + 1])
            out.examples[rule.key] = f"{plans.mesh(first)}: {rule.explain(model, train, plans, first)}"
    return out


def _count_memory(est: cost_step.Estimates, hw: HardwareProfile, rejected: Rejections) -> None:
    """Out-of-memory count; the example is the leanest plan, i.e. the closest to fitting."""
    over = ~np.asarray(est.fits_memory, dtype=bool)
    if not over.any():
        return
    mem = np.where(over, est.memory_bytes_per_device, np.inf)
    lean = int(np.argmin(mem))
    rejected.counts[OUT_OF_MEMORY] = int(over.sum())
    rejected.examples[OUT_OF_MEMORY] = (
        f"{_describe(est.plans, lean)}: needs {fmt_bytes(mem[lean])} per device, "
        f"{hw.name} has {fmt_bytes(hw.hbm_bytes)}"
    )


# ---- scoring and ranking ----------------------------------------------------------------


@dataclass
class Scored:
    """Cost-model estimates of the structurally valid candidates, and why the rest failed."""

    estimates: cost_step.Estimates  # one entry per structurally valid plan
    feasible: np.ndarray  # indices into `estimates` that also fit memory
    rejected: Rejections


def score(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, plans: Plans,
          routing=None, max_drop: float | None = None) -> Scored:
    """Filter `plans` by the structural rules, estimate the rest, then filter by memory
    (and, with `routing` and `max_drop`, by predicted drops: moeplan.cost.balance)."""
    codes = rejection_codes(model, train, plans)
    rejected = _count_structural(model, train, plans, codes)
    valid = plans.take(np.flatnonzero(codes == 0))
    if routing is None:
        est = cost_step.estimate(model, train, hw, valid)
    else:
        from moeplan.cost import balance

        effect = balance.routing_effect(model, train, valid, routing)
        est = cost_step.estimate(model, train, hw, valid, routing=effect)
    _count_memory(est, hw, rejected)
    ok = np.asarray(est.fits_memory, dtype=bool)
    if max_drop is not None:
        ok = ok & _count_drops(est, ok, max_drop, rejected)
    return Scored(est, np.flatnonzero(ok), rejected)


def _count_drops(est: cost_step.Estimates, fits: np.ndarray, max_drop: float, rejected: Rejections) -> np.ndarray:
    """Plans within the drop budget; counts the others that fit memory (example: the closest)."""
    drops = np.asarray(est.dropped_fraction, dtype=np.float64)
    over = fits & (drops > max_drop)
    if over.any():
        close = int(np.argmin(np.where(over, drops, np.inf)))
        rejected.counts[TOO_MANY_DROPS] = int(over.sum())
        rejected.examples[TOO_MANY_DROPS] = (
            f"{_describe(est.plans, close)}: drops {drops[close]:.1%} of token-expert pairs, budget {max_drop:.1%}"
        )
    return ~over


def rank(est: cost_step.Estimates, feasible: np.ndarray, top: int) -> np.ndarray:
    """Indices of the `top` fastest feasible plans: step time, then memory, then input order."""
    order = np.lexsort((feasible, est.memory_bytes_per_device[feasible], est.step_s[feasible]))
    return feasible[order[:top]]


@dataclass
class SearchResult:
    """The ranked plans for one model on `devices` devices, and what was rejected and why."""

    model: ModelSpec
    train: TrainSpec
    hardware: HardwareProfile
    devices: int
    candidates: int  # how many plans were enumerated
    estimates: cost_step.Estimates  # the structurally valid plans
    ranked: np.ndarray  # indices into `estimates` of the `top` fastest plans that fit memory
    rejected: Rejections
    feasible_count: int  # how many plans passed every filter (ranked holds the best of them)

    @property
    def feasible(self) -> bool:
        return len(self.ranked) > 0

    @property
    def best_step_s(self) -> float:
        return float(self.estimates.step_s[self.ranked[0]]) if self.feasible else float("nan")

    def rows(self) -> list[dict]:
        """The ranked plans as schema rows (docs/schema.md), fastest first."""
        return [plan_row(self.estimates, int(i)) for i in self.ranked]

    def require_feasible(self) -> SearchResult:
        """Self, or a MoeplanError saying why no plan survived (one line per reason)."""
        if self.feasible:
            return self
        head = (
            f"no feasible mesh for {self.model.name} on {self.devices} x {self.hardware.name}: "
            f"all {self.candidates} candidates rejected"
        )
        raise MoeplanError("\n".join([head, *("  " + line for line in self.rejected.lines())]))


def plan_row(est: cost_step.Estimates, i: int) -> dict:
    """Estimates.row(i), with the plan's memory-saving choices always present."""
    row = est.row(i)
    row.setdefault("fsdp", bool(est.plans.fsdp[i]))
    row.setdefault("remat", REMAT_NAMES[int(est.plans.remat[i])])
    return row


def search(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    devices: int,
    options: SearchOptions = SearchOptions(),
) -> SearchResult:
    """Score every plan of `devices` devices and keep the `options.top` fastest that fit."""
    plans = enumerate_plans(devices, options)
    scored = score(model, train, hw, plans, routing=options.routing, max_drop=options.max_drop)
    ranked = rank(scored.estimates, scored.feasible, options.top)
    return SearchResult(
        model, train, hw, devices, len(plans), scored.estimates, ranked, scored.rejected, len(scored.feasible)
    )


# ---- expert-count proposal --------------------------------------------------------------


@dataclass
class ExpertChoice:
    """The best plan for one routed-expert count, relative to the dense backbone."""

    num_experts: int
    result: SearchResult
    step_ratio: float  # best MoE step time / best dense-backbone step time (nan if infeasible)
    within_budget: bool


@dataclass
class ExpertProposal:
    """Expert counts tried, the dense reference, and the largest count within the budget."""

    dense: SearchResult
    choices: list[ExpertChoice]
    max_step_increase: float
    chosen: int | None  # largest num_experts within budget, None if none is


def check_expert_counts(counts: Sequence[int]) -> list[int]:
    """Sorted unique positive counts, or a one-line error."""
    if not counts:
        raise MoeplanError("give at least one expert count, e.g. --experts 8,16,32")
    bad = [c for c in counts if c < 1]
    if bad:
        raise MoeplanError(f"expert count must be positive (got {bad[0]}): it is experts per MoE layer")
    return sorted(set(int(c) for c in counts))


def propose_experts(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    devices: int,
    counts: Sequence[int] = DEFAULT_EXPERT_COUNTS,
    max_step_increase: float = DEFAULT_MAX_STEP_INCREASE,
    options: SearchOptions = SearchOptions(),
) -> ExpertProposal:
    """For each expert count, the best plan's step time against the dense backbone's.

    arXiv 2405.15052 measures an MoE model's cost by step time (not FLOPs or activated
    parameters) and keeps it within ~20% of the dense backbone on the same devices; the
    proposal is the largest expert count whose best plan stays within `max_step_increase`.
    """
    if model.moe is None:
        raise MoeplanError(f"{model.name} is a dense model; --experts needs a model with a moe section")
    if max_step_increase < 0:
        raise MoeplanError(f"max step increase must be >= 0 (got {max_step_increase}): it is a fraction, 0.2 = 20%")
    counts = check_expert_counts(counts)
    dense = search(model.dense_backbone(), train, hw, devices, options).require_feasible()
    choices = []
    for count in counts:
        result = search(model.with_experts(count), train, hw, devices, options)
        ratio = result.best_step_s / dense.best_step_s if result.feasible else float("nan")
        within = bool(result.feasible and ratio <= 1 + max_step_increase)
        choices.append(ExpertChoice(count, result, ratio, within))
    within_counts = [c.num_experts for c in choices if c.within_budget]
    return ExpertProposal(dense, choices, max_step_increase, max(within_counts) if within_counts else None)


# ---- capacity factor against drops (moeplan.cost.balance) ------------------------------


@dataclass
class CapacityChoice:
    """The best plan at one capacity factor, under the routing and drop budget of the search."""

    capacity_factor: float
    result: SearchResult
    dropped_fraction: float  # predicted, of the best plan (nan if none is feasible)


@dataclass
class CapacityTrade:
    """Capacity factors tried and the one whose best plan is fastest within the drop budget."""

    choices: list[CapacityChoice]
    max_drop: float | None
    chosen: float | None


def trade_capacity(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    devices: int,
    factors: Sequence[float],
    options: SearchOptions = SearchOptions(),
) -> CapacityTrade:
    """Search each capacity factor; pick the fastest best plan whose drops fit the budget.

    With static shapes a larger capacity factor pads expert compute and all-to-all buffers
    (GShard arXiv 2006.16668 sec. 2.2) but drops fewer tokens under skewed routing; plans over
    `options.max_drop` are rejected inside each search, so the trade is a plain minimum.
    """
    if model.moe is None:
        raise MoeplanError(f"{model.name} is a dense model; capacity factors need a model with a moe section")
    choices = []
    for cf in sorted(set(factors)):
        m = model.model_copy(update={"moe": model.moe.model_copy(update={"capacity_factor": cf})})
        result = search(m, train, hw, devices, options)
        drop = float(result.estimates.dropped_fraction[result.ranked[0]]) if result.feasible else float("nan")
        choices.append(CapacityChoice(cf, result, drop))
    feasible = [c for c in choices if c.result.feasible]
    best = min(feasible, key=lambda c: c.result.best_step_s) if feasible else None
    return CapacityTrade(choices, options.max_drop, best.capacity_factor if best else None)
