"""`moeplan profile` and `moeplan calibrate` as a user sees them (CliRunner; slow ones compile).

The test session has 8 simulated CPU devices (conftest.py), so single-process runs measure
in this process; `--processes 2` and the 16-device probe start child interpreters.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from moeplan import presets
from moeplan.cli import app
from moeplan.errors import MoeplanError
from moeplan.validate import calibrate as cal
from moeplan.validate import devices as dev

runner = CliRunner()
MESH = "data=2,expert=2,model=2"
# Lean on purpose: the smallest step that still exercises every collective kind of tiny-moe.
PROFILE = ["profile", "--model", "tiny-moe", "--hardware", "cpu", "--devices", "8", "--mesh", MESH,
           "--seq-len", "32", "--batch", "8", "--steps", "2", "--warmup", "1", "--format", "json", "--quiet"]


def fails(*args: str) -> str:
    """Run a command that must fail cleanly (non-zero exit, no traceback); its stderr."""
    result = runner.invoke(app, list(args))
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.stderr


def test_calibrate_refuses_to_overwrite_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# my hand-tuned numbers\nname: mine\n")
    err = fails("calibrate", "--devices", "8", "-o", str(path))
    assert "--force" in err and "not written by moeplan calibrate" in err
    assert path.read_text() == "# my hand-tuned numbers\nname: mine\n"


def test_bad_profile_options_are_one_line_errors():
    assert "--steps must be at least 1" in fails("profile", "--steps", "0", "--hardware", "cpu")
    assert "--rounds must be at least 1" in fails("profile", "--rounds", "0", "--hardware", "cpu")
    assert "give --rounds 2 or more" in fails("profile", "--isolate", "--hardware", "cpu")
    assert "drop one of them" in fails("profile", "--isolate", "--rounds", "2", "--processes", "2", "--hardware", "cpu")
    assert "--format" in fails("profile", "--format", "xml", "--hardware", "cpu")
    assert "--target only compiles" in fails("profile", "--breakdown", "--target", "tpu-v5p:4x4x4")
    err = fails("profile", "--hardware", "cpu", "--devices", "8", "--mesh", "data=3")
    assert "has 3 devices" in err
    err = fails("profile", "--hardware", "cpu", "--devices", "8", "--mesh", "data=8", "--batch", "4")
    assert "cannot run tiny-moe" in err and err.count("\n") == 1  # batch 4 does not split 8 ways


def test_devices_loop_guard(monkeypatch):
    """A child that still lacks devices must fail, never spawn another child."""
    monkeypatch.setenv(dev.CHILD_ENV, "1")
    with pytest.raises(MoeplanError, match="could not get 64 simulated CPU devices"):
        dev.run("moeplan.validate.devices:probe", {}, devices=64, on_event=lambda e: None)


def test_profile_uses_a_cached_calibration(tmp_path, monkeypatch):
    """Without --hardware, a profile cached by an earlier calibration is used as is."""
    import jax

    from moeplan.validate import profile as prof
    from tests.test_validate_calibrate import raw_record

    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    ident = {"platform": "cpu", "kind": "cpu", "count": 8}
    path = cal.cache_path("cpu", 8, 1, "float32", jax.__version__)
    cal.write_profile(path, cal.fit_profile(raw_record(), name="cached one"))
    monkeypatch.setattr(cal, "run_calibration", lambda **kw: pytest.fail("must not calibrate again"))
    hw, note = prof.resolve_hardware(None, ident=ident, processes=1, dtype="float32")
    assert hw.name == "cached one" and str(path) in note


@pytest.mark.slow
def test_reexec_gives_more_simulated_devices_than_this_process_has():
    events = []
    dev.run("moeplan.validate.devices:probe", {}, devices=16, on_event=events.append)
    assert events == [{"event": "devices", "count": 16, "platform": "cpu", "kind": "cpu", "processes": 1}]


@pytest.mark.slow
def test_calibrate_quick_writes_a_loadable_profile(tmp_path):
    path = tmp_path / "local-cpu.yaml"
    args = ["calibrate", "--devices", "8", "--quick", "--steps", "2", "--warmup", "1", "-o", str(path),
            "--format", "json", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    hw = presets.load_hardware(path)
    assert hw.peak_flops == doc["profile"]["peak_flops"] > 0
    assert hw.scale_up.bandwidth > 0 and hw.scale_up_size == 8
    assert hw.measured["device"]["count"] == 8 and hw.measured["sweep"] == "quick"
    assert {p["kind"] for p in hw.measured["collectives"]} == set(cal.KINDS)
    assert {p["group"] for p in hw.measured["collectives"]} == {2, 8}  # quick: smallest and largest
    assert cal.written_by_calibrate(path)  # so a later calibrate may refresh it
    assert cal.residuals_per_layer(hw.measured) > cal.UNFUSED_CUT  # the CPU backend keeps all five
    assert [p.rows for p in hw.matmul_rows_curve] == [16.0, 512.0]  # quick: the two ends
    assert hw.matmul_rows_curve[0].efficiency < hw.matmul_rows_curve[1].efficiency  # skinny runs slower


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "result.json"
    result = runner.invoke(app, [*PROFILE, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), json.loads(out.read_text())


@pytest.mark.slow
def test_profile_json_on_tiny_moe(single_process):
    doc, saved = single_process
    assert saved == doc  # -o holds the same document
    assert doc["schema_version"] == 1 and doc["devices"] == 8 and doc["interrupted"] is False
    (r,) = doc["results"]
    assert r["mesh"] == MESH and r["error"] is None
    assert doc["routing"] is None and r["routing"] is None  # router left alone without --routing
    m = r["measured"]
    assert m["step_time_s"] > 0 and m["compile_s"] > 0 and m["step_time_cv"] >= 0
    assert m["flops_per_device"] > 0 and m["memory_bytes_per_device"] > 0
    # the contract: compiled collective bytes equal traffic.py's, kind by kind
    assert r["comparison"]["comm_bytes_match"] == {"all-to-all": True, "all-reduce": True}
    for kind, want in r["comparison"]["comm_bytes_predicted"].items():
        assert m["comm_bytes_per_device"][kind] == pytest.approx(want, rel=1e-9)
    s = doc["summary"]
    assert s["comm_bytes_exact"] is True and s["measured"] == 1 and s["failed"] == 0
    assert s["median_abs_error"] == pytest.approx(abs(r["comparison"]["step_time_ratio"] - 1))
    assert s["spearman"] is None and s["top1_regret"] is None  # one candidate ranks nothing


@pytest.mark.slow
def test_profile_rounds_times_two_meshes_interleaved(single_process):
    """--rounds 2 --isolate: both meshes compiled first (each in its own process), then timed in
    2 rounds; same bytes as alone."""
    other = "data=2,expert=4,model=1"
    result = runner.invoke(app, [*PROFILE, "--mesh", other, "--rounds", "2", "--isolate"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rounds"] == 2 and doc["isolate"] is True and [r["mesh"] for r in doc["results"]] == [MESH, other]
    for r in doc["results"]:
        assert r["error"] is None and len(r["measured"]["step_times_s"]) == 2  # a median per round
        assert all(r["comparison"]["comm_bytes_match"].values())
    alone = single_process[0]["results"][0]["measured"]["comm_bytes_per_device"]
    assert doc["results"][0]["measured"]["comm_bytes_per_device"] == alone
    # simulated CPU devices: each candidate ran in a worker process of its own
    pids = {r["measured"]["worker_pid"] for r in doc["results"]}
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_profile_two_processes_agrees_on_comm_bytes(single_process):
    """The jax.distributed path (2 processes x 4 CPU devices, gloo) compiles the same program."""
    doc, _ = single_process
    result = runner.invoke(app, [*PROFILE, "--processes", "2"])
    assert result.exit_code == 0, result.output
    multi = json.loads(result.stdout)
    assert multi["processes"] == 2
    (r,) = multi["results"]
    assert r["error"] is None, r["error"]
    one = doc["results"][0]["measured"]["comm_bytes_per_device"]
    assert r["measured"]["comm_bytes_per_device"] == one
    assert multi["summary"]["comm_bytes_exact"] is True


@pytest.mark.slow
def test_profile_breakdown_splits_the_step_by_cost_term():
    """--breakdown: a traced split whose terms add up to the step and name every part of it."""
    result = runner.invoke(app, [*PROFILE, "--breakdown"])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.stdout)["results"]
    m = r["measured"]
    split, raw = m["time_by_term_s"], m["op_time_by_term_s"]
    assert m["traced_steps"] == 3 and "breakdown_error" not in m
    assert sum(split.values()) == pytest.approx(m["step_time_s"], rel=1e-9)
    # data=2, expert=2, model=2 runs every kind of term: matmuls, memory-bound ops, the
    # optimizer, and collectives on each axis
    for term in ("attention_proj", "expert_ffn", "lm_head", "router", "optimizer_update",
                 "norms_residuals", "moe_permute", "all_to_all", "model_axis", "data_axis"):
        assert raw.get(term, 0.0) > 0, (term, raw)
    assert raw.get("other", 0.0) < 0.25 * sum(raw.values()), raw  # the scopes name most of the step
    from rich.console import Console

    from moeplan.commands.validate import profile_tables

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    for part in profile_tables(json.loads(result.stdout)):
        console.print(part)
    text = console.export_text()
    assert "Step time by cost term" in text and "all_to_all" in text


@pytest.mark.slow
def test_profile_counts_the_page_faults_the_cost_model_predicts():
    """On CPU devices a scratch block over glibc's 32 MiB map threshold is paged in afresh every
    step and one under it is not: the count of `profile` must match `first_touch` both ways."""
    from pathlib import Path

    import os
    import subprocess
    import sys

    profile = Path(__file__).parent / "regress_cpu8.yaml"  # a calibrated profile: has host_memory
    assert presets.load_hardware(profile).host_memory is not None
    # in a fresh interpreter, as a user runs it: the heap of a long test session may hold free
    # regions large enough to serve the scratch block without mapping it (its faults then vary)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-m", "moeplan", "profile", "--model", "small-moe", "--hardware", str(profile),
         "--devices", "8", "--mesh", "data=8", "--mesh", "data=1,expert=8", "--seq-len", "64", "--batch", "16",
         "--steps", "3", "--warmup", "3", "--format", "json", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    big, small = doc["results"]
    mib = 2**20
    # data=8: gradients + their all-reduce output, 114 MiB of scratch per device
    assert big["predicted"]["first_touch_bytes_per_device"] > 64 * mib
    assert big["measured"]["first_touch_bytes_per_device"] == pytest.approx(
        big["predicted"]["first_touch_bytes_per_device"], rel=0.15)
    assert big["comparison"]["first_touch_bytes"]["measured"] == big["measured"]["first_touch_bytes_per_device"]
    assert big["comparison"]["memory_ratio"] == pytest.approx(1.0, abs=0.05)  # the reduce buffer counted
    # data=1,expert=8: ~26 MiB, under the threshold: predicted 0; glibc recycles most of it once
    # its threshold has adapted (0-3 MiB faulted per step over a benchmark's many steps, up to
    # 13 MiB after one warm-up step)
    scratch = small["measured"]["memory_analysis"]["temp_size"]
    assert 16 * mib < scratch < 32 * mib
    assert small["predicted"]["first_touch_bytes_per_device"] == 0
    assert small["measured"]["first_touch_bytes_per_device"] < 0.5 * scratch
    from rich.console import Console

    from moeplan.commands.validate import profile_tables

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    for part in profile_tables(doc):
        console.print(part)
    text = console.export_text()
    assert "Scratch paged in afresh per step" in text and "data=1,expert=8,model=1" in text
