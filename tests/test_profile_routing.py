"""`moeplan profile --routing`: the real router driven to a skew, measured beside the routing model.

Fast tests fake the device side (no compile); the slow one profiles tiny-moe on one mesh.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan import presets
from moeplan.cli import app
from moeplan.commands.validate import profile_tables
from moeplan.cost import balance as bal
from moeplan.specs import Mesh
from moeplan.validate import profile, skew
from tests.test_validate_compare import meas

runner = CliRunner()
BASE = ["profile", "--hardware", "cpu", "--devices", "8", "--mesh", "data=2,expert=4"]


def one_line_exit_2(*args: str) -> str:
    """A bad-input run: exit code 2, one line on stderr, no traceback; that line."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_bad_routing_is_one_line_exit_2():
    assert "zipf exponent must be a number" in one_line_exit_2(*BASE, "--routing", "zipf:abc")
    assert "not one of uniform" in one_line_exit_2(*BASE, "--routing", "normal")


def test_routing_on_a_dense_model_is_one_line_exit_2():
    assert "dense" in one_line_exit_2(*BASE, "--model", "tiny-dense", "--routing", "zipf:1.2")


def test_histogram_of_the_wrong_size_fails_before_compiling(tmp_path):
    hist = tmp_path / "load.json"
    hist.write_text("[1, 2, 3]")
    assert "3 experts but the model has 8" in one_line_exit_2(*BASE, "--routing", f"hist:{hist}")


def test_bad_learning_rate_and_target_are_one_line_exit_2():
    assert "--learning-rate" in one_line_exit_2(*BASE, "--learning-rate", "-1")
    assert "--target" in one_line_exit_2(*BASE, "--routing", "uniform", "--target", "tpu-v5p:2x2x1")


def test_step_options_cross_as_json_and_come_back_as_step_kwargs():
    model = presets.load_model("tiny-moe")
    assert skew.step_options(model, None, None) == {}  # undriven: the default step
    opts = json.loads(json.dumps(skew.step_options(model, bal.parse_routing("zipf:1.5"), 0.01)))
    kwargs = skew.step_kwargs(opts)
    assert kwargs["router_noise"] is True and kwargs["learning_rate"] == 0.01
    assert isinstance(kwargs["router_bias"], tuple) and len(kwargs["router_bias"]) == 8
    w = np.exp(kwargs["router_bias"])  # the bias is log w_e of zipf:1.5
    assert w / w.sum() == pytest.approx((np.arange(1, 9) ** -1.5) / (np.arange(1, 9) ** -1.5).sum())


def raw_record(routing: bal.Routing, *, groups: int = 8, tokens: int = 128, capacity: int = 40) -> dict:
    """A device-side `routing` record whose first step is exactly the predicted loads."""
    law = bal.resolve(routing, 8, 2)
    load = groups * tokens * law.inclusion
    pred_drop = bal.dropped_fraction(law.inclusion, tokens, capacity)
    dropped = pred_drop * groups * tokens * 2
    flat = np.full(8, groups * tokens * 2 / 8)
    history = [{"expert_load": np.stack([load, load]), "dropped": np.array([dropped, dropped]),
                "lm_loss": 6.0, "aux_loss": 4.0, "z_loss": 0.0},
               {"expert_load": np.stack([flat, flat]), "dropped": np.zeros(2),
                "lm_loss": 5.0, "aux_loss": 2.0, "z_loss": 0.1}]
    return skew.measured_routing(history, groups=groups, tokens=tokens, capacity=capacity, learning_rate=0.01)


def test_compare_puts_the_first_step_beside_the_prediction_and_reports_the_last():
    routing = bal.parse_routing("zipf:1.5")
    obj = skew.compare(routing, 2, json.loads(json.dumps(raw_record(routing))))
    assert obj["routing"] == "zipf:1.5" and obj["steps"] == 2 and obj["learning_rate"] == 0.01
    assert obj["aux_loss"] == [4.0, 2.0] and obj["z_loss"] == [0.0, pytest.approx(0.1)]
    assert obj["aux_loss_balanced"] == 2.0 and 2.0 < obj["aux_loss_predicted"] < 2 * 8
    assert len(obj["layers"]) == 2
    for layer in obj["layers"]:
        assert layer["dropped_fraction"]["measured"] == pytest.approx(layer["dropped_fraction"]["predicted"])
        assert layer["tokens_per_expert"]["measured"] == pytest.approx(layer["tokens_per_expert"]["predicted"])
        assert layer["max_mean"]["predicted"] == pytest.approx(layer["max_mean"]["measured"], rel=0.05)
        assert layer["last"] == {"dropped_fraction": 0.0, "max_mean": 1.0, "tokens_per_expert": [256.0] * 8}
        kept = np.array(layer["expected_kept"])
        assert np.all(kept <= 8 * 40 + 1e-9) and kept.sum() < sum(layer["tokens_per_expert"]["predicted"])
    assert 1.0 < obj["uniform_max_mean"] < 1.2  # balanced routing, 1024 tokens pooled
    assert skew.mean_max_mean(obj, "last") == 1.0 < skew.mean_max_mean(obj, "first")


