"""`moeplan profile`: compile and time the real step on candidate meshes, next to the prediction.

Split in two halves that may live in different processes:
- the parent (this module's `run_profile`, no jax needed) picks the candidate meshes,
  predicts each with the cost model, and turns what comes back into a report;
- `measure_task` runs where the devices are (here, a re-executed child with simulated CPU
  devices, or process 0 of a `jax.distributed` group; see devices.py) and streams one event
  per candidate: compile time, timed steps, HLO collectives, cost_analysis FLOPs and
  memory_analysis bytes.

Streaming is what makes a run robust: a candidate that fails to compile or runs out of
memory comes back as an error event and the run goes on, and a Ctrl-C keeps (and prints,
and saves) every candidate measured before it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable

from moeplan.cost import balance as bal
from moeplan.cost import step as cost_step
from moeplan.cost.layout import Plans
from moeplan.errors import MoeplanError
from moeplan.specs import HardwareProfile, Mesh, ModelSpec, TrainSpec
from moeplan.validate import devices as dev
from moeplan.validate import isolated, skew
from moeplan.validate.compare import Comparison, Measured, Predicted, Summary, summarize

TASK = "moeplan.validate.profile:measure_task"
Emit = Callable[[dict], None]


@dataclass
class ProfileRequest:
    """Everything one `moeplan profile` run needs (all plain specs; no jax objects)."""

    model: ModelSpec
    train: TrainSpec
    hardware: HardwareProfile
    meshes: list[Mesh]
    devices: int
    processes: int = 1
    steps: int = 10
    warmup: int = 3
    cluster: bool = False
    rounds: int = 1  # >1: time all candidates in interleaved rounds (measure_task)
    routing: bal.Routing | None = None  # drive the real router to this law (None: leave it alone)
    learning_rate: float | None = None  # StepOptions.learning_rate override (None: the step's default)
    breakdown: int = 0  # >0: after timing, trace this many steps for the time by cost term (term_times.py)
    isolate: bool = False  # rounds on simulated CPU devices: each candidate in its own process (isolated.py)


@dataclass
class ProfileReport:
    """Per-candidate comparisons, their summary, and whether the run was cut short."""

    request: ProfileRequest
    comparisons: list[Comparison]
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        return summarize(self.comparisons, rounds=self.request.rounds > 1)

    def record(self) -> dict:
        """The `--format json` document (schema_version 1, docs/validation.md)."""
        r, t = self.request, self.request.train
        return {
            "schema_version": 1,
            "model": r.model.name,
            "hardware": r.hardware.name,
            "devices": r.devices,
            "processes": r.processes,
            "train": {"seq_len": t.seq_len, "global_batch": t.batch, "grad_accum": t.grad_accum,
                      "remat": t.remat, "compute_dtype": t.compute_dtype, "param_dtype": t.param_dtype},
            "steps": r.steps,
            "warmup": r.warmup,
            "rounds": r.rounds,
            "isolate": r.isolate,
            "routing": None if r.routing is None else str(r.routing),
            "learning_rate": r.learning_rate,
            "interrupted": self.interrupted,
            "notes": list(self.notes),
            "results": [c.record() for c in self.comparisons],
            "summary": self.summary.record(),
        }


# ---- parent side: hardware, candidates and predictions ------------------------------------


def resolve_hardware(
    hardware: str | None, *, ident: dict, processes: int, dtype: str, cluster: bool = False,
    recalibrate: bool = False, on_event: Emit | None = None,
) -> tuple[HardwareProfile, str]:
    """The profile to predict with, and a note saying where it came from.

    Given a preset or file, that. Otherwise a calibration of these very devices, cached per
    device kind, count, process count, dtype and jax version (calibrate.cache_path), so only
    the first run pays for the micro-benchmarks.
    """
    from moeplan import presets
    from moeplan.validate import calibrate as cal

    if hardware:
        return presets.load_hardware(hardware), f"hardware profile {hardware}"
    import jax

    path = cal.cache_path(ident["kind"], ident["count"], processes, dtype, jax.__version__)
    if path.exists() and cal.written_by_calibrate(path) and not recalibrate:
        try:
            return presets.load_hardware(path), f"cached calibration {path}"
        except MoeplanError:
            pass  # a damaged cache entry is measured again
    profile = cal.run_calibration(devices=ident["count"], processes=processes, dtype=dtype,
                                  cluster=cluster, on_event=on_event)
    if dev.is_primary():
        cal.write_profile(path, profile)
    return presets.build(HardwareProfile, profile, str(path)), f"calibrated now, cached at {path}"



def check_device_counts(meshes: list[str], devices: int) -> list[Mesh]:
    """The --mesh options parsed, each checked to span exactly `devices` devices. Cheap and
    jax-free, so a command can call it before any backend starts."""
    out = [Mesh.parse(m) for m in meshes]
    for m in out:
        if m.devices != devices:
            raise MoeplanError(f"mesh {m} has {m.devices} devices, not --devices {devices}")
    return out


def candidate_meshes(
    model: ModelSpec, train: TrainSpec, hw: HardwareProfile, devices: int,
    meshes: list[str] | None = None, top: int | None = None,
) -> list[Mesh]:
    """The meshes to measure: those given (checked), else the planner's `top` (default all).

    Planner candidates keep the user's FSDP / remat choice: the measured step is built with
    those, so the ranking must be over meshes alone.
    """
    from moeplan import search

    if meshes:
        out = check_device_counts(meshes, devices)
        for m in out:
            problems = search.mesh_problems(model, train, m)
            if problems:
                raise MoeplanError(f"mesh {m} cannot run {model.name}: {problems[0]}")
        return list(dict.fromkeys(out))
    opts = search.SearchOptions(fsdp=(train.fsdp,), remat=(train.remat,), top=top or 10**6)
    result = search.search(model, train, hw, devices, opts).require_feasible()
    return [result.estimates.plans.mesh(int(i)) for i in result.ranked]


def predict(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, meshes: list[Mesh],
            routing: bal.Routing | None = None) -> cost_step.Estimates:
    """Cost-model estimates for the candidate meshes, in order (one vectorised call).

    With `routing` the imbalance term is in (as `moeplan estimate --routing`), so the step
    time and dropped fraction predicted are those of the skew the real router is driven to.
    """
    import numpy as np

    singles = [Plans.single(m, train) for m in meshes]
    cat = lambda f: np.concatenate([getattr(p, f) for p in singles])  # noqa: E731
    plans = Plans(cat("data"), cat("expert"), cat("model"), cat("fsdp"), cat("remat"))
    if routing is None:
        return cost_step.estimate(model, train, hw, plans)
    effect = bal.routing_effect(model, train, plans, routing, expert_max=True)
    return cost_step.estimate(model, train, hw, plans, routing=effect)


def predicted_row(est: cost_step.Estimates, i: int) -> dict:
    from moeplan.search import plan_row

    return plan_row(est, i)


def run_profile(req: ProfileRequest, *, on_event: Emit | None = None) -> ProfileReport:
    """Predict, then measure every candidate; a Ctrl-C returns what was measured so far."""
    est = predict(req.model, req.train, req.hardware, req.meshes, req.routing)
    comps = [
        Comparison(mesh=str(m), predicted=Predicted.from_estimates(est, i), predicted_row=predicted_row(est, i))
        for i, m in enumerate(req.meshes)
    ]
    report = ProfileReport(req, [])
    done: dict[int, Comparison] = {}

    def handle(event: dict) -> None:
        if event.get("event") in ("result", "error"):
            c = comps[event["index"]]
            if event["event"] == "result":
                raw = event["measured"].pop("routing", None)
                c.measured = Measured.from_record(event["measured"])
                if raw is not None and req.routing is not None:
                    c.routing = skew.compare(req.routing, req.model.moe.top_k, raw)
            else:
                c.error = event["reason"]
            done[event["index"]] = c
            report.comparisons = [done[k] for k in sorted(done)]
        if on_event:
            on_event(event)

    try:
        dev.run(TASK, payload(req), devices=req.devices, processes=req.processes,
                cluster=req.cluster, on_event=handle)
    except KeyboardInterrupt:
        report.interrupted = True
    return report


def payload(req: ProfileRequest) -> dict:
    """What the measuring side needs, as JSON (it may be another process)."""
    return {
        "model": req.model.model_dump(mode="json"),
        "train": req.train.model_dump(mode="json"),
        "meshes": [str(m) for m in req.meshes],
        "steps": req.steps,
        "warmup": req.warmup,
        "rounds": req.rounds,
        "breakdown": req.breakdown,
        "isolate": req.isolate,
        "options": skew.step_options(req.model, req.routing, req.learning_rate),
    }


# ---- device side ----------------------------------------------------------------------------


def measure_task(payload: dict, devices: list, emit: Emit) -> None:
    """Compile, time and read back every candidate mesh; one event per candidate.

    With `rounds` > 1 every candidate is compiled and warmed up first, then all are timed
    in interleaved rounds (validate/rounds.py), so load that drifts over the minutes a run
    takes hits every candidate alike instead of whichever ran then. All compiled programs and
    states are then alive at once in this process, or, with `isolate` on simulated CPU
    devices, each candidate runs in a process of its own (validate/isolated.py), so that no
    candidate inherits another's free heap.
    """
    model = ModelSpec.model_validate(payload["model"])
    train = TrainSpec.model_validate(payload["train"])
    meshes = [Mesh.parse(m) for m in payload["meshes"]]
    rounds = int(payload.get("rounds", 1))
    interleave = rounds > 1 and len(meshes) > 1
    emit({"event": "start", "total": len(meshes)})
    if interleave and payload.get("isolate") and isolated.applies(devices):
        isolated.measure(payload, emit, settle=ROUND_SETTLE)  # one process per candidate
        return
    ready: dict[int, Prepared] = {}
    for i, mesh in enumerate(meshes):
        phase = _phases(emit, i, mesh)
        try:
            prep = prepare_one(model, train, mesh, devices[: mesh.devices], phase=phase,
                               options=payload.get("options"))
            if not interleave:
                record = time_alone(prep, payload["steps"], payload["warmup"], phase)
                emit_measured(prep, record, devices[: mesh.devices], payload, emit, i)
            else:
                warm_up(prep, payload["warmup"])
                ready[i] = prep
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 (any failure of one candidate is reported, not fatal)
            emit({"event": "error", "index": i, "mesh": str(meshes[i]), "reason": failure_reason(e)})
        finally:
            # clearing jax's caches would drop the kept candidates' compiled steps: only gc then
            release_memory() if not interleave else gc.collect()
    if ready:
        emit({"event": "phase", "index": min(ready), "mesh": "all", "phase": "rounds", "done": 0, "total": rounds})
        for i, rec in time_in_rounds(ready, payload["steps"], rounds).items():
            emit_measured(ready[i], rec, devices[: meshes[i].devices], payload, emit, i)
        ready.clear()
        release_memory()


def _phases(emit: Emit, i: int, mesh: Mesh) -> Callable[..., None]:
    """phase(name, done, total): candidate i's progress events (compile, run, trace)."""
    def phase(name: str, done: int = 0, total: int = 0) -> None:
        emit({"event": "phase", "index": i, "mesh": str(mesh), "phase": name, "done": done, "total": total})
    return phase


