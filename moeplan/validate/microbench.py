"""The micro-benchmarks behind `moeplan calibrate`: matmuls, copies, single collectives.

Why separate from calibrate.py: this is the part that needs jax and devices; the fitting and
the YAML writing next door are pure and tested without them.

Every benchmark is one `shard_map` program over *all* devices, each doing its own share, so
the devices contend for the host's cores, memory and links exactly as in a training step.
Small operations are repeated inside one program (a batch of matmuls, a chain of
collectives) so that the launch overhead of a program is spread over many of them. A
collective chain is checked in the compiled HLO: the time is divided by the number of ops
XLA actually kept, not by the number asked for.

All choices are fixed in advance (never adapted to a measured time), because with several
processes every process must run the very same sequence of programs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from moeplan.validate import calibrate as cal
from moeplan.validate.timing import median, time_steps

Job = tuple[str, str, Callable[[], Any]]


@dataclass(frozen=True)
class Bench:
    """Where and how to benchmark: the devices (all of them take part), dtype, repetitions."""

    devices: list
    dtype: str = "float32"
    steps: int = 5
    warmup: int = 2
    sweep: cal.Sweep = cal.FULL

    @property
    def processes(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def ordered(self) -> np.ndarray:
        """Devices as a (processes, local) array: process-major, then by id."""
        devs = sorted(self.devices, key=lambda d: (d.process_index, d.id))
        return np.array(devs, dtype=object).reshape(self.processes, -1)


def job_list(b: Bench) -> list[Job]:
    """Every benchmark as (section, label, thunk), in a fixed order."""
    jobs: list[Job] = []
    jobs.append(("matmul", f"{len(b.sweep.matmul_shapes)} matmul shapes", partial(matmul_sweep, b)))
    if b.sweep.matmul_rows:
        jobs.append(("matmul_rows", f"{len(b.sweep.matmul_rows)} expert row counts", partial(matmul_rows, b)))
    for section, in_place in (("copy", False), ("copy_in_place", True)):
        for nbytes in b.sweep.copy_bytes:
            label = f"{'in-place ' if in_place else ''}copy {nbytes // cal.MIB} MiB"
            jobs.append((section, label, partial(copy, b, nbytes, in_place)))
    for link, groups in link_groups(b).items():
        for g in groups:
            for kind in cal.KINDS:
                for nbytes in b.sweep.collective_bytes:
                    label = f"{kind} {link} n={g} {nbytes // 1024} KiB"
                    jobs.append(("collectives", label, partial(collective, b, kind, g, link, nbytes)))
    jobs.append(("overlap", "overlap", partial(overlap, b)))
    jobs.append(("reduce_scratch", "all-reduce scratch", partial(reduce_scratch, b)))
    jobs.append(("residual_scratch", "autodiff residuals", partial(residual_scratch, b)))
    return jobs


def link_groups(b: Bench) -> dict[str, list[int]]:
    """Group sizes per link: inside a process (scale_up) and across processes (scale_out)."""
    procs, local = b.ordered.shape
    divisors = lambda n: [g for g in range(2, n + 1) if n % g == 0]  # noqa: E731
    out = {"scale_up": divisors(local)}
    if procs > 1:
        out["scale_out"] = divisors(procs)
    if not b.sweep.all_groups:
        out = {k: sorted({v[0], v[-1]}) for k, v in out.items() if v}
    return {k: v for k, v in out.items() if v}


def group_grid(b: Bench, group: int, link: str) -> np.ndarray:
    """Devices as (rest, group): each row one group, inside one process or across processes."""
    grid = b.ordered
    if link == "scale_out":
        grid = grid.T  # neighbours along a row are then in different processes
    return grid.reshape(-1, group)


def group_mesh(b: Bench, group: int, link: str):
    """A ('rest', 'g') mesh whose 'g' groups are the rows of `group_grid`."""
    from jax.sharding import Mesh

    return Mesh(group_grid(b, group, link), ("rest", "g"))


def flat_mesh(b: Bench):
    from jax.sharding import Mesh

    return Mesh(b.ordered.reshape(-1), ("d",))


def _random(mesh, spec, shape: tuple[int, ...], dtype: str, seed: int):
    """A random array created directly in its sharding (works across processes too)."""
    import jax
    from jax.sharding import NamedSharding

    make = jax.jit(lambda key: jax.random.normal(key, shape, dtype), out_shardings=NamedSharding(mesh, spec))
    return make(jax.random.key(seed))


def _timed(run: Callable[[], Any], b: Bench) -> tuple[float, float | None]:
    """(median seconds, bytes page-faulted per call per device) over the timed calls, warm-up
    excluded: the faults price first touch (calibrate.first_touch_bandwidth) and are taken
    out of the collectives' times (calibrate.without_faults)."""
    from moeplan.validate import page_faults
    from moeplan.validate.timing import block

    for _ in range(b.warmup):
        block(run())
    before = page_faults.minor_faults()
    t = time_steps(run, steps=b.steps, warmup=0).median_s
    return t, page_faults.per_call_bytes(before, page_faults.minor_faults(), b.steps, b.ordered.shape[1])


