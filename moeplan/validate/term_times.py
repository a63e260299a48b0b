"""Measured step time split by cost-model term, read from a profiler trace of the real step.

Why: a step-time ratio says *that* a prediction is off, not *where*. The cost model adds
up per-op-class rooflines (cost/compute.py) and per-axis collective times (collectives.py);
this module puts a measured figure beside each of those terms, so a miss can be traced to
the term that carries it (an all-reduce that waits, an optimizer that streams faster than
the calibrated bandwidth, ...).

How: the step's code runs under `jax.named_scope`s that name the cost classes (validate/
model.py, moe.py, step.py). XLA keeps each op's scope path in its HLO metadata (op_name,
forward as `jvp(scope)`, backward as `transpose(jvp(scope))`), and the profiler records one
event per executed HLO op (thunk on CPU, kernel on GPU) with its name and device. So:
1. `instruction_terms(hlo_text)` maps every HLO instruction to a term by its op_name;
2. `trace_events(run, steps)` runs `steps` steps under `jax.profiler` and returns the op
   events (name, device, exclusive duration; nested events such as a while loop's body are
   not counted twice);
3. `seconds_by_term(events, terms, steps)` sums them per term, per device and step.

What the figures mean: each device's time inside its ops, averaged over devices. On a GPU
or TPU that is the device's busy time. On simulated CPU devices the devices share the
host's cores, so an op's duration includes time its thread waited for a core, and a
collective's includes waiting for the slowest device to arrive: the shares are meaningful,
the absolute sum is not, which is why `scale_to` rescales them to the measured step time.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from bisect import bisect_left
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from moeplan.cost.collectives import TERMS as COMM_TERMS  # all_to_all, model_axis, data_axis

TRACED_STEPS = 3  # steps `profile --breakdown` traces per candidate, after timing
OTHER = "other"
COLLECTIVE_OPS = ("all-reduce", "all-to-all", "all-gather", "reduce-scatter", "collective-permute")
MATMUL_TERMS = ("attention_proj", "attention_scores", "dense_ffn", "router", "expert_ffn", "shared_experts",
                "lm_head")
MODEL_AXIS_SCOPES = ("attention", "ffn", "experts")  # sub-blocks whose psum / pcast run over `model`

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?\s([\w\-]+)\(")  # name = shape opcode(
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # a computation's header line
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_WORD = re.compile(r"[A-Za-z_]+")


class OpEvent(NamedTuple):
    """One executed HLO op on one device: its instruction name and exclusive seconds."""

    name: str
    device: str
    seconds: float


def is_matmul(op_name: str, opcode: str) -> bool:
    """Whether an op is a matrix product: a dot/convolution, or a fusion rooted at an einsum."""
    last = op_name.rsplit("/", 1)[-1]
    return opcode in ("dot", "convolution") or "->" in last or last.startswith("dot")


def classify(op_name: str, opcode: str) -> str:
    """The cost term (a cost/compute.py op class, a COMM_TERMS entry, or OTHER) of one op.

    Scope names are those of the validation step; the order matters where scopes nest
    (the router is inside `moe`, the norm inside `attention`, the softmax inside the scores).
    """
    scopes = set(_WORD.findall(op_name))
    mm = is_matmul(op_name, opcode)
    base = opcode.removesuffix("-start").removesuffix("-done")
    if base in COLLECTIVE_OPS:
        if base == "all-to-all":
            return "all_to_all"
        return "model_axis" if scopes & set(MODEL_AXIS_SCOPES) and "grad_reduce" not in scopes else "data_axis"
    if "adam" in scopes:
        return "optimizer_update"
    if "grad_reduce" in scopes or "metrics" in scopes or "embed" in scopes:
        return OTHER
    if "norm" in scopes:
        return "norms_residuals"
    if "lm_head" in scopes:
        return "lm_head" if mm else "loss_softmax"
    if "loss" in scopes:
        return "loss_softmax"
    if "attn_softmax" in scopes:
        return "attention_softmax"
    if "attn_scores" in scopes:
        return "attention_scores" if mm else "attention_softmax"
    if "route" in scopes:
        return "router" if mm else "routing"
    if "permute" in scopes or "unpermute" in scopes:
        return "moe_permute"
    if "experts" in scopes:
        return "expert_ffn" if mm else "activations"
    if "ffn" in scopes:
        return ("shared_experts" if "moe" in scopes else "dense_ffn") if mm else "activations"
    if "attention" in scopes:
        return "attention_proj" if mm else OTHER
    if "add_any" in scopes:
        return "gradient_sums"
    if op_name.rsplit("/", 1)[-1] == "add":
        return "norms_residuals"  # the residual adds of each block
    return OTHER


def instruction_terms(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> cost term, for every instruction with a known op_name.

    A fusion's own line may carry no metadata (the CPU backend's XNNPACK fusions). It then
    takes the op_name of its fused computation's root (or first op that has one); failing
    that, that of its first operand that has one: XLA drops the metadata of an einsum it
    rewrites into a plain dot (one local expert), but its weight operand still carries the
    parameter's path (state.params[...]['experts']['w1']).
    """
    names: dict[str, tuple[str, str]] = {}
    unnamed: list[tuple[str, str, str, list[str]]] = []
    comp_meta: dict[str, str] = {}
    comp_root: dict[str, str] = {}
    comp = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        meta, callee = _OP_NAME.search(line), _CALLS.search(line)
        is_root = line.lstrip().startswith("ROOT")
        if comp is not None and is_root:
            comp_root[comp] = opcode
        if meta:
            names[name] = (meta.group(1), opcode)
            if comp is not None and (is_root or comp not in comp_meta):
                comp_meta[comp] = meta.group(1)
        elif callee:
            args = line[m.end():].split(")", 1)[0]
            unnamed.append((name, callee.group(1), opcode, _OPERAND.findall(args)))
    out = {name: classify(op_name, opcode) for name, (op_name, opcode) in names.items()}
    for name, callee, opcode, operands in unnamed:
        kind = "dot" if comp_root.get(callee) in ("dot", "convolution") else opcode
        if callee in comp_meta:
            out[name] = classify(comp_meta[callee], kind)
            continue
        found = [classify(names[o][0], kind) for o in operands if o in names]
        if kind == "dot":  # a product is named by its weight, not by the activation it reads
            found = sorted(found, key=lambda t: t not in MATMUL_TERMS)
        out[name] = next((t for t in found if t != OTHER), OTHER)
    return out


