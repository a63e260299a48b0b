"""Measure a hardware profile from micro-benchmarks on the devices in hand.

Honesty rule (DESIGN.md): a profile is fitted to matmuls, copies and single collectives,
never to the training steps `moeplan profile` later judges it on. Each benchmark runs on
*all* devices at once (every device does its own matmul, copy or collective), because that
is how the step runs: simulated CPU devices share the host's cores, real ones share a host
link, and a figure taken on one idle device would be optimistic for both.

What each number is (also written into the YAML's header):
- peak_flops: the best per-device rate over a sweep of batched [m,k]x[k,n] matmuls in the
  compute dtype, each run forward and backward as a training step runs it (input and weight
  gradients: 3 x 2mkn FLOPs). It is an *achieved* peak, so matmul_efficiency is 1.0; the
  whole sweep is kept under `measured.matmul`.
- matmul_curve: each size's rate over that peak (sizes down to 64 x 16 x 64, the attention
  scores of a small model), so the cost model times a small product at the rate such
  products actually reach instead of at the peak of large ones.
- matmul_rows_curve: forward + backward of [rows, 256] x [256, 1024] products for 8-512 rows
  (the tokens one expert holds), each rate over the peak: an expert with few tokens runs
  skinny products far below the size curve's square ones of equal FLOPs.
- hbm_bandwidth: the harmonic mean of the per-device rates of an elementwise x+1 (bytes read
  + written) over the buffers of 4 to 64 MiB whose output did not page-fault, i.e. the rate
  at which equal bytes through each such size would stream. memory_efficiency is 1.0
  because it is an achieved rate.
- host_memory (CPU devices): every copy counts its page faults (getrusage). glibc maps
  outputs over its 32 MiB mmap threshold afresh, so those copies fault their whole output
  every call; first_touch_bandwidth is their extra faulted bytes over their extra time
  against the in-place copy of the same size, and the cost model charges it on the step's
  scratch block (cost/first_touch.py). Before this split the mean went over all five sizes
  and charged every memory-bound kernel a share of the faults. all_reduce_out_of_place: the
  scratch XLA plans for one all-reduce of gradients made in the program.
  keeps_autodiff_residuals: the scratch XLA plans for the gradient of 1 and of 3 stacked
  gated-FFN layers; per layer 5.06 hidden-size buffers on CPU (every residual JAX saves)
  against 3 in the fused count, so memory and first-touch count the unfused residuals.
- scale_up / scale_out links: alpha (latency per step) and bandwidth fitted by least
  squares to time = steps*alpha + wire_bytes/bandwidth over all four collective kinds,
  several group sizes and buffer sizes (Hockney's alpha-beta model; steps and wire bytes
  in the cost model's own conventions: collectives.ring_steps, traffic.wire_factor).
  With several processes, groups inside one process give scale_up and groups across
  processes scale_out; in one process there is one link and scale_out repeats it.
- collective_scale: each collective kind's own alpha-beta fit (same points, one kind) over
  the joint one, so an all-to-all is timed at the rate all-to-alls reach on these devices.
- overlap: one program with a matmul and an independent all-reduce of similar length
  against the two alone: overlap = (t_mm + t_ar - t_both) / min(t_mm, t_ar), clipped to
  [0, 1], the cost model's definition (cost/step.py overlap_bounds).
- hbm_bytes: the device's memory limit, or for host devices the host RAM split evenly
  between the simulated devices of one process.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeplan.cost.collectives import ring_steps
from moeplan.cost.traffic import KINDS, wire_factor
from moeplan.errors import MoeplanError
from moeplan.files import write_text_atomic
from moeplan.validate import host_allocator

MARKER = "# moeplan-calibrate: measured hardware profile"
TASK = "moeplan.validate.calibrate:calibrate_task"
MIB = 2**20



@dataclass(frozen=True)
class Sweep:
    """Which sizes the micro-benchmarks try (fixed in advance, never adapted to timings)."""

    matmul_shapes: tuple[tuple[int, int, int], ...]
    """(m, k, n) per device: square ones find the peak, skinny ones (like the per-expert and
    projection matmuls of small MoE blocks) trace the efficiency curve."""
    copy_bytes: tuple[int, ...]
    """Bytes per device of the x+1 copy, in powers of two on both sides of glibc's 32 MiB
    mmap threshold (8 CPU devices: 32-512 MiB in all): the sizes under it give hbm_bandwidth,
    those over it the first-touch rate (host_memory)."""
    collective_bytes: tuple[int, ...]
    """Buffer bytes per collective (traffic.py convention), from latency-bound messages up to
    the size of a small model's gradient all-reduce (small-moe's is 60 MB; on CPU the largest
    pay page faults on their fresh outputs, which the fits leave out: `without_faults`)."""
    matmul_rows: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    """Row counts of the expert-product probe (microbench.matmul_rows): tokens per expert."""
    repeat: int = 4
    """Collectives chained in one program, so the program launch is spread over them."""
    repeat_below: int = 1 * MIB
    """Only buffers smaller than this are chained; a larger op dwarfs the launch anyway."""
    matmul_flops_per_call: float = 2e8
    """FLOPs per device per timed call; small shapes are batched up to it."""
    all_groups: bool = True
    """Every divisor of the device count as a group size, or only the smallest and largest."""


FULL = Sweep(
    matmul_shapes=((32, 32, 32), (64, 16, 64), (64, 64, 64), (128, 128, 32), (16, 128, 256),
                   (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
                   (256, 128, 512), (1024, 256, 1024), (64, 256, 1024)),
    copy_bytes=(4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB),
    collective_bytes=(16 * 1024, 256 * 1024, 4 * MIB, 32 * MIB, 64 * MIB),
)
# A smoke test of the machinery (tests, `calibrate --quick`): a few points, figures to distrust
# as a profile. Its matmul and copy are timed exactly as FULL's same points, so a quick run
# later tells how far the host has drifted since a full one (benchmarks/bench_accuracy.py).
QUICK = Sweep(matmul_shapes=((256, 256, 256),), copy_bytes=(4 * MIB,),
              collective_bytes=(16 * 1024, 1 * MIB), matmul_rows=(16, 512), repeat=2, all_groups=False)


# ---- fitting (pure numpy, tested on synthetic timings) ------------------------------------


@dataclass(frozen=True)
class LinkFit:
    """alpha-beta fit of one link: seconds per step, bytes per second, quality."""

    latency: float
    bandwidth: float
    rms_rel_residual: float
    points: int

    def record(self) -> dict:
        return {"latency_s": self.latency, "bandwidth_Bps": self.bandwidth,
                "rms_rel_residual": self.rms_rel_residual, "points": self.points}


def fit_alpha_beta(steps: np.ndarray, wire_bytes: np.ndarray, times: np.ndarray) -> LinkFit:
    """Least squares for time = steps*alpha + wire_bytes*beta with alpha, beta >= 0.

    Each equation is divided by its measured time, so the fit minimises *relative* error:
    a 20 us small message weighs as much as a 20 ms large one (unweighted, the large ones
    alone would set alpha). Non-negativity: if the free fit gives a negative coefficient,
    that term is dropped and the other refitted (the 2-variable case of Lawson & Hanson's
    NNLS, "Solving Least Squares Problems", 1974, ch. 23).
    """
    steps, wire, t = (np.asarray(a, dtype=np.float64) for a in (steps, wire_bytes, times))
    if len(t) < 2 or np.any(t <= 0):
        raise ValueError("need at least two positive timings to fit alpha and beta")
    a = np.stack([steps / t, wire / t], axis=1)
    b = np.ones_like(t)
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    if coef[0] < 0 or coef[1] <= 0:
        coef = _one_term_fit(a, b)
    resid = a @ coef - b
    beta = coef[1]
    return LinkFit(
        latency=float(coef[0]),
        bandwidth=float(1 / beta) if beta > 0 else math.inf,
        rms_rel_residual=float(np.sqrt(np.mean(resid**2))),
        points=len(t),
    )


def _one_term_fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Best fit using alpha alone or beta alone (non-negative), whichever fits better."""
    best, best_err = np.zeros(2), math.inf
    for j in (0, 1):
        col = a[:, j]
        denom = col @ col
        c = max(0.0, (col @ b) / denom) if denom > 0 else 0.0
        coef = np.zeros(2)
        coef[j] = c
        err = float(np.sum((a @ coef - b) ** 2))
        if err < best_err and (j == 0 or c > 0):
            best, best_err = coef, err
    return best


