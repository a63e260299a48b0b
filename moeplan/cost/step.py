"""One training step's predicted time, traffic and memory, for many plans at once.

Why one vectorised call: the search scores every data x expert x model factorisation (with
FSDP and remat choices) of a device count, 10^4 to 10^6 plans, so every term is a numpy
expression over the plans and nothing loops over them.

step time: compute (sum of per-class rooflines, compute.py) and communication (sum of
alpha-beta collective times, collectives.py) overlap partly. Perfect overlap gives
lower = max(compute, comm); none gives upper = compute + comm; the point estimate is
upper - overlap * (upper - lower) with the profile's overlap fraction (the lower/upper
bracket follows the scaling-book, "How to Scale Your Model", ch. 1).
On profiles with `host_memory` (CPU runtimes) compute also holds `first_touch`, the page
faults of a scratch block mapped afresh every step (first_touch.py), which is why memory is
estimated before compute here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from moeplan.cost import collectives, compute, first_touch, memory, traffic
from moeplan.cost.layout import REMAT_CODES, Plans, activated_params, total_params
from moeplan.specs import HardwareProfile, ModelSpec, TrainSpec

SECONDS_PER_DAY = 86_400.0
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. arXiv 2203.15556, table 3
REMAT_NAMES = {v: k for k, v in REMAT_CODES.items()}
COMM_KEYS = {k: k.replace("-", "_") for k in traffic.KINDS}


class Routing(Protocol):
    """What the load-balance model (moeplan/cost/balance.py) hands to `estimate`.

    expert_compute_factor: the busiest device's expert FFN work relative to the
    capacity-padded uniform case (1.0 = no change); a scalar or one value per plan.
    dropped_fraction: share of token-expert assignments dropped by capacity.
    """

    expert_compute_factor: float | np.ndarray
    dropped_fraction: float | np.ndarray


@dataclass
class Estimates:
    """Predictions for each plan in `plans` (every array has one entry per plan).

    Times are seconds per optimizer step; bytes and FLOPs are per device per step.
    """

    plans: Plans
    compute_s: np.ndarray
    all_to_all_s: np.ndarray
    model_axis_s: np.ndarray
    data_axis_s: np.ndarray
    step_lower_s: np.ndarray  # max(compute, communication): perfect overlap
    step_upper_s: np.ndarray  # compute + communication: no overlap
    step_s: np.ndarray  # point estimate from the profile's overlap factor
    comm_bytes: dict[str, np.ndarray]  # kind (traffic.KINDS, e.g. "all-to-all") -> wire bytes per device per step
    flops_per_device: np.ndarray
    memory_bytes_per_device: np.ndarray
    fits_memory: np.ndarray  # bool
    mfu: np.ndarray
    tokens_per_s: np.ndarray
    compute_detail_s: dict[str, np.ndarray] = field(default_factory=dict)  # per op class
    flops_detail: dict[str, np.ndarray] = field(default_factory=dict)  # per op class
    memory_detail: dict[str, np.ndarray] = field(default_factory=dict)  # weights, grads, ...
    # added by the cost model (all have defaults so older constructors keep working)
    train_days: np.ndarray = field(default_factory=lambda: np.zeros(0))  # wall-clock for train_tokens
    train_tokens: float = 0.0  # token budget used for train_days
    flops_per_token: float = 0.0  # model FLOPs per token (6N_active + attention), no remat/padding
    activated_params: int = 0
    total_params: int = 0
    num_experts: int = 0  # 0 for a dense model
    tokens_per_step: int = 0
    bytes_detail: dict[str, np.ndarray] = field(default_factory=dict)  # HBM bytes per op class
    collective_detail_s: dict[str, np.ndarray] = field(default_factory=dict)  # per traffic entry
    dropped_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expert_compute_factor: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # bytes per device paged in afresh every step (CPU runtimes: cost/first_touch.py), 0 elsewhere
    first_touch_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # (model, train, hw) the estimate came from: lets row(i) fill in skipped detail dicts
    inputs: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.step_s)

    @property
    def has_detail(self) -> bool:
        """Whether the per-class / per-entry detail dicts were kept (see `estimate`)."""
        return bool(self.flops_detail)

    def alone(self, i: int) -> Estimates:
        """Plan i estimated on its own, with every detail dict (equal to row i of self)."""
        if self.inputs is None:
            raise ValueError("these estimates do not record their inputs")
        model, train, hw = self.inputs
        routing = _FixedRouting(float(self.expert_compute_factor[i]), float(self.dropped_fraction[i]))
        return estimate(model, train, hw, self.plans.take(np.array([i])), routing, detail=True)

    def row(self, i: int) -> dict:
        """JSON-ready record of plan i in the documented schema (docs/schema.md)."""
        p = self.plans
        f = lambda a: float(a[i])  # noqa: E731
        d, j = (self, i) if self.has_detail or self.inputs is None else (self.alone(i), 0)
        g = lambda a: float(a[j])  # noqa: E731
        comm = {COMM_KEYS[k]: f(v) for k, v in self.comm_bytes.items()}
        return {
            "mesh": {"data": int(p.data[i]), "expert": int(p.expert[i]), "model": int(p.model[i])},
            "devices": int(p.data[i] * p.expert[i] * p.model[i]),
            "fsdp": bool(p.fsdp[i]),
            "remat": REMAT_NAMES[int(p.remat[i])],
            "num_experts": int(self.num_experts),
            "step_time_s": f(self.step_s),
            "step_time_bounds_s": [f(self.step_lower_s), f(self.step_upper_s)],
            "breakdown_s": {
                "compute": f(self.compute_s),
                "all_to_all": f(self.all_to_all_s),
                "model_axis": f(self.model_axis_s),
                "data_axis": f(self.data_axis_s),
            },
            "comm_bytes_per_device": comm,
            "flops_per_device": f(self.flops_per_device),
            "memory_bytes_per_device": f(self.memory_bytes_per_device),
            "memory_breakdown_bytes": {k: g(v) for k, v in d.memory_detail.items()},
            "fits_memory": bool(self.fits_memory[i]),
            "mfu": f(self.mfu),
            "tokens_per_s": f(self.tokens_per_s),
            "compute_s_by_op": {k: g(v) for k, v in d.compute_detail_s.items()},
            "flops_by_op": {k: g(v) for k, v in d.flops_detail.items()},
            "train_days": f(self.train_days),
            "train_tokens": float(self.train_tokens),
            "dropped_fraction": f(self.dropped_fraction),
            **({"first_touch_bytes_per_device": f(self.first_touch_bytes)} if self._host_memory else {}),
        }

    @property
    def _host_memory(self) -> bool:
        """Whether the hardware prices first-touch page faults (a CPU runtime's profile)."""
        return self.inputs is not None and self.inputs[2].host_memory is not None


def overlap_bounds(compute_s: np.ndarray, comm_s: np.ndarray, overlap: float):
    """(lower, upper, point): max, sum, and sum minus the hidden share of the difference."""
    lower = np.maximum(compute_s, comm_s)
    upper = compute_s + comm_s
    return lower, upper, upper - overlap * (upper - lower)


@dataclass(frozen=True)
class _FixedRouting:
    expert_compute_factor: float
    dropped_fraction: float


def _per_plan(value, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()


def _float_sizes(plans: Plans) -> Plans:
    """The same plans with float64 mesh sizes: numpy then converts them once, not per term."""
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    return Plans(f(plans.data), f(plans.expert), f(plans.model), np.asarray(plans.fsdp, dtype=bool),
                 np.asarray(plans.remat))


def estimate(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    plans: Plans,
    routing: Routing | None = None,
    *,
    detail: bool | None = None,
) -> Estimates:
    """Predict every term for every plan (vectorised over `plans`).

    `routing` (optional, from moeplan/cost/balance.py) scales the expert FFN by its
    expert_compute_factor and reports its dropped_fraction; None means the
    capacity-padded uniform case.

    `detail`: keep the per-op-class and per-collective dicts (compute_detail_s,
    flops_detail, bytes_detail, memory_detail, collective_detail_s). They are ~50 arrays per
    plan; None keeps them for at most DETAIL_LIMIT plans. Without them, `row(i)` still
    reports plan i's breakdown by re-estimating that one plan (`Estimates.alone`).

    Large batches are scored CHUNK plans at a time: the few hundred temporaries of one pass
    then stay in cache and reuse freed memory, which is >2x faster on 10^6 plans.
    """
    n = len(plans)
    detail = n <= DETAIL_LIMIT if detail is None else detail
    factor = np.ones(n) if routing is None else _per_plan(routing.expert_compute_factor, n)
    dropped = _per_plan(0.0 if routing is None else routing.dropped_fraction, n)
    scaled = routing is not None and not np.all(factor == 1.0)
    totals = _model_totals(model, train)
    block = lambda part: _estimate_block(  # noqa: E731
        model, train, hw, plans.take(part), factor[part] if scaled else 1.0, totals, detail
    )
    if n <= CHUNK:
        out = block(slice(0, n))
    else:
        out = _allocate(block(slice(0, CHUNK)), plans)
        for lo in range(CHUNK, n, CHUNK):
            _copy_into(out, block(slice(lo, lo + CHUNK)), slice(lo, lo + CHUNK))
    out.plans, out.dropped_fraction, out.expert_compute_factor = plans, dropped, factor
    out.inputs = (model, train, hw)
    return out


CHUNK = 32_768  # plans per vectorised pass (see `estimate`); 16-64k measured about equal
DETAIL_LIMIT = 65_536  # largest batch that keeps the detail dicts by default


@dataclass(frozen=True)
class _ModelTotals:
    """Plan-independent figures, computed once per call."""

    flops_per_token: float
    total_params: int
    activated_params: int
    train_tokens: float


def _model_totals(model: ModelSpec, train: TrainSpec) -> _ModelTotals:
    total = total_params(model)
    budget = train.train_tokens or CHINCHILLA_TOKENS_PER_PARAM * total
    return _ModelTotals(compute.model_flops_per_token(model, train), total, activated_params(model), float(budget))


def _estimate_block(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    plans_in: Plans,
    factor: np.ndarray | float,
    totals: _ModelTotals,
    detail: bool,
) -> Estimates:
    """`estimate` for one block of plans (routing arrays are filled in by the caller)."""
    plans = _float_sizes(plans_in)
    host = hw.host_memory
    out_of_place = host is not None and host.all_reduce_out_of_place
    unfused = host is not None and host.keeps_autodiff_residuals
    mem = memory.memory_per_device(model, train, plans, reduce_out_of_place=out_of_place, unfused=unfused)
    mem_total = sum(mem.values())
    work = compute.op_work(model, train, plans, expert_factor=factor)
    compute_detail = {k: compute.roofline_s(w, hw) for k, w in work.items()}
    flops_detail = {k: w.flops for k, w in work.items()}
    bytes_detail = {k: w.bytes for k, w in work.items()}
    faulted = np.zeros(len(plans))
    if host is not None:  # simulated CPU devices: page faults on a large scratch block
        faulted = first_touch.faulted_bytes(memory.scratch_bytes(mem), host)
        compute_detail["first_touch"] = faulted / host.first_touch_bandwidth
        flops_detail["first_touch"] = np.zeros(len(plans))
    compute_s = sum(compute_detail.values())
    flops = sum(flops_detail.values())

    colls = traffic.step_collectives(model, train, plans)
    comm = collectives.comm_totals(colls, plans, hw, per_entry=detail)
    terms = comm.seconds_by_term
    comm_s = terms["all_to_all"] + terms["model_axis"] + terms["data_axis"]
    lower, upper, point = overlap_bounds(compute_s, comm_s, hw.overlap)

    devices = plans.data * plans.expert * plans.model
    tokens = train.tokens_per_step
    tokens_per_s = tokens / point
    keep = (lambda d: d) if detail else (lambda d: {})  # noqa: E731
    return Estimates(
        plans=plans_in,
        compute_s=compute_s,
        all_to_all_s=terms["all_to_all"],
        model_axis_s=terms["model_axis"],
        data_axis_s=terms["data_axis"],
        step_lower_s=lower,
        step_upper_s=upper,
        step_s=point,
        comm_bytes=comm.bytes_by_kind,
        flops_per_device=flops,
        memory_bytes_per_device=mem_total,
        fits_memory=mem_total <= hw.hbm_bytes,
        mfu=totals.flops_per_token * tokens / (point * hw.peak_flops * devices),
        tokens_per_s=tokens_per_s,
        compute_detail_s=keep(compute_detail),
        flops_detail=keep(flops_detail),
        memory_detail=keep(mem),
        train_days=totals.train_tokens / tokens_per_s / SECONDS_PER_DAY,
        train_tokens=totals.train_tokens,
        flops_per_token=totals.flops_per_token,
        activated_params=totals.activated_params,
        total_params=totals.total_params,
        num_experts=model.moe.num_experts if model.moe is not None else 0,
        tokens_per_step=tokens,
        bytes_detail=keep(bytes_detail),
        collective_detail_s=keep(comm.seconds_by_entry),
        first_touch_bytes=faulted,
    )


def _per_plan_arrays(e: Estimates):
    """(field name, dict key or None, array) for every per-plan array of a block."""
    for f in fields(Estimates):
        value = getattr(e, f.name)
        if f.name in ("plans", "dropped_fraction", "expert_compute_factor"):
            continue
        if isinstance(value, np.ndarray):
            yield f.name, None, value
        elif isinstance(value, dict):
            for k, a in value.items():
                yield f.name, k, a


def _allocate(first: Estimates, plans: Plans) -> Estimates:
    """Estimates for all plans, with `first` (the first block) copied in and room for the rest."""
    n, m = len(plans), len(first)
    own = lambda v: dict(v) if isinstance(v, dict) else v  # noqa: E731  (not the block's dicts)
    out = Estimates(**{f.name: own(getattr(first, f.name)) for f in fields(Estimates)})
    for name, key, a in _per_plan_arrays(first):
        full = np.empty(n, dtype=a.dtype)
        full[:m] = a
        if key is None:
            setattr(out, name, full)
        else:
            getattr(out, name)[key] = full
    return out


def _copy_into(out: Estimates, part: Estimates, where: slice) -> None:
    for name, key, a in _per_plan_arrays(part):
        (getattr(out, name) if key is None else getattr(out, name)[key])[where] = a
