"""Planning commands: `presets`, `estimate` (one plan, every term) and `suggest-mesh` (search).

Thin by design: parse options, call `moeplan.search` / `moeplan.cost`, build one dict in
the documented schema (docs/schema.md), and hand it to `moeplan.output.emit`, which prints it
as a table, JSON or YAML. No jax here: planning must start in well under a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from moeplan import output
from moeplan.commands import balance as balance_cmds
from moeplan.commands.guard import guarded
from moeplan.errors import MoeplanError

# The search, the cost model, presets and specs (numpy, pydantic, yaml) are imported inside
# the functions that use them: every `moeplan` run imports this module to register its
# commands, and `moeplan --help` or another command's run should not pay for them.
if TYPE_CHECKING:
    from moeplan import search
    from moeplan.cost import balance
    from moeplan.cost import step as cost_step
    from moeplan.specs import HardwareProfile, Mesh, ModelSpec, TrainSpec

DEFAULT_MODEL = "mixtral-8x7b"
DEFAULT_HARDWARE = "h100-sxm"
DEFAULT_DEVICES = 64
SECONDS_PER_DAY = 86400.0
# = moeplan.search.DEFAULT_MAX_STEP_INCREASE, spelled out so --help needs no numpy (tested)
DEFAULT_MAX_STEP_INCREASE = 0.2

# ---- options shared by commands ---------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model preset name or YAML file.")]
HardwareOpt = Annotated[str, typer.Option("--hardware", help="Hardware preset name or YAML file.")]
TrainOpt = Annotated[Optional[str], typer.Option("--train", help="TrainSpec YAML file (options below override it).")]
SeqLenOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch", help="Global batch in sequences.")]
BatchTokensOpt = Annotated[Optional[int], typer.Option("--batch-tokens", help="Global batch in tokens.")]
GradAccumOpt = Annotated[Optional[int], typer.Option("--grad-accum", help="Microbatches per optimizer step.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--compute-dtype", help="float32, bfloat16, float16 or float8.")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, json or yaml.")]
RoutingOpt = Annotated[Optional[str], typer.Option(
    "--routing", help="Router skew: uniform, zipf:S (e.g. zipf:1.2) or hist:FILE (see `moeplan balance`).")]
CapacityOpt = Annotated[Optional[str], typer.Option(
    "--capacity-factor", help="Override the model's capacity factor ('dropless' for none); "
    "suggest-mesh takes a comma list and picks the fastest within --max-drop.")]


def register(app: typer.Typer) -> None:
    app.command("presets")(presets_cmd)
    app.command("estimate")(estimate_cmd)
    app.command("suggest-mesh")(suggest_mesh_cmd)


def _load_train(path, seq_len, batch, batch_tokens, grad_accum, compute_dtype, **extra) -> TrainSpec:
    from moeplan import presets

    return presets.load_train(
        path,
        seq_len=seq_len,
        global_batch=batch,
        global_batch_tokens=batch_tokens,
        grad_accum=grad_accum,
        compute_dtype=compute_dtype,
        **extra,
    )


def _positive(name: str, value: int | None, what: str) -> None:
    if value is not None and value < 1:
        raise MoeplanError(f"{name} must be positive (got {value}): it is {what}")


def _header(model: ModelSpec, hw: HardwareProfile, devices: int, train: TrainSpec) -> dict:
    return {
        "schema_version": output.SCHEMA_VERSION,
        "model": model.name,
        "hardware": hw.name,
        "devices": devices,
        "train": {
            "seq_len": train.seq_len,
            "global_batch": train.batch,
            "tokens_per_step": train.tokens_per_step,
            "grad_accum": train.grad_accum,
            "compute_dtype": train.compute_dtype,
        },
    }


# ---- presets ----------------------------------------------------------------------------


@guarded
def presets_cmd(fmt: FormatOpt = "table") -> None:
    """List hardware and model presets with their key figures."""
    from moeplan import presets

    fmt = output.check_format(fmt)
    data = {
        "schema_version": output.SCHEMA_VERSION,
        "profiles_dir": str(presets.profiles_dir()),
        "hardware": [
            {"preset": n, **_hardware_figures(presets.load_hardware(n))} for n in presets.preset_names("hardware")
        ],
        "models": [{"preset": n, **_model_summary(presets.load_model(n))} for n in presets.preset_names("models")],
    }
    output.emit(data, fmt, _presets_tables)


def _hardware_figures(hw: HardwareProfile) -> dict:
    return {
        "name": hw.name,
        "peak_tflops": hw.peak_flops / 1e12,
        "hbm_gib": hw.hbm_bytes / 2**30,
        "hbm_bandwidth_bytes_per_s": hw.hbm_bandwidth,
        "scale_up_size": hw.scale_up_size,
        "scale_up_bandwidth_bytes_per_s": hw.scale_up.bandwidth,
        "scale_out_bandwidth_bytes_per_s": hw.scale_out.bandwidth,
        "topology": hw.topology,
        "source": hw.source,
    }


def _model_summary(model: ModelSpec) -> dict:
    from moeplan.cost.layout import activated_params, total_params

    moe = model.moe
    return {
        "name": model.name,
        "params_total": total_params(model),
        "params_activated": activated_params(model),
        "layers": model.layers,
        "d_model": model.d_model,
        "heads": model.heads,
        "num_experts": moe.num_experts if moe else 0,
        "top_k": moe.top_k if moe else 0,
        "moe_layers": model.moe_layers,
    }


def _presets_tables(data: dict):
    hw = output.new_table(
        "Hardware presets",
        [("preset", "left"), ("name", "left"), "peak TFLOP/s", "HBM", "HBM bandwidth", "scale-up size",
         "scale-up bw", "scale-out bw", ("topology", "left")],
    )
    for h in data["hardware"]:
        hw.add_row(
            output.esc(h["preset"]), output.esc(h["name"]), f"{h['peak_tflops']:.3g}", f"{h['hbm_gib']:.1f} GiB",
            output.fmt_rate(h["hbm_bandwidth_bytes_per_s"], "B"), str(h["scale_up_size"]),
            output.fmt_rate(h["scale_up_bandwidth_bytes_per_s"], "B"),
            output.fmt_rate(h["scale_out_bandwidth_bytes_per_s"], "B"), h["topology"],
        )
    models = output.new_table(
        "Model presets",
        [("preset", "left"), "params total", "params active", "experts (top-k)", "MoE layers",
         "layers", "d_model", "heads"],
    )
    for m in data["models"]:
        experts = f"{m['num_experts']} (top-{m['top_k']})" if m["num_experts"] else "dense"
        models.add_row(
            output.esc(m["preset"]), output.fmt_count(m["params_total"]), output.fmt_count(m["params_activated"]),
            experts, str(m["moe_layers"]), str(m["layers"]), str(m["d_model"]), str(m["heads"]),
        )
    return [hw, models, f"[dim]from {output.esc(data['profiles_dir'])}[/]"]


# ---- estimate ---------------------------------------------------------------------------


@guarded
def estimate_cmd(
    mesh: Annotated[Optional[str], typer.Option("--mesh", help="Mesh as data=8,expert=4,model=2 (or 8x4x2).")] = None,
    model_name: ModelOpt = DEFAULT_MODEL,
    hardware_name: HardwareOpt = DEFAULT_HARDWARE,
    devices: Annotated[Optional[int], typer.Option("--devices", "-n", help="Checked against the mesh.")] = None,
    train_file: TrainOpt = None,
    seq_len: SeqLenOpt = None,
    batch: BatchOpt = None,
    batch_tokens: BatchTokensOpt = None,
    grad_accum: GradAccumOpt = None,
    fsdp: Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", help="Shard weights over batch axes.")] = None,
    remat: Annotated[Optional[str], typer.Option("--remat", help="none, selective or full.")] = None,
    compute_dtype: DtypeOpt = None,
    routing: RoutingOpt = None,
    capacity_factor: CapacityOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """Predict one plan term by term: compute, each collective, memory, step time, MFU."""
    from moeplan import presets, search
    from moeplan.specs import Mesh

    fmt = output.check_format(fmt)
    if remat is not None:
        remat = output.check_choice("--remat", remat, search.REMAT_CODES)
    _positive("--devices", devices, "the number of accelerators")
    if mesh is None:
        raise MoeplanError("estimate needs --mesh, e.g. --mesh data=8,expert=4,model=2 (suggest-mesh proposes one)")
    the_mesh = Mesh.parse(mesh)
    if devices is not None and devices != the_mesh.devices:
        raise MoeplanError(
            f"mesh {the_mesh} has {the_mesh.devices} devices, but --devices is {devices}"
        )
    spec = _routing_spec(routing)
    factors = _capacity_factors(capacity_factor)
    if len(factors) > 1:
        raise MoeplanError("estimate takes one --capacity-factor (suggest-mesh compares several)")
    model = _with_capacity(presets.load_model(model_name), factors)
    hw = presets.load_hardware(hardware_name)
    train = _load_train(train_file, seq_len, batch, batch_tokens, grad_accum, compute_dtype, fsdp=fsdp, remat=remat)
    output.emit(estimate_report(model, train, hw, the_mesh, routing=spec), fmt, _estimate_tables)


def _routing_spec(text: str | None, max_drop: float | None = None) -> balance.Routing | None:
    """--routing parsed; None when neither it nor --max-drop is given (no routing model)."""
    if text is None and max_drop is None:
        return None
    from moeplan.cost import balance  # only when routing is modelled: ~10 ms of numpy set-up

    if text is not None:
        return balance.parse_routing(text)
    return balance.UNIFORM  # even balanced routing drops what random fluctuations overflow


def _capacity_factors(text: str | None) -> list:
    """--capacity-factor '1.25' or '1.0,1.25,2.0' ('dropless' = None); [] when not given."""
    return [] if text is None else balance_cmds.parse_factors(text)


def _with_capacity(model: ModelSpec, factors: list) -> ModelSpec:
    """The model with its capacity factor replaced by the only one in `factors` (if any)."""
    if len(factors) != 1:
        return model
    if model.moe is None:
        raise MoeplanError(f"{model.name} is a dense model: --capacity-factor needs a model with a moe section")
    return model.model_copy(update={"moe": model.moe.model_copy(update={"capacity_factor": factors[0]})})


def estimate_report(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, mesh: Mesh,
                    routing: balance.Routing | None = None) -> dict:
    """Every predicted term of one plan, as a schema dict (docs/schema.md, `estimate`).

    With `routing`, the routing model (moeplan.cost.balance) adds drops and, dropless, the
    busiest device's expert compute to the estimate, and `detail.routing` says how much.
    """
    from moeplan import search
    from moeplan.cost import step as cost_step
    from moeplan.cost.layout import Plans

    problems = search.mesh_problems(model, train, mesh)
    if problems:
        raise MoeplanError(f"mesh {mesh} is not valid for {model.name}: " + "; ".join(problems))
    plans = Plans.single(mesh, train)
    effect = None
    if routing is None:
        est = cost_step.estimate(model, train, hw, plans)
    else:
        from moeplan.cost import balance

        effect = balance.routing_effect(model, train, plans, routing, expert_max=True)
        est = cost_step.estimate(model, train, hw, plans, routing=effect)
    row = search.plan_row(est, 0)
    report = _header(model, hw, mesh.devices, train)
    report["candidates"] = [row]
    report["detail"] = {
        "params_total": est.total_params,
        "params_activated": est.activated_params,
        "flops_per_token": est.flops_per_token,
        "hbm_bytes": hw.hbm_bytes,
        "collectives": _collective_rows(est, model, train),
    }
    if effect is not None:
        report["detail"]["routing"] = _routing_detail(model, effect, est)
    return report


def _routing_detail(model: ModelSpec, effect: balance.RoutingEffect, est: cost_step.Estimates) -> dict:
    """The imbalance term of plan 0: drops, max/mean loads, and expert FFN time lost to it."""
    ffn = est.compute_detail_s.get("expert_ffn")
    f = lambda a: float(a[0])  # noqa: E731
    return {
        "routing": effect.routing,
        "capacity_factor": model.moe.capacity_factor if model.moe else None,
        "dropped_fraction": f(effect.dropped_fraction),
        "padded_fraction": f(effect.padded_fraction),
        "expert_max_mean": f(effect.expert_max_mean),
        "device_max_mean_dropless": f(effect.device_max_mean),
        "expert_compute_factor": f(effect.expert_compute_factor),
        "imbalance_s": f(ffn) * f(effect.imbalance_share) if ffn is not None else 0.0,
    }


def _collective_rows(est: cost_step.Estimates, model: ModelSpec, train: TrainSpec) -> list[dict]:
    """Each collective of the step (moeplan.cost.traffic) with its bytes and time, for plan 0."""
    from moeplan.cost.collectives import entry_key
    from moeplan.cost.traffic import step_collectives

    plans = est.plans
    rows: dict[str, dict] = {}
    for c in step_collectives(model, train, plans):
        count, group = float(c.count[0]), int(c.group_size(plans)[0])
        if count == 0 or group == 1:
            continue
        key = entry_key(c)
        row = rows.setdefault(key, {
            "name": c.name, "kind": c.kind, "axes": list(c.axes), "term": c.term, "group_size": group,
            "count": 0.0, "buffer_bytes": float(c.buffer_bytes[0]), "wire_bytes_per_step": 0.0,
            "time_s": float(est.collective_detail_s[key][0]),
        })
        row["count"] += count
        row["wire_bytes_per_step"] += float(c.wire_bytes(plans)[0]) * count
    return list(rows.values())


def _estimate_tables(report: dict):
    row, d, t = report["candidates"][0], report["detail"], report["train"]
    lower, upper = row["step_time_bounds_s"]
    head = (
        f"[bold]{output.esc(report['model'])}[/] on {report['devices']} x {output.esc(report['hardware'])}, mesh "
        f"{_mesh_text(row['mesh'])}, fsdp {'on' if row['fsdp'] else 'off'}, remat {row['remat']}; "
        f"batch {t['global_batch']} x {t['seq_len']} = {output.fmt_count(t['tokens_per_step'])} tokens, "
        f"grad_accum {t['grad_accum']}"
    )
    step = output.new_table("Step", [("term", "left"), "value"])
    step.add_row("step time (point)", output.fmt_seconds(row["step_time_s"]))
    step.add_row("bounds (full overlap .. none)", f"{output.fmt_seconds(lower)} .. {output.fmt_seconds(upper)}")
    for term, secs in row["breakdown_s"].items():
        step.add_row(f"  {term}", output.fmt_seconds(secs))
    r = d.get("routing")
    if r is not None:
        cf = "dropless" if r["capacity_factor"] is None else f"cf {r['capacity_factor']:g}"
        step.add_row(f"  imbalance, within compute ({output.esc(r['routing'])}, {cf})", output.fmt_seconds(r["imbalance_s"]))
        step.add_row("  dropped token-expert pairs", output.fmt_percent(r["dropped_fraction"]))
        step.add_row("  busiest expert / mean", f"{r['expert_max_mean']:.2f}")
    step.add_row("MFU", output.fmt_percent(row["mfu"]))
    step.add_row("tokens/s", output.fmt_si(row["tokens_per_s"]))
    step.add_row("model FLOPs/token", output.fmt_flops(d["flops_per_token"]))
    step.add_row("params total / activated", f"{output.fmt_count(d['params_total'])} / {output.fmt_count(d['params_activated'])}")
    step.add_row("train tokens", output.fmt_count(row["train_tokens"]))
    step.add_row("training time", output.fmt_seconds(row["train_days"] * SECONDS_PER_DAY))

    compute = output.new_table("Compute per device per step", [("op class", "left"), "FLOPs", "time"])
    for op, secs in row["compute_s_by_op"].items():
        compute.add_row(op, output.fmt_flops(row["flops_by_op"].get(op, float("nan"))), output.fmt_seconds(secs))
    compute.add_row("[bold]total[/]", output.fmt_flops(row["flops_per_device"]), output.fmt_seconds(row["breakdown_s"]["compute"]))

    comm = output.new_table(
        "Collectives per device per step",
        [("name", "left"), ("kind", "left"), ("axes", "left"), "group", "count", "buffer", "wire bytes", "time"],
    )
    for c in d["collectives"]:
        comm.add_row(
            c["name"], c["kind"], ",".join(c["axes"]), str(c["group_size"]), f"{c['count']:g}",
            output.fmt_bytes(c["buffer_bytes"]), output.fmt_bytes(c["wire_bytes_per_step"]),
            output.fmt_seconds(c["time_s"]),
        )
    hbm = d["hbm_bytes"]
    mem = output.new_table("Memory per device", [("part", "left"), "bytes", "of HBM"])
    for part, nbytes in row["memory_breakdown_bytes"].items():
        mem.add_row(part, output.fmt_bytes(nbytes), output.fmt_percent(nbytes / hbm))
    total = row["memory_bytes_per_device"]
    mem.add_row("[bold]total[/]", output.fmt_bytes(total), output.fmt_percent(total / hbm))
    mem.caption = _peak_caption(row["memory_breakdown_bytes"])
    verdict = "[green]fits[/]" if row["fits_memory"] else "[bold red]does NOT fit[/]"
    mem_line = f"memory {output.fmt_bytes(total)} of {output.fmt_bytes(hbm)} HBM: {verdict}"
    return [head, step, compute, comm, mem, mem_line]


def _peak_caption(parts: dict) -> str:
    """Which end of backward the memory peak is at (cost/memory.py, "Peak"): the logits are
    live only at its start."""
    if parts.get("logits", 0) > 0:
        return "live at the peak: the start of backward"
    return "live at the peak: the end of backward"


def _mesh_text(mesh: dict) -> str:
    return f"data={mesh['data']},expert={mesh['expert']},model={mesh['model']}"


# ---- suggest-mesh -----------------------------------------------------------------------


@guarded
def suggest_mesh_cmd(
    model_name: ModelOpt = DEFAULT_MODEL,
    hardware_name: HardwareOpt = DEFAULT_HARDWARE,
    devices: Annotated[int, typer.Option("--devices", "-n", help="Number of accelerators.")] = DEFAULT_DEVICES,
    top: Annotated[int, typer.Option("--top", help="How many plans to show.")] = 5,
    experts: Annotated[Optional[str], typer.Option("--experts", help="Expert counts to compare, e.g. 8,16,32,64.")] = None,
    max_step_increase: Annotated[float, typer.Option("--max-step-increase", help="Step-time budget over the dense backbone (0.2 = 20%).")] = DEFAULT_MAX_STEP_INCREASE,
    fsdp: Annotated[str, typer.Option("--fsdp", help="auto (try both), on or off.")] = "auto",
    remat: Annotated[str, typer.Option("--remat", help="auto (try all), none, selective or full.")] = "auto",
    train_file: TrainOpt = None,
    seq_len: SeqLenOpt = None,
    batch: BatchOpt = None,
    batch_tokens: BatchTokensOpt = None,
    grad_accum: GradAccumOpt = None,
    compute_dtype: DtypeOpt = None,
    routing: RoutingOpt = None,
    capacity_factor: CapacityOpt = None,
    max_drop: Annotated[Optional[float], typer.Option(
        "--max-drop", help="Reject plans predicted to drop more token-expert pairs than this (0.01 = 1%).")] = None,
    fmt: FormatOpt = "table",
) -> None:
    """Rank every data x expert x model mesh (and FSDP / remat choice) by predicted step time."""
    from moeplan import presets, search

    fmt = output.check_format(fmt)
    _positive("--devices", devices, "the number of accelerators")
    _positive("--top", top, "how many plans to show")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise MoeplanError(f"--max-drop must be a fraction in [0, 1) (got {max_drop}), e.g. 0.01 for 1%")
    spec = _routing_spec(routing, max_drop)
    options = search.SearchOptions(fsdp=_fsdp_choices(fsdp), remat=_remat_choices(remat), top=top,
                                   routing=spec, max_drop=max_drop)
    counts = _parse_counts(experts) if experts is not None else None
    factors = _capacity_factors(capacity_factor)
    model = _with_capacity(presets.load_model(model_name), factors)
    hw = presets.load_hardware(hardware_name)
    train = _load_train(train_file, seq_len, batch, batch_tokens, grad_accum, compute_dtype)
    trade = None
    if len(factors) > 1:
        if None in factors:
            raise MoeplanError("--capacity-factor lists compare capacity factors; leave 'dropless' out of a list")
        trade = search.trade_capacity(model, train, hw, devices, factors, options)
        if trade.chosen is None:
            raise MoeplanError(f"no capacity factor in {capacity_factor} has a feasible plan for {model.name} "
                               f"on {devices} devices" + (f" within --max-drop {max_drop}" if max_drop is not None else ""))
        model = _with_capacity(model, [trade.chosen])
    report = suggest_report(model, train, hw, devices, options, counts, max_step_increase)
    if spec is not None:
        report["routing"] = {"routing": str(spec), "max_drop": max_drop,
                             "capacity_factor": model.moe.capacity_factor if model.moe else None}
    if trade is not None:
        report["capacity_trade"] = _trade_dict(trade)
    output.emit(report, fmt, _suggest_tables)


def _outcome(result: search.SearchResult) -> dict:
    """Whether a search found a plan, its step time and its best row (None when it did not)."""
    ok = result.feasible
    return {"feasible": ok, "step_time_s": result.best_step_s if ok else None,
            "best": result.rows()[0] if ok else None}


def _trade_dict(trade: search.CapacityTrade) -> dict:
    """Each capacity factor's best plan and its predicted drops, and the one chosen."""
    return {
        "max_drop": trade.max_drop,
        "chosen": trade.chosen,
        "factors": [
            {
                "capacity_factor": c.capacity_factor,
                **_outcome(c.result),
                "dropped_fraction": c.dropped_fraction if c.result.feasible else None,
                "rejected": dict(c.result.rejected.counts),
            }
            for c in trade.choices
        ],
    }