def fake_run(routing_raw: dict | None):
    """A stand-in for devices.run that returns one measured candidate (with `routing` if given)."""
    def run(task, payload, *, devices, processes, cluster, on_event):
        run.payload = payload
        rec = meas(0.2, {"all-reduce": 1.0}).record()
        if routing_raw is not None:
            rec["routing"] = routing_raw
        on_event({"event": "result", "index": 0, "measured": rec})
    return run


def request(routing: bal.Routing | None) -> profile.ProfileRequest:
    return profile.ProfileRequest(
        model=presets.load_model("tiny-moe"), train=presets.load_train(None, seq_len=64, global_batch=16),
        hardware=presets.load_hardware("cpu"), meshes=[Mesh(data=2, expert=4)], devices=8, routing=routing)


def test_run_profile_attaches_the_routing_object_and_renders_it(monkeypatch):
    routing = bal.parse_routing("zipf:1.5")
    monkeypatch.setattr(profile.dev, "run", fake_run(raw_record(routing)))
    doc = profile.run_profile(request(routing)).record()
    assert profile.dev.run.payload["options"]["router_noise"] is True
    assert doc["schema_version"] == 1 and doc["routing"] == "zipf:1.5"
    (r,) = doc["results"]
    assert "routing" not in r["measured"]  # moved out of the raw record, not duplicated
    assert r["routing"]["layers"][0]["dropped_fraction"]["predicted"] == pytest.approx(
        r["predicted"]["dropped_fraction"])  # the cost model was given the same routing
    text = render(doc)
    assert "Routing zipf:1.5" in text and "e0 pred" in text and "meas" in text
    assert "aux loss by step 1:4.0000 2:2.0000" in text and "3.2" in text


def test_undriven_profile_has_null_routing(monkeypatch):
    monkeypatch.setattr(profile.dev, "run", fake_run(None))
    doc = profile.run_profile(request(None)).record()
    assert profile.dev.run.payload["options"] == {}
    assert doc["routing"] is None and doc["results"][0]["routing"] is None
    assert "Routing" not in render(doc)


def render(doc: dict) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    for renderable in profile_tables(doc):
        console.print(renderable)
    return console.export_text()


def test_paired_chart_groups_many_experts_by_their_busiest():
    from rich.console import Console

    from moeplan.commands.balance import paired_chart

    pred = np.arange(64, dtype=float)
    meas_load = pred[::-1].copy()
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(paired_chart("t", pred, pred, meas_load, None))
    lines = console.export_text().splitlines()
    assert sum("pred" in line for line in lines) == 32
    assert lines[1].strip().startswith("e0-1 pred") and lines[1].rstrip().endswith("1.0")  # busiest of e0, e1
    assert lines[2].rstrip().endswith("63.0")  # measured: its own busiest of the pair


@pytest.mark.slow
def test_profile_zipf_matches_the_routing_model_and_trains_toward_uniform():
    """tiny-moe, data=2 x expert=4, T=512 tokens per group: the first step's drops within 2 pp
    and max/mean within 10% of predicted on both MoE layers; a few steps at lr 1e-2 lower the
    aux loss and the max/mean load."""
    result = runner.invoke(app, [*BASE, "--model", "tiny-moe", "--seq-len", "128", "--batch", "32",
                                 "--routing", "zipf:1.5", "--learning-rate", "0.01", "--steps", "8",
                                 "--warmup", "1", "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["routing"] == "zipf:1.5" and doc["learning_rate"] == 0.01
    (r,) = doc["results"]
    assert r["error"] is None, r["error"]
    o = r["routing"]
    assert (o["groups"], o["tokens_per_group"], o["capacity"], o["steps"]) == (8, 512, 160, 9)
    assert len(o["aux_loss"]) == len(o["z_loss"]) == len(o["lm_loss"]) == 9
    for layer in o["layers"]:
        drop, mm = layer["dropped_fraction"], layer["max_mean"]
        assert abs(drop["measured"] - drop["predicted"]) <= 0.02, drop
        assert abs(mm["measured"] / mm["predicted"] - 1) <= 0.10, mm
        assert sum(layer["tokens_per_expert"]["measured"]) == 8 * 512 * 2  # every token counted K times
    assert o["aux_loss"][0] == pytest.approx(o["aux_loss_predicted"], rel=0.03)  # Switch loss of the law
    assert o["aux_loss"][-1] < o["aux_loss"][0]
    assert skew.mean_max_mean(o, "last") < skew.mean_max_mean(o, "first")
