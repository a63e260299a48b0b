"""Measurement commands: `profile` (predicted against measured) and `calibrate` (hardware profile).

Thin by design: parse options, call `moeplan.validate.profile` / `.calibrate`, render one
document through `moeplan.output`. jax is imported only inside the command bodies, after the
device count is settled (devices.py), so `moeplan --help` and planning stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeplan import output
from moeplan.commands.guard import guarded
from moeplan.errors import MoeplanError

DEFAULT_MODEL = "tiny-moe"
# Small enough that tiny-moe compiles and steps in seconds on simulated CPU devices; every
# factorization of 8 devices divides the batch.
DEFAULT_SEQ_LEN = 64
DEFAULT_BATCH = 16

DevicesOpt = Annotated[Optional[int], typer.Option(
    "--devices", "-n", help="Devices to use; simulated CPU devices are made when jax has fewer "
    "(default: all accelerators, else 8 simulated CPU devices).")]
ProcessesOpt = Annotated[int, typer.Option(
    "--processes", help="Local processes joined by jax.distributed (gloo CPU collectives), "
    "each with devices/processes CPU devices.")]
ClusterOpt = Annotated[bool, typer.Option(
    "--cluster", help="Join a real multi-host job with jax.distributed.initialize() (run one "
    "moeplan per host under the launcher); process 0 prints.")]


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
    app.command("calibrate")(calibrate_cmd)


# ---- progress -----------------------------------------------------------------------------


class Progress:
    """A rich progress bar on stderr fed by measurement events (silent when not a terminal)."""

    def __init__(self, title: str, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True, disable=not enabled,
        )
        self.task = self.bar.add_task(title, total=None)
        self.title = title

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.bar.reset(self.task, total=event["total"], description=self.title)
        elif kind == "progress":
            self.bar.update(self.task, completed=event["done"], description=f"{self.title}: {event['label']}")
        elif kind == "phase":
            what = {"compile": "compiling", "trace": "tracing"}.get(event["phase"], f"step {event['done']}/{event['total']}")
            self.bar.update(self.task, description=f"{self.title}: {event['mesh']} {what}")
        elif kind in ("result", "error"):
            self.bar.advance(self.task)


def _progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# ---- profile ------------------------------------------------------------------------------


@guarded
def profile_cmd(
    model_name: Annotated[str, typer.Option("--model", "-m", help="Model preset name or YAML file.")] = DEFAULT_MODEL,
    hardware: Annotated[Optional[str], typer.Option(
        "--hardware", help="Hardware preset or YAML; default: calibrate these devices (cached).")] = None,
    devices: DevicesOpt = None,
    processes: ProcessesOpt = 1,
    cluster: ClusterOpt = False,
    mesh: Annotated[Optional[list[str]], typer.Option(
        "--mesh", help="Mesh to measure, as data=2,expert=2,model=2 (repeatable); default: the planner's meshes.")] = None,
    top: Annotated[Optional[int], typer.Option("--top", help="Measure the planner's K best meshes (default: all feasible).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per mesh (median reported); each is a "
                                       "real training step on the same batch.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps before timing.")] = 3,
    rounds: Annotated[int, typer.Option(
        "--rounds", help="Time all meshes in N interleaved rounds of steps/N steps (after compiling all), so "
        "load that drifts during the run hits every mesh alike; 1: one mesh after another.")] = 1,
    isolate: Annotated[bool, typer.Option(
        "--isolate", help="With --rounds on simulated CPU devices: run each mesh in a process of its own, as "
        "a training job runs (its own C heap, so a large scratch block is paged in every step as the "
        "cost model's first-touch term says); short steps then time noisier.")] = False,
    train_file: Annotated[Optional[str], typer.Option("--train", help="TrainSpec YAML (options below override it).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help=f"Tokens per sequence (default {DEFAULT_SEQ_LEN}).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help=f"Global batch in sequences (default {DEFAULT_BATCH}).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Microbatches per optimizer step.")] = None,
    remat: Annotated[Optional[str], typer.Option("--remat", help="none, selective or full.")] = None,
    compute_dtype: Annotated[Optional[str], typer.Option(
        "--compute-dtype", help="Matmul dtype (default float32 on CPU, bfloat16 on accelerators).")] = None,
    routing: Annotated[Optional[str], typer.Option(
        "--routing", help="Drive the real router to this skew (uniform, zipf:S e.g. zipf:1.2, or hist:FILE): "
        "router bias + Gumbel noise from a zero router; shows tokens per expert, drops and the aux "
        "loss measured beside predicted (default: router left alone).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning-rate", help="Adam learning rate of the measured steps (default 1e-3); with --routing "
        "a larger one (1e-2) lets a few dozen steps show the aux loss rebalancing.")] = None,
    recalibrate: Annotated[bool, typer.Option("--recalibrate", help="Measure the hardware again (ignore the cache).")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    out: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the JSON (or .yaml) document here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    breakdown: Annotated[bool, typer.Option(
        "--breakdown", help="After timing, trace a few steps with the jax profiler and show the step time by "
        "cost term (each op class and collective axis), predicted beside measured.")] = False,
    target: Annotated[Optional[str], typer.Option(
        "--target", help="Compile only, ahead of time, for a TPU slice such as tpu-v5p:4x4x4 (needs "
        "libtpu, the tpu extra; no TPU): compiled collectives, memory vs HBM and XLA's time "
        "estimate; default meshes: the planner's best 3.")] = None,
) -> None:
    """Compile and time the real sharded step on candidate meshes; compare with the cost model."""
    fmt = output.check_choice("--format", fmt, ("table", "json"))
    _check_counts(steps=steps, warmup=warmup, top=top, rounds=rounds)
    if isolate and rounds < 2:
        raise MoeplanError("--isolate runs each mesh in its own process between interleaved rounds: "
                           "give --rounds 2 or more")
    if isolate and (processes > 1 or cluster):
        raise MoeplanError("--isolate is for simulated CPU devices in one process; with --processes or "
                           "--cluster each process already has a heap of its own (drop one of them)")
    if remat is not None:
        remat = output.check_choice("--remat", remat, ("none", "selective", "full"))
    spec = _routing_spec(routing, learning_rate, target)
    if breakdown and target is not None:
        raise MoeplanError("--breakdown traces steps that run; --target only compiles (drop one of them)")
    if target is not None:
        from moeplan.commands import tpu_profile

        with Progress(f"compiling for {target}", _progress_enabled(quiet)) as bar:
            doc = tpu_profile.profile_target(
                target=target, model_name=model_name, hardware=hardware, mesh=mesh, top=top,
                train_file=train_file, seq_len=seq_len, batch=batch, grad_accum=grad_accum, remat=remat,
                compute_dtype=compute_dtype, default_seq_len=DEFAULT_SEQ_LEN, on_result=lambda r: bar.bar.advance(bar.task))
        if out is not None:
            _write_document(out, doc)
        output.emit(doc, fmt, tpu_profile.target_tables)
        return
    from moeplan import presets  # here, like jax: registering the command must stay cheap
    from moeplan.specs import Mesh
    from moeplan.validate import devices as dev
    from moeplan.validate import profile as prof
    from moeplan.validate.term_times import TRACED_STEPS

    model = presets.load_model(model_name)
    if spec is not None:
        from moeplan.validate import skew

        skew.check_routing(model, spec)
    if devices is None and mesh:
        devices = max(Mesh.parse(m).devices for m in mesh)
    if mesh:
        prof.check_device_counts(mesh, devices)  # before any backend starts: a typo costs one line
    ident = dev.identity(devices, processes, cluster)
    dtype = compute_dtype or ("float32" if ident["platform"] == "cpu" else "bfloat16")
    train = presets.load_train(
        train_file, seq_len=seq_len or (None if train_file else DEFAULT_SEQ_LEN),
        global_batch=batch or (None if train_file else DEFAULT_BATCH),
        grad_accum=grad_accum, remat=remat, compute_dtype=dtype,
    )
    with Progress("calibrating", _progress_enabled(quiet)) as bar:
        hw, source = prof.resolve_hardware(hardware, ident=ident, processes=processes, dtype=train.compute_dtype,
                                           cluster=cluster, recalibrate=recalibrate, on_event=bar)
    meshes = prof.candidate_meshes(model, train, hw, ident["count"], mesh, top)
    req = prof.ProfileRequest(model, train, hw, meshes, ident["count"], processes, steps, warmup, cluster,
                              routing=spec, learning_rate=learning_rate, rounds=rounds,
                              breakdown=TRACED_STEPS if breakdown else 0, isolate=isolate)
    with Progress("profiling", _progress_enabled(quiet)) as bar:
        report = prof.run_profile(req, on_event=bar)
    report.notes.append(source)
    from moeplan.validate.calibrate import calibration_warnings

    report.notes += calibration_warnings(hw.measured)  # a copy-rate cliff under hbm_bandwidth
    if not dev.is_primary():
        return
    doc = report.record()
    if out is not None:
        _write_document(out, doc)
    output.emit(doc, fmt, profile_tables)
    if report.interrupted:
        raise MoeplanError("interrupted: printed and saved the candidates measured so far", exit_code=130)


def _routing_spec(routing: str | None, learning_rate: float | None, target: str | None):
    """The parsed --routing (None when not given), and --learning-rate checked, before any
    device is touched: a typo must cost one line, not a calibration."""
    import math

    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise MoeplanError(f"--learning-rate must be a finite number >= 0 (got {learning_rate})")
    if routing is None:
        return None
    if target is not None:
        raise MoeplanError("--routing drives a router that runs; --target only compiles (drop one of them)")
    from moeplan.cost import balance as bal

    return bal.parse_routing(routing)


def _check_counts(**values: int | None) -> None:
    limits = {"steps": 1, "warmup": 0, "top": 1, "rounds": 1}
    for name, value in values.items():
        if value is not None and value < limits[name]:
            raise MoeplanError(f"--{name} must be at least {limits[name]} (got {value})")


def _write_document(path: Path, doc: dict) -> None:
    """JSON (or YAML for a .yaml/.yml name), written atomically."""
    from moeplan.files import write_text_atomic as write_atomic

    fmt = "yaml" if path.suffix in (".yaml", ".yml") else "json"
    try:
        write_atomic(path, output.dumps(doc, fmt) + "\n")
    except OSError as e:
        raise MoeplanError(f"cannot write {path}: {e.strerror}") from None


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _short_kind(kind: str) -> str:
    return {"all-to-all": "a2a", "all-reduce": "ar", "all-gather": "ag", "reduce-scatter": "rs"}.get(kind, kind)


def profile_tables(doc: dict):
    """Candidates table, collective bytes table, and the summary lines."""
    head = (f"[bold]{output.esc(doc['model'])}[/] on {doc['devices']} devices "
            f"({doc['processes']} process(es)), hardware {output.esc(doc['hardware'])}; "
            f"batch {doc['train']['global_batch']} x {doc['train']['seq_len']}, {doc['train']['compute_dtype']}, "
            f"{doc['steps']} timed steps after {doc['warmup']} warm-up")
    cand = output.new_table("Step time, FLOPs and memory: predicted vs measured", [
        ("mesh", "left"), "predicted", "measured", "cv", "pred/meas", "compile", "FLOPs p/m", "memory p/m",
        ("collectives", "left"), ("error", "left")])
    comm = output.new_table("Collective wire bytes per device per step", [
        ("mesh", "left"), ("kind", "left"), "predicted", "compiled", ("match", "left")])
    for r in doc["results"]:
        _candidate_rows(r, cand, comm)
    return [head, cand, comm, *_fault_section(doc), *_breakdown_section(doc), *_routing_section(doc),
            *_summary_lines(doc)]


def _fault_section(doc: dict) -> list:
    """CPU devices with a profile that prices first touch: the scratch paged in afresh per step."""
    rows = [(r["mesh"], (r.get("comparison") or {}).get("first_touch_bytes")) for r in doc["results"]]
    rows = [(mesh, f) for mesh, f in rows if f]
    if not rows:
        return []
    table = output.new_table("Scratch paged in afresh per step (first-touch page faults), per device", [
        ("mesh", "left"), "predicted", "counted"])
    for mesh, f in rows:
        table.add_row(mesh, output.fmt_bytes(f["predicted"]), output.fmt_bytes(f["measured"]))
    table.caption = ("predicted: the step's scratch if it reaches host_memory.map_threshold_bytes, else 0; "
                     "counted: this process's minor page faults over 2 steps after timing (getrusage)")
    return [table]


def _breakdown_section(doc: dict) -> list:
    """With --breakdown: each candidate's step time by cost term, predicted beside measured."""
    from moeplan.validate import term_times as tt

    traced = [r for r in doc["results"] if (r.get("measured") or {}).get("time_by_term_s")]
    failed = [f"[yellow]{r['mesh']}: no breakdown ({output.esc(r['measured']['breakdown_error'])})[/]"
              for r in doc["results"] if (r.get("measured") or {}).get("breakdown_error")]
    if not traced:
        return failed
    table = output.new_table("Step time by cost term: predicted vs measured (profiler trace)", [
        ("mesh", "left"), ("term", "left"), "predicted", "measured", "meas/pred"])
    for r in traced:
        rows = tt.term_rows(tt.predicted_terms(r["predicted"]), r["measured"]["time_by_term_s"])
        for j, (term, p, m) in enumerate(rows):
            table.add_row(r["mesh"] if j == 0 else "", term, output.fmt_seconds(p),
                          "in other ops" if m is None else output.fmt_seconds(m), _ratio(m / p if p and m is not None else None))
    table.caption = ("measured: each device's time inside the ops of a term, averaged over devices and "
                     f"{traced[0]['measured']['traced_steps']} traced steps, scaled to the measured step time; "
                     "'waiting': collectives' rendezvous waits for the other devices, where the runtime records "
                     "them (CPU); on simulated CPU devices every op also waits for a core (shares, not costs); "
                     "'first_touch': page faults on fresh scratch, paid inside the ops that first write it")
    return [table, *failed]


