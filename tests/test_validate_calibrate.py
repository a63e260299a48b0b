"""Calibration: the alpha-beta fit, the profile it builds, and how the YAML is written."""

import numpy as np
import pytest

from moeplan import presets
from moeplan.errors import MoeplanError
from moeplan.validate import calibrate as cal

ALPHA, BW = 40e-6, 2.5e9  # the "true" link the synthetic timings are made from


def synthetic_points(link="scale_up", alpha=ALPHA, bw=BW, groups=(2, 4, 8), noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    for kind in cal.KINDS:
        for g in groups:
            for nbytes in (16 * 1024, 256 * 1024, 4 * 2**20):
                p = cal.collective_point(kind, g, link, nbytes, 1.0)
                t = p["steps"] * alpha + p["wire_bytes"] / bw
                p["time_s"] = t * (1 + noise * rng.standard_normal())
                pts.append(p)
    return pts


def test_collective_point_uses_cost_model_conventions():
    p = cal.collective_point("all-reduce", 4, "scale_up", 1000, 1e-3)
    assert p["wire_bytes"] == pytest.approx(2 * 3 / 4 * 1000)  # ring all-reduce 2(n-1)/n
    assert p["steps"] == 6  # 2(n-1)
    q = cal.collective_point("all-to-all", 4, "scale_up", 1000, 1e-3)
    assert q["wire_bytes"] == pytest.approx(750) and q["steps"] == 3


def test_fit_recovers_alpha_and_beta_exactly_without_noise():
    fit = cal.fit_link(synthetic_points())
    assert fit.latency == pytest.approx(ALPHA, rel=1e-9)
    assert fit.bandwidth == pytest.approx(BW, rel=1e-9)
    assert fit.rms_rel_residual == pytest.approx(0.0, abs=1e-9)
    assert fit.points == 36


def test_fit_with_noise_stays_close():
    fit = cal.fit_link(synthetic_points(noise=0.02, seed=1))
    assert fit.latency == pytest.approx(ALPHA, rel=0.05)
    assert fit.bandwidth == pytest.approx(BW, rel=0.05)
    assert 0.005 < fit.rms_rel_residual < 0.05  # residual reflects the 2% noise


def test_fit_never_returns_negative_latency():
    # pure bandwidth link with noise that pulls the free fit below zero
    steps = np.array([1.0, 1.0, 7.0, 7.0])
    wire = np.array([1e6, 4e6, 1e6, 4e6])
    times = wire / BW * np.array([1.0, 1.0, 0.9, 0.9])  # the many-step points are *faster*
    fit = cal.fit_alpha_beta(steps, wire, times)
    assert fit.latency == 0.0
    assert fit.bandwidth == pytest.approx(BW, rel=0.1)


def test_fit_needs_two_positive_points():
    with pytest.raises(ValueError):
        cal.fit_alpha_beta(np.array([1.0]), np.array([1.0]), np.array([1.0]))
    with pytest.raises(ValueError):
        cal.fit_alpha_beta(np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([1.0, 0.0]))


def test_overlap_fraction():
    assert cal.overlap_fraction(10.0, 4.0, 11.0) == pytest.approx(0.75)  # 3 of the 4 hidden
    assert cal.overlap_fraction(10.0, 4.0, 15.0) == 0.0  # slower together: clipped
    assert cal.overlap_fraction(10.0, 4.0, 9.0) == 1.0  # faster than the longer alone: clipped


def raw_record(processes=1, count=8):
    pts = synthetic_points(groups=(2, 4) if processes > 1 else (2, 4, 8))
    if processes > 1:
        pts += synthetic_points("scale_out", alpha=2e-4, bw=1e8, groups=(2,))
    return {
        "matmul": [{"m": 128, "k": 128, "n": 128, "batch": 4, "time_s": 1e-3, "flops_per_s": 5e9},
                   {"m": 512, "k": 512, "n": 512, "batch": 1, "time_s": 1e-2, "flops_per_s": 8e9}],
        "copy": [{"bytes_per_device": 2**22, "time_s": 1e-3, "bytes_per_s": 3e9},
                 {"bytes_per_device": 2**24, "time_s": 5e-3, "bytes_per_s": 2e9}],
        "collectives": pts,
        "overlap": {"matmul_s": 10.0, "all_reduce_s": 4.0, "both_s": 12.0},
        "device": {"platform": "cpu", "kind": "cpu", "count": count, "processes": processes,
                   "jax": "0.0.test", "memory_bytes": 2**31, "host_cpus": 2},
        "dtype": "float32",
        "date": "2000-01-01 00:00 UTC",
    }


def test_fit_profile_single_process():
    prof = cal.fit_profile(raw_record(), name="test cpu")
    assert prof["peak_flops"] == 8e9 and prof["matmul_efficiency"] == 1.0
    assert prof["matmul_curve"][-1]["efficiency"] == 1.0  # the peak's own size
    assert prof["hbm_bandwidth"] == pytest.approx(2 / (1 / 3e9 + 1 / 2e9))  # harmonic mean: 2.4e9
    assert prof["scale_up"]["latency"] == pytest.approx(ALPHA)
    assert prof["scale_up"]["bandwidth"] == pytest.approx(BW)
    assert prof["scale_out"] == prof["scale_up"]  # one process: one link
    assert prof["scale_up_size"] == 8
    assert prof["overlap"] == pytest.approx(0.5)  # (10 + 4 - 12) / 4
    assert set(prof["measured"]["collective_fit_by_kind"]) == set(cal.KINDS)
    presets.build(presets.HardwareProfile, prof, "test")  # a valid HardwareProfile


def test_matmul_curve_is_rate_over_peak_per_size_equal_sizes_averaged():
    points = [{"m": 256, "k": 256, "n": 256, "flops_per_s": 6e9},
              {"m": 64, "k": 16, "n": 64, "flops_per_s": 1e9},
              {"m": 256, "k": 128, "n": 512, "flops_per_s": 4e9},  # same 2mkn as 256^3
              {"m": 1024, "k": 1024, "n": 1024, "flops_per_s": 8e9}]
    curve = cal.matmul_curve(points)
    assert [p["size"] for p in curve] == [2 * 64 * 16 * 64, 2 * 256**3, 2 * 1024**3]
    assert [p["efficiency"] for p in curve] == pytest.approx([1 / 8, 5 / 8, 1.0])


def test_fit_profile_two_processes_separates_links():
    prof = cal.fit_profile(raw_record(processes=2), name="test")
    assert prof["scale_up_size"] == 4
    assert prof["scale_up"]["bandwidth"] == pytest.approx(BW)
    assert prof["scale_out"]["latency"] == pytest.approx(2e-4)
    assert prof["scale_out"]["bandwidth"] == pytest.approx(1e8)


def test_write_profile_is_loadable_and_marked(tmp_path):
    path = tmp_path / "hw" / "local-cpu.yaml"
    cal.write_profile(path, cal.fit_profile(raw_record(), name="local"))
    text = path.read_text()
    assert text.splitlines()[0] == cal.MARKER
    assert "jax 0.0.test" in text.splitlines()[1]
    hw = presets.load_hardware(path)
    assert hw.peak_flops == 8e9 and hw.measured["tool"] == "moeplan calibrate"
    assert [p.name for p in path.parent.iterdir()] == ["local-cpu.yaml"]  # no temp file left


def test_write_profile_refuses_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: my tuned profile\n")
    with pytest.raises(MoeplanError, match="--force"):
        cal.write_profile(path, cal.fit_profile(raw_record(), name="x"))
    assert path.read_text() == "name: my tuned profile\n"  # untouched
    cal.write_profile(path, cal.fit_profile(raw_record(), name="x"), force=True)
    assert cal.written_by_calibrate(path)


def test_write_profile_refreshes_its_own_file(tmp_path):
    path = tmp_path / "cal.yaml"
    cal.write_profile(path, cal.fit_profile(raw_record(), name="first"))
    cal.write_profile(path, cal.fit_profile(raw_record(), name="second"))
    assert presets.load_hardware(path).name == "second"


def test_cache_path_is_keyed_by_everything_that_changes_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    a = cal.cache_path("NVIDIA H100 80GB HBM3", 8, 1, "bfloat16", "0.10.2")
    assert a.parent == tmp_path / "hardware"
    assert " " not in a.name and "8dev" in a.name and "0.10.2" in a.name
    others = {cal.cache_path("NVIDIA H100 80GB HBM3", 4, 1, "bfloat16", "0.10.2"),
              cal.cache_path("NVIDIA H100 80GB HBM3", 8, 2, "bfloat16", "0.10.2"),
              cal.cache_path("NVIDIA H100 80GB HBM3", 8, 1, "float32", "0.10.2"),
              cal.cache_path("NVIDIA H100 80GB HBM3", 8, 1, "bfloat16", "0.10.3"),
              cal.cache_path("cpu", 8, 1, "bfloat16", "0.10.2")}
    assert a not in others and len(others) == 5


@pytest.mark.slow
def test_collective_chains_survive_compilation():
    """Each benchmark program must really contain `repeat` collectives of its kind, on 2- and
    8-device groups, or the per-op time would be wrong."""
    import jax

    from moeplan.validate import microbench as mb

    b = mb.Bench(devices=jax.devices()[:8], steps=1, warmup=0, sweep=cal.QUICK)
    for kind in cal.KINDS:
        for g in (2, 8):
            p = mb.collective(b, kind, g, "scale_up", 64 * 1024)
            assert p["ops_in_hlo"] == cal.QUICK.repeat, (kind, g)
            assert p["time_s"] > 0 and p["buffer_bytes"] == 64 * 1024


def test_group_meshes_stay_inside_or_cross_processes():
    """scale_up groups are contiguous devices of one process; scale_out groups span processes."""
    from dataclasses import dataclass

    from moeplan.validate import microbench as mb

    @dataclass(frozen=True)
    class FakeDevice:
        id: int
        process_index: int

    devs = [FakeDevice(i, i // 4) for i in range(8)]  # 2 processes x 4 devices
    b = mb.Bench(devices=devs)
    assert mb.link_groups(b) == {"scale_up": [2, 4], "scale_out": [2]}
    for g in (2, 4):
        rows = mb.group_grid(b, g, "scale_up")
        assert rows.shape == (8 // g, g)
        assert all(len({d.process_index for d in row}) == 1 for row in rows)
    rows = mb.group_grid(b, 2, "scale_out")
    assert all(len({d.process_index for d in row}) == 2 for row in rows)
    assert sorted(d.id for d in rows.ravel()) == list(range(8))  # every device in one group


def test_copy_rates_far_apart_warn_of_a_cliff():
    raw = raw_record()
    raw["copy"][0]["bytes_per_s"] = 4e9  # against 2e9: 2x apart
    (line,) = cal.calibration_warnings(cal.fit_profile(raw, name="test cpu")["measured"])
    assert "2.00x" in line and "4 MiB: 4.00 GB/s" in line and "16 MiB: 2.00 GB/s" in line
    # 3e9 against 2e9 is 1.5x apart: within CLIFF_SPREAD
    assert cal.calibration_warnings(cal.fit_profile(raw_record(), name="test cpu")["measured"]) == []
    # a slow size that page-faulted its output, slower than its in-place copy, is explained
    # (and priced by host_memory)
    raw["copy"][1]["fault_bytes"] = float(raw["copy"][1]["bytes_per_device"])
    raw["copy_in_place"] = [{"bytes_per_device": 2**22, "time_s": 1e-3, "bytes_per_s": 8e9},
                            {"bytes_per_device": 2**24, "time_s": 2e-3, "bytes_per_s": 1.6e10}]
    assert cal.calibration_warnings(cal.fit_profile(raw, name="test cpu")["measured"]) == []


def test_collective_scale_is_each_kinds_own_fit_over_the_joint_one():
    same = cal.fit_profile(raw_record(), name="test cpu")["collective_scale"]
    for kind in cal.KINDS:  # every kind on the same alpha and beta: scales of 1
        assert same[kind]["bandwidth"] == pytest.approx(1.0) and same[kind]["latency"] == pytest.approx(1.0)
    raw = raw_record()
    for p in raw["collectives"]:  # all-to-all at 40% of the bandwidth, as measured on CPU
        if p["kind"] == "all-to-all":
            p["time_s"] = p["steps"] * ALPHA + p["wire_bytes"] / (0.4 * BW)
    prof = cal.fit_profile(raw, name="test cpu")
    joint = prof["scale_up"]["bandwidth"]
    a2a = prof["collective_scale"]["all-to-all"]
    assert a2a["bandwidth"] * joint == pytest.approx(0.4 * BW)  # the kind's own rate, recovered
    assert a2a["latency"] * prof["scale_up"]["latency"] == pytest.approx(ALPHA)
    assert prof["collective_scale"]["all-reduce"]["bandwidth"] * joint == pytest.approx(BW)


def test_in_place_copies_give_inplace_bandwidth():
    raw = raw_record()
    assert "inplace_bandwidth" not in cal.fit_profile(raw, name="test cpu")  # none measured: hbm's rate
    raw["copy_in_place"] = [{"bytes_per_device": 2**22, "time_s": 1e-3, "bytes_per_s": 6e9},
                            {"bytes_per_device": 2**24, "time_s": 5e-3, "bytes_per_s": 4e9}]
    prof = cal.fit_profile(raw, name="test cpu")
    assert prof["inplace_bandwidth"] == pytest.approx(2 / (1 / 6e9 + 1 / 4e9))  # harmonic mean: 4.8e9
    assert prof["measured"]["copy_in_place"] == raw["copy_in_place"]
    assert presets.build(presets.HardwareProfile, prof, "test").inplace_bandwidth == pytest.approx(4.8e9)


def test_size_factors_are_time_over_the_kinds_fit_per_buffer_size():
    fit = {"latency_s": ALPHA, "bandwidth_Bps": BW}
    pts = synthetic_points()
    slow = {16 * 1024: (1.0, 1.0, 1.0), 4 * 2**20: (2.0, 8.0, 4.0)}  # per group 2, 4, 8
    for p in pts:
        if p["buffer_bytes"] in slow:
            p["time_s"] *= slow[p["buffer_bytes"]][(2, 4, 8).index(p["group"])]
    got = cal.size_factors(pts, {"all-reduce": fit})
    assert list(got) == ["all-reduce"]  # kinds without a fit get no curve
    assert [p["size"] for p in got["all-reduce"]] == [16 * 1024, 256 * 1024, 4 * 2**20]
    # the geometric mean over group sizes: (2 * 8 * 4)^(1/3) = 4 at 4 MiB, exactly 1 elsewhere
    assert [p["factor"] for p in got["all-reduce"]] == pytest.approx([1.0, 1.0, 4.0])


def test_fit_profile_writes_the_size_curve_into_collective_scale():
    raw = raw_record()
    for p in raw["collectives"]:
        if p["kind"] == "all-reduce" and p["buffer_bytes"] == 4 * 2**20:
            p["time_s"] *= 3.0  # the largest all-reduces pay extra, as on CPU hosts
    prof = cal.fit_profile(raw, name="test cpu")
    curve = prof["collective_scale"]["all-reduce"]["by_size"]
    assert curve[-1]["size"] == 4 * 2**20 and curve[-1]["factor"] > 1.5 > curve[0]["factor"]
    for kind in ("all-to-all", "all-gather", "reduce-scatter"):  # untouched kinds: factors of 1
        assert [p["factor"] for p in prof["collective_scale"][kind]["by_size"]] == pytest.approx([1.0] * 3)
    hw = presets.build(presets.HardwareProfile, prof, "test")
    assert hw.collective_scale["all-reduce"].by_size[-1].factor == pytest.approx(curve[-1]["factor"])


def test_calibrate_table_lists_the_size_factors_per_kind():
    from rich.console import Console

    from moeplan.commands.validate import calibrate_tables

    raw = raw_record()
    raw["copy_in_place"] = [{"bytes_per_device": 2**22, "time_s": 1e-3, "bytes_per_s": 6e9}]
    for p in raw["collectives"]:
        if p["kind"] == "all-reduce" and p["buffer_bytes"] == 4 * 2**20:
            p["time_s"] *= 3.0
    prof = cal.fit_profile(raw, name="test cpu")
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    doc = {"profile": prof, "path": "p.yaml", "fits": prof["measured"]["links"]}
    for part in calibrate_tables(doc):
        console.print(part)
    text = console.export_text()
    assert "inplace_bandwidth" in text and "6.00 GB/s" in text
    assert "Collective time by buffer size" in text and "4.00 MiB" in text
    row = next(line for line in text.splitlines() if "all-reduce" in line and "x" in line and "MiB" not in line
               and "alpha" not in line)
    factor = prof["collective_scale"]["all-reduce"]["by_size"][-1]["factor"]
    assert f"{factor:.2f}x" in row


MIB = 2**20


def copies_with_faults():
    """Fresh copies: 8 MiB recycled (no faults), 32 and 64 MiB paged in afresh (their whole
    output faulted); in-place copies fault nothing. Fresh 32 MiB takes 0.1 s more than in
    place for 32 MiB faulted (rate 32 MiB / 0.1 s), 64 MiB 0.2 s more for 64 MiB."""
    fresh = [{"bytes_per_device": 8 * MIB, "time_s": 0.008, "bytes_per_s": 16 * MIB / 0.008, "fault_bytes": 0.0},
             {"bytes_per_device": 32 * MIB, "time_s": 0.11, "bytes_per_s": 64 * MIB / 0.11, "fault_bytes": 32.0 * MIB},
             {"bytes_per_device": 64 * MIB, "time_s": 0.22, "bytes_per_s": 128 * MIB / 0.22, "fault_bytes": 64.0 * MIB}]
    donated = [{"bytes_per_device": n * MIB, "time_s": t, "bytes_per_s": 2 * n * MIB / t, "fault_bytes": 0.0}
               for n, t in ((8, 0.004), (32, 0.01), (64, 0.02))]
    return fresh, donated


def test_first_touch_bandwidth_is_extra_faulted_bytes_over_extra_time():
    fresh, donated = copies_with_faults()
    assert cal.first_touch_bandwidth(fresh, donated) == pytest.approx(32 * MIB / 0.1)
    # without fault counts (or with no size faulted) there is nothing to price
    assert cal.first_touch_bandwidth([{**p, "fault_bytes": None} for p in fresh], donated) is None
    assert cal.first_touch_bandwidth(fresh[:1], donated) is None


def test_stream_bandwidth_leaves_out_the_faulted_sizes_only_when_faults_are_priced():
    fresh, _ = copies_with_faults()
    assert cal.stream_bandwidth(fresh, 3e8) == pytest.approx(16 * MIB / 0.008)  # the 8 MiB copy alone
    assert cal.stream_bandwidth(fresh, None) == pytest.approx(cal.copy_bandwidth(fresh))


def test_without_faults_takes_the_paged_time_out_of_each_collective():
    pts = [{"kind": "all-reduce", "time_s": 0.3, "fault_bytes": 1e8},
           {"kind": "all-reduce", "time_s": 0.01, "fault_bytes": 0.0},
           {"kind": "all-reduce", "time_s": 0.01, "fault_bytes": 1e9}]
    got = cal.without_faults(pts, 1e9)
    assert got[0]["time_s"] == pytest.approx(0.2)
    assert got[1]["time_s"] == 0.01
    assert got[2]["time_s"] == pytest.approx(cal.MIN_LEFT * 0.01)  # noise never makes it negative
    assert pts[0]["time_s"] == 0.3  # the raw record is kept as measured
    assert cal.without_faults(pts, None) is pts


def test_fit_profile_prices_first_touch_on_cpu_devices_only():
    raw = raw_record()
    raw["copy"], raw["copy_in_place"] = copies_with_faults()
    raw["reduce_scratch"] = {"buffer_bytes": 8 * MIB, "temp_bytes": 16.0 * MIB}
    prof = cal.fit_profile(raw, name="test cpu")
    host = prof["host_memory"]
    assert host["first_touch_bandwidth"] == pytest.approx(32 * MIB / 0.1)
    assert host["map_threshold_bytes"] == 32 * MIB
    assert host["all_reduce_out_of_place"] is True
    assert prof["hbm_bandwidth"] == pytest.approx(16 * MIB / 0.008)
    hw = presets.build(presets.HardwareProfile, prof, "test")
    assert hw.host_memory.first_touch_bandwidth == pytest.approx(32 * MIB / 0.1)
    raw["reduce_scratch"] = {"buffer_bytes": 8 * MIB, "temp_bytes": 8.0 * MIB}  # reduced in place
    assert cal.fit_profile(raw, name="test cpu")["host_memory"]["all_reduce_out_of_place"] is False
    raw["device"] = {**raw["device"], "platform": "gpu"}
    assert "host_memory" not in cal.fit_profile(raw, name="test gpu")


def test_residual_probe_marks_runtimes_that_keep_every_autodiff_residual():
    raw = raw_record()
    raw["copy"], raw["copy_in_place"] = copies_with_faults()
    raw["residual_scratch"] = {"hidden_bytes": 4 * MIB, "temp_per_layer_bytes": 5.06 * 4 * MIB}  # CPU
    assert cal.fit_profile(raw, name="cpu")["host_memory"]["keeps_autodiff_residuals"] is True
    raw["residual_scratch"] = {"hidden_bytes": 4 * MIB, "temp_per_layer_bytes": 1.1 * 4 * MIB}  # fusing
    assert cal.fit_profile(raw, name="cpu")["host_memory"]["keeps_autodiff_residuals"] is False
    raw.pop("residual_scratch")  # an older raw record: the field keeps its default
    assert "keeps_autodiff_residuals" not in cal.fit_profile(raw, name="cpu")["host_memory"]


def test_residual_probe_reads_five_hidden_buffers_a_layer_on_cpu():
    import jax

    from moeplan.validate import microbench as mb

    bench = mb.Bench(devices=jax.devices("cpu")[:1], dtype="float32", steps=1, warmup=0, sweep=cal.QUICK)
    kept = cal.residuals_per_layer({"residual_scratch": mb.residual_scratch(bench)})
    assert 4.5 <= kept <= 5.5  # h1, h3, sigmoid(h1), silu(h1), product (+ a few [T, M] rows)


def test_rows_probe_becomes_the_rows_curve_over_the_matmul_peak():
    raw = raw_record()  # matmul peak 8e9
    raw["matmul_rows"] = [{"rows": 64, "k": 256, "n": 1024, "batch": 6, "time_s": 1e-2, "flops_per_s": 4e9},
                          {"rows": 16, "k": 256, "n": 1024, "batch": 24, "time_s": 1e-2, "flops_per_s": 1e9}]
    prof = cal.fit_profile(raw, name="cpu")
    assert prof["matmul_rows_curve"] == [{"rows": 16.0, "efficiency": 0.125}, {"rows": 64.0, "efficiency": 0.5}]
    hw = presets.build(presets.HardwareProfile, prof, "test")
    assert [p.rows for p in hw.matmul_rows_curve] == [16.0, 64.0]
    assert "matmul_rows_curve" not in cal.fit_profile(raw_record(), name="cpu")  # older records: none
