"""validate/isolated.py: every candidate of a rounds run in a worker process of its own."""

from __future__ import annotations

import os

import pytest

from moeplan import presets
from moeplan.validate import isolated


def _payload(meshes: list[str], batch: int) -> dict:
    model = presets.load_model("tiny-moe")
    train = presets.load_train(None, seq_len=32, global_batch=batch)
    return {"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"), "meshes": meshes,
            "steps": 4, "warmup": 1, "rounds": 2, "breakdown": 0, "options": None, "isolate": True}


def test_applies_only_to_simulated_cpu_devices_outside_a_worker(monkeypatch):
    class Device:
        def __init__(self, platform):
            self.platform = platform

    assert isolated.applies([Device("cpu")])
    assert not isolated.applies([Device("gpu")])
    assert not isolated.applies([0, 1])  # not jax devices at all (faked tests)
    monkeypatch.setenv(isolated.WORKER_ENV, "1")
    assert not isolated.applies([Device("cpu")])  # a worker never spawns workers


@pytest.mark.slow
def test_a_failing_worker_is_reported_and_the_others_are_timed_in_rounds():
    """data=8 cannot split a batch of 4 (the worker reports why and exits); the other two
    candidates each run in their own process, one median per round."""
    events = []
    isolated.measure(_payload(["data=2,expert=2,model=2", "data=8", "data=1,expert=4,model=2"], batch=4),
                     events.append, settle=1)
    kinds = [(e["event"], e.get("index")) for e in events if e["event"] != "phase"]
    assert kinds == [("error", 1), ("result", 0), ("result", 2)]
    assert "data" in events[[e["event"] for e in events].index("error")]["reason"]
    results = [e["measured"] for e in events if e["event"] == "result"]
    pids = {r["worker_pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    for r in results:
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
        assert r["step_time_s"] == pytest.approx(sorted(r["step_times_s"])[0] / 2 + sorted(r["step_times_s"])[1] / 2)
        assert r["comm_bytes_per_device"]  # what compile read comes back with the timing
    rounds = [e for e in events if e["event"] == "phase" and e.get("phase") == "rounds"]
    assert [e["done"] for e in rounds] == [0, 1, 2]


class _FakeWorker:
    """Answers round commands with fixed times; `dies_in` makes one worker die in that round."""

    def __init__(self, index: int, step_s: float, dies_in: int | None = None):
        self.index, self.step_s, self.dies_in = index, step_s, dies_in
        self.mesh, self.rounds, self.stopped = f"mesh{index}", 0, False

    def ask(self, command, until):
        assert command["cmd"] == "round" and until == ("times",)
        if self.rounds == self.dies_in:
            raise isolated.WorkerDied("measurement process exited with code -9: killed")
        self.rounds += 1
        return {"event": "times", "times": [self.step_s] * command["steps"]}

    def stop(self):
        self.stopped = True


def test_a_worker_that_dies_mid_run_is_reported_and_leaves_the_rounds():
    ready = {0: _FakeWorker(0, 0.1), 1: _FakeWorker(1, 0.2, dies_in=1), 2: _FakeWorker(2, 0.3)}
    dead = ready[1]
    events = []
    medians = isolated._rounds(ready, rounds=3, steps=2, settle=1, emit=events.append)
    errors = [e for e in events if e["event"] == "error"]
    assert [(e["index"], e["reason"]) for e in errors] == [(1, "measurement process exited with code -9: killed")]
    assert dead.stopped and set(ready) == {0, 2}
    assert medians[0] == [0.1] * 3 and medians[2] == [0.3] * 3 and medians[1] == [0.2]


def test_measure_task_isolates_only_when_asked(monkeypatch):
    """`isolate` in the payload (profile --isolate) hands a rounds run to the workers; without
    it the candidates share this process as before."""
    from moeplan.validate import profile

    calls = []
    monkeypatch.setattr(isolated, "applies", lambda devices: True)
    monkeypatch.setattr(isolated, "measure", lambda payload, emit, settle: calls.append((payload["meshes"], settle)))
    monkeypatch.setattr(profile, "prepare_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shared path")))
    monkeypatch.setattr(profile, "release_memory", lambda: None)
    payload = _payload(["data=8", "data=1,expert=8"], batch=8)
    events = []
    profile.measure_task(payload, [0] * 8, events.append)
    assert calls == [(["data=8", "data=1,expert=8"], profile.ROUND_SETTLE)]
    profile.measure_task({**payload, "isolate": False}, [0] * 8, events.append)
    assert len(calls) == 1 and [e["reason"] for e in events if e["event"] == "error"] == ["RuntimeError: shared path"] * 2