def fit_link(points: list[dict]) -> LinkFit:
    """Fit one link from collective points (dicts with steps, wire_bytes, time_s)."""
    return fit_alpha_beta(
        np.array([p["steps"] for p in points]),
        np.array([p["wire_bytes"] for p in points]),
        np.array([p["time_s"] for p in points]),
    )


def overlap_fraction(t_a: float, t_b: float, t_both: float) -> float:
    """Share of the shorter op hidden under the other, clipped to [0, 1] (cost/step.py)."""
    hidden = (t_a + t_b - t_both) / min(t_a, t_b)
    return float(min(1.0, max(0.0, hidden)))


def matmul_curve(points: list[dict]) -> list[dict]:
    """Achieved fraction of the peak per matmul size (2mkn FLOPs), sizes ascending.

    Shapes of equal size (a square and two skinny products of 2^25 FLOPs, say) are averaged:
    the cost model keys the curve on size alone, and the step's products at one size come
    in several shapes too.
    """
    peak = max(p["flops_per_s"] for p in points)
    by_size: dict[float, list[float]] = {}
    for p in points:
        by_size.setdefault(2.0 * p["m"] * p["k"] * p["n"], []).append(p["flops_per_s"])
    return [{"size": size, "efficiency": float(np.mean(rates)) / peak} for size, rates in sorted(by_size.items())]


