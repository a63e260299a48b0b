"""Time of every collective in the step (alpha-beta model), for many plans at once.

Why a separate module: `traffic.py` says *what* is sent (the contract checked against the
compiled HLO); this module says *how long* it takes on a given machine, which depends on
which physical links a device group crosses.

Alpha-beta model (Hockney, "The communication challenge for MPP", Parallel Computing 20,
1994; Thakur, Rabenseifner & Gropp, IJHPCA 19(1), 2005): one collective over n devices
costs  steps(kind, n) * alpha + wire_bytes / beta,  with ring step counts
all-reduce 2(n-1) (reduce-scatter then all-gather), all-gather and reduce-scatter n-1,
all-to-all n-1 (pairwise exchange), and wire bytes from `traffic.wire_factor`.

Which link (beta, alpha). Devices are numbered with `model` innermost, then `expert`, then
`data` (see specs.Mesh), so a group over contiguous axes is {base + stride*j : j < n} with
stride = product of the sizes of the axes inside it. A scale-up domain is hw.scale_up_size
consecutive, aligned device indices. Every group of such a family lies inside one domain
iff n == 1, or all devices fit in one domain, or n*stride divides the domain size (proof
sketch in docs/cost-model.md); such groups use hw.scale_up, all others hw.scale_out (the
slowest link they cross).

Torus (hw.topology == "torus", approximation, following the scaling-book's treatment of
TPU ICI): inside the domain, devices fill hw.torus_dims with the first dimension fastest.
Dimension k has period P_k = t_0*...*t_(k-1). A group {base + stride*j : j < n} spans
dimension k iff stride < P_(k+1) and n*stride > P_k (its coordinates along k vary), and
covers it fully iff stride <= P_k and n*stride >= P_(k+1) (exact when sizes divide each
other, as power-of-two meshes do). Each spanned dimension adds one link per direction; a
fully covered one closes a ring with wraparound, so both directions carry data:
    beta = scale_up.bandwidth * sum_k spanned_k * (2 if full_k else 1).
Step counts stay those of a single ring over n devices (pessimistic for multi-dimensional
groups), and all-to-all uses the same beta (optimistic: a torus all-to-all is limited by
bisection bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.cost.layout import Plans
from moeplan.cost.traffic import KINDS, Collective, wire_factor
from moeplan.specs import AXES, HardwareProfile

RING_STEP_FACTOR = {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 1}
TERMS: tuple[str, ...] = ("all_to_all", "model_axis", "data_axis")


@dataclass(frozen=True)
class LinkChoice:
    """Per-plan bandwidth (bytes/s per device, one direction) and per-step latency (s)."""

    bandwidth: np.ndarray
    latency: np.ndarray


def ring_steps(kind: str, n: np.ndarray) -> np.ndarray:
    """Latency-bound steps of the ring algorithm for `kind` over n devices (0 for n = 1)."""
    return RING_STEP_FACTOR[kind] * (np.asarray(n, dtype=np.float64) - 1)


def _product(plans: Plans, axes) -> np.ndarray | int:
    out: np.ndarray | int = 1
    for axis in axes:
        out = out * getattr(plans, axis)
    return out


def group_geometry(axes: tuple[str, ...], plans: Plans) -> tuple[np.ndarray | int, np.ndarray | int]:
    """(stride, size) of the device groups over `axes` in data > expert > model order
    (the scalar 1 where no axis contributes, e.g. the stride of `model`)."""
    pos = sorted(AXES.index(a) for a in axes)
    if pos != list(range(pos[0], pos[-1] + 1)):
        raise ValueError(f"axes {axes} are not contiguous in device order {AXES}")
    return _product(plans, AXES[pos[-1] + 1 :]), _product(plans, axes)


def inside_domain(stride: np.ndarray, size: np.ndarray, devices: np.ndarray, domain: int) -> np.ndarray:
    """Whether every group {base + stride*j : j < size} lies in one aligned domain of `domain`."""
    per_block = domain / (stride * size)  # an integer iff the group's block divides the domain
    return (size <= 1) | (devices <= domain) | (per_block == np.floor(per_block))


def torus_links(stride: np.ndarray, size: np.ndarray, dims: list[int]) -> np.ndarray:
    """Link-directions a group uses inside a torus: per spanned dim 1, or 2 if fully covered.

    Dimension k holds the index digits [P_k, P_(k+1)); the group's indices step by `stride`
    up to stride*size. It spans dim k iff stride < P_(k+1) and stride*size > P_k, and covers
    it fully (a ring with wraparound, used in both directions) iff stride <= P_k and
    stride*size >= P_(k+1). Written as comparisons: exact for integer sizes, and cheap.
    """
    span = stride * size
    links = np.zeros(np.shape(span), dtype=np.int8)  # small ints: cheap to accumulate
    period = 1
    for extent in dims:
        if extent > 1:  # a dimension of one device has no links
            nxt = period * extent
            links += (stride < nxt) & (span > period)
            links += (stride <= period) & (span >= nxt)
        period *= extent
    return links


def group_link(
    axes: tuple[str, ...], plans: Plans, hw: HardwareProfile, devices: np.ndarray | None = None
) -> LinkChoice:
    """The link a collective over `axes` runs on, for each plan."""
    stride, size = group_geometry(axes, plans)
    devices = plans.data * plans.expert * plans.model if devices is None else devices
    inside = inside_domain(stride, size, devices, hw.scale_up_size).astype(np.float64)
    outside = 1.0 - inside
    up, out = hw.scale_up, hw.scale_out
    up_bw: float | np.ndarray = up.bandwidth
    if hw.topology == "torus":
        links = torus_links(stride, size, list(hw.torus_dims or []))
        up_bw = up.bandwidth * np.maximum(links, 1.0)  # a group of one uses no link; avoid 0
    # exact 0/1 blends rather than np.where: same values, several times faster on 10^6 plans
    bandwidth = inside * up_bw + outside * out.bandwidth
    latency = inside * up.latency + outside * out.latency
    return LinkChoice(bandwidth, latency)


def kind_scale(hw: HardwareProfile, kind: str) -> tuple[float, float]:
    """(latency, bandwidth) multipliers of `kind` on any link: a calibrated profile's own
    per-kind fit over its joint fit (collectives differ: an all-to-all exchanges with every
    peer at once and reaches less of a link than a ring all-reduce), else (1, 1)."""
    scale = (hw.collective_scale or {}).get(kind)
    return (1.0, 1.0) if scale is None else (scale.latency, scale.bandwidth)


def size_curve(hw: HardwareProfile, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(log buffer sizes, factors) of `kind`'s KindScale.by_size, or None without one."""
    scale = (hw.collective_scale or {}).get(kind)
    if scale is None or not scale.by_size:
        return None
    return np.log([p.size for p in scale.by_size]), np.array([p.factor for p in scale.by_size])


