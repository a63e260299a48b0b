"""Predicted-vs-measured logic of moeplan.validate.compare and the profile run loop (no jax)."""

import pytest

from moeplan.validate import compare, profile
from moeplan.validate.compare import Comparison, Measured, Predicted, bytes_match, summarize


def pred(step, a2a=0.0, ar=0.0, flops=100.0, mem=1000.0):
    return Predicted(step_s=step, comm_bytes={"all-to-all": a2a, "all-reduce": ar, "all-gather": 0.0,
                                               "reduce-scatter": 0.0}, flops_per_device=flops,
                     memory_bytes_per_device=mem)


def meas(step, comm=None, flops=100.0, mem=1000.0):
    return Measured(step_time_s=step, step_time_cv=0.01, compile_s=1.0,
                    comm_bytes_per_device=comm or {}, flops_per_device=flops, memory_bytes_per_device=mem)


def test_ratios_of_one_candidate():
    c = Comparison("data=8", pred(2.0, flops=90.0, mem=1100.0), measured=meas(4.0, flops=100.0, mem=1000.0))
    assert c.step_ratio == pytest.approx(0.5)
    assert c.flops_ratio == pytest.approx(0.9)
    assert c.memory_ratio == pytest.approx(1.1)


def test_first_touch_bytes_need_both_sides():
    from dataclasses import replace

    counted = Measured.from_record({**meas(1.0).record(), "first_touch_bytes_per_device": 3e7})
    with_pred = replace(pred(1.0), first_touch_bytes_per_device=4e7)
    c = Comparison("data=8", with_pred, measured=counted)
    assert c.first_touch_bytes == {"predicted": 4e7, "measured": 3e7}
    assert c.record()["comparison"]["first_touch_bytes"] == {"predicted": 4e7, "measured": 3e7}
    assert Comparison("data=8", pred(1.0), measured=counted).first_touch_bytes is None  # not priced
    assert Comparison("data=8", with_pred, measured=meas(1.0)).first_touch_bytes is None  # not counted
    assert "first_touch_bytes" not in Comparison("m", pred(1.0), measured=meas(1.0)).record()["comparison"]


def test_comm_match_is_exact_up_to_float_rounding():
    # a group of 3 sends 2/3 of the buffer: float rounding must not count as a mismatch
    wire = 3072 * (2 / 3)
    assert bytes_match(wire, 2048.0)
    assert not bytes_match(2048.0, 2049.0)  # one byte off is a real mismatch
    c = Comparison("m", pred(1.0, a2a=2048.0, ar=wire),
                   measured=meas(1.0, {"all-to-all": 2048.0, "all-reduce": 2048.0, "all-gather": 0.0}))
    assert c.comm_match() == {"all-to-all": True, "all-reduce": True}


def test_comm_mismatch_and_unexpected_kind_are_reported():
    c = Comparison("m", pred(1.0, a2a=2048.0, ar=512.0),
                   measured=meas(1.0, {"all-to-all": 4096.0, "all-reduce": 512.0, "collective-permute": 64.0}))
    assert c.comm_match() == {"all-to-all": False, "all-reduce": True, "collective-permute": False}
    rec = c.record()
    assert rec["comparison"]["comm_bytes_match"]["all-to-all"] is False
    assert rec["comparison"]["comm_bytes_predicted"]["collective-permute"] == 0.0


def test_failed_candidate_has_no_ratios_and_keeps_its_reason():
    c = Comparison("m", pred(1.0), error="out of memory: RESOURCE_EXHAUSTED")
    assert not c.ok and c.step_ratio is None and c.comm_match() == {}
    rec = c.record()
    assert rec["measured"] is None and rec["comparison"] is None
    assert rec["error"].startswith("out of memory")


def test_summary_over_measured_candidates_only():
    comps = [
        Comparison("a", pred(1.0, ar=8.0), measured=meas(1.25, {"all-reduce": 8.0})),  # -0.2
        Comparison("b", pred(2.0, ar=8.0), measured=meas(2.0, {"all-reduce": 8.0})),  # 0
        Comparison("c", pred(3.0, ar=8.0), measured=meas(2.5, {"all-reduce": 8.0})),  # +0.2
        Comparison("d", pred(0.5), error="compile failed"),
    ]
    s = summarize(comps)
    assert (s.measured, s.failed) == (3, 1)
    assert s.median_abs_error == pytest.approx(0.2)
    assert s.spearman == pytest.approx(1.0)
    # planner's pick among the measured is "a" (1.0); it measured 1.25 vs the best 1.25 -> 0
    assert s.top1_regret == pytest.approx(0.0)
    assert s.comm_bytes_exact is True


def test_summary_regret_and_inexact_bytes():
    comps = [
        Comparison("a", pred(1.0, ar=8.0), measured=meas(3.0, {"all-reduce": 16.0})),
        Comparison("b", pred(2.0, ar=8.0), measured=meas(2.0, {"all-reduce": 8.0})),
    ]
    s = summarize(comps)
    assert s.top1_regret == pytest.approx(0.5)  # picked a (3.0) against the best b (2.0)
    assert s.spearman == pytest.approx(-1.0)
    assert s.comm_bytes_exact is False