def matmul_rows_curve(points: list[dict], peak: float) -> list[dict]:
    """Achieved fraction of the peak per expert row count, rows ascending (rows probe)."""
    return [{"rows": float(p["rows"]), "efficiency": min(1.0, p["flops_per_s"] / peak)}
            for p in sorted(points, key=lambda p: p["rows"])]


def copy_bandwidth(points: list[dict]) -> float:
    """Harmonic mean of the copy rates: equal bytes through every buffer size (module doc)."""
    rates = [p["bytes_per_s"] for p in points]
    return len(rates) / sum(1.0 / r for r in rates)


FAULTED_SHARE = 0.5
"""A copy that page-faulted at least this share of its output was served fresh pages (over
the allocator's map threshold); one below it reused recycled memory."""


def faulted(point: dict) -> bool:
    """Whether a copy point's output came as fresh pages (see FAULTED_SHARE)."""
    return (point.get("fault_bytes") or 0.0) >= FAULTED_SHARE * point["bytes_per_device"]


def first_touch_bandwidth(copies: list[dict], in_place: list[dict]) -> float | None:
    """Bytes/s per device of first-touching fresh pages (HostMemory.first_touch_bandwidth).

    For each buffer size whose fresh copy faulted its output (`faulted`), the extra bytes it
    faulted over the in-place copy of the same size, divided by the extra time it took; the
    median over those sizes. None where no size faulted or the fresh copy was not slower
    (accelerators, or a host allocator that recycles large buffers).
    """
    donated = {p["bytes_per_device"]: p for p in in_place}
    rates = []
    for p in copies:
        q = donated.get(p["bytes_per_device"])
        if q is None or not faulted(p):
            continue
        extra_bytes = p["fault_bytes"] - (q.get("fault_bytes") or 0.0)
        extra_s = p["time_s"] - q["time_s"]
        if extra_bytes > 0 and extra_s > 0:
            rates.append(extra_bytes / extra_s)
    return float(np.median(rates)) if rates else None


def stream_copies(copies: list[dict], priced: bool) -> list[dict]:
    """The copies hbm_bandwidth is taken over: those that did not fault when first touch is
    priced on its own (their faults are then HostMemory's term, and a step's kernels write
    into recycled scratch like these copies); all of them otherwise."""
    kept = [p for p in copies if not faulted(p)] if priced else []
    return kept or copies


def stream_bandwidth(copies: list[dict], first_touch: float | None) -> float:
    """hbm_bandwidth: the harmonic mean of the rates of `stream_copies`."""
    return copy_bandwidth(stream_copies(copies, bool(first_touch)))


MIN_LEFT = 0.1
"""Floor of a time after its faults are taken out, as a share of the measured time (noise
can make the estimated fault time exceed the measurement)."""


def time_without_faults(point: dict, first_touch: float) -> float:
    """A micro-benchmark's time less the time of the pages it faulted (fault_bytes / rate)."""
    paged = (point.get("fault_bytes") or 0.0) / first_touch
    return max(point["time_s"] - paged, MIN_LEFT * point["time_s"])


