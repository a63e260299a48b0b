"""The one place that turns results into text: tables for people, JSON / YAML for machines.

Every command renders through `emit`, so a result printed as a table and the same result
printed as JSON come from one dict, and a new format is added here once. The number
formatters keep units consistent across commands (bytes in binary units, FLOPs and counts
in SI units, durations from nanoseconds to days).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moeplan.errors import MoeplanError

FORMATS = ("table", "json", "yaml")
SCHEMA_VERSION = 1
WIDE = 200  # columns used when stdout is not a terminal, so piped tables are not squeezed


def check_format(fmt: str) -> str:
    """Return `fmt` normalised, or fail with one line listing the known formats."""
    norm = fmt.strip().lower()
    if norm not in FORMATS:
        raise MoeplanError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return norm


def check_choice(option: str, value: str, choices: Iterable[str]) -> str:
    """Validate a string option against its choices with a one-line error."""
    choices = tuple(choices)
    norm = value.strip().lower()
    if norm not in choices:
        raise MoeplanError(f"{option} '{value}' is unknown; choose one of {', '.join(choices)}")
    return norm


def console():
    """A rich console on the current stdout (CliRunner swaps stdout, so build it per call)."""
    from rich.console import Console

    wide = None if sys.stdout.isatty() else WIDE
    return Console(width=wide, highlight=False, soft_wrap=False)


def jsonable(value: Any) -> Any:
    """Plain Python values (dicts, lists, str, int, float, bool, None) from numpy and friends."""
    import numpy as np  # here, not at the top: `moeplan --help` and the formatters need no numpy

    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def dumps(data: Any, fmt: str) -> str:
    """Serialise `data` as 'json' or 'yaml' text."""
    plain = jsonable(data)
    if fmt == "json":
        return json.dumps(plain, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False).rstrip("\n")
    raise MoeplanError(f"format '{fmt}' is not a serialisation; use json or yaml")


def emit(data: Any, fmt: str, table: Callable[[Any], Iterable[Any]] | None = None) -> None:
    """Print `data` as JSON / YAML, or as the renderables `table(data)` returns for 'table'.

    JSON and YAML go straight to stdout (no rich wrapping, so they stay parseable).
    """
    fmt = check_format(fmt)
    if fmt == "table":
        if table is None:
            raise MoeplanError("this command has no table view; use --format json or yaml")
        out = console()
        for renderable in table(data):
            out.print(renderable)
        return
    sys.stdout.write(dumps(data, fmt) + "\n")


def esc(text: object) -> str:
    """User-supplied text (names from YAML, explanations) made safe for rich markup."""
    from rich.markup import escape

    return escape(str(text))


def new_table(title: str | None, columns: Iterable[str | tuple[str, str]]):
    """A rich table; a column given as (header, 'left') is left-aligned, others right-aligned."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        header, justify = col if isinstance(col, tuple) else (col, "right")
        t.add_column(header, justify=justify, no_wrap=True)
    return t


# ---- human-readable numbers -------------------------------------------------------------

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SI = ("", "K", "M", "G", "T", "P", "E", "Z")


def _scaled(value: float, base: float, units: tuple[str, ...], digits: int) -> tuple[str, str]:
    if value is None or not math.isfinite(value):
        return "-", ""
    mag = abs(value)
    i = 0
    while mag >= base and i < len(units) - 1:
        mag /= base
        i += 1
    sign = "-" if value < 0 else ""
    return f"{sign}{_sig(mag, digits)}", units[i]


def _sig(x: float, digits: int) -> str:
    """x with `digits` significant digits, without exponent notation."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(x))))
    return f"{x:.{decimals}f}"


def fmt_bytes(n: float, digits: int = 3) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    num, unit = _scaled(float(n), 1024.0, _BINARY, digits)
    return f"{num} {unit}".strip()


def fmt_si(n: float, unit: str = "", digits: int = 3) -> str:
    """SI-scaled number: fmt_si(4.67e10) -> '46.7G', fmt_si(2e15, 'FLOP') -> '2.00 PFLOP'."""
    num, prefix = _scaled(float(n), 1000.0, _SI, digits)
    if unit:
        return f"{num} {prefix}{unit}"
    return f"{num}{prefix}"


def fmt_count(n: float) -> str:
    """Parameter or token counts: 46.7e9 -> '46.7B' (B for billion, as papers write it)."""
    s = fmt_si(n)
    return s[:-1] + "B" if s.endswith("G") else s


def fmt_flops(n: float) -> str:
    """FLOPs: 1.2e15 -> '1.20 PFLOP'."""
    return fmt_si(n, "FLOP")


def fmt_rate(n: float, unit: str) -> str:
    """A per-second rate: fmt_rate(4.5e11, 'B') -> '450 GB/s'."""
    return fmt_si(n, unit) + "/s"


def fmt_seconds(s: float, digits: int = 3) -> str:
    """Durations from nanoseconds to days: 0.0123 -> '12.3 ms', 93600 -> '1.08 days'."""
    if s is None or not math.isfinite(s):
        return "-"
    mag = abs(s)
    if mag == 0:
        return "0 s"
    for limit, scale, unit in ((1e-6, 1e9, "ns"), (1e-3, 1e6, "µs"), (1.0, 1e3, "ms"), (120.0, 1, "s")):
        if mag < limit:
            return f"{_sig(mag * scale, digits)} {unit}"
    if mag < 2 * 3600:
        return f"{_sig(mag / 60, digits)} min"
    if mag < 2 * 86400:
        return f"{_sig(mag / 3600, digits)} h"
    return f"{_sig(mag / 86400, digits)} days"


def fmt_percent(x: float, digits: int = 3) -> str:
    """A fraction as a percentage: 0.4123 -> '41.2%'."""
    if x is None or not math.isfinite(x):
        return "-"
    sign = "-" if x < 0 else ""
    return f"{sign}{_sig(abs(x) * 100, digits)}%"


def fmt_mesh(mesh: Mapping[str, int]) -> str:
    """A mesh row as 'data x expert x model': {'data': 8, 'expert': 4, 'model': 2} -> '8x4x2'."""
    return f"{mesh['data']}x{mesh['expert']}x{mesh['model']}"