def _candidate_rows(r: dict, cand, comm) -> None:
    pred, meas, cmp = r["predicted"], r["measured"], r["comparison"]
    if meas is None or cmp is None:
        cand.add_row(r["mesh"], output.fmt_seconds(pred["step_time_s"]), "-", "-", "-", "-", "-", "-", "-",
                     f"[red]{output.esc(r['error'] or 'not measured')}[/]")
        return
    match = cmp["comm_bytes_match"]
    marks = " ".join(f"{_short_kind(k)}{'✓' if ok else '[red]✗[/]'}" for k, ok in match.items()) or "none"
    cand.add_row(
        r["mesh"], output.fmt_seconds(pred["step_time_s"]), output.fmt_seconds(meas["step_time_s"]),
        output.fmt_percent(meas["step_time_cv"], 2), _ratio(cmp["step_time_ratio"]),
        output.fmt_seconds(meas["compile_s"]), _ratio(cmp["flops_ratio"]), _ratio(cmp["memory_ratio"]), marks, "")
    for kind, ok in match.items():
        comm.add_row(r["mesh"], kind, output.fmt_bytes(cmp["comm_bytes_predicted"][kind]),
                     output.fmt_bytes(meas["comm_bytes_per_device"].get(kind, 0.0)),
                     "exact" if ok else "[red]MISMATCH[/]")


