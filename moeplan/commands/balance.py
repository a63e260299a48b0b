"""`moeplan balance`: the routing model on its own, for a grid of capacity factors.

Why a command of its own: choosing a capacity factor is a trade between dropped tokens and
padded compute / all-to-all bytes, and it depends only on E, K, the tokens per routing group
and how skewed the router is. This shows drop rate, max/mean load and expert-time inflation
per capacity factor, and a bar chart of tokens per expert for a balanced and the given layer.
All numbers come from `moeplan.cost.balance`; this module only parses and renders.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from moeplan import output
from moeplan.commands.guard import guarded
from moeplan.errors import MoeplanError

# numpy, pydantic (specs, presets) and the cost model are imported inside the functions that
# use them, so that registering this command (every `moeplan` run, `--help` too) stays cheap.
if TYPE_CHECKING:
    import numpy as np

    from moeplan.cost import balance as bal
    from moeplan.specs import Mesh, ModelSpec

DEFAULT_FACTORS = "1.0,1.25,1.5,2.0,dropless"
DEFAULT_SEED = 0  # = moeplan.cost.balance.DEFAULT_SEED, spelled out so --help needs no numpy (tested)
BAR_WIDTH = 44
MAX_BARS = 32


def register(app: typer.Typer) -> None:
    app.command("balance")(balance_cmd)


def parse_factors(text: str) -> list[float | None]:
    """'1.0,1.25,dropless' -> [1.0, 1.25, None] (None = no capacity limit)."""
    out: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("dropless", "none"):
            out.append(None)
            continue
        try:
            cf = float(item)
        except ValueError:
            cf = float("nan")
        if not math.isfinite(cf) or cf <= 0:
            raise MoeplanError(
                f"capacity factor '{item}' must be a positive number or 'dropless' (e.g. 1.0,1.25,dropless)"
            )
        out.append(cf)
    return out


def _group_tokens(mesh, tokens, seq_len, batch, batch_tokens, grad_accum) -> int:
    """T per routing group: --tokens, else one device's microbatch for --mesh and the batch."""
    from moeplan import presets
    from moeplan.cost.layout import Plans, tokens_per_microbatch

    if tokens is not None:
        if tokens < 1:
            raise MoeplanError(f"--tokens must be positive (got {tokens})")
        return tokens
    if mesh is None:
        raise MoeplanError("give --tokens (tokens per routing group) or --mesh with the batch options")
    train = presets.load_train(
        None, seq_len=seq_len, global_batch=batch, global_batch_tokens=batch_tokens, grad_accum=grad_accum
    )
    t = float(tokens_per_microbatch(train, Plans.single(mesh, train))[0])
    if t < 1 or abs(t - round(t)) > 1e-9:
        raise MoeplanError(
            f"{train.batch} sequences of {train.seq_len} tokens do not split evenly over "
            f"{mesh.data}x{mesh.expert} batch shards and {train.grad_accum} microbatches (T = {t:g})"
        )
    return int(round(t))


def _shape(model: ModelSpec | None, experts, top_k) -> tuple[int, int]:
    e = experts if experts is not None else (model.moe.num_experts if model and model.moe else None)
    k = top_k if top_k is not None else (model.moe.top_k if model and model.moe else 2)
    if e is None:
        raise MoeplanError("give --experts (or an MoE --model)")
    if e < 1 or k < 1:
        raise MoeplanError(f"--experts and --top-k must be positive (got {e}, {k})")
    return e, k


@guarded
def balance_cmd(
    model_name: Annotated[Optional[str], typer.Option("--model", "-m", help="MoE model preset or YAML (E, K, widths).")] = None,
    routing: Annotated[str, typer.Option("--routing", help="uniform, zipf:S (e.g. zipf:1.2) or hist:FILE.")] = "uniform",
    capacity_factor: Annotated[str, typer.Option("--capacity-factor", help="Comma list of capacity factors; 'dropless' for none.")] = DEFAULT_FACTORS,
    capacity: Annotated[Optional[int], typer.Option("--capacity", help="Slots per expert per group (overrides the factors).")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="Routed experts E (default: the model's).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Experts per token K (default: the model's, else 2).")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Tokens per routing group T (one device's microbatch).")] = None,
    mesh: Annotated[Optional[str], typer.Option("--mesh", help="data=8,expert=4,model=2: sets the expert axis and T.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence (with --mesh).")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help="Global batch in sequences (with --mesh).")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", help="Global batch in tokens (with --mesh).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Microbatches per step (with --mesh).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Monte Carlo for max loads.")] = DEFAULT_SEED,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json or yaml.")] = "table",
) -> None:
    """Drop rate, max/mean load and expert-time inflation of skewed routing, per capacity factor."""
    _balance(model_name, routing, capacity_factor, capacity, experts, top_k, tokens, mesh,
             seq_len, batch, batch_tokens, grad_accum, seed, fmt)