def itemsize(dtype: str) -> int:
    return int(np.dtype(dtype).itemsize) if dtype != "bfloat16" else 2


def _product_program(b: Bench, m: int, k: int, n: int) -> tuple[Callable[[], Any], int]:
    """(call, batch r): per device, forward and backward of a batched [r,m,k] x [r,k,n]
    product, r chosen so one call does about `matmul_flops_per_call` FLOPs (small shapes are
    batched up to it). Backward is the input gradient [m,n] x [n,k] and the weight gradient
    [k,m] x [m,n]: three products of 2mkn FLOPs each (PRODUCTS_PER_CALL), as every matmul of a
    training step runs (compute.passes: 1 forward + 2 backward). Timed forward-only, the same
    shapes ran 1.0-1.3x as fast (8 CPU devices, 2026-12-02: 512 x 256 x 1024 at 36.3 GFLOP/s
    forward, 32.2 forward + backward), which read the host fast for every matmul class."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh, nd = flat_mesh(b), len(b.devices)
    r = max(1, round(b.sweep.matmul_flops_per_call / (PRODUCTS_PER_CALL * 2 * m * k * n)))
    x = _random(mesh, P("d"), (nd * r, m, k), b.dtype, 0)
    w = _random(mesh, P("d"), (nd * r, k, n), b.dtype, 1)
    loss = lambda x, w: jnp.sum(jnp.einsum("rmk,rkn->rmn", x, w) ** 2)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1))
    fn = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P("d"))))
    return (lambda: fn(x, w)), r


PRODUCTS_PER_CALL = 3  # forward, input gradient, weight gradient


MATMUL_ROUNDS = 7


def matmul_sweep(b: Bench) -> list[dict]:
    """Every shape of the sweep compiled and warmed up first, then timed in MATMUL_ROUNDS
    interleaved rounds of `steps` calls each; a shape's time is the median of its per-round
    medians. Why: timed one after another, single shapes moved 30-60% between calibrations
    an hour apart on a shared 2-core host (128^3 at 9.1-15.9 GFLOP/s, 512^3 at 12.2-20.0),
    and the matmul curve prices every small product of a step; interleaving makes drift hit
    all shapes alike, and more rounds average it."""
    return [{"m": m, "k": k, "n": n, **timing} for (m, k, n), timing in _product_rates(b, b.sweep.matmul_shapes)]


def matmul_rows(b: Bench) -> list[dict]:
    """Forward + backward of [rows, K] x [K, N] products (K x N fixed: ROWS_KN) for each row
    count of the sweep, timed like matmul_sweep. An expert holding few tokens runs exactly
    these skinny products (HardwareProfile.matmul_rows_curve)."""
    k, n = ROWS_KN
    shapes = [(rows, k, n) for rows in b.sweep.matmul_rows]
    return [{"rows": m, "k": k, "n": n, **timing} for (m, k, n), timing in _product_rates(b, shapes)]


ROWS_KN = (256, 1024)  # K x N of the rows probe: an expert's d_model x hidden in the validation shapes


def _product_rates(b: Bench, shapes) -> list[tuple[tuple[int, int, int], dict]]:
    """Each shape's product program (_product_program) warmed up, then all timed in
    MATMUL_ROUNDS interleaved rounds of `steps` calls: per shape its batch, the median of its
    per-round medians and the FLOP rate that gives."""
    shapes = list(shapes)
    programs = [_product_program(b, m, k, n) for m, k, n in shapes]
    for run, _ in programs:
        time_steps(run, steps=1, warmup=b.warmup)
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(MATMUL_ROUNDS):
        for i, (run, _) in enumerate(programs):
            times[i].append(time_steps(run, steps=b.steps, warmup=0).median_s)
    out = []
    for (m, k, n), (_, r), ts in zip(shapes, programs, times):
        t = median(ts)
        out.append(((m, k, n), {"batch": r, "time_s": t, "flops_per_s": PRODUCTS_PER_CALL * 2 * r * m * k * n / t}))
    return out


def copy(b: Bench, nbytes: int, in_place: bool = False) -> dict:
    """Per-device y = x + 1 over `nbytes`; rate = (read + write bytes) / time.

    `in_place`: x is donated, so its buffer takes the output, as the optimizer's update of
    the donated training state does (no fresh output buffer, hence no first-touch faults).
    """
    import jax
    from jax.sharding import PartitionSpec as P

    mesh, nd = flat_mesh(b), len(b.devices)
    x = _random(mesh, P("d"), (nd * (nbytes // itemsize(b.dtype)),), b.dtype, 2)
    fn = jax.jit(jax.shard_map(lambda x: x + 1, mesh=mesh, in_specs=P("d"), out_specs=P("d")),
                 donate_argnums=0 if in_place else ())
    box = [x]

    def run():
        out = fn(box[0])
        if in_place:
            box[0] = out  # the donated input is gone: feed the output back
        return out

    t, faulted = _timed(run, b)
    return {"bytes_per_device": nbytes, "time_s": t, "bytes_per_s": 2 * nbytes / t, "fault_bytes": faulted}


def _chain(kind: str, repeat: int, x):
    """`repeat` collectives of `kind` over axis 'g', each fed by the previous one's result.

    Buffers follow traffic.py: all-reduce and all-to-all move the local buffer, all-gather
    produces it (input is 1/g of it), reduce-scatter consumes it. Shapes are restored by a
    static slice (all-gather) or an in-place update (reduce-scatter), both small.
    """
    import jax
    from jax import lax

    for _ in range(repeat):
        if kind == "all-reduce":
            x = lax.psum(x, "g")
        elif kind == "all-to-all":
            x = lax.all_to_all(x, "g", 0, 0, tiled=True)
        elif kind == "all-gather":
            x = lax.all_gather(x, "g", tiled=True)[: x.shape[0]]
        elif kind == "reduce-scatter":
            x = lax.dynamic_update_slice(x, lax.psum_scatter(x, "g", tiled=True), (0,))
        else:
            raise ValueError(kind)
    return jax.numpy.sum(x[:1]) + x[:1]  # keep every op live without a large output


def hlo_count(text: str, kind: str) -> int:
    """How many `kind` ops (sync or async start) the compiled HLO text contains."""
    return len(re.findall(rf"\s{kind}(?:-start)?\(", text))


def collective(b: Bench, kind: str, group: int, link: str, nbytes: int) -> dict:
    """Time one op of `kind` over groups of `group` devices with a buffer of `nbytes`."""
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = group_mesh(b, group, link)
    rest = mesh.shape["rest"]
    elems = max(group, nbytes // itemsize(b.dtype) // group * group)
    local = elems // group if kind == "all-gather" else elems
    x = _random(mesh, P(("rest", "g")), (rest * group * local,), b.dtype, 3)
    body = partial(_chain, kind, b.sweep.repeat if nbytes < b.sweep.repeat_below else 1)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(("rest", "g")), out_specs=P(("rest", "g")),
                               check_vma=False))
    ops = max(hlo_count(fn.lower(x).compile().as_text(), kind), 1)
    t, faulted = _timed(lambda: fn(x), b)
    point = cal.collective_point(kind, group, link, elems * itemsize(b.dtype), t / ops)
    point["ops_in_hlo"] = ops
    point["fault_bytes"] = None if faulted is None else faulted / ops
    return point


def reduce_scratch(b: Bench) -> dict:
    """Compile (not run) the step's gradient pattern at 8 MiB per device: gradients made
    in the program, all-reduced, added into the donated state. XLA's scratch for it is one
    buffer if the all-reduce works in place and two if it writes a new output (the CPU
    runtime does: HostMemory.all_reduce_out_of_place)."""
    import jax
    from jax.sharding import PartitionSpec as P

    mesh, nd, nbytes = flat_mesh(b), len(b.devices), 8 * cal.MIB
    x = _random(mesh, P("d"), (nd * (nbytes // itemsize(b.dtype)),), b.dtype, 7)
    body = lambda x: x + jax.lax.psum(x * 2, "d")  # noqa: E731
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")), donate_argnums=0)
    return {"buffer_bytes": nbytes, "temp_bytes": _temp_bytes(fn.lower(x).compile())}


def _temp_bytes(compiled) -> float:
    """XLA's planned scratch (memory_analysis temp_size) of a compiled program; 0 if unknown."""
    mem = compiled.memory_analysis()
    return float(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0.0


RESIDUAL_SHAPE = (1024, 64, 1024)  # tokens T, width M, hidden H: [T, H] buffers dominate


def residual_scratch(b: Bench) -> dict:
    """Compile (not run) the gradient of 1 and of 3 stacked RMSNorm + gated-FFN layers on one
    device: XLA's scratch grows per layer by the residuals it keeps for backward. An unfused
    runtime keeps all five hidden-size ones JAX saves (HostMemory.keeps_autodiff_residuals:
    5.06 [T, H] buffers a layer measured on CPU); a fusing compiler far fewer (1.1 on TPU v5p).
    """
    import jax
    import jax.numpy as jnp

    t, m, h = RESIDUAL_SHAPE
    dt = jnp.dtype(b.dtype)

    def layer(x, w):
        xn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w[0]
        return x + (jax.nn.silu(xn @ w[1]) * (xn @ w[2])) @ w[3]

    def loss(ws, x):
        for w in ws:
            x = layer(x, w)
        return jnp.sum(x * x)

    sharding = jax.sharding.SingleDeviceSharding(b.devices[0])
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    w = (spec(m), spec(m, h), spec(m, h), spec(h, m))

    def temp(layers: int) -> float:
        return _temp_bytes(jax.jit(jax.grad(loss)).lower([w] * layers, spec(t, m)).compile())

    return {"hidden_bytes": t * h * dt.itemsize, "temp_per_layer_bytes": (temp(3) - temp(1)) / 2}


def overlap(b: Bench) -> dict:
    """A matmul and an independent all-reduce over all devices: alone and in one program.

    The three programs are timed in interleaved rounds (one call of each per round), so load
    that drifts during the measurement hits all three alike; medians over the rounds.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh, nd = flat_mesh(b), len(b.devices)
    r, m, nbytes = 4, 256, 4 * cal.MIB
    x = _random(mesh, P("d"), (nd * r, m, m), b.dtype, 4)
    w = _random(mesh, P("d"), (nd * r, m, m), b.dtype, 5)
    y = _random(mesh, P("d"), (nd * nbytes // itemsize(b.dtype),), b.dtype, 6)
    mm = lambda x, w: jnp.einsum("rmk,rkn->rmn", x, w)  # noqa: E731
    ar = lambda y: jax.lax.psum(y, "d")  # noqa: E731
    both = lambda x, w, y: (mm(x, w), ar(y))  # noqa: E731
    sm = partial(jax.shard_map, mesh=mesh, check_vma=False)
    calls = {
        "matmul_s": (jax.jit(sm(mm, in_specs=(P("d"), P("d")), out_specs=P("d"))), (x, w)),
        "all_reduce_s": (jax.jit(sm(ar, in_specs=P("d"), out_specs=P("d"))), (y,)),
        "both_s": (jax.jit(sm(both, in_specs=(P("d"), P("d"), P("d")), out_specs=(P("d"), P("d")))), (x, w, y)),
    }
    for fn, args in calls.values():
        time_steps(lambda: fn(*args), steps=1, warmup=b.warmup)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(b.steps):
        for key, (fn, args) in calls.items():
            times[key] += time_steps(lambda: fn(*args), steps=1, warmup=0).times_s
    out = {"matmul": [r, m, m, m], "all_reduce_bytes": nbytes}
    out.update({k: median(v) for k, v in times.items()})
    return out


def describe(devices: list) -> dict:
    """Identity of the devices for the profile header and the cache key."""
    import jax

    d = devices[0]
    local = sum(1 for x in devices if x.process_index == d.process_index)
    return {
        "platform": d.platform, "kind": d.device_kind, "count": len(devices),
        "processes": jax.process_count(), "jax": jax.__version__,
        "memory_bytes": memory_bytes(d, local), "host_cpus": os.cpu_count(),
    }


def memory_bytes(device: Any, local_devices: int) -> float:
    """The device's memory limit; host devices share the host's RAM evenly."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (backends without stats raise various errors)
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram) / max(local_devices, 1)