def _fsdp_choices(value: str) -> tuple[bool, ...]:
    return {"auto": (False, True), "on": (True,), "off": (False,)}[
        output.check_choice("--fsdp", value, ("auto", "on", "off"))
    ]


def _remat_choices(value: str) -> tuple[str, ...]:
    from moeplan import search

    value = output.check_choice("--remat", value, ("auto", *search.REMAT_CODES))
    return tuple(search.REMAT_CODES) if value == "auto" else (value,)


def _parse_counts(text: str) -> list[int]:
    from moeplan import search

    try:
        counts = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise MoeplanError(f"--experts '{text}' is not a comma-separated list of integers, e.g. 8,16,32") from None
    return search.check_expert_counts(counts)


def suggest_report(
    model: ModelSpec,
    train: TrainSpec,
    hw: HardwareProfile,
    devices: int,
    options: search.SearchOptions,
    counts: list[int] | None = None,
    max_step_increase: float = DEFAULT_MAX_STEP_INCREASE,
) -> dict:
    """The ranked plans, rejection counts, dense comparison and expert proposal as one dict."""
    from moeplan import search

    result = search.search(model, train, hw, devices, options).require_feasible()
    report = _header(model, hw, devices, train)
    report["enumerated"] = result.candidates
    report["feasible"] = result.feasible_count
    report["candidates"] = [_ranked(r, i) for i, r in enumerate(result.rows(), start=1)]
    report["rejected"] = dict(result.rejected.counts)
    report["rejected_examples"] = dict(result.rejected.examples)
    if model.moe is not None:
        dense = search.search(model.dense_backbone(), train, hw, devices, options)
        report["dense_backbone"] = _dense_comparison(result, dense)
    if counts is not None:
        proposal = search.propose_experts(model, train, hw, devices, counts, max_step_increase, options)
        report["experts"] = _proposal_dict(proposal)
    return report