def size_factor(curve: tuple[np.ndarray, np.ndarray] | None, buffer_bytes: np.ndarray | float) -> np.ndarray | float:
    """Measured time over the alpha-beta fit at `buffer_bytes` on a `size_curve`: linear in
    log(size) between the calibrated points, held beyond them; 1 without a curve."""
    if curve is None:
        return 1.0
    return np.interp(np.log(np.maximum(buffer_bytes, 1.0)), *curve)


def alpha_beta(hw: HardwareProfile, kind: str, n: np.ndarray | int, link: LinkChoice) -> tuple:
    """(wire share, alpha seconds, seconds per buffer byte) of one `kind` op over n devices
    on `link`, with the kind's calibrated scale: op time = alpha + buffer_bytes * beta,
    before the kind's size_factor."""
    share = wire_factor(kind, n)
    lat, bw = kind_scale(hw, kind)
    return share, ring_steps(kind, n) * (link.latency * lat), share / (link.bandwidth * bw)


def op_seconds(hw: HardwareProfile, kind: str, n: int, buffer_bytes: float) -> float:
    """Predicted seconds of one `kind` op over n devices inside a switched scale-up domain
    (a torus's extra links not counted), with `buffer_bytes` per device (traffic.py's
    convention): what comm_totals charges each such op."""
    _, alpha, beta = alpha_beta(hw, kind, n, LinkChoice(np.float64(hw.scale_up.bandwidth), np.float64(hw.scale_up.latency)))
    return float((alpha + buffer_bytes * beta) * size_factor(size_curve(hw, kind), buffer_bytes))


def entry_key(c: Collective) -> str:
    """Unique, readable name of a traffic entry, e.g. 'all-reduce: non-expert gradients'."""
    return f"{c.kind}: {c.name}"


@dataclass
class CommTotals:
    """Seconds per step by term and by traffic entry, and wire bytes per device by kind."""

    seconds_by_term: dict[str, np.ndarray]
    seconds_by_entry: dict[str, np.ndarray]
    bytes_by_kind: dict[str, np.ndarray]


def comm_totals(
    collectives: list[Collective], plans: Plans, hw: HardwareProfile, per_entry: bool = True
) -> CommTotals:
    """Time and bytes of every entry: count * (steps * alpha + wire_bytes / beta) with the
    link's alpha and beta scaled by `kind_scale`, times the kind's `size_factor` at the
    entry's buffer size, and the same bytes as
    `traffic.bytes_by_kind`, with the per-group factors computed once per (axes, kind)
    because the search calls this on up to 10^6 plans. `per_entry=False` skips
    seconds_by_entry (left empty)."""
    n = len(plans)
    links: dict[tuple[str, ...], tuple[np.ndarray, LinkChoice]] = {}
    devices = plans.data * plans.expert * plans.model
    factors: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    curves = {k: size_curve(hw, k) for k in KINDS}
    by_term = {t: np.zeros(n) for t in TERMS}
    by_entry: dict[str, np.ndarray] = {}
    by_kind = {k: np.zeros(n) for k in KINDS}
    for c in collectives:
        name = entry_key(c)
        if not np.any(c.count):
            if per_entry:
                by_entry.setdefault(name, np.zeros(n))
            continue
        if c.axes not in links:
            links[c.axes] = (c.group_size(plans), group_link(c.axes, plans, hw, devices))
        size, link = links[c.axes]
        key = (c.axes, c.kind)
        if key not in factors:
            factors[key] = alpha_beta(hw, c.kind, size, link)
        share, alpha, beta = factors[key]
        moved = c.count * c.buffer_bytes
        s = c.count * alpha + moved * beta
        if curves[c.kind] is not None:
            s = s * size_factor(curves[c.kind], c.buffer_bytes)
        by_term[c.term] += s
        by_kind[c.kind] += moved * share
        if per_entry:
            by_entry[name] = by_entry[name] + s if name in by_entry else s
    return CommTotals(by_term, by_entry, by_kind)