TRAJECTORY_POINTS = 6


def _routing_section(doc: dict) -> list:
    """With --routing: predicted vs measured drops and max/mean per candidate and MoE layer
    (first step, router still at zero), the same at the last step with the aux-loss
    trajectory (is training pulling the load toward uniform?), and the bar chart of tokens
    per expert of the first candidate's first layer, measured beside predicted."""
    driven = [r for r in doc["results"] if r.get("routing")]
    if not driven:
        return []
    pct = lambda x: output.fmt_percent(x, 3)  # noqa: E731
    table = output.new_table(
        f"Routing {output.esc(doc.get('routing'))}: predicted vs measured at the first step "
        "(router at zero), and the last step", [
            ("mesh", "left"), "layer", "drop pred", "drop meas", "max/mean pred", "max/mean meas",
            "max/mean last", "drop last"])
    for r in driven:
        for i, layer in enumerate(r["routing"]["layers"]):
            table.add_row(
                r["mesh"] if i == 0 else "", str(i), pct(layer["dropped_fraction"]["predicted"]),
                pct(layer["dropped_fraction"]["measured"]), f"{layer['max_mean']['predicted']:.3f}",
                f"{layer['max_mean']['measured']:.3f}", f"{layer['last']['max_mean']:.3f}",
                pct(layer["last"]["dropped_fraction"]))
    first = driven[0]["routing"]
    table.caption = (f"T={first['tokens_per_group']} tokens x {first['groups']} routing groups a step, "
                     f"C={first['capacity']} slots per expert per group; max/mean of the counts summed over "
                     f"the groups (uniform routing: {first['uniform_max_mean']:.3f})")
    return [table, *(_training_line(r) for r in driven), _first_chart(driven[0])]