def _balance(model_name, routing, capacity_factor, capacity, experts, top_k, tokens, mesh_text,
             seq_len, batch, batch_tokens, grad_accum, seed, fmt) -> None:
    from moeplan import presets
    from moeplan.cost import balance as bal
    from moeplan.specs import Mesh

    fmt = output.check_format(fmt)
    spec = bal.parse_routing(routing)
    factors = parse_factors(capacity_factor)
    model = presets.load_model(model_name) if model_name else None
    if model is not None and model.moe is None:
        raise MoeplanError(f"model '{model.name}' is dense: it has no experts to balance")
    mesh = Mesh.parse(mesh_text) if mesh_text else None
    e, k = _shape(model, experts, top_k)
    t = _group_tokens(mesh, tokens, seq_len, batch, batch_tokens, grad_accum)
    x, d = (mesh.expert, mesh.data) if mesh else (1, 1)
    common = dict(experts=e, top_k=k, tokens=t, capacity_factors=factors, capacity=capacity,
                  expert_axis=x, data_axis=d, seed=seed)
    result = bal.analyse(routing=spec, **common)
    balanced = bal.analyse(routing=bal.UNIFORM, **common) if spec.kind != "uniform" else result
    data = _report(result, balanced, model, mesh)
    output.emit(data, fmt, table=lambda _: _render(result, balanced, data))


def _report(result: bal.Balance, balanced: bal.Balance, model: ModelSpec | None, mesh: Mesh | None) -> dict:
    """The JSON record: the routing model's result, the balanced baseline, per-device costs."""
    out = {"schema_version": output.SCHEMA_VERSION, "model": model.name if model else None,
           "mesh": None if mesh is None else {"data": mesh.data, "expert": mesh.expert, "model": mesh.model}}
    out.update(result.as_dict())
    out["balanced"] = balanced.as_dict()
    if model is not None:
        m = mesh.model if mesh else 1
        for row, rec in zip(result.rows, out["capacity"]):
            rec.update(_per_device_cost(model, row.slots_per_device, result.expert_axis, m))
    return out


def _per_device_cost(model: ModelSpec, slots: float, x: int, m: int) -> dict:
    """Forward expert FLOPs and dispatch all-to-all wire bytes of one device, per MoE layer.

    FLOPs: 2 per multiply-add, ffn_matrices matmuls of M x H_e per slot, H_e split over the
    model axis (Megatron). All-to-all: the [E*C, M] compute-dtype buffer, of which (x-1)/x
    leaves the device (Thakur et al. 2005; same convention as cost/traffic.py); a ragged
    dropless kernel sends the busiest device's tokens instead.
    """
    from moeplan.specs import DTYPE_BYTES, TrainSpec

    moe = model.moe
    flops = 2.0 * slots * model.ffn_matrices * model.d_model * moe.expert_hidden / m
    buf = slots * model.d_model * DTYPE_BYTES[TrainSpec.model_fields["compute_dtype"].default]
    return {"expert_flops_per_device": flops, "all_to_all_wire_bytes_per_device": buf * (x - 1) / x}


# ---- rendering ----------------------------------------------------------------------------


def _render(result: bal.Balance, balanced: bal.Balance, data: dict):
    from rich.text import Text

    head = Text()
    head.append(f"routing {result.routing}: E={result.experts}, top-{result.top_k}, "
                f"T={result.tokens} tokens per group, expert axis {result.expert_axis}, "
                f"data axis {result.data_axis}\n", style="bold")
    em, dm = result.expert_max_mean, result.device_max_mean
    head.append(f"busiest expert / mean  {em.ratio:.3f} ± {em.stderr:.3f}   "
                f"(balanced routing: {balanced.expert_max_mean.ratio:.3f})\n")
    head.append(f"busiest device / mean  {dm.ratio:.3f} ± {dm.stderr:.3f}   dropless, over "
                f"{result.data_axis * result.expert_axis} devices (balanced: {balanced.device_max_mean.ratio:.3f})\n")
    head.append(f"max loads: {em.method}, {em.trials} trials, seed {result.seed}; drops and padding exact "
                f"(binomial)", style="dim")
    yield head
    yield _table(result, balanced, data)
    row = _chart_row(result)
    top = max(float(balanced.expected_tokens.max()), float(result.expected_tokens.max()),
              float(result.rows[row].capacity if result.rows[row].capacity_factor is not None else 0))
    yield _chart(balanced, row, "balanced (uniform)", top)
    if result is not balanced:
        yield _chart(result, row, result.routing, top)


def _table(result: bal.Balance, balanced: bal.Balance, data: dict):
    cols = ["capacity factor", "C", "dropped", "dropped (uniform)", "padded", "expert time ×"]
    with_cost = data.get("model") is not None
    if with_cost:
        cols += ["expert FLOP/device", "all-to-all/device"]
    t = output.new_table("per MoE layer, per routing group", cols)
    for row, base, rec in zip(result.rows, balanced.rows, data["capacity"]):
        cf = "dropless" if row.capacity_factor is None else f"{row.capacity_factor:g}"
        cells = [cf, str(row.capacity), output.fmt_percent(row.dropped_fraction),
                 output.fmt_percent(base.dropped_fraction), output.fmt_percent(row.padded_fraction),
                 f"{row.expert_time_factor:.2f}"]
        if with_cost:
            cells += [output.fmt_flops(rec["expert_flops_per_device"]),
                      output.fmt_bytes(rec["all_to_all_wire_bytes_per_device"])]
        t.add_row(*cells)
    t.caption = ("expert time × = busiest device's expert slots / perfectly balanced (T·K); static "
                 "shapes pad to C whatever the skew, dropless is set by the busiest device")
    return t