def _ranked(row: dict, rank: int) -> dict:
    return {"rank": rank, **row}


def _dense_comparison(moe: search.SearchResult, dense: search.SearchResult) -> dict:
    """Step time of the best dense-backbone plan next to the MoE's (arXiv 2405.15052)."""
    from moeplan.cost.layout import activated_params

    if not dense.feasible:
        return {"feasible": False, "rejected": dict(dense.rejected.counts)}
    return {
        "feasible": True,
        "mesh": dense.rows()[0]["mesh"],
        "step_time_s": dense.best_step_s,
        "step_time_ratio": moe.best_step_s / dense.best_step_s,
        "flops_per_token_ratio": moe.estimates.flops_per_token / dense.estimates.flops_per_token,
        "activated_params_ratio": activated_params(moe.model) / activated_params(dense.model),
    }


def _proposal_dict(p: search.ExpertProposal) -> dict:
    from moeplan.cost.layout import total_params

    return {
        "max_step_increase": p.max_step_increase,
        "dense_step_time_s": p.dense.best_step_s,
        "dense_mesh": p.dense.rows()[0]["mesh"],
        "chosen": p.chosen,
        "counts": [
            {
                "num_experts": c.num_experts,
                **_outcome(c.result),
                "step_time_ratio": c.step_ratio if c.result.feasible else None,
                "within_budget": c.within_budget,
                "params_total": total_params(c.result.model),
                "rejected": dict(c.result.rejected.counts),
            }
            for c in p.choices
        ],
    }