def _training_line(r: dict) -> str:
    """Aux loss at a few steps from first to last, and mean max/mean over layers first -> last."""
    from moeplan.validate import skew

    o = r["routing"]
    aux = o["aux_loss"]
    picks = sorted({round(i * (len(aux) - 1) / (TRAJECTORY_POINTS - 1)) for i in range(TRAJECTORY_POINTS)})
    trail = " ".join(f"{i + 1}:{aux[i]:.4f}" for i in picks)
    return (f"{r['mesh']}: {o['steps']} training steps at learning rate {o['learning_rate']:g}: aux loss by step "
            f"{trail} (predicted at step 1 {o['aux_loss_predicted']:.4f}, balanced {o['aux_loss_balanced']:.4f}); z-loss {o['z_loss'][0]:.4f} -> {o['z_loss'][-1]:.4f}; max/mean (mean over layers) "
            f"{skew.mean_max_mean(o, 'first'):.3f} -> {skew.mean_max_mean(o, 'last'):.3f}")


def _first_chart(r: dict):
    """Tokens per expert of MoE layer 0 at the first step, predicted above measured."""
    import numpy as np

    from moeplan.commands.balance import paired_chart

    o = r["routing"]
    layer = o["layers"][0]
    pooled_capacity = o["groups"] * o["capacity"]
    title = (f"tokens per expert, {r['mesh']}, MoE layer 0, first step, summed over {o['groups']} groups "
             f"(│ = {o['groups']} x C = {pooled_capacity}; drops happen per group)")
    return paired_chart(title, np.asarray(layer["tokens_per_expert"]["predicted"]), np.asarray(layer["expected_kept"]),
                        np.asarray(layer["tokens_per_expert"]["measured"]), pooled_capacity)


