"""Get the devices a measurement asks for: real, simulated CPU, or spread over processes.

Why a module of its own: jax fixes its device list when its backend starts, so "run this on
8 devices" cannot always be granted in the running process. Four ways to get them:

1. Real devices (GPU/TPU, or enough CPU devices already): use `jax.devices()[:n]` here.
2. Simulated CPU devices, backend not started yet: ask jax for n host devices
   (`jax_num_cpu_devices`, the config twin of XLA_FLAGS=--xla_force_host_platform_device_count)
   before it starts, and run here.
3. Simulated CPU devices, backend already started with fewer (a library caller, a test
   session set to 8 devices asking for 16): run the task again in a child interpreter with
   XLA_FLAGS=--xla_force_host_platform_device_count=n set before jax is imported. The child
   carries MOEPLAN_DEVICES_CHILD=1; a child that still sees too few devices fails instead of
   spawning again, so this can never loop.
4. `processes=P`: P local child processes, each with n/P CPU devices, joined by
   `jax.distributed.initialize(coordinator_address='127.0.0.1:<free port>', num_processes=P,
   process_id=i)` with gloo CPU collectives: the code path of a real multi-host run.
   On a real cluster each host runs moeplan itself under the launcher (SLURM, a TPU pod)
   with `cluster=True`, which calls `jax.distributed.initialize()` with no arguments and
   lets jax find the coordinator (docs/validation.md).

A *task* is a function `fn(payload: dict, devices: list, emit: Callable[[dict], None])`
named as "module:function". It reports what it measures through `emit` as JSON-ready
events. In a child process events travel as prefixed lines on stdout (gloo and XLA write
their own lines there too); only process 0 emits, the other processes run the same SPMD
program silently. The parent hands each event to `on_event` as it arrives, so a Ctrl-C
keeps everything measured before it.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from moeplan.errors import MoeplanError
from moeplan.validate import host_allocator

Emit = Callable[[dict], None]
CHILD_ENV = "MOEPLAN_DEVICES_CHILD"
EVENT_PREFIX = "@moeplan-event "
COUNT_FLAG = "--xla_force_host_platform_device_count"
INIT_TIMEOUT_S = 120  # a process that never reaches the coordinator fails instead of hanging
SHUTDOWN_GRACE_S = 30  # how long the other processes may take to exit after process 0
_cluster_started = False


def run(
    task: str,
    payload: dict,
    *,
    devices: int | None,
    processes: int = 1,
    cluster: bool = False,
    on_event: Emit,
) -> None:
    """Run `task(payload, devices, emit)` on `devices` devices; events go to `on_event`.

    `devices=None` takes every device jax sees. Raises MoeplanError when the devices cannot
    be had (too few real accelerators, a count that does not split over the processes).
    """
    if processes < 1:
        raise MoeplanError(f"--processes must be at least 1, got {processes}")
    if devices is not None and devices < 1:
        raise MoeplanError(f"--devices must be at least 1, got {devices}")
    if processes > 1:
        if cluster:
            raise MoeplanError("--processes starts local processes; on a cluster launch one moeplan per host")
        if devices is None or devices % processes:
            raise MoeplanError(f"--devices ({devices}) must be a multiple of --processes ({processes})")
        _run_children(task, payload, devices, processes, on_event)
        return
    if cluster:
        start_cluster()
    elif devices is not None:
        request_cpu_devices(devices)
    import jax

    have = jax.devices()
    n = len(have) if devices is None else devices
    if len(have) >= n:
        emit = on_event if jax.process_index() == 0 else _quiet
        _start(task, payload, list(have[:n]), emit)
        return
    if have[0].platform != "cpu" or cluster:
        raise MoeplanError(f"asked for {n} devices but jax sees {len(have)} ({have[0].platform})")
    if os.environ.get(CHILD_ENV):
        raise MoeplanError(f"could not get {n} simulated CPU devices (jax sees {len(have)})")
    _run_children(task, payload, n, 1, on_event)


DEFAULT_SIMULATED = 8  # CPU devices simulated when none are asked for (validation tier 1)


def identity(devices: int | None, processes: int = 1, cluster: bool = False) -> dict:
    """Platform, device kind and count a run will get, found without running a task.

    With no count given: every accelerator jax sees, or DEFAULT_SIMULATED simulated CPU
    devices on a host without accelerators. Local processes are always CPU devices.
    """
    if processes > 1:
        return {"platform": "cpu", "kind": "cpu", "count": devices or DEFAULT_SIMULATED}
    if cluster:
        start_cluster()
    else:
        request_cpu_devices(devices or DEFAULT_SIMULATED)
    import jax

    have = jax.devices()
    platform = have[0].platform
    count = devices or (len(have) if platform != "cpu" or cluster else DEFAULT_SIMULATED)
    if count > len(have) and platform != "cpu":
        raise MoeplanError(f"asked for {count} devices but jax sees {len(have)} ({platform})")
    return {"platform": platform, "kind": have[0].device_kind, "count": count}


def backend_started() -> bool:
    """Whether jax has already created its backends (its device list is then fixed)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def request_cpu_devices(n: int) -> None:
    """Before jax starts, ask for at least n host (CPU) devices; a no-op once it has started.

    Leaves an explicit user setting (XLA_FLAGS with a device count) alone. On a machine with
    accelerators this only sizes the CPU backend, which the accelerators outrank.
    """
    if backend_started() or COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", max(n, 1))