def _suggest_tables(report: dict):
    from moeplan import search

    t = report["train"]
    head = (
        f"[bold]{output.esc(report['model'])}[/] on {report['devices']} x {output.esc(report['hardware'])}: "
        f"batch {t['global_batch']} x {t['seq_len']} tokens, grad_accum {t['grad_accum']}; "
        f"{report['enumerated']} candidates, {report['feasible']} feasible, {len(report['candidates'])} shown"
    )
    table = output.new_table(
        None,
        ["#", ("data x expert x model", "left"), ("fsdp", "left"), ("remat", "left"), "step",
         "bounds", "compute", "all-to-all", "model axis", "data axis", "memory", "MFU", "tokens/s"],
    )
    for r in report["candidates"]:
        b = r["breakdown_s"]
        lo, hi = r["step_time_bounds_s"]
        table.add_row(
            str(r["rank"]), output.fmt_mesh(r["mesh"]), "on" if r["fsdp"] else "off", r["remat"],
            output.fmt_seconds(r["step_time_s"]),
            f"{output.fmt_seconds(lo)}..{output.fmt_seconds(hi)}",
            output.fmt_seconds(b["compute"]), output.fmt_seconds(b["all_to_all"]),
            output.fmt_seconds(b["model_axis"]), output.fmt_seconds(b["data_axis"]),
            output.fmt_bytes(r["memory_bytes_per_device"]), output.fmt_percent(r["mfu"]),
            output.fmt_si(r["tokens_per_s"]),
        )
    parts = [head, table]
    rejected = report["rejected"]
    if rejected:
        parts.append(f"rejected {sum(rejected.values())} of {report['enumerated']}:")
        for key, n in rejected.items():
            parts.append(f"  {search.LABELS[key]}: {n}  [dim](e.g. {output.esc(report['rejected_examples'][key])})[/]")
    if "dense_backbone" in report:
        parts.append(_dense_line(report["candidates"][0], report["dense_backbone"]))
    if "experts" in report:
        parts.extend(_experts_table(report["experts"]))
    if "routing" in report:
        r = report["routing"]
        budget = f", drops <= {r['max_drop']:.1%}" if r["max_drop"] is not None else ""
        parts.append(f"routing {output.esc(r['routing'])}{budget}: the ranking includes its drops and imbalance")
    if "capacity_trade" in report:
        parts.extend(_trade_table(report["capacity_trade"]))
    return parts