def _rounds_line(r: dict) -> str:
    """The rank figures round by round: whether a miss of Spearman or top-1 regret is the
    planner's or a near tie the host's noise decides (timing.RoundFigures)."""
    rhos = sorted(x for x in r["spearman"] if x is not None)
    spread = f"Spearman {rhos[0]:.3f} to {rhos[-1]:.3f}" if rhos else "Spearman -"
    return (f"[dim]round by round ({r['rounds']} rounds): {spread}; the planner's pick measured slower "
            f"than the measured best in {r['pick_slower_rounds']} of {r['rounds']} rounds[/]")


def _summary_lines(doc: dict) -> list[str]:
    s = doc["summary"]
    pct = lambda x: output.fmt_percent(x) if x is not None else "-"  # noqa: E731
    exact = {True: "yes", False: "[red]no[/]", None: "-"}[s["comm_bytes_exact"]]
    rho = "-" if s["spearman"] is None else f"{s['spearman']:.3f}"
    lines = [
        f"[bold]summary[/] over {s['measured']} measured candidate(s), {s['failed']} failed: "
        f"median |pred/meas - 1| {pct(s['median_abs_error'])}, "
        f"Spearman {rho}, "
        f"top-1 regret {pct(s['top1_regret'])}, comm bytes exact: {exact}, "
        f"FLOPs error {pct(s['flops_median_abs_error'])}, memory error {pct(s['memory_median_abs_error'])}",
    ]
    if s.get("rounds"):
        lines.append(_rounds_line(s["rounds"]))
    lines += [f"[dim]{output.esc(n)}[/]" for n in doc.get("notes", [])]
    if doc.get("interrupted"):
        lines.append("[yellow]interrupted: only the candidates above were measured[/]")
    return lines


# ---- calibrate ----------------------------------------------------------------------------


