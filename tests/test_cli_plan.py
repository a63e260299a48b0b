"""The planning CLI (`presets`, `estimate`, `suggest-mesh`) as a user sees it, via CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moeplan import presets, search
from moeplan.cli import app
from moeplan.errors import MoeplanError

runner = CliRunner()
ROW_KEYS = {
    "mesh", "num_experts", "step_time_s", "step_time_bounds_s", "breakdown_s", "comm_bytes_per_device",
    "flops_per_device", "memory_bytes_per_device", "fits_memory", "mfu", "tokens_per_s", "fsdp", "remat",
}
TINY = ["--model", "tiny-moe", "--devices", "8", "--seq-len", "128", "--batch", "64"]


def ok(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def as_json(*args: str) -> dict:
    return json.loads(ok(*args, "--format", "json").stdout)


def error_lines(*args: str) -> list[str]:
    """Run a command that must fail cleanly: non-zero exit, no traceback; its stderr lines."""
    result = runner.invoke(app, list(args))
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: ")
    return lines


def one_error(*args: str) -> str:
    lines = error_lines(*args)
    assert len(lines) == 1, lines
    return lines[0]


def check_row(row: dict, devices: int) -> None:
    assert ROW_KEYS <= set(row)
    mesh = row["mesh"]
    assert mesh["data"] * mesh["expert"] * mesh["model"] == devices
    lower, upper = row["step_time_bounds_s"]
    assert 0 < lower <= row["step_time_s"] <= upper
    assert set(row["breakdown_s"]) == {"compute", "all_to_all", "model_axis", "data_axis"}
    assert set(row["comm_bytes_per_device"]) == {"all_to_all", "all_reduce", "all_gather", "reduce_scatter"}
    assert row["fits_memory"] is True or row["fits_memory"] is False


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- happy paths ------------------------------------------------------------------------


def test_help_lists_planning_commands():
    out = ok("--help").output
    for command in ("presets", "estimate", "suggest-mesh"):
        assert command in out


def test_presets_lists_key_figures():
    out = ok("presets").stdout
    assert "mixtral-8x7b" in out and "h100-sxm" in out
    data = as_json("presets")
    hw = {h["preset"]: h for h in data["hardware"]}
    h100 = presets.load_hardware("h100-sxm")
    assert hw["h100-sxm"]["peak_tflops"] == pytest.approx(h100.peak_flops / 1e12)
    assert hw["h100-sxm"]["hbm_gib"] == pytest.approx(h100.hbm_bytes / 2**30)
    assert hw["h100-sxm"]["scale_up_size"] == h100.scale_up_size
    models = {m["preset"]: m for m in data["models"]}
    mixtral = models["mixtral-8x7b"]
    assert mixtral["num_experts"] == presets.load_model("mixtral-8x7b").moe.num_experts
    assert mixtral["params_activated"] < mixtral["params_total"]
    assert models["tiny-dense"]["params_activated"] == models["tiny-dense"]["params_total"]


def test_suggest_mesh_with_no_options_plans_the_default():
    result = ok("suggest-mesh")
    model = presets.load_model("mixtral-8x7b")
    assert model.name in result.stdout
    assert "rejected" in result.stdout and "dense backbone" in result.stdout
    data = as_json("suggest-mesh")
    assert data["schema_version"] == 1
    assert data["devices"] == 64
    assert data["model"] == model.name
    assert data["hardware"] == presets.load_hardware("h100-sxm").name
    assert 1 <= len(data["candidates"]) <= 5


def test_suggest_mesh_json_is_ranked_and_accounts_for_every_candidate():
    data = as_json("suggest-mesh", *TINY, "--top", "50")
    rows = data["candidates"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    steps = [r["step_time_s"] for r in rows]
    assert steps == sorted(steps)
    for r in rows:
        check_row(r, 8)
        assert r["fits_memory"]
    assert data["enumerated"] == 10 * 2 * 3
    assert data["feasible"] + sum(data["rejected"].values()) == data["enumerated"]
    assert len(rows) == min(50, data["feasible"])
    assert set(data["rejected"]) <= set(search.LABELS)


def test_yaml_output_matches_json():
    args = ("suggest-mesh", *TINY)
    assert yaml.safe_load(ok(*args, "--format", "yaml").stdout) == json.loads(ok(*args, "--format", "json").stdout)


def test_table_shows_breakdown_rejections_and_dense_line():
    out = ok("suggest-mesh", *TINY, "--devices", "64").stdout
    for header in ("compute", "all-to-all", "model axis", "data axis", "memory", "MFU"):
        assert header in out
    rejected = as_json("suggest-mesh", *TINY, "--devices", "64")["rejected"]
    assert rejected and f"rejected {sum(rejected.values())} of" in out
    for key, count in rejected.items():
        assert f"{search.LABELS[key]}: {count}" in out
    assert "dense backbone" in out and "step time" in out


def test_dense_backbone_comparison_for_moe_only():
    moe = as_json("suggest-mesh", *TINY)
    dense = moe["dense_backbone"]
    assert dense["feasible"]
    assert dense["step_time_ratio"] == pytest.approx(moe["candidates"][0]["step_time_s"] / dense["step_time_s"])
    assert dense["mesh"]["expert"] == 1
    plain = as_json("suggest-mesh", "--model", "tiny-dense", "--devices", "8", "--seq-len", "128", "--batch", "64")
    assert "dense_backbone" not in plain
    assert all(r["mesh"]["expert"] == 1 for r in plain["candidates"])


def test_top_fsdp_and_remat_restrict_the_search():
    data = as_json("suggest-mesh", *TINY, "--top", "2", "--fsdp", "on", "--remat", "full")
    assert len(data["candidates"]) == 2
    assert all(r["fsdp"] and r["remat"] == "full" for r in data["candidates"])
    assert data["enumerated"] == 10
    off = as_json("suggest-mesh", *TINY, "--fsdp", "off")
    assert all(not r["fsdp"] for r in off["candidates"])


def test_expert_proposal():
    data = as_json("suggest-mesh", *TINY, "--experts", "16,4,8", "--max-step-increase", "0.5")
    p = data["experts"]
    assert p["max_step_increase"] == 0.5
    assert [c["num_experts"] for c in p["counts"]] == [4, 8, 16]
    for c in p["counts"]:
        if c["feasible"]:
            assert c["best"]["mesh"]["data"] * c["best"]["mesh"]["expert"] * c["best"]["mesh"]["model"] == 8
            assert c["step_time_ratio"] == pytest.approx(c["step_time_s"] / p["dense_step_time_s"])
            assert c["within_budget"] == (c["step_time_ratio"] <= 1.5)
    within = [c["num_experts"] for c in p["counts"] if c["within_budget"]]
    assert p["chosen"] == (max(within) if within else None)
    table = ok("suggest-mesh", *TINY, "--experts", "4,8").stdout
    assert "Expert counts" in table


def test_estimate_reports_every_term():
    data = as_json("estimate", *TINY, "--mesh", "data=2,expert=2,model=2")
    (row,) = data["candidates"]
    check_row(row, 8)
    assert row["mesh"] == {"data": 2, "expert": 2, "model": 2}
    d = data["detail"]
    assert d["params_activated"] < d["params_total"]
    assert d["flops_per_token"] > 0
    assert row["train_days"] > 0
    kinds = {c["kind"] for c in d["collectives"]}
    assert "all-to-all" in kinds and "all-reduce" in kinds
    # the per-collective rows account for every term and every byte
    for term in ("all_to_all", "model_axis", "data_axis"):
        total = sum(c["time_s"] for c in d["collectives"] if c["term"] == term)
        assert total == pytest.approx(row["breakdown_s"][term], rel=1e-9)
    for kind, nbytes in row["comm_bytes_per_device"].items():
        total = sum(c["wire_bytes_per_step"] for c in d["collectives"] if c["kind"].replace("-", "_") == kind)
        assert total == pytest.approx(nbytes, rel=1e-9)
    assert sum(row["memory_breakdown_bytes"].values()) == pytest.approx(row["memory_bytes_per_device"])


def test_estimate_options_reach_the_plan():
    data = as_json("estimate", *TINY, "--mesh", "4x2x1", "--fsdp", "--remat", "full", "--grad-accum", "2")
    row = data["candidates"][0]
    assert row["fsdp"] is True and row["remat"] == "full"
    assert data["train"]["grad_accum"] == 2
    tokens = as_json("estimate", *TINY[:4], "--mesh", "8x1x1", "--batch-tokens", "4096", "--seq-len", "512")
    assert tokens["train"]["global_batch"] == 8


def test_estimate_table_lists_terms():
    out = ok("estimate", *TINY, "--mesh", "2x2x2").stdout
    for text in ("step time", "Compute per device", "Collectives", "dispatch", "Memory per device", "HBM", "MFU"):
        assert text in out


def test_estimate_says_which_end_of_backward_the_memory_peak_is_at():
    # no remat keeps every layer's activations: they outweigh the gradients, the peak is at the
    # start; full remat keeps so few that every gradient outweighs them, the peak is at the end
    full = ["--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--mesh", "data=8,expert=4,model=2"]
    assert "live at the peak: the start of backward" in ok("estimate", *full).stdout
    end = ok("estimate", *full, "--remat", "full")
    assert "live at the peak: the end of backward" in end.stdout
    parts = as_json("estimate", *full, "--remat", "full")["candidates"][0]["memory_breakdown_bytes"]
    assert parts["logits"] == 0 and parts["gradients"] == parts["weights"]  # all of them, in the param dtype


def test_estimate_reads_a_train_file(tmp_path):
    path = write(tmp_path, "train.yaml", "seq_len: 64\nglobal_batch: 16\ngrad_accum: 2\n")
    data = as_json("estimate", "--model", "tiny-moe", "--mesh", "4x2x1", "--train", path, "--grad-accum", "1")
    assert data["train"]["seq_len"] == 64 and data["train"]["global_batch"] == 16
    assert data["train"]["grad_accum"] == 1  # the command line overrides the file


# ---- bad input: one clear line, non-zero exit, no traceback ------------------------------


def test_unknown_preset_lists_known_and_closest():
    line = one_error("suggest-mesh", "--model", "mixtral-8x7")
    assert "unknown model preset 'mixtral-8x7'" in line
    assert "Did you mean 'mixtral-8x7b'" in line and "tiny-moe" in line
    line = one_error("estimate", "--mesh", "8x1x1", "--hardware", "h100")
    assert "unknown hardware preset" in line and "h100-sxm" in line


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "d_model: 64\nlayers: 2\nheads: [4\nvocab: 256\n")
    line = one_error("suggest-mesh", "--model", path)
    assert f"{path}:" in line and "malformed YAML" in line


def test_invalid_field_in_yaml_names_the_field(tmp_path):
    path = write(tmp_path, "zero.yaml", "d_model: 64\nlayers: 2\nheads: 4\nvocab: 256\nffn_hidden: 0\n")
    line = one_error("suggest-mesh", "--model", path, "--devices", "8")
    assert f"{path}:5" in line and "ffn_hidden" in line and "greater than 0" in line


@pytest.mark.parametrize(
    "args, field",
    [
        (["suggest-mesh", "--devices", "0"], "--devices"),
        (["suggest-mesh", "--devices", "-8"], "--devices"),
        (["suggest-mesh", "--top", "0"], "--top"),
        (["suggest-mesh", "--seq-len", "0"], "seq_len"),
        (["suggest-mesh", "--batch", "0"], "global_batch"),
        (["suggest-mesh", "--grad-accum", "0"], "grad_accum"),
        (["estimate", "--mesh", "8x8x1", "--batch-tokens", "-5"], "global_batch_tokens"),
        (["estimate", "--mesh", "8x8x1", "--devices", "0"], "--devices"),
        (["suggest-mesh", "--experts", "0,8"], "expert count"),
        (["suggest-mesh", "--experts", "8", "--max-step-increase", "-1"], "max step increase"),
    ],
)
def test_zero_or_negative_sizes_name_the_field(args, field):
    line = one_error(*args)
    assert field in line
    assert "positive" in line or "greater than 0" in line or ">= 0" in line


def test_device_count_no_mesh_fits_lists_reasons():
    lines = error_lines("suggest-mesh", "--devices", "7")
    assert "no feasible mesh" in lines[0] and "7" in lines[0]
    reasons = lines[1:]
    assert len(reasons) >= 2 and all("e.g." in r for r in reasons)
    assert any("heads not divisible" in r for r in reasons)
    assert any("experts not divisible" in r for r in reasons)


def test_heads_not_divisible_by_model_axis():
    heads = presets.load_model("mixtral-8x7b").heads
    line = one_error("estimate", "--mesh", f"data=1,expert=1,model={heads * 2}")
    assert f"heads={heads} is not divisible by model={heads * 2}" in line


def test_mesh_product_must_match_devices():
    line = one_error("estimate", "--mesh", "data=8,expert=4,model=2", "--devices", "32")
    assert "64 devices" in line and "32" in line


@pytest.mark.parametrize(
    "args, text",
    [
        (["estimate"], "estimate needs --mesh"),
        (["estimate", "--mesh", "8x4"], "not of the form"),
        (["estimate", "--mesh", "data=8,pipeline=2"], "axis 'pipeline' is unknown"),
        (["suggest-mesh", "--format", "xml"], "unknown format 'xml'"),
        (["estimate", "--mesh", "8x8x1", "--format", "csv"], "unknown format 'csv'"),
        (["presets", "--format", "toml"], "unknown format 'toml'"),
        (["suggest-mesh", "--fsdp", "maybe"], "--fsdp 'maybe'"),
        (["suggest-mesh", "--remat", "sometimes"], "--remat 'sometimes'"),
        (["estimate", "--mesh", "8x8x1", "--remat", "some"], "--remat 'some'"),
        (["suggest-mesh", "--experts", "8,lots"], "comma-separated"),
        (["suggest-mesh", "--model", "tiny-dense", "--experts", "8"], "dense model"),
        (["suggest-mesh", "--compute-dtype", "int3"], "compute_dtype"),
        (["suggest-mesh", "--train", "/no/such/train.yaml"], "no such file"),
        (["suggest-mesh", "--batch", "8", "--batch-tokens", "4096", "--train", "/no/such.yaml"], "no such file"),
    ],
)
def test_other_bad_input_is_one_line(args, text):
    assert text in one_error(*args)


def test_debug_shows_the_exception():
    result = runner.invoke(app, ["--debug", "suggest-mesh", "--devices", "0"])
    assert isinstance(result.exception, MoeplanError)


# ---- start-up ---------------------------------------------------------------------------


def test_cli_import_does_not_import_jax():
    code = "import moeplan.cli, sys; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_imports_no_numpy_yaml_specs_or_cost_model():
    """Registering the commands and printing --help must not pay for the planning libraries."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from moeplan.cli import app\n"
        "res = CliRunner().invoke(app, ['--help'])\n"
        "assert res.exit_code == 0 and 'suggest-mesh' in res.output, res.output\n"
        "heavy = ['jax', 'numpy', 'yaml', 'moeplan.specs', 'moeplan.presets', 'moeplan.search',\n"
        "         'moeplan.cost.step', 'moeplan.cost.balance', 'moeplan.validate.suite']\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, f'imported by --help: {loaded}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_option_defaults_spelled_out_for_fast_help_match_the_library():
    from moeplan.commands import balance as balance_cmds
    from moeplan.commands import plan
    from moeplan.cost import balance

    assert plan.DEFAULT_MAX_STEP_INCREASE == search.DEFAULT_MAX_STEP_INCREASE
    assert balance_cmds.DEFAULT_SEED == balance.DEFAULT_SEED


def test_error_line_in_a_file_with_merge_keys(tmp_path):
    """A merged key ('<<') is not a line of its own: the error names the enclosing key's line,
    as a freshly parsed tree gives it (building the data rewrites merge keys in the tree)."""
    text = ("d_model: 64\nlayers: 2\nheads: 4\nvocab: 256\nffn_hidden: 128\n"
            "moe:\n  <<: {num_experts: 4, top_k: 0}\n  expert_hidden: 64\n")
    path = write(tmp_path, "merged.yaml", text)
    line = one_error("suggest-mesh", "--model", path, "--devices", "8")
    assert line.startswith(f"error: {path}:6: invalid value for 'moe.top_k'"), line


def test_planning_commands_do_not_import_jax():
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from moeplan.cli import app\n"
        "r = CliRunner()\n"
        "for args in (['presets'], ['suggest-mesh', '--experts', '8,16'], ['estimate', '--mesh', '8x8x1']):\n"
        "    res = r.invoke(app, args)\n"
        "    assert res.exit_code == 0, res.output\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