def emit_measured(prep: Prepared, record: dict, devices: list, payload: dict, emit: Emit, i: int) -> None:
    """Candidate i's timed record, completed after timing (page faults, then the traced
    breakdown the payload asks for) and sent as its result event."""
    record = with_page_faults(prep, record, devices)
    record = with_breakdown(prep, record, payload.get("breakdown", 0), _phases(emit, i, prep.mesh))
    emit({"event": "result", "index": i, "mesh": str(prep.mesh), "measured": record})


@dataclass
class Prepared:
    """One compiled candidate ready to run: its step closure and what was read at compile."""

    built: object
    run: Callable[[], object]
    record: dict  # the `measured` record minus the timing
    history: list  # metrics of every step run (driven router only)
    mesh: Mesh
    train: TrainSpec


def prepare_one(model: ModelSpec, train: TrainSpec, mesh: Mesh, devices: list, *,
                phase: Callable[..., None], options: dict | None = None) -> Prepared:
    """Build, compile (timed), read the HLO and memory, initialise; no step run yet.

    `options` are StepOptions keywords (`skew.step_options`); with a router bias the router
    starts at zero so the first step routes exactly by the law, and every step's metrics
    vector is kept (on device while timing, read after it: no extra host sync).
    """
    from moeplan.validate import StepOptions, build_step, hlo
    from moeplan.validate.timing import time_compile

    options = skew.step_kwargs(options)
    driven = options.get("router_bias") is not None
    phase("compile")
    built = build_step(model, train, mesh, devices=devices, options=StepOptions(**options))
    compiled, compile_s = time_compile(built.compile)
    comm = hlo.wire_bytes_by_kind(hlo.collectives(compiled))
    mem = hlo.memory(compiled)
    state, batch = built.init_state(seed=0, zero_router=driven), built.make_batch(seed=0)
    box = [state]
    history: list = []

    def run():
        box[0], metrics = built.step(box[0], batch)
        if driven:
            history.append(metrics)
        return box[0], metrics

    record = {
        "compile_s": compile_s,
        "comm_bytes_per_device": {k: v for k, v in comm.items() if v or k != "collective-permute"},
        "flops_per_device": hlo.flops(compiled),
        "bytes_accessed_per_device": bytes_accessed(compiled),
        "memory_bytes_per_device": peak_bytes(mem),
        "memory_analysis": mem,
    }
    return Prepared(built, run, record, history, mesh, train)