def exclusive_events(raw: Iterable[dict]) -> list[OpEvent]:
    """Profiler 'X' events that name an HLO op, with nested op time subtracted, and the time
    a collective spent waiting split off as its own event (named WAIT_PREFIX + op).

    Events on one thread nest by time; an op that contains others (a while loop, a call)
    keeps only the time not spent in them. The CPU runtime also records, inside a
    collective, its rendezvous waits for the other devices ("Wait: pending_threads=...");
    their union inside a leaf op is that op's waiting time.
    """
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    waits: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for e in raw:
        if e.get("ph") != "X":
            continue
        key = (e.get("pid"), e.get("tid"))
        if "hlo_op" in (e.get("args") or {}):
            by_thread[key].append(e)
        elif str(e.get("name", "")).startswith("Wait"):
            waits[key].append((e["ts"], e["ts"] + e["dur"]))
    out: list[OpEvent] = []
    for key, events in by_thread.items():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        pending = sorted(waits.get(key, []))
        stack: list[list] = []  # [event, end, child time]
        for e in events:
            while stack and e["ts"] >= stack[-1][1]:
                out.extend(_closed(stack.pop(), pending))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e, e["ts"] + e["dur"], 0.0])
        while stack:
            out.extend(_closed(stack.pop(), pending))
    return out


WAIT_PREFIX = "wait:"
WAIT = "waiting"  # the term of collectives' rendezvous waits