def start_cluster() -> None:
    """Join a real multi-host job: `jax.distributed.initialize()` finds the coordinator
    from the cluster environment (SLURM, Open MPI, TPU pod metadata)."""
    global _cluster_started
    if _cluster_started:
        return
    import jax

    jax.distributed.initialize()
    _cluster_started = True


def is_primary() -> bool:
    """True in process 0 (or when jax was never split over processes)."""
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


def resolve(task: str) -> Callable[[dict, list, Emit], Any]:
    """'package.module:function' -> the function."""
    module, _, name = task.partition(":")
    return getattr(importlib.import_module(module), name)


def _start(task: str, payload: dict, devices: list, emit: Emit) -> None:
    """Run the task; on CPU devices first pin the host allocator, so that which scratch
    blocks page-fault every step follows one fixed rule (validate/host_allocator.py)."""
    if devices[0].platform == "cpu":
        host_allocator.pin()
    resolve(task)(payload, devices, emit)


def _quiet(event: dict) -> None:
    """Emit for processes other than 0: they measure in lockstep but report nothing."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(local_devices: int) -> dict[str, str]:
    """Environment of a child: CPU only, `local_devices` host devices, the loop marker."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{COUNT_FLAG}={local_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this moeplan
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_children(task: str, payload: dict, devices: int, processes: int, on_event: Emit) -> None:
    """Start the child processes, relay process 0's events, and stop them all on failure."""
    with tempfile.TemporaryDirectory(prefix="moeplan-") as tmp:
        payload_path = Path(tmp) / "payload.json"
        payload_path.write_text(json.dumps(payload))
        port = free_port() if processes > 1 else 0
        procs, logs = [], []
        try:
            for pid in range(processes):
                log = open(Path(tmp) / f"stderr-{pid}.txt", "w+")
                logs.append(log)
                cmd = [sys.executable, "-m", "moeplan.validate.devices", task, str(payload_path),
                       str(devices), str(processes), str(pid), str(port)]
                procs.append(subprocess.Popen(
                    cmd, env=child_env(devices // processes), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if pid == 0 else subprocess.DEVNULL, stderr=log,
                    text=True, start_new_session=True,  # Ctrl-C reaches only us; we stop them
                ))
            fatal = _relay(procs, on_event)
        except BaseException:
            _stop(procs)
            raise
        finally:
            for log in logs:
                log.flush()
        _stop(procs)
        # process 0 carries the results; a straggler stopped after it finished is no failure
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (0, None)]
        if procs[0].returncode == 0:
            failed = []
        if fatal or failed:
            raise MoeplanError(fatal or _failure_line(failed, logs))
        for log in logs:
            log.close()


def _relay(procs: list[subprocess.Popen], on_event: Emit) -> str | None:
    """Pass process 0's events on until it ends; stop early if any process dies.

    Returns the message of a 'fatal' event, if one came.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if any(p.poll() not in (0, None) for p in procs):
                return None  # a process crashed; the others would wait for it forever
            continue
        if line is None:
            procs[0].wait()
            for p in procs[1:]:  # they finish with process 0; a straggler is stopped by _stop
                try:
                    p.wait(timeout=SHUTDOWN_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            return None
        if line.startswith(EVENT_PREFIX):
            event = json.loads(line[len(EVENT_PREFIX):])
            if event.get("event") == "fatal":
                return event.get("message", "measurement failed")
            on_event(event)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate children that are still running (each by its own pid), then reap them."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _failure_line(failed: list[tuple[int, int]], logs: list) -> str:
    """One line naming the failed process and the last line of what it wrote to stderr.

    A process that exited on its own (code > 0) is named before one we stopped (signal)."""
    pid, code = sorted(failed, key=lambda f: (f[1] < 0, f[0]))[0]
    return f"measurement process {pid} exited with code {code}: {last_line(logs[pid])}"


def last_line(log) -> str:
    """The last non-blank line a process wrote to its log file (stderr), or 'no output'."""
    log.flush()
    log.seek(0)
    tail = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
    return tail[-1] if tail else "no output"


# ---- child side ---------------------------------------------------------------------------


def _emit_line(event: dict) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def child_main(argv: list[str]) -> int:
    """Entry point of a child: join the processes (if several), check devices, run the task."""
    task, payload_path, devices, processes, pid, port = argv
    n, nproc, pid_i = int(devices), int(processes), int(pid)
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid_i,
            initialization_timeout=INIT_TIMEOUT_S,
        )
    emit = _emit_line if pid_i == 0 else _quiet
    try:
        have = jax.devices()
        if len(have) < n:
            raise MoeplanError(f"could not get {n} simulated CPU devices (jax sees {len(have)})")
        payload = json.loads(Path(payload_path).read_text())
        _start(task, payload, list(have[:n]), emit)
    except MoeplanError as e:
        emit({"event": "fatal", "message": str(e)})
        return 1
    except KeyboardInterrupt:
        return 130
    if nproc > 1:
        jax.distributed.shutdown()
    return 0


def probe(payload: dict, devices: list, emit: Emit) -> None:
    """A task that reports the devices it was given (used by tests and `--debug`)."""
    import jax

    emit({
        "event": "devices", "count": len(devices), "platform": devices[0].platform,
        "kind": devices[0].device_kind, "processes": jax.process_count(),
    })


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(child_main(sys.argv[1:]))