def without_faults(points: list[dict], first_touch: float | None) -> list[dict]:
    """Collective points with the time of the pages they faulted taken out.

    Why: a 32 MiB collective's output is fresh pages on CPU devices, and that cost belongs
    to the step's scratch block (cost/first_touch.py), which holds its collectives' outputs;
    left in the fits it would be paid twice.
    """
    if not first_touch:
        return points
    return [{**p, "time_s": time_without_faults(p, first_touch)} for p in points]


def host_memory(raw: dict, in_place: list[dict]) -> dict | None:
    """HardwareProfile.host_memory from the copies and the all-reduce scratch probe: CPU
    devices whose fresh copies paid page faults; None for accelerators."""
    if raw["device"]["platform"] != "cpu":
        return None
    rate = first_touch_bandwidth(raw["copy"], in_place)
    if rate is None:
        return None
    probe = raw.get("reduce_scratch") or {}
    out = {"first_touch_bandwidth": rate, "map_threshold_bytes": float(MAP_THRESHOLD)}
    if probe.get("buffer_bytes"):
        out["all_reduce_out_of_place"] = bool(probe["temp_bytes"] >= 1.5 * probe["buffer_bytes"])
    kept = residuals_per_layer(raw)
    if kept is not None:
        out["keeps_autodiff_residuals"] = kept >= UNFUSED_CUT
    return out


def residuals_per_layer(raw: dict) -> float | None:
    """Hidden-size buffers XLA keeps per gated-FFN layer (the residual_scratch probe)."""
    probe = raw.get("residual_scratch") or {}
    return probe["temp_per_layer_bytes"] / probe["hidden_bytes"] if probe.get("hidden_bytes") else None


UNFUSED_CUT = 4.0
"""Between the 3 hidden buffers a layer the fused count keeps (cost/memory.py) and the 5 JAX's
autodiff saves: a probe at or over it marks a runtime that keeps every residual."""

MAP_THRESHOLD = host_allocator.MAP_THRESHOLD_BYTES
"""Requests this large always get fresh pages: glibc's largest mmap threshold on 64-bit
hosts, which the simulated devices' allocator is pinned to (validate/host_allocator.py)."""


def collective_scale(joint: LinkFit, per_kind: dict[str, dict],
                     by_size: dict[str, list[dict]] | None = None) -> dict[str, dict]:
    """Each kind's own alpha and beta over the joint fit's, for HardwareProfile.collective_scale,
    with its time-by-size factors (`size_factors`) where given.

    Why: the joint fit averages kinds that use a link differently. On 8 CPU devices the
    all-to-all's own fit reached 0.34-0.43 of the joint bandwidth in eight calibrations and
    the all-reduce 1.04-1.15, so one (alpha, beta) under-costs every expert-parallel mesh.
    A kind whose own fit dropped alpha (latency 0) gets latency scale 0; a joint alpha of 0
    leaves every latency scale at 1.
    """
    out: dict[str, dict] = {}
    if not math.isfinite(joint.bandwidth):
        return out
    for kind, fit in per_kind.items():
        if not math.isfinite(fit["bandwidth_Bps"]):
            continue  # a latency-only fit says nothing about this kind's bandwidth
        lat = fit["latency_s"] / joint.latency if joint.latency > 0 else 1.0
        out[kind] = {"latency": float(lat), "bandwidth": float(fit["bandwidth_Bps"] / joint.bandwidth)}
        if (by_size or {}).get(kind):
            out[kind]["by_size"] = by_size[kind]
    return out


def size_factors(points: list[dict], per_kind: dict[str, dict]) -> dict[str, list[dict]]:
    """Per kind: measured time over the kind's own alpha-beta fit at each buffer size, the
    geometric mean over group sizes (HardwareProfile KindScale.by_size).

    Why: one straight line in bytes cannot hold a host whose large collectives are slower
    per byte than its small ones. On 8 CPU devices a 32 MiB all-reduce also pays
    first-touch page faults on its fresh output and measured 2-4x its fit, and a step's
    gradient all-reduce is that large; the relative-error fit splits the difference with
    the small sizes. Only the scale_up points are used (the curve applies to both links).
    """
    out: dict[str, list[dict]] = {}
    for kind, fit in per_kind.items():
        if not math.isfinite(fit["bandwidth_Bps"]):
            continue
        logs: dict[float, list[float]] = {}
        for p in points:
            if p["kind"] != kind or p["link"] != "scale_up":
                continue
            fitted = p["steps"] * fit["latency_s"] + p["wire_bytes"] / fit["bandwidth_Bps"]
            if fitted > 0 and p["time_s"] > 0:
                logs.setdefault(float(p["buffer_bytes"]), []).append(math.log(p["time_s"] / fitted))
        if logs:
            out[kind] = [{"size": size, "factor": float(math.exp(np.mean(v)))} for size, v in sorted(logs.items())]
    return out


