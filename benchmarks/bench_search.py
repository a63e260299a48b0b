"""How fast the planner scores candidates, and how long `suggest-mesh` takes end to end.

Targets (printed next to the figures, never asserted: timings on a shared machine are noisy):
  * >= 1,000,000 candidate plans scored per second by the cost model (moeplan.cost.estimate),
    and by the whole search pipeline (filters + estimate + memory check);
  * `moeplan suggest-mesh --devices 65536 --model deepseek-v3 --hardware tpu-v5p` in < 1 s of
    wall time as a subprocess, interpreter start-up included.

Usage: python benchmarks/bench_search.py [--plans 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from moeplan import presets, search
from moeplan.cost import step as cost_step
from moeplan.cost.layout import Plans
from moeplan.validate import host_allocator

SCORE_TARGET = 1_000_000  # plans per second
CLI_TARGET_S = 1.0
CLI_ARGS = [
    "suggest-mesh", "--devices", "65536", "--model", "deepseek-v3", "--hardware", "tpu-v5p",
    # 65,536 devices need a batch of at least 512 sequences (the model axis stops at the 128
    # heads); DeepSeek-V3 trained with 15,360 x 4K-token sequences, 16,384 is the nearest power of two.
    "--batch", "16384",
]


def valid_plans(model, train, devices: int, count: int) -> Plans:
    """At least `count` structurally valid plans: the valid candidates of `devices`, tiled."""
    plans = search.enumerate_plans(devices)
    base = plans.take(np.flatnonzero(search.rejection_codes(model, train, plans) == 0))
    reps = -(-count // len(base))
    fields = ("data", "expert", "model", "fsdp", "remat")
    return Plans(*(np.tile(getattr(base, f), reps) for f in fields))


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, cpu) seconds of `fn()`; cpu time is less sensitive to a busy machine."""
    fn()  # warm up (first-touch allocation, lazy imports)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_scoring(n_plans: int, repeats: int) -> None:
    model = presets.load_model("deepseek-v3")
    hw = presets.load_hardware("tpu-v5p")
    train = presets.load_train(None, global_batch=16384)
    plans = valid_plans(model, train, 65536, n_plans)
    n = len(plans)
    pinned = host_allocator.pin()  # as every moeplan command does at start-up (cli.py)
    print(f"deepseek-v3 on tpu-v5p, {n:,d} plans (valid plans of 65,536 devices, tiled); median of {repeats}; "
          f"allocator thresholds {'pinned' if pinned else 'not pinned (no glibc)'}")
    est = median_seconds(lambda: cost_step.estimate(model, train, hw, plans), repeats)
    score = median_seconds(lambda: search.score(model, train, hw, plans), repeats)
    for label, (wall, cpu) in (("cost.estimate()", est), ("search.score() (filters+estimate)", score)):
        print(
            f"  {label:34s} wall {wall * 1e3:7.0f} ms = {n / wall:>11,.0f} plans/s "
            f"({n / wall / SCORE_TARGET:4.2f}x target); cpu {cpu * 1e3:7.0f} ms = "
            f"{n / cpu:>11,.0f} plans/s ({n / cpu / SCORE_TARGET:4.2f}x target)"
        )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli_command() -> list[str]:
    exe = shutil.which("moeplan")
    return [exe] if exe else [sys.executable, "-m", "moeplan"]


def bench_cli(repeats: int) -> None:
    cmd = cli_command()
    for label, args in (("moeplan --help (start-up only)", ["--help"]), ("moeplan " + " ".join(CLI_ARGS), CLI_ARGS)):
        walls, cpus, rc = [], [], 0
        for _ in range(repeats + 1):
            c0 = _children_cpu()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd + args, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            cpus.append(_children_cpu() - c0)
            rc = proc.returncode
        wall, cpu = statistics.median(walls[1:]), statistics.median(cpus[1:])  # run 1 warms caches
        print(
            f"{label}\n    wall {wall * 1e3:6.0f} ms = {wall / CLI_TARGET_S:4.2f}x the {CLI_TARGET_S:g} s target; "
            f"cpu {cpu * 1e3:6.0f} ms (median of {repeats}, exit code {rc})"
        )
        if rc != 0:
            print("    stderr: " + proc.stderr.strip().replace("\n", "\n    "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=1_000_000, help="plans per scoring call")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    args = parser.parse_args()
    print(f"search benchmark (python {sys.version.split()[0]}, numpy {np.__version__})")
    bench_scoring(args.plans, args.repeats)
    bench_cli(args.repeats)


if __name__ == "__main__":
    main()
