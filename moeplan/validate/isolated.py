"""Interleaved rounds with every candidate in a process of its own: one program per heap.

Why: `profile --rounds` times the candidates in interleaved rounds so that load drifting over
the minutes of a run hits them all alike. Run in one process, the candidates also share one
C heap, and that changes what is timed on simulated CPU devices. malloc serves a request
from any free chunk large enough before it maps fresh pages, and the scratch blocks the other
candidates free beside each other coalesce into such chunks, so whether a candidate's 32-64
MiB scratch is paged in afresh every step (cost/first_touch.py) depended on its neighbours.
Measured 2026-12-02 on 8 simulated devices: small-moe data=2,expert=4 (35.4 MiB of scratch)
faulted 35.4 MiB per step timed alone and 19.9 in the shared process's rounds; wide-moe
data=1,expert=1,model=8 (38.6 MiB) 24.1. A training job runs one program in its process, and
that is what the cost model prices, so `profile --isolate` gives each candidate its own
process (a worker), and only the round order is shared. Not the default: short steps time
noisier across processes (tiny-moe's round-to-round CV, median about 15% against 6% shared).

How: the device side (`profile.measure_task`, asked to isolate and holding simulated CPU
devices in a single process) starts one worker per candidate, one after another, each with the
candidate's device count (`devices.child_env`). A worker compiles and warms up its step
(`profile.prepare_one`, `warm_up`), says `ready`, then waits on its stdin. The parent then
runs the rounds: per round, in rotating order, it asks each worker for `settle` untimed and
`steps` timed steps, and the worker answers with the wall times. Only one worker runs at a
time; the others block on their pipe. Afterwards each worker gets the round medians,
builds the candidate's record exactly as the shared-process path does (`profile.finish`,
page faults, traced breakdown) and emits it. Events travel as `devices.EVENT_PREFIX` lines
on the worker's stdout; commands as JSON lines on its stdin.

A worker that fails to build or compile reports an error event and exits; one that dies
mid-run is reported with the last line it wrote to stderr, and the others go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, TextIO

from moeplan.specs import Mesh
from moeplan.validate import devices as dev

Emit = Callable[[dict], None]
WORKER_ENV = "MOEPLAN_ISOLATED_WORKER"


def applies(devices: list) -> bool:
    """Isolate on simulated CPU devices of one process (not inside a worker already):
    accelerators cannot be shared by several processes, and a `jax.distributed` group
    already gives each process its own heap."""
    import jax

    return (getattr(devices[0], "platform", None) == "cpu" and jax.process_count() == 1
            and not os.environ.get(WORKER_ENV))


class WorkerDied(Exception):
    """A worker's stdout closed before it answered."""


class Worker:
    """One candidate's process: its pipes, its stderr log, and the events it sends back."""

    def __init__(self, payload_path: Path, index: int, mesh: Mesh, log_dir: Path, emit: Emit):
        self.index, self.mesh, self.emit = index, mesh, emit
        self.log: TextIO = open(log_dir / f"worker-{index}.txt", "w+")
        env = dev.child_env(mesh.devices)
        env[WORKER_ENV] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeplan.validate.isolated", str(payload_path), str(index)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            start_new_session=True,  # Ctrl-C reaches the parent only, which stops the workers
        )

    def ask(self, command: dict | None, until: tuple[str, ...]) -> dict:
        """Send `command` (if any), relay progress events, return the first event in `until`."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if not line.startswith(dev.EVENT_PREFIX):
                continue  # XLA and libraries write their own lines to stdout
            event = json.loads(line[len(dev.EVENT_PREFIX):])
            if event.get("event") in until:
                return event
            self.emit(event)
        raise WorkerDied(self.failure())

    def failure(self) -> str:
        """Why the worker stopped: its exit code and the last line of its stderr."""
        code = self.proc.wait()
        return f"measurement process exited with code {code}: {dev.last_line(self.log)}"

    def stop(self) -> None:
        dev._stop([self.proc])
        self.log.close()


def measure(payload: dict, emit: Emit, settle: int) -> None:
    """Every candidate of `payload` in its own worker, timed in interleaved rounds."""
    meshes = [Mesh.parse(m) for m in payload["meshes"]]
    rounds, per_round = int(payload["rounds"]), max(1, int(payload["steps"]) // int(payload["rounds"]))
    with tempfile.TemporaryDirectory(prefix="moeplan-workers-") as tmp:
        path = Path(tmp) / "payload.json"
        path.write_text(json.dumps(payload))
        ready: dict[int, Worker] = {}
        try:
            for i, mesh in enumerate(meshes):
                worker = _start(path, i, mesh, Path(tmp), emit)
                if worker is not None:
                    ready[i] = worker
            if not ready:
                return
            emit({"event": "phase", "index": min(ready), "mesh": "all", "phase": "rounds", "done": 0,
                  "total": rounds})
            times = _rounds(ready, rounds, per_round, settle, emit)
            for i, worker in list(ready.items()):
                _finish(worker, times[i], emit)
        finally:
            for worker in ready.values():
                worker.stop()


def _start(path: Path, i: int, mesh: Mesh, log_dir: Path, emit: Emit) -> Worker | None:
    """Start candidate i's worker and wait until it has compiled and warmed up (None: it failed)."""
    worker = Worker(path, i, mesh, log_dir, emit)
    try:
        event = worker.ask(None, until=("ready", "error"))
    except WorkerDied as e:
        event = {"event": "error", "index": i, "mesh": str(mesh), "reason": str(e)}
    if event["event"] == "ready":
        return worker
    emit(event)
    worker.stop()
    return None