def fit_profile(raw: dict, *, name: str) -> dict:
    """The HardwareProfile fields (a plain dict) from the raw measurements of `calibrate_task`."""
    dev = raw["device"]
    in_place = raw.get("copy_in_place") or []
    host = host_memory(raw, in_place)
    first_touch = host["first_touch_bandwidth"] if host else None
    collectives = without_faults(raw["collectives"], first_touch)
    links = {}
    for link in ("scale_up", "scale_out"):
        pts = [p for p in collectives if p["link"] == link]
        if pts:
            links[link] = fit_link(pts)
    if "scale_up" not in links:
        raise MoeplanError("calibration needs at least 2 devices to measure collectives")
    out_link = links.get("scale_out", links["scale_up"])
    per_kind = {k: fit_link(pts).record() for k in KINDS
                if len(pts := [p for p in collectives if p["kind"] == k and p["link"] == "scale_up"]) >= 2}
    ov = raw["overlap"]
    scale = collective_scale(links["scale_up"], per_kind, size_factors(collectives, per_kind))
    peak = max(p["flops_per_s"] for p in raw["matmul"])
    return {
        "name": name,
        "peak_flops": peak,
        "matmul_efficiency": 1.0,
        "matmul_curve": matmul_curve(raw["matmul"]),
        **({"matmul_rows_curve": matmul_rows_curve(raw["matmul_rows"], peak)} if raw.get("matmul_rows") else {}),
        "hbm_bytes": float(dev["memory_bytes"]),
        "hbm_bandwidth": stream_bandwidth(raw["copy"], first_touch),
        "memory_efficiency": 1.0,
        **({"inplace_bandwidth": copy_bandwidth(in_place)} if in_place else {}),
        "scale_up": {"bandwidth": links["scale_up"].bandwidth, "latency": links["scale_up"].latency},
        "scale_up_size": dev["count"] // dev["processes"] if "scale_out" in links else dev["count"],
        "scale_out": {"bandwidth": out_link.bandwidth, "latency": out_link.latency},
        "topology": "switch",
        "overlap": overlap_fraction(ov["matmul_s"], ov["all_reduce_s"], ov["both_s"]),
        **({"collective_scale": scale} if scale else {}),
        **({"host_memory": host} if host else {}),
        "source": (
            f"measured by `moeplan calibrate` on {dev['count']} {dev['platform']} devices "
            f"({dev['kind']}) in {dev['processes']} process(es), jax {dev['jax']}, {raw['date']}; "
            "micro-benchmarks only (matmuls, copies, single collectives), see docs/validation.md"
        ),
        "measured": {
            "tool": "moeplan calibrate",
            "date": raw["date"],
            "device": dev,
            "dtype": raw["dtype"],
            "sweep": raw.get("sweep", "full"),
            "links": {k: v.record() for k, v in links.items()},
            "collective_fit_by_kind": per_kind,
            "matmul": raw["matmul"],
            "matmul_rows": raw.get("matmul_rows"),
            "copy": raw["copy"],
            "copy_in_place": in_place,
            "collectives": raw["collectives"],
            "overlap": ov,
            "reduce_scratch": raw.get("reduce_scratch"),
            "residual_scratch": raw.get("residual_scratch"),
        },
    }


CLIFF_SPREAD = 1.5
"""Copy rates further apart than this across the sweep's buffer sizes mean the buffers
straddle a cliff of the host's memory system. On CPU devices that cliff is the allocator:
glibc serves buffers under its 32 MiB mmap-threshold ceiling from a recycled heap but maps
larger ones afresh, so each call pays first-touch page faults (measured on one host: 1.7-2.9
GB/s at 4-16 MiB against 0.9-1.2 GB/s at 32-64 MiB, while an in-place (donated) copy streams
4-5 GB/s at every size; docs/validation.md). Where the copies' page faults were counted and
priced, the sizes that faulted their output are left out and the others' rates are judged
with their own (partial) fault time taken out: what is left is a cliff faults do not explain."""