def _closed(entry: list, waits: list[tuple[float, float]]) -> list[OpEvent]:
    e, end, child = entry
    args = e["args"]
    device = str(args.get("device_ordinal", e.get("pid")))
    waited = _covered(waits, e["ts"], end) if child == 0 else 0.0
    own = OpEvent(args["hlo_op"], device, max(e["dur"] - child - waited, 0.0) * 1e-6)
    return [own, OpEvent(WAIT_PREFIX + args["hlo_op"], device, waited * 1e-6)] if waited else [own]


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of the (sorted) intervals lying inside [start, end]."""
    total, reach = 0.0, start
    for a, b in intervals[bisect_left(intervals, (start, start)):]:
        if a >= end:
            break
        if b > end:
            continue
        a = max(a, reach)
        if b > a:
            total += b - a
            reach = b
    return total


def seconds_by_term(events: Iterable[OpEvent], terms: dict[str, str], steps: int) -> dict[str, float]:
    """Seconds per device per step in each term (ops the HLO does not name count as OTHER)."""
    total: dict[str, float] = defaultdict(float)
    devices = set()
    for ev in events:
        total[WAIT if ev.name.startswith(WAIT_PREFIX) else terms.get(ev.name, OTHER)] += ev.seconds
        devices.add(ev.device)
    n = max(len(devices), 1) * max(steps, 1)
    return {k: v / n for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def scale_to(by_term: dict[str, float], step_s: float) -> dict[str, float]:
    """The same split rescaled so the terms add up to the measured step time."""
    busy = sum(by_term.values())
    return {k: v * step_s / busy for k, v in by_term.items()} if busy > 0 else dict(by_term)


def trace_events(run: Callable[[], object], steps: int, sync: Callable[[object], object]) -> list[OpEvent]:
    """Run `steps` steps under the jax profiler; the op events of the trace it writes."""
    import jax

    with tempfile.TemporaryDirectory(prefix="moeplan-trace-") as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(steps):
                sync(run())
        finally:
            jax.profiler.stop_trace()
        files = sorted(Path(tmp).rglob("*.trace.json.gz"))
        if not files:
            return []
        with gzip.open(files[-1], "rt") as f:
            return exclusive_events(json.load(f).get("traceEvents", []))


def measure(compiled, run: Callable[[], object], steps: int, sync: Callable[[object], object],
            step_s: float) -> dict:
    """The `measured` record's term split: raw seconds per device per step and, scaled to
    the measured step time, `time_by_term_s`."""
    terms = instruction_terms(compiled.as_text())
    raw = seconds_by_term(trace_events(run, steps, sync), terms, steps)
    return {"op_time_by_term_s": raw, "time_by_term_s": scale_to(raw, step_s), "traced_steps": steps}


def predicted_terms(row: dict) -> dict[str, float]:
    """A plan's predicted seconds per term from its estimate row (suggest-mesh schema):
    the compute classes and the three communication terms."""
    out = {k: float(v) for k, v in row.get("compute_s_by_op", {}).items()}
    out.update({k: float(row["breakdown_s"][k]) for k in COMM_TERMS})
    return out


REST = "rest"
UNTRACED = ("first_touch",)
"""Predicted terms a trace has no ops for: page faults on fresh scratch (cost/first_touch.py)
are paid inside whichever kernels first write those pages, so their time is in those terms."""


def term_rows(predicted: dict[str, float], measured: dict[str, float],
              min_share: float = 0.02) -> list[tuple[str, float, float | None]]:
    """(term, predicted s, measured s), largest measured first, for every term holding at
    least `min_share` of either side's total; the others are added up in one REST row.
    UNTRACED terms have no measured figure (None)."""
    tot_p, tot_m = sum(predicted.values()) or 1.0, sum(measured.values()) or 1.0
    rows: list[tuple[str, float, float | None]] = []
    rest = [0.0, 0.0]
    for k in sorted(set(predicted) | set(measured), key=lambda k: -measured.get(k, 0.0)):
        p, m = predicted.get(k, 0.0), measured.get(k, 0.0)
        if k in UNTRACED:
            rows.append((k, p, None))
        elif p >= min_share * tot_p or m >= min_share * tot_m:
            rows.append((k, p, m))
        else:
            rest[0] += p
            rest[1] += m
    if rest[0] or rest[1]:
        rows.append((REST, rest[0], rest[1]))
    return rows