def warm_up(prep: Prepared, steps: int) -> None:
    import jax

    for _ in range(steps):
        jax.block_until_ready(prep.run())


def time_alone(prep: Prepared, steps: int, warmup: int, phase: Callable[..., None]) -> dict:
    """Time one candidate on its own: `warmup` untimed steps, then `steps` timed ones."""
    import jax

    from moeplan.validate.timing import time_steps

    timing = time_steps(prep.run, steps=steps, warmup=warmup, sync=jax.block_until_ready,
                        on_step=lambda d, t: phase("run", d, t))
    return finish(prep, timing.median_s, timing.cv, list(timing.times_s))


ROUND_SETTLE = 1
"""Untimed steps a candidate runs at the start of each of its rounds. The first step after
another candidate ran is not a training step's steady state: measured on 8 CPU devices
(wide-moe, ten meshes interleaved, 2026-12-02), data=1,expert=8's first step of a round took
159 ms and its second 142 (142-147 for the other meshes' second steps), which alone made
the planner's pick read 8-10% slower than its neighbours."""


def time_in_rounds(ready: dict[int, Prepared], steps: int, rounds: int) -> dict[int, dict]:
    """Every warmed-up candidate timed in `rounds` interleaved rounds of steps // rounds steps
    (at least 1), each after ROUND_SETTLE untimed ones, on the wall clock; step time = median
    of the per-round medians."""
    import jax

    from moeplan.validate import rounds as rounds_lib

    runs = {str(i): prep.run for i, prep in ready.items()}
    timed = rounds_lib.measure(runs, rounds=rounds, steps=max(1, steps // rounds), max_cv=float("inf"),
                               remeasure=0, clock="wall", sync=jax.block_until_ready, settle=ROUND_SETTLE)
    # on the wall clock the judged times are the wall times: median, spread, per-round values
    out = {}
    for i, prep in ready.items():
        t = timed[str(i)]
        out[i] = finish(prep, t.time_s, t.time_cv, list(t.times_s))
    return out


FAULT_STEPS = 2  # untimed steps run after timing to count the page faults of one step


def with_page_faults(prep: Prepared, record: dict, devices: list) -> dict:
    """`record` plus `first_touch_bytes_per_device`: the bytes this process page-faulted per
    step per local device, over FAULT_STEPS steps run after timing (CPU devices only: there
    the scratch block over the allocator's map threshold is paged in afresh every step,
    cost/first_touch.py). Left out of the routing history like the traced steps."""
    import jax

    from moeplan.validate import page_faults

    if not devices or getattr(devices[0], "platform", None) != "cpu":
        return record
    local = sum(1 for d in devices if d.process_index == jax.process_index())
    kept = len(prep.history)
    try:
        faulted = page_faults.count(prep.run, FAULT_STEPS, jax.block_until_ready, local)
    finally:
        del prep.history[kept:]
    return record if faulted is None else {**record, "first_touch_bytes_per_device": faulted}


def with_breakdown(prep: Prepared, record: dict, steps: int, phase: Callable[..., None]) -> dict:
    """`record` plus the measured time by cost term from `steps` traced steps (none: as is).

    Runs after timing, so the profiler never touches a timed step; the traced steps are
    left out of the routing history (its "last step" is the last timed one).
    """
    if steps <= 0:
        return record
    import jax

    from moeplan.validate import term_times

    phase("trace")
    kept = len(prep.history)
    try:
        split = term_times.measure(prep.built.compile(), prep.run, steps, jax.block_until_ready,
                                   record["step_time_s"])
    except Exception as e:  # noqa: BLE001 (a profiler that cannot trace costs the split, not the timing)
        split = {"breakdown_error": failure_reason(e)}
    finally:
        del prep.history[kept:]
    return {**record, **split}


def finish(prep: Prepared, median_s: float, cv: float, times_s: list[float]) -> dict:
    """The `measured` record: what compile read, the timing, and the routing read-out."""
    record = {"step_time_s": median_s, "step_time_cv": cv, **prep.record, "step_times_s": times_s}
    if prep.history:
        built = prep.built
        record["routing"] = skew.measured_routing(
            [built.metrics_dict(m) for m in prep.history], groups=skew.routing_groups(prep.mesh, prep.train),
            tokens=built.tokens_per_microbatch, capacity=built.capacity,
            learning_rate=built.options.learning_rate)
    return record


def bytes_accessed(compiled) -> float | None:
    """XLA's count of memory traffic (cost_analysis 'bytes accessed'): a diagnostic to set
    against the cost model's HBM bytes when a step is slower than its FLOPs explain."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    value = (analysis or {}).get("bytes accessed")
    return float(value) if value is not None else None


def peak_bytes(mem: dict[str, int]) -> float | None:
    """Peak bytes of one device from memory_analysis: arguments + outputs - aliased + temporaries.

    (The buffers XLA assigns for one execution: inputs, outputs not donated into inputs, and
    the scratch it plans; jax's docs on `Compiled.memory_analysis` add them the same way.)
    Why not XLA's own `peak_memory` field, as the TPU path uses (tpu_aot.xla_memory): on the
    CPU backend it reports little more than the arguments (tiny-moe, data=1,expert=1,model=8:
    4.17 MB against 30.6 MB of assigned buffers, 26.4 MB of them temporaries), while the TPU
    compiler's figure is its heap simulation's true peak.
    """
    if not mem:
        return None
    return float(mem.get("argument_size", 0) + mem.get("output_size", 0)
                 - mem.get("alias_size", 0) + mem.get("temp_size", 0))


def failure_reason(e: BaseException) -> str:
    """One line saying why a candidate failed (out of memory called out as such)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError):
        return f"out of memory: {text[:300]}"
    kind = "" if isinstance(e, MoeplanError) else f"{type(e).__name__}: "
    return f"{kind}{text[:300]}"


def release_memory() -> None:
    """Drop compiled programs and buffers of the finished candidate before the next one."""
    import jax

    gc.collect()
    jax.clear_caches()
