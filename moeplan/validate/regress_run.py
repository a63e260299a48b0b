"""The jax half of `moeplan regress`: compile every candidate, then time them in rounds.

Kept apart from `regress.py` so that judging, baselines and reports stay importable and
testable without jax. Compiling uses the validation step (`build_step`) and reads the
collectives, FLOPs and memory back with `moeplan.validate.hlo`, exactly as `moeplan profile`
does, so the two commands can never disagree about what the compiled program contains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from moeplan.errors import MoeplanError
from moeplan.validate.regress import Observation
from moeplan.validate.suite import Candidate, Suite


def _cpu_devices(n: int) -> list:
    """The first n CPU devices, with the host allocator pinned as `profile` runs them."""
    import jax

    from moeplan.validate import host_allocator

    host_allocator.pin()
    devs = jax.devices("cpu")
    if len(devs) < n:
        raise MoeplanError(
            f"needs {n} CPU devices, jax has {len(devs)} "
            "(set XLA_FLAGS=--xla_force_host_platform_device_count before jax starts)"
        )
    return devs[:n]


def compile_one(c: Candidate, devices: list) -> tuple[Any, dict]:
    """Build and compile one candidate -> (BuiltStep, compiled facts).

    The facts are read as `moeplan profile` reads them, so the two commands never disagree
    about a compiled program: on CPU devices as `profile.measure_one` does (collective bytes
    from the HLO, cost_analysis FLOPs, `profile.peak_bytes` of memory_analysis), on a TPU
    target with `tpu_aot.measure_compiled` (XLA's own peak).
    """
    from moeplan.validate import build_step, hlo, profile, tpu_aot

    built = build_step(c.model, c.train, c.mesh, devices=devices)
    start = time.perf_counter()
    compiled = built.compile() if c.timed else built.lower_abstract().compile()
    seconds = time.perf_counter() - start
    if c.timed:
        comm = hlo.wire_bytes_by_kind(hlo.collectives(compiled))
        flops, memory = hlo.flops(compiled), profile.peak_bytes(hlo.memory(compiled))
    else:
        m = tpu_aot.measure_compiled(compiled, c.hardware.hbm_bytes)
        comm, flops, memory = m["comm_bytes_per_device"], m["flops_per_device"], m["memory_bytes_per_device"]
    facts = {"comm_bytes": {k: float(v) for k, v in comm.items()}, "flops": flops, "memory": memory,
             "compile_s": seconds}
    return built, facts


def compile_all(suite: Suite, obs: list[Observation], *, log: Callable[[str], None]) -> dict[str, Any]:
    """Compile every candidate that predicted; errors become the candidate's error row."""
    built: dict[str, Any] = {}
    pools: dict[str | None, list] = {}
    for o in obs:
        if o.error:
            continue
        try:
            c = o.candidate
            if c.topology not in pools:
                pools[c.topology] = _cpu_devices(c.mesh.devices) if c.timed else _tpu_devices(c.topology)
            built[o.id], o.compiled = compile_one(c, pools[c.topology][: c.mesh.devices])
            log(f"compiled {o.id} in {o.compiled['compile_s']:.1f}s")
        except MoeplanError as e:
            o.error = f"build: {e}"
        except Exception as e:  # a step that no longer compiles is a regression, named per row
            o.error = f"compile: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return built


def _tpu_devices(topology: str | None) -> list:
    from moeplan.validate import tpu_aot

    return tpu_aot.topology_devices(tpu_aot.parse_target(str(topology)))


def _runner(built: Any) -> Callable[[], Any]:
    """A closure that runs one optimizer step, threading the state through (donation-safe)."""
    box = [built.init_state(seed=0)]
    batch = built.make_batch(seed=0)

    def run():
        box[0], metrics = built.step(box[0], batch)
        return box[0], metrics

    return run


def time_all(suite: Suite, obs: list[Observation], built: dict[str, Any], *, log: Callable[[str], None]) -> None:
    """Warm up every compiled, timed candidate, then time them in interleaved rounds."""
    from moeplan.validate import rounds, timing

    t = suite.timing
    todo = [o for o in obs if o.candidate.timed and not o.error and o.id in built]
    if len(todo) < 2:
        return
    runs = {o.id: _runner(built[o.id]) for o in todo}
    for run in runs.values():
        timing.time_steps(run, steps=1, warmup=t.warmup)  # warm-up: allocation, thread pools
    log(f"timing {len(runs)} candidates: {t.rounds} rounds x {t.steps_per_round} steps")

    def note(attempt: int, noisy: list[str]) -> None:
        log(f"re-measuring {len(noisy)} noisy candidate(s), attempt {attempt}: {', '.join(noisy)}")

    result = rounds.measure(
        runs, rounds=t.rounds, steps=t.steps_per_round, max_cv=t.max_cv, remeasure=t.remeasure, clock=t.clock,
        on_attempt=note,
    )
    for o in todo:
        o.timing = result[o.id]