def calibration_warnings(measured: dict | None) -> list[str]:
    """What a user should know before trusting a profile's memory-bound predictions, from its
    calibration record (`measured`; None for vendor presets: nothing to say)."""
    measured = measured or {}
    ft = first_touch_bandwidth(measured.get("copy", []), measured.get("copy_in_place") or [])
    copies = [p for p in measured.get("copy", []) if not (ft and faulted(p))]
    rates = [2 * p["bytes_per_device"] / time_without_faults(p, ft) if ft else p["bytes_per_s"] for p in copies]
    if len(rates) < 2 or min(rates) <= 0:
        return []
    spread = max(rates) / min(rates)
    if spread <= CLIFF_SPREAD:
        return []
    sizes = ", ".join(f"{p['bytes_per_device'] / MIB:g} MiB: {r / 1e9:.2f} GB/s" for p, r in zip(copies, rates))
    return [f"copy rate differs {spread:.2f}x across buffer sizes ({sizes} per device): this host's memory "
            "system has a cliff between them that page faults do not explain; hbm_bandwidth is their "
            "harmonic mean, so memory-bound step times depend on which side a step's buffers fall"]


# ---- writing the profile ------------------------------------------------------------------


def header(profile: dict) -> str:
    """Comment block above the YAML: the marker, provenance, and how each number was made."""
    m = profile["measured"]
    dev = m["device"]
    up = m["links"]["scale_up"]
    priced = "host_memory" in profile
    copies = stream_copies(m["copy"], priced)
    lines = [
        MARKER,
        f"# date: {m['date']}   jax {dev['jax']}   device: {dev['kind']} ({dev['platform']}) "
        f"x{dev['count']} in {dev['processes']} process(es)   dtype: {m['dtype']}",
        "# peak_flops: best per-device rate of batched matmuls run forward + backward, all devices at once "
        "(achieved peak; matmul_efficiency 1.0); matmul_curve: mean rate per size / peak",
        *(["# matmul_rows_curve: forward + backward rate of [rows, 256] x [256, 1024] per row count / peak "
           "(an expert's tokens; the expert FFN takes the lower of the two curves)"] if m.get("matmul_rows") else []),
        "# hbm_bandwidth: harmonic mean of the per-device rates of x+1 over buffers of "
        + ", ".join(f"{p['bytes_per_device'] // MIB} MiB" for p in copies) + " (read + write bytes)"
        + ("; the sizes that page-faulted their output are priced by host_memory" if priced else ""),
        "# inplace_bandwidth: the same for x = x + 1 with x donated (output written over the input)",
        *(["# host_memory: first_touch_bandwidth = extra bytes page-faulted (getrusage) over extra time of "
           "the fresh x+1 against the in-place one, at the sizes that faulted; collectives' fits exclude "
           "their faults; all_reduce_out_of_place from the scratch XLA plans for one all-reduce; "
           "keeps_autodiff_residuals when XLA's scratch for a stack of gated FFN layers grows by "
           f"{UNFUSED_CUT:g}+ hidden buffers a layer (this host: {residuals_per_layer(m) or 0:.2f})"] if priced else []),
        "# scale_up/scale_out: least-squares alpha-beta fit, time = ring_steps*latency + "
        f"wire_bytes/bandwidth, over {', '.join(KINDS)} (rms relative residual "
        f"{up['rms_rel_residual']:.2f} on {up['points']} points)",
        "# collective_scale: each kind's own alpha-beta fit over the joint one; by_size: measured time "
        "over that fit per buffer size (geometric mean over group sizes)",
        "# overlap: matmul + independent all-reduce in one program vs each alone",
        "# hbm_bytes: device memory limit (host devices: host RAM / devices per process)",
        "# Refreshed by `moeplan calibrate`; remove the first line to keep your edits from being overwritten.",
    ]
    return "\n".join(lines) + "\n"


def written_by_calibrate(path: Path) -> bool:
    """Whether `path` starts with calibrate's marker line (so refreshing it loses nothing)."""
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") == MARKER
    except OSError:
        return False


