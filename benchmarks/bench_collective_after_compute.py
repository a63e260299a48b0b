"""What an all-to-all costs when it follows compute, against the calibrated prediction.

Why: `moeplan calibrate` times collectives back to back, so every device thread reaches
each op together. In a training step each op follows the devices' own compute, and on
simulated CPU devices (8 threads on a few cores) the threads arrive at different times. The
profiler's op time for a step's all-to-all (`profile --breakdown`) then reads 10-18x the
prediction, because it includes waiting for the other threads, most of which the host spends
on their compute. This benchmark measures what the op adds to the wall clock instead:

    one program = R segments of (per-device x @ w, tanh, then an all-to-all over groups of g)
    control     = the same with a local reverse of x in place of the all-to-all
    cost per op = (time of program - time of control) / R

for several buffer sizes and group sizes, both programs timed in interleaved rounds, and
prints it beside `collectives.op_seconds` of a hardware profile (default: calibrate these
devices, cached, as `moeplan profile` does).

Usage: python benchmarks/bench_collective_after_compute.py [--rows 64,512,2048] [--hardware FILE]
(about 2 minutes on 2 cores after calibration)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moeplan.cost.collectives import op_seconds  # noqa: E402
from moeplan.validate.timing import time_steps  # noqa: E402

SEGMENTS = 8  # compute + collective pairs per program
WIDTH = 256  # columns of x and the square w; a segment's buffer is rows x WIDTH float32
ROUNDS, STEPS = 5, 5


def program(devices: np.ndarray, group: int, rows: int, exchange: bool):
    """A jitted call: SEGMENTS x (x @ w, tanh, all-to-all over `group` or a local reverse)."""
    mesh = Mesh(devices.reshape(-1, group), ("rest", "g"))
    spec = P(("rest", "g"))

    def body(x, w):
        for _ in range(SEGMENTS):
            x = jnp.tanh(x @ w)
            x = jax.lax.all_to_all(x, "g", 0, 0, tiled=True) if exchange else x[::-1]
        return x

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False))
    n = devices.size
    x = jax.device_put(jnp.full((n * rows, WIDTH), 0.01, jnp.float32), NamedSharding(mesh, spec))
    w = jax.device_put(jnp.full((n * WIDTH, WIDTH), 0.01, jnp.float32), NamedSharding(mesh, spec))
    return lambda: fn(x, w)


def measure(devices: np.ndarray, rows: int, groups: list[int]) -> tuple[float, dict[int, float]]:
    """(control seconds per call, added seconds per all-to-all by group size): every program
    warmed up, then timed in ROUNDS interleaved rounds; medians of the round medians."""
    runs = {0: program(devices, 1, rows, exchange=False)}
    runs.update({g: program(devices, g, rows, exchange=True) for g in groups})
    for run in runs.values():
        time_steps(run, steps=1, warmup=2)
    times: dict[int, list[float]] = {g: [] for g in runs}
    for _ in range(ROUNDS):
        for g, run in runs.items():
            times[g].append(time_steps(run, steps=STEPS, warmup=0).median_s)
    base = statistics.median(times[0])
    return base, {g: (statistics.median(times[g]) - base) / SEGMENTS for g in groups}


def hardware(path: str | None, devices: int):
    from moeplan.validate import profile as prof
    from moeplan.validate.microbench import describe

    hw, source = prof.resolve_hardware(path, ident=describe(jax.devices()[:devices]), processes=1, dtype="float32")
    return hw, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,512,2048", help="rows of each device's x (buffer = rows x 256 float32)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--hardware", default=None, help="hardware YAML (default: calibrate these devices, cached)")
    args = ap.parse_args()
    devices = np.array(jax.devices()[: args.devices])
    groups = [g for g in (2, 4, 8) if args.devices % g == 0 and g <= args.devices]
    hw, source = hardware(args.hardware, args.devices)
    print(f"{args.devices} {devices[0].platform} devices; predictions from {source}")
    print(f"{'buffer':>9} {'compute/seg':>11}  " + "  ".join(f"{'g=' + str(g) + ' meas / pred':>22}" for g in groups))
    for rows in (int(r) for r in args.rows.split(",")):
        nbytes = rows * WIDTH * 4
        base, added = measure(devices, rows, groups)
        cells = [f"{added[g] * 1e3:7.3f} / {op_seconds(hw, 'all-to-all', g, nbytes) * 1e3:6.3f} ms"
                 f" {added[g] / op_seconds(hw, 'all-to-all', g, nbytes):4.1f}x" for g in groups]
        print(f"{nbytes / 1024:>6.0f} KiB {base / SEGMENTS * 1e3:8.2f} ms  " + "  ".join(f"{c:>22}" for c in cells),
              flush=True)
    print("meas: wall time an all-to-all adds after per-device compute; pred: collectives.op_seconds")


if __name__ == "__main__":
    main()