def _rounds(ready: dict[int, Worker], rounds: int, steps: int, settle: int, emit: Emit) -> dict[int, list[float]]:
    """Per worker, the median wall time of each round it completed (rotating order, as
    validate/rounds.py); a worker that dies is reported and leaves the rounds."""
    from moeplan.validate.timing import median

    medians: dict[int, list[float]] = {i: [] for i in ready}
    for r in range(rounds):
        ids = list(ready)
        k = r % len(ids) if ids else 0
        for i in ids[k:] + ids[:k]:
            try:
                reply = ready[i].ask({"cmd": "round", "steps": steps, "settle": settle}, until=("times",))
            except WorkerDied as e:
                emit({"event": "error", "index": i, "mesh": str(ready[i].mesh), "reason": str(e)})
                ready.pop(i).stop()
                continue
            medians[i].append(median(reply["times"]))
        first = min(ready) if ready else 0
        emit({"event": "phase", "index": first, "mesh": "all", "phase": "rounds", "done": r + 1, "total": rounds})
    return medians


def _finish(worker: Worker, medians: list[float], emit: Emit) -> None:
    """Hand the worker its round medians; relay the result record it builds from them."""
    from moeplan.validate.timing import coefficient_of_variation, median

    command = {"cmd": "finish", "median_s": median(medians), "cv": coefficient_of_variation(medians),
               "times_s": medians}
    try:
        event = worker.ask(command, until=("result", "error"))
    except WorkerDied as e:
        event = {"event": "error", "index": worker.index, "mesh": str(worker.mesh), "reason": str(e)}
    emit(event)


# ---- worker side -----------------------------------------------------------------------------


def worker_main(argv: list[str]) -> int:
    """One candidate: compile, warm up, then serve round and finish commands from stdin."""
    from moeplan.specs import ModelSpec, TrainSpec
    from moeplan.validate import host_allocator
    from moeplan.validate import profile as prof
    from moeplan.validate.timing import time_steps

    payload_path, index = argv
    i = int(index)
    payload = json.loads(Path(payload_path).read_text())
    mesh = Mesh.parse(payload["meshes"][i])
    emit = dev._emit_line
    import jax

    host_allocator.pin()
    devices = jax.devices()[: mesh.devices]

    try:
        prep = prof.prepare_one(ModelSpec.model_validate(payload["model"]), TrainSpec.model_validate(payload["train"]),
                                mesh, devices, phase=prof._phases(emit, i, mesh), options=payload.get("options"))
        prof.warm_up(prep, payload["warmup"])
    except Exception as e:  # noqa: BLE001 (reported to the parent, which goes on)
        emit({"event": "error", "index": i, "mesh": str(mesh), "reason": prof.failure_reason(e)})
        return 0
    emit({"event": "ready", "index": i})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "round":  # settle steps untimed, then the wall time of each step
            timing = time_steps(prep.run, steps=command["steps"], warmup=command["settle"],
                                sync=jax.block_until_ready)
            emit({"event": "times", "times": list(timing.times_s)})
            continue
        record = prof.finish(prep, command["median_s"], command["cv"], command["times_s"])
        prof.emit_measured(prep, {**record, "worker_pid": os.getpid()}, devices, payload, emit, i)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