def write_profile(path: str | Path, profile: dict, *, force: bool = False) -> Path:
    """Write the profile YAML atomically; never replace a user's file unless `force`."""
    import yaml

    from moeplan.output import jsonable

    path = check_writable(path, force=force)
    body = yaml.safe_dump(jsonable(profile), sort_keys=False, default_flow_style=False, width=100)
    write_text_atomic(path, header(profile) + body)
    return path


def check_writable(path: str | Path, *, force: bool = False) -> Path:
    """`path`, unless it holds a file the user wrote (no marker) and `force` is not set."""
    path = Path(path)
    if path.is_dir():
        raise MoeplanError(f"{path} is a directory; give a file name such as {path / 'local-cpu.yaml'}")
    if path.exists() and not force and not written_by_calibrate(path):
        raise MoeplanError(f"{path} exists and was not written by moeplan calibrate; use --force to replace it")
    return path


def cache_dir() -> Path:
    """Where `profile` keeps calibrations: $MOEPLAN_CACHE, else $XDG_CACHE_HOME/moeplan."""
    if env := os.environ.get("MOEPLAN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeplan"


def cache_path(kind: str, devices: int, processes: int, dtype: str, jax_version: str) -> Path:
    """One cached profile per device kind, count, process count, dtype and jax version."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in kind.lower())
    return cache_dir() / "hardware" / f"{slug}-{devices}dev-{processes}proc-{dtype}-jax{jax_version}.yaml"


# ---- the benchmarks (jax; run on the devices by moeplan.validate.devices) ------------------


def calibrate_task(payload: dict, devices: list, emit: Callable[[dict], None]) -> None:
    """Run every micro-benchmark on `devices` and emit the raw results (event 'calibration')."""
    from moeplan.validate import microbench as mb

    dtype = payload.get("dtype", "float32")
    steps, warmup = int(payload.get("steps", 5)), int(payload.get("warmup", 2))
    sweep = QUICK if payload.get("quick") else FULL
    plan = mb.Bench(devices=devices, dtype=dtype, steps=steps, warmup=warmup, sweep=sweep)
    jobs = mb.job_list(plan)
    emit({"event": "start", "total": len(jobs)})
    raw: dict[str, Any] = {"matmul": [], "copy": [], "copy_in_place": [], "collectives": [], "overlap": {}}
    for i, (section, label, job) in enumerate(jobs):
        emit({"event": "progress", "done": i, "label": label})
        result = job()
        if section in ("overlap", "reduce_scratch", "residual_scratch"):
            raw[section] = result
        elif section in ("matmul", "matmul_rows"):
            raw.setdefault(section, []).extend(result)  # each sweep times its shapes in interleaved rounds
        else:
            raw[section].append(result)
    raw["device"] = mb.describe(devices)
    raw["dtype"] = dtype
    raw["sweep"] = "quick" if payload.get("quick") else "full"
    raw["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    emit({"event": "progress", "done": len(jobs), "label": "done"})
    emit({"event": "calibration", "raw": raw})


def collective_point(kind: str, group: int, link: str, buffer_bytes: int, time_s: float) -> dict:
    """One collective measurement in the cost model's conventions (steps, wire bytes)."""
    return {
        "kind": kind, "group": group, "link": link, "buffer_bytes": buffer_bytes,
        "wire_bytes": float(wire_factor(kind, group) * buffer_bytes),
        "steps": float(ring_steps(kind, group)), "time_s": time_s,
    }


# ---- orchestration ------------------------------------------------------------------------


def run_calibration(
    *, devices: int, processes: int = 1, dtype: str = "float32", cluster: bool = False,
    steps: int = 5, warmup: int = 2, quick: bool = False, on_event: Callable[[dict], None] | None = None,
) -> dict:
    """Benchmark `devices` devices (see devices.run) and fit a profile; returns its fields."""
    from moeplan.validate import devices as dev

    raw: dict = {}

    def handle(event: dict) -> None:
        if event.get("event") == "calibration":
            raw.update(event["raw"])
        elif on_event:
            on_event(event)

    payload = {"dtype": dtype, "steps": steps, "warmup": warmup, "quick": quick}
    dev.run(TASK, payload, devices=devices, processes=processes, cluster=cluster, on_event=handle)
    if not raw:
        raise MoeplanError("calibration returned no measurements")
    d = raw["device"]
    return fit_profile(raw, name=f"{d['kind']} x{d['count']} (calibrated)")
