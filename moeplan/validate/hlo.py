"""Read collectives, FLOPs and memory back out of a compiled (post-optimisation) XLA program.

The cost model's inventory (`moeplan/cost/traffic.py`) is checked against what the compiler
actually emits, so this parser works on `compiled.as_text()`: the HLO after SPMD
partitioning, fusion and collective combining. It finds every all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute (async `-start`/`-done` pairs counted once,
at the start), sizes their buffers with traffic.py's convention, reads their replica groups
(explicit `{{0,1},{2,3}}` or iota `[2,4]<=[4,2]T(1,0)`), and multiplies ops inside while
loops by the loop's trip count: `known_trip_count` in the backend config (XLA:CPU/GPU print
it for counted loops such as `lax.scan`). The TPU compiler's printout drops it;
`collectives(compiled)` first restores it with `trip_counts.annotate_trip_counts`, which
reads it off the counted loop itself.

Buffer convention (as traffic.Collective): the operand of all-reduce and all-to-all (tuple
operands summed), the gathered result of all-gather, the unscattered input of reduce-scatter.
Wire bytes = buffer * traffic.wire_factor(kind, group size). A collective-permute sends its
whole operand (factor 1); traffic.py issues none, so any that appears is a finding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from moeplan.cost.traffic import wire_factor
from moeplan.errors import MoeplanError

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1,
    "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*(?:->.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP = re.compile(r"\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_COMMENT = re.compile(r"/\*.*?\*/")
_NUM_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_REPLICA_COUNT = re.compile(r"replica_count=(\d+)")


@dataclass(frozen=True)
class HloCollective:
    """One collective instruction of the compiled program."""

    kind: str
    name: str
    computation: str
    operand_bytes: float  # sum over (tuple) operands, per device
    result_bytes: float  # sum over (tuple) results, per device (async starts: the result part)
    dtypes: tuple[str, ...]
    group_size: int
    num_groups: int
    count: int | None  # times it runs per step (product of loop trip counts); None = unknown
    groups: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    @property
    def buffer_bytes(self) -> float:
        """traffic.py's buffer: operand (all-reduce, all-to-all, reduce-scatter, permute),
        gathered result (all-gather)."""
        if self.kind == "all-gather":
            return self.operand_bytes * self.group_size
        return self.operand_bytes

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends for one execution of this op."""
        if self.kind == "collective-permute":
            return self.operand_bytes
        return float(wire_factor(self.kind, self.group_size)) * self.buffer_bytes


