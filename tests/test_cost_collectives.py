"""Alpha-beta timing of collectives and the choice of link, on hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pytest

from moeplan.cost.collectives import (
    comm_totals,
    group_geometry,
    group_link,
    inside_domain,
    ring_steps,
    torus_links,
)
from moeplan.cost.layout import Plans
from moeplan.cost.traffic import Collective, step_collectives
from moeplan.specs import HardwareProfile, Link, Mesh, ModelSpec, MoESpec, TrainSpec

UP = Link(bandwidth=100e9, latency=1e-6)
OUT = Link(bandwidth=10e9, latency=5e-6)


def hw(**kw) -> HardwareProfile:
    base = dict(peak_flops=1e15, hbm_bytes=80e9, hbm_bandwidth=2e12, scale_up=UP,
                scale_up_size=8, scale_out=OUT)
    return HardwareProfile(**(base | kw))


def one(mesh: Mesh, fsdp: bool = False) -> Plans:
    return Plans.single(mesh, TrainSpec(global_batch=64, fsdp=fsdp))


def entry(kind: str, axes: tuple[str, ...], buffer: float, count: float = 1.0) -> Collective:
    return Collective("test", kind, axes, "data_axis", np.array([buffer]), np.array([count]))


def test_ring_all_reduce_over_8_devices():
    # 1 MiB all-reduced over data=8 (one scale-up domain of 8):
    # wire bytes = 2*(8-1)/8 * 1048576 = 1835008; steps = 2*(8-1) = 14
    # time = 14 * 1e-6 + 1835008 / 100e9 = 1.4e-5 + 1.835008e-5 = 3.235008e-5 s
    plans = one(Mesh(data=8))
    c = entry("all-reduce", ("data",), 1048576.0)
    assert c.wire_bytes(plans)[0] == 1835008
    tot = comm_totals([c], plans, hw())
    assert tot.bytes_by_kind["all-reduce"][0] == 1835008
    assert tot.seconds_by_term["data_axis"][0] == pytest.approx(3.235008e-5, rel=1e-12)


def test_all_gather_and_reduce_scatter():
    # 4 devices, 4000-byte gathered result / unscattered input: each sends 3/4 * 4000 = 3000
    # bytes in 3 steps: 3 * 1e-6 + 3000 / 100e9 = 3.03e-6 s, twice each (count 2)
    plans = one(Mesh(data=4))
    for kind in ("all-gather", "reduce-scatter"):
        tot = comm_totals([entry(kind, ("data",), 4000.0, count=2)], plans, hw())
        assert tot.bytes_by_kind[kind][0] == 6000
        assert tot.seconds_by_term["data_axis"][0] == pytest.approx(2 * 3.03e-6, rel=1e-12)


def test_fsdp_gathers_and_scatters_of_a_tiny_model():
    # M=8, L=1, N=2, V=16, H=16 plain: params = embedding+head 2*16*8=256, final norm 8,
    # block norms 16, attention 4*8*8=256, FFN 2*8*16=256 -> 792 (all non-expert).
    # data=4, FSDP, 1 microbatch: all-gather of 792*2 B (bf16) = 1584, sent 3/4 -> 1188,
    # before forward and before backward -> 2376; reduce-scatter of 792*4 B (fp32) = 3168,
    # sent 3/4 -> 2376, once. Gradient all-reduce is replaced: only the metrics (3 floats,
    # 12 B, 2*3/4*12 = 18 wire bytes) remain as all-reduce.
    model = ModelSpec(d_model=8, layers=1, heads=2, vocab=16, ffn_hidden=16, gated=False)
    train = TrainSpec(seq_len=4, global_batch=4, fsdp=True)
    plans = Plans.single(Mesh(data=4), train)
    tot = comm_totals(step_collectives(model, train, plans), plans, hw())
    assert tot.bytes_by_kind["all-gather"][0] == 2376
    assert tot.bytes_by_kind["reduce-scatter"][0] == 2376
    assert tot.bytes_by_kind["all-reduce"][0] == 18


def test_all_to_all_bytes_and_time_of_one_moe_layer():
    # M=64, E=8, K=2, cf=1, one MoE layer; 4 seqs of 16 tokens over expert=4 -> T=16 tokens,
    # C = ceil(1 * 16 * 2 / 8) = 4; buffer [E*C, M] bf16 = 8*4*64*2 = 4096 B; each device
    # sends 3/4 -> 3072 B per all-to-all; dispatch + combine, forward + backward -> 4 ops:
    # 12288 B. Time: 4 * (3 * 1e-6 + 3072 / 100e9) = 4 * 3.03072e-6 = 1.212288e-5 s.
    model = ModelSpec(d_model=64, layers=1, heads=4, vocab=32, ffn_hidden=128,
                      moe=MoESpec(num_experts=8, top_k=2, expert_hidden=32, capacity_factor=1.0))
    train = TrainSpec(seq_len=16, global_batch=4)
    plans = Plans.single(Mesh(expert=4), train)
    tot = comm_totals(step_collectives(model, train, plans), plans, hw())
    assert tot.bytes_by_kind["all-to-all"][0] == 12288
    assert tot.seconds_by_term["all_to_all"][0] == pytest.approx(1.212288e-5, rel=1e-12)


def test_group_geometry_follows_device_order():
    plans = one(Mesh(data=2, expert=4, model=8))
    cases = {("model",): (1, 8), ("expert",): (8, 4), ("data",): (32, 2), ("data", "expert"): (8, 8)}
    for axes, (stride, size) in cases.items():
        s, n = group_geometry(axes, plans)
        assert (np.atleast_1d(s)[0], np.atleast_1d(n)[0]) == (stride, size)
    with pytest.raises(ValueError):
        group_geometry(("data", "model"), plans)


def test_link_inside_and_across_the_scale_up_domain():
    h = hw(scale_up_size=8)
    # model=8 groups are devices 0-7, 8-15: each inside one 8-device domain -> scale-up
    # data=2 groups pair device i with i+8: they cross domains -> scale-out
    plans = one(Mesh(data=2, model=8))
    assert group_link(("model",), plans, h).bandwidth[0] == UP.bandwidth
    assert group_link(("data",), plans, h).bandwidth[0] == OUT.bandwidth
    assert group_link(("data",), plans, h).latency[0] == OUT.latency
    # expert=4, data=2, model=1: data groups {i, i+4} span 8 aligned devices -> inside
    plans = one(Mesh(data=2, expert=4))
    assert group_link(("data",), plans, h).bandwidth[0] == UP.bandwidth
    # model=3 groups {0,1,2}, {3,4,5}, {6,7,8}: the third straddles the boundary at 8
    plans = one(Mesh(data=4, model=3))
    assert group_link(("model",), plans, h).bandwidth[0] == OUT.bandwidth
    # everything fits in one domain when there are at most 8 devices
    plans = one(Mesh(data=2, model=3))
    assert group_link(("data",), plans, h).bandwidth[0] == UP.bandwidth


def test_inside_domain_matches_brute_force():
    # enumerate every group of every (stride, size) family on 32 devices, domain 8
    for stride in (1, 2, 3, 4, 8):
        for size in (1, 2, 3, 4, 8):
            devices = 32 if 32 % (stride * size) == 0 else stride * size * 2
            groups = [[o * stride * size + r + stride * j for j in range(size)]
                      for o in range(devices // (stride * size)) for r in range(stride)]
            brute = all(len({g // 8 for g in grp}) == 1 for grp in groups)
            got = inside_domain(np.array([stride]), np.array([size]), np.array([devices]), 8)[0]
            assert got == brute, (stride, size, devices)


def test_torus_bandwidth_counts_spanned_dimensions():
    # 4x4 torus, first dim fastest; coordinates of device i are (i % 4, i // 4)
    h = hw(topology="torus", torus_dims=[4, 4], scale_up_size=16)
    # model=4: devices 0..3 cover dim 0 fully (ring with wraparound) -> 2 x 100e9
    plans = one(Mesh(expert=4, model=4))
    assert group_link(("model",), plans, h).bandwidth[0] == 200e9
    # expert=4 at stride 4: devices 0,4,8,12 cover dim 1 fully -> 2 x 100e9
    assert group_link(("expert",), plans, h).bandwidth[0] == 200e9
    # (data, expert) with model=2: devices 0,2,...,14 -> dim 0 coordinates {0,2} (partial,
    # 1 x) and dim 1 all of {0,1,2,3} (full, 2 x) -> 3 x 100e9
    plans = one(Mesh(data=4, expert=2, model=2))
    assert group_link(("data", "expert"), plans, h).bandwidth[0] == 300e9
    # a 2-device model group covers half of dim 0 only -> 1 x 100e9
    assert group_link(("model",), plans, h).bandwidth[0] == 100e9
    # 32 devices: data=2 at stride 16 leaves the 16-chip torus -> scale-out
    plans = one(Mesh(data=2, expert=4, model=4))
    assert group_link(("data",), plans, h).bandwidth[0] == OUT.bandwidth
    assert torus_links(np.array([1]), np.array([1]), [4, 4])[0] == 0


def test_groups_of_one_cost_nothing():
    plans = one(Mesh())
    assert ring_steps("all-reduce", np.array([1]))[0] == 0
    c = entry("all-reduce", ("data",), 1e9)
    tot = comm_totals([c], plans, hw())
    assert tot.seconds_by_term["data_axis"][0] == 0
    assert tot.bytes_by_kind["all-reduce"][0] == 0


def test_ring_step_counts():
    n = np.array([8])
    assert ring_steps("all-reduce", n)[0] == 14
    assert ring_steps("all-gather", n)[0] == 7
    assert ring_steps("reduce-scatter", n)[0] == 7
    assert ring_steps("all-to-all", n)[0] == 7


def test_collective_scale_times_each_kind_at_its_own_alpha_and_beta():
    # all-to-all of 1 MiB over data=8: wire 7/8 * 1048576 = 917504 B, 7 steps.
    # Unscaled: 7 * 1e-6 + 917504 / 100e9. With latency x2 and bandwidth x0.4:
    # 7 * 2e-6 + 917504 / 40e9.
    plans = one(Mesh(data=8))
    c = entry("all-to-all", ("data",), 1048576.0)
    plain = comm_totals([c], plans, hw()).seconds_by_term["data_axis"][0]
    assert plain == pytest.approx(7e-6 + 917504 / 100e9)
    scaled = hw(collective_scale={"all-to-all": {"latency": 2.0, "bandwidth": 0.4}})
    assert comm_totals([c], plans, scaled).seconds_by_term["data_axis"][0] == pytest.approx(14e-6 + 917504 / 40e9)
    ar = entry("all-reduce", ("data",), 1048576.0)  # kinds not listed keep the link as it is
    assert comm_totals([ar], plans, scaled).seconds_by_term["data_axis"][0] == pytest.approx(14e-6 + 1835008 / 100e9)


def test_size_factor_scales_each_entry_by_its_buffer_size():
    # by_size 1 MiB -> 1.0, 16 MiB -> 3.0; linear in log(size): 4 MiB (halfway in log) -> 2.0;
    # held beyond the ends: 64 KiB -> 1.0, 64 MiB -> 3.0
    curve = [{"size": 2**20, "factor": 1.0}, {"size": 2**24, "factor": 3.0}]
    scaled = hw(collective_scale={"all-reduce": {"by_size": curve}})
    plans = one(Mesh(data=8))
    for buffer, factor in ((2**16, 1.0), (2**20, 1.0), (2**22, 2.0), (2**24, 3.0), (2**26, 3.0)):
        c = entry("all-reduce", ("data",), float(buffer))
        plain = comm_totals([c], plans, hw()).seconds_by_term["data_axis"][0]
        got = comm_totals([c], plans, scaled).seconds_by_term["data_axis"][0]
        assert got == pytest.approx(factor * plain, rel=1e-12), buffer
        # bytes on the wire do not change: only the time per byte does
        assert comm_totals([c], plans, scaled).bytes_by_kind["all-reduce"][0] == c.wire_bytes(plans)[0]
    a2a = entry("all-to-all", ("data",), float(2**24))  # a kind without a curve: factor 1
    assert comm_totals([a2a], plans, scaled).seconds_by_term["data_axis"][0] == pytest.approx(
        comm_totals([a2a], plans, hw()).seconds_by_term["data_axis"][0])


def test_by_size_points_must_increase():
    with pytest.raises(ValueError, match="strictly increasing"):
        hw(collective_scale={"all-reduce": {"by_size": [{"size": 2e6, "factor": 1.0}, {"size": 1e6, "factor": 2.0}]}})