def test_summary_by_round_only_for_interleaved_rounds():
    def timed(step, per_round):
        return Measured.from_record({**meas(step).record(), "step_times_s": per_round})

    comps = [Comparison("a", pred(1.0), measured=timed(2.25, [3.0, 1.5])),
             Comparison("b", pred(2.0), measured=timed(2.0, [2.0, 2.0]))]
    assert summarize(comps).by_round is None  # step by step, not paired across candidates
    r = summarize(comps, rounds=True).record()["rounds"]
    assert r == {"rounds": 2, "spearman": [-1.0, 1.0], "pick_slower_rounds": 1}


def test_summary_with_nothing_or_one_measured():
    assert summarize([Comparison("a", pred(1.0), error="x")]).median_abs_error is None
    one = summarize([Comparison("a", pred(1.0), measured=meas(2.0))])
    assert one.median_abs_error == pytest.approx(0.5)
    assert one.spearman is None and one.top1_regret is None


def test_measured_record_round_trip_keeps_extra_fields():
    rec = meas(1.5, {"all-reduce": 4.0}).record() | {"step_times_s": [1.4, 1.5, 1.6]}
    back = Measured.from_record(rec)
    assert back.step_time_s == 1.5 and back.extra == {"step_times_s": [1.4, 1.5, 1.6]}
    assert back.record() == rec


def _fake_prepare(model, train, mesh, devices, *, phase, options=None):
    """A compiled candidate without jax: a model=2 mesh runs out of memory; steps cost
    1 ms per data shard, so rounds can be told apart."""
    import time

    if mesh.model == 2:
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating 9 GiB")
    record = {k: v for k, v in meas(0.1, {"all-reduce": 1.0}).record().items() if not k.startswith("step_time")}
    return profile.Prepared(None, lambda: time.sleep(1e-3 * mesh.data), record, [], mesh, train)


def _payload(meshes: list[str], rounds: int = 1) -> dict:
    from moeplan import presets

    model = presets.load_model("tiny-moe")
    train = presets.load_train(None, seq_len=32, global_batch=8)
    return {"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"),
            "meshes": meshes, "steps": 4, "warmup": 0, "rounds": rounds}


def test_measure_task_reports_a_failing_candidate_and_goes_on(monkeypatch):
    """One mesh that fails to build must not stop the others (no jax needed: prepare_one faked)."""
    monkeypatch.setattr(profile, "prepare_one", _fake_prepare)
    monkeypatch.setattr(profile, "release_memory", lambda: None)
    events = []
    profile.measure_task(_payload(["data=4,model=2", "data=8"]), list(range(8)), events.append)
    kinds = [(e["event"], e.get("index")) for e in events if e["event"] != "phase"]
    assert kinds == [("start", None), ("error", 0), ("result", 1)]
    assert events[1]["reason"].startswith("out of memory")


def test_rounds_time_every_candidate_after_all_compiled(monkeypatch):
    """--rounds: failures still reported, then every good candidate timed in rounds."""
    monkeypatch.setattr(profile, "prepare_one", _fake_prepare)
    monkeypatch.setattr(profile, "release_memory", lambda: None)
    events = []
    profile.measure_task(_payload(["data=8", "data=4,model=2", "data=2,expert=4"], rounds=2), list(range(8)),
                         events.append)
    kinds = [(e["event"], e.get("index")) for e in events if e["event"] != "phase"]
    assert kinds == [("start", None), ("error", 1), ("result", 0), ("result", 2)]
    slow, fast = events[-2]["measured"], events[-1]["measured"]
    assert len(slow["step_times_s"]) == 2  # one median per round
    assert slow["step_time_s"] > fast["step_time_s"] >= 2e-3  # 8 ms vs 2 ms steps
    assert slow["comm_bytes_per_device"] == {"all-reduce": 1.0}  # what compile read is kept


def test_interrupt_keeps_what_was_measured(monkeypatch):
    """Ctrl-C after the first candidate: the report holds it and says it was interrupted."""
    from moeplan import presets
    from moeplan.specs import Mesh

    def fake_run(task, payload, *, devices, processes, cluster, on_event):
        on_event({"event": "start", "total": 2})
        on_event({"event": "result", "index": 0, "measured": meas(0.2, {"all-reduce": 1.0}).record()})
        raise KeyboardInterrupt

    monkeypatch.setattr(profile.dev, "run", fake_run)
    req = profile.ProfileRequest(
        model=presets.load_model("tiny-moe"), train=presets.load_train(None, seq_len=32, global_batch=8),
        hardware=presets.load_hardware("cpu"), meshes=[Mesh(data=8), Mesh(expert=8)], devices=8)
    report = profile.run_profile(req)
    assert report.interrupted
    assert [c.mesh for c in report.comparisons] == ["data=8,expert=1,model=1"]
    doc = report.record()
    assert doc["interrupted"] is True and len(doc["results"]) == 1
    assert doc["results"][0]["predicted"]["step_time_s"] > 0


def test_peak_bytes_from_memory_analysis():
    mem = {"argument_size": 100, "output_size": 90, "alias_size": 80, "temp_size": 50}
    assert profile.peak_bytes(mem) == 160.0  # 100 + 90 - 80 + 50
    assert profile.peak_bytes({}) is None


def test_kinds_follow_traffic_contract():
    from moeplan.cost.traffic import KINDS

    assert set(compare.KINDS) == set(KINDS)