def _trade_table(t: dict):
    from moeplan import search

    table = output.new_table("Capacity factor against drops (best plan at each)",
                             ["capacity factor", ("best plan", "left"), "step", "dropped", ("", "left")])
    for c in t["factors"]:
        mark = "[bold green]<- chosen[/]" if c["capacity_factor"] == t["chosen"] else ""
        if not c["feasible"]:
            why = ("every plan that fits drops more than the budget" if search.TOO_MANY_DROPS in c["rejected"]
                   else f"no feasible plan (mostly: {search.LABELS[max(c['rejected'], key=c['rejected'].get)]})")
            table.add_row(f"{c['capacity_factor']:g}", why, "-", "-", "")
            continue
        table.add_row(f"{c['capacity_factor']:g}", output.fmt_mesh(c["best"]["mesh"]),
                      output.fmt_seconds(c["step_time_s"]), output.fmt_percent(c["dropped_fraction"]), mark)
    return [table]


def _dense_line(best: dict, dense: dict) -> str:
    if not dense["feasible"]:
        return "dense backbone: no feasible plan on these devices"
    return (
        f"dense backbone: best step {output.fmt_seconds(dense['step_time_s'])} "
        f"({output.fmt_mesh(dense['mesh'])}); this MoE takes [bold]{dense['step_time_ratio']:.2f}x[/] its step "
        f"time, for {dense['flops_per_token_ratio']:.2f}x the FLOPs/token and "
        f"{dense['activated_params_ratio']:.2f}x the activated params (step time is the true cost, "
        "arXiv 2405.15052)"
    )