def _chart_row(result: bal.Balance) -> int:
    """The capacity row the chart shows: the first one with a capacity, else the first."""
    for i, r in enumerate(result.rows):
        if r.capacity_factor is not None:
            return i
    return 0


def _chart(res: bal.Balance, row_index: int, label: str, top: float):
    """Bars of expected tokens per expert: kept █ (green), expected dropped ▒ (red), capacity │.

    The dropped part is the exact E[(n_e - C)^+], so under balanced routing it shows the
    drops that random fluctuations alone cause at a tight capacity.
    """
    from rich.text import Text

    from moeplan.cost import balance as bal

    row = res.rows[row_index]
    capped = row.capacity_factor is not None
    expected = res.expected_tokens
    kept = bal.expected_kept(res.inclusion, res.tokens, row.capacity) if capped else expected
    labels, (tot, kp) = _buckets(expected, expected, kept)
    c = row.capacity if capped else None
    scale = top or 1.0  # shared by both charts so their bars compare
    title = f"tokens per expert, {label}"
    title += f", capacity C={c} (cf {row.capacity_factor:g})" if capped else ", dropless"
    out = Text(title + "\n", style="bold")
    for name, total, keep in zip(labels, tot, kp):
        _bar(out, name, total, keep, scale, _capacity_column(c, scale))
    _grouping_note(out, len(labels), len(expected))
    return out


def paired_chart(title: str, predicted: np.ndarray, kept: np.ndarray, measured: np.ndarray,
                 capacity: float | None):
    """Predicted (kept █ green, expected dropped ▒ red) above measured (█ blue) tokens per
    expert, pair by pair on one scale: `moeplan profile --routing` sets the routing model
    beside the real router with the same bars `moeplan balance` draws."""
    from rich.text import Text

    labels, (pt, pk) = _buckets(predicted, predicted, kept)
    _, (mt,) = _buckets(measured, measured)
    scale = max(float(pt.max()), float(mt.max()), float(capacity or 0.0)) or 1.0
    width = max(len(name) for name in labels) + 5
    cap_col = _capacity_column(capacity, scale)
    out = Text(title + "\n", style="bold")
    for name, total, keep, meas in zip(labels, pt, pk, mt):
        _bar(out, f"{name} pred", total, keep, scale, cap_col, width=width)
        _bar(out, "meas", meas, meas, scale, cap_col, width=width, style="blue")
    _grouping_note(out, len(labels), len(predicted))
    return out


def _capacity_column(capacity: float | None, scale: float) -> int | None:
    return int(round(capacity / scale * BAR_WIDTH)) if capacity else None


def _bar(out, name: str, total: float, keep: float, scale: float, cap_col: int | None, *,
         width: int = 9, style: str = "green") -> None:
    """One bar line: `keep` as █ in `style`, the rest of `total` as dropped ▒ (red), the
    capacity as │ where the bar does not reach it, then the count (and what is dropped)."""
    n_keep = int(round(keep / scale * BAR_WIDTH))
    n_drop = int(round(total / scale * BAR_WIDTH)) - n_keep
    out.append(f"{name:>{width}} ")
    for col in range(BAR_WIDTH + 1):
        if col < n_keep:
            out.append("█", style=style)
        elif col < n_keep + n_drop:
            out.append("▒", style="red")
        elif col == cap_col:
            out.append("│", style="yellow")
        else:
            out.append(" ")
    drop = total - keep
    out.append(f" {total:8.1f}")
    out.append(f"  -{drop:.1f} dropped" if drop >= 0.05 else "", style="red")
    out.append("\n")


def _grouping_note(out, bars: int, experts: int) -> None:
    if bars < experts:
        out.append(f"(experts grouped {experts // bars} per bar; each bar shows the "
                   "busiest expert of its group)\n", style="dim")


def _buckets(key: np.ndarray, *series: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """At most MAX_BARS bars: consecutive experts grouped, each bar the expert of its group
    with the largest `key`, read from every one of `series` (so kept stays with its total)."""
    import numpy as np

    e = len(key)
    if e <= MAX_BARS:
        return [f"e{i}" for i in range(e)], [np.asarray(s) for s in series]
    size = math.ceil(e / MAX_BARS)
    labels, picks = [], []
    for start in range(0, e, size):
        stop = min(e, start + size)
        picks.append(start + int(np.argmax(key[start:stop])))
        labels.append(f"e{start}-{stop - 1}")
    return labels, [np.asarray(s)[picks] for s in series]