def array_bytes(type_text: str) -> tuple[float, tuple[str, ...]]:
    """Bytes and dtypes of an HLO type: `f32[4,8]{1,0}` or a tuple of them."""
    total, dtypes = 0.0, []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
        dtypes.append(dtype)
    return total, tuple(dtypes)


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/braces/parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def parse_replica_groups(attrs: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """Device groups of a collective from its attribute text.

    Forms: `replica_groups={{0,1},{2,3}}`; iota `replica_groups=[2,4]<=[8]` (iota(8) reshaped
    to [2,4]); `[4,2]<=[2,4]T(1,0)` (iota reshaped to [2,4], transposed by (1,0), reshaped to
    [4,2]); `replica_groups={}` or absent: one group of all devices. collective-permute has
    source_target_pairs instead: its groups are the pairs.
    """
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = ids.reshape(shape[0], -1)
        return tuple(tuple(int(v) for v in row) for row in ids)
    for key in ("replica_groups", "source_target_pairs"):
        pos = attrs.find(key + "={")
        if pos >= 0:
            start = pos + len(key) + 1
            body = attrs[start + 1 : _matching(attrs, start) - 1]
            groups = re.findall(r"\{([0-9,\s]*)\}", body)
            parsed = tuple(tuple(int(v) for v in g.split(",") if v.strip()) for g in groups)
            if parsed:
                return parsed
    return (tuple(range(num_devices)),)


@dataclass(frozen=True)
class _Instr:
    opcode: str
    operands: tuple[str, ...]  # value names
    operands_text: str
    attrs: str


@dataclass
class _Computation:
    name: str
    types: dict[str, str] = field(default_factory=dict)  # value name -> HLO type text
    instrs: dict[str, _Instr] = field(default_factory=dict)
    root: str = ""
    calls: list[tuple[str, str | None]] = field(default_factory=list)  # (callee, while instr if body)
    ops: list[tuple[str, str, list[str], str]] = field(default_factory=list)  # kind, name, operands, attrs


def _parse_params(header_params: str | None, comp: _Computation) -> None:
    if not header_params:
        return
    for part in _split_top(header_params[1:-1]):
        name, _, typ = part.partition(":")
        comp.types[name.strip().lstrip("%")] = typ.strip()


def _parse_instruction(line: str, comp: _Computation) -> None:
    line = _COMMENT.sub("", line)
    m = _INSTR.match(line)
    if not m:
        return
    name, rest = m.group(1), m.group(2)
    op = _OP.search(" " + rest)
    if not op:
        return
    comp.types[name] = (" " + rest)[: op.start()].strip()
    opcode, after = op.group(1), op.group(2)
    close = _matching("(" + after, 0) - 1
    operands_text, attrs = after[: close - 1], after[close:]
    operands = tuple(o.split()[-1].lstrip("%") for o in _split_top(operands_text))
    comp.instrs[name] = _Instr(opcode, operands, operands_text, attrs)
    if line.lstrip().startswith("ROOT"):
        comp.root = name
    for callee in _CALLED.findall(attrs):
        is_body = opcode == "while" and re.search(r"\bbody=%?" + re.escape(callee) + r"(?![\w.\-])", attrs)
        comp.calls.append((callee, name if is_body else None))
    for branches in _BRANCHES.findall(attrs):
        comp.calls += [(b.strip().lstrip("%"), None) for b in branches.split(",") if b.strip()]
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    if base in KINDS:
        comp.ops.append((base, name, list(operands), attrs))


def _split_computations(text: str) -> tuple[dict[str, _Computation], str]:
    comps: dict[str, _Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _COMP_HEADER.match(line)
        if header and "=" not in line.split("->")[0].split("(")[0]:
            current = _Computation(header.group(2))
            comps[current.name] = current
            _parse_params(header.group(3), current)
            if header.group(1):
                entry = current.name
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                _parse_instruction(line, current)
    if not entry:
        raise MoeplanError("no ENTRY computation found in the HLO text")
    return comps, entry


def _trip_count(caller: _Computation, loop_name: str) -> int | None:
    known = _TRIP.search(caller.instrs[loop_name].attrs)
    return int(known.group(1)) if known else None


def _multipliers(comps: dict[str, _Computation], entry: str) -> dict[str, int | None]:
    """Times each computation runs per execution of ENTRY (None: inside an unknown-trip loop)."""
    mult: dict[str, int | None] = {}

    def visit(name: str, factor: int | None, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        old = mult.get(name, 0)
        mult[name] = None if (old is None or factor is None) else old + factor
        for callee, loop in comps[name].calls:
            trips = 1 if loop is None else _trip_count(comps[name], loop)
            visit(callee, None if (factor is None or trips is None) else factor * trips, depth + 1)

    visit(entry, 1)
    return mult


def parse_collectives(hlo_text: str) -> list[HloCollective]:
    """Every collective in an HLO module's text, with how often it runs per execution."""
    comps, entry = _split_computations(hlo_text)
    m = _NUM_PARTITIONS.search(hlo_text)
    r = _REPLICA_COUNT.search(hlo_text)
    devices = (int(m.group(1)) if m else 1) * (int(r.group(1)) if r else 1)
    mult = _multipliers(comps, entry)
    out = []
    for comp in comps.values():
        if comp.name not in mult:
            continue  # never called from ENTRY (e.g. a reduction's to_apply region)
        for kind, name, operands, attrs in comp.ops:
            op_bytes, dtypes = 0.0, []
            for o in operands:
                b, d = array_bytes(comp.types.get(o, ""))
                op_bytes += b
                dtypes += d
            res_bytes, _ = array_bytes(comp.types.get(name, ""))
            groups = parse_replica_groups(attrs, devices)
            out.append(HloCollective(
                kind=kind, name=name, computation=comp.name, operand_bytes=op_bytes,
                result_bytes=res_bytes, dtypes=tuple(dtypes),
                group_size=2 if kind == "collective-permute" else len(groups[0]),
                num_groups=len(groups), count=mult[comp.name], groups=groups,
            ))
    return out


def collectives(compiled) -> list[HloCollective]:
    """Collectives of a jax `Compiled` (post-optimisation HLO), with loop trip counts restored
    where the compiler's text dropped them (TPU)."""
    from moeplan.validate.trip_counts import annotate_trip_counts

    return parse_collectives(annotate_trip_counts(compiled.as_text()))


def _check_counts(ops: list[HloCollective]) -> None:
    unknown = [o.name for o in ops if o.count is None]
    if unknown:
        raise MoeplanError(f"collectives inside loops with unknown trip count: {', '.join(unknown[:5])}")


def wire_bytes_by_kind(ops: list[HloCollective]) -> dict[str, float]:
    """Bytes each device sends per step, by kind (traffic.bytes_by_kind's convention)."""
    return _per_kind(ops, "wire_bytes")


def buffer_bytes_by_kind(ops: list[HloCollective]) -> dict[str, float]:
    """Sum of buffer bytes times executions, by kind (group size ignored)."""
    return _per_kind(ops, "buffer_bytes")


def _per_kind(ops: list[HloCollective], field: str) -> dict[str, float]:
    """Sum of one per-op byte figure times executions, by kind (every kind present)."""
    _check_counts(ops)
    totals = {k: 0.0 for k in KINDS}
    for o in ops:
        totals[o.kind] += getattr(o, field) * o.count
    return totals


def expected_bytes_by_kind(model, train, mesh) -> dict[str, float]:
    """The cost model's wire bytes per device per step for one plan, by kind."""
    from moeplan.cost.layout import Plans
    from moeplan.cost.traffic import bytes_by_kind, step_collectives

    plans = Plans.single(mesh, train)
    totals = bytes_by_kind(step_collectives(model, train, plans), plans)
    out = {k: float(v[0]) for k, v in totals.items()}
    out.setdefault("collective-permute", 0.0)
    return out


def flops(compiled) -> float | None:
    """XLA's own FLOP count for the compiled program (cost_analysis), if it reports one."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def memory(compiled) -> dict[str, int]:
    """memory_analysis() fields in bytes (argument, output, temp, alias, generated code...)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = [n for n in dir(stats) if n.endswith("_in_bytes")]
    return {n[: -len("_in_bytes")]: int(getattr(stats, n)) for n in names}