def _experts_table(p: dict):
    from moeplan import search

    budget = 1 + p["max_step_increase"]
    table = output.new_table(
        f"Expert counts (budget: step time <= {budget:.2f}x the dense backbone's "
        f"{output.fmt_seconds(p['dense_step_time_s'])})",
        ["experts", "params total", ("best plan", "left"), "step", "vs dense", ("within", "left")],
    )
    for c in p["counts"]:
        mark = "[bold green]<- proposed[/]" if c["num_experts"] == p["chosen"] else ""
        if not c["feasible"]:
            why = max(c["rejected"], key=c["rejected"].get)
            table.add_row(
                str(c["num_experts"]), output.fmt_count(c["params_total"]),
                f"no feasible plan (mostly: {search.LABELS[why]})", "-", "-", "no",
            )
            continue
        best = c["best"]
        table.add_row(
            str(c["num_experts"]), output.fmt_count(c["params_total"]),
            f"{output.fmt_mesh(best['mesh'])} fsdp {'on' if best['fsdp'] else 'off'} {best['remat']}",
            output.fmt_seconds(c["step_time_s"]), f"{c['step_time_ratio']:.2f}x",
            f"{'yes' if c['within_budget'] else 'no'} {mark}".strip(),
        )
    verdict = (
        f"proposed: {p['chosen']} experts (largest count within budget)"
        if p["chosen"] is not None
        else f"no expert count stays within {budget:.2f}x of the dense backbone"
    )
    return [table, verdict]