@guarded
def calibrate_cmd(
    out: Annotated[Path, typer.Option("--output", "-o", help="Where to write the hardware profile YAML.")],
    devices: DevicesOpt = None,
    processes: ProcessesOpt = 1,
    cluster: ClusterOpt = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Matmul dtype to benchmark (float32, bfloat16).")] = "float32",
    steps: Annotated[int, typer.Option("--steps", help="Timed repetitions per benchmark (median kept).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions first.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file not written by calibrate.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A few sizes only: checks the machinery in seconds; "
                                        "do not trust its figures.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Measure this machine's devices with micro-benchmarks and write a hardware profile."""
    fmt = output.check_choice("--format", fmt, ("table", "json"))
    dtype = output.check_choice("--dtype", dtype, ("float32", "bfloat16", "float16"))
    _check_counts(steps=steps, warmup=warmup)
    from moeplan import presets
    from moeplan.validate import calibrate as cal
    from moeplan.validate import devices as dev

    cal.check_writable(out, force=force)  # fail before minutes of benchmarks, not after
    ident = dev.identity(devices, processes, cluster)
    if ident["count"] < 2:
        raise MoeplanError("calibration needs at least 2 devices to measure collectives")
    with Progress("calibrating", _progress_enabled(quiet)) as bar:
        profile = cal.run_calibration(devices=ident["count"], processes=processes, dtype=dtype, cluster=cluster,
                                      steps=steps, warmup=warmup, quick=quick, on_event=bar)
    if not dev.is_primary():
        return
    cal.write_profile(out, profile, force=force)
    presets.load_hardware(out)  # what we wrote must load; a failure here is a bug worth seeing
    doc = {"schema_version": 1, "path": str(out),
           "profile": {k: v for k, v in profile.items() if k != "measured"},
           "fits": profile["measured"]["links"], "warnings": cal.calibration_warnings(profile["measured"])}
    output.emit(doc, fmt, calibrate_tables)


def calibrate_tables(doc: dict):
    p = doc["profile"]
    t = output.new_table(f"Calibrated hardware profile -> {output.esc(doc['path'])}", [("figure", "left"), "value"])
    t.add_row("peak_flops (per device)", output.fmt_rate(p["peak_flops"], "FLOP"))
    t.add_row("hbm_bandwidth (per device)", output.fmt_rate(p["hbm_bandwidth"], "B"))
    if p.get("inplace_bandwidth"):
        t.add_row("inplace_bandwidth (per device)", output.fmt_rate(p["inplace_bandwidth"], "B"))
    host = p.get("host_memory")
    if host:
        t.add_row("first-touch page faults (per device)",
                  f"{output.fmt_rate(host['first_touch_bandwidth'], 'B')} on scratch >= "
                  f"{output.fmt_bytes(host['map_threshold_bytes'])}")
        t.add_row("all-reduce output", "out of place" if host.get("all_reduce_out_of_place", True) else "in place")
        t.add_row("autodiff residuals", "all kept (unfused)" if host.get("keeps_autodiff_residuals") else "fused count")
    t.add_row("hbm_bytes (per device)", output.fmt_bytes(p["hbm_bytes"]))
    for link in ("scale_up", "scale_out"):
        t.add_row(f"{link} bandwidth", output.fmt_rate(p[link]["bandwidth"], "B"))
        t.add_row(f"{link} latency", output.fmt_seconds(p[link]["latency"]))
    t.add_row("scale_up_size", str(p["scale_up_size"]))
    t.add_row("overlap", f"{p['overlap']:.2f}")
    scales = p.get("collective_scale") or {}
    for kind, scale in scales.items():
        t.add_row(f"{kind} vs link", f"alpha x{scale['latency']:.2f}, beta x{scale['bandwidth']:.2f}")
    fits = "; ".join(f"{k}: rms relative residual {v['rms_rel_residual']:.2f} over {v['points']} points"
                     for k, v in doc["fits"].items())
    warn = [f"[yellow]warning: {output.esc(w)}[/]" for w in doc.get("warnings", [])]
    return [t, *_size_factor_table(scales), f"[dim]{output.esc(p['source'])}[/]",
            f"[dim]alpha-beta fit {fits}[/]", *warn]


def _size_factor_table(scales: dict) -> list:
    """Each kind's measured time over its alpha-beta fit per buffer size (collective_scale.by_size)."""
    sizes = sorted({q["size"] for s in scales.values() for q in s.get("by_size", [])})
    if not sizes:
        return []
    t = output.new_table("Collective time by buffer size: measured / alpha-beta fit",
                         [("kind", "left"), *(output.fmt_bytes(x) for x in sizes)])
    for kind, scale in scales.items():
        got = {q["size"]: q["factor"] for q in scale.get("by_size", [])}
        t.add_row(kind, *(f"{got[x]:.2f}x" if x in got else "-" for x in sizes))
    return [t]
