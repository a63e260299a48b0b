"""First-touch page faults of a CPU runtime's scratch block (cost/first_touch.py, HostMemory)."""

from __future__ import annotations

import numpy as np
import pytest

from moeplan.cost import first_touch
from moeplan.cost.layout import Plans
from moeplan.cost.memory import scratch_bytes
from moeplan.cost.step import estimate
from moeplan.specs import HardwareProfile, HostMemory, Link, Mesh, ModelSpec, MoESpec, TrainSpec

LINK = Link(bandwidth=1e9, latency=1e-5)
CPU = HardwareProfile(peak_flops=2e10, hbm_bytes=2e9, hbm_bandwidth=2e9, scale_up=LINK,
                      scale_up_size=8, scale_out=LINK, overlap=0.2)
MOE = ModelSpec(d_model=256, layers=4, heads=8, vocab=4096, ffn_hidden=1024,
                moe=MoESpec(num_experts=8, top_k=2, expert_hidden=512))
TRAIN = TrainSpec(seq_len=64, global_batch=16, compute_dtype="float32")


def test_faulted_bytes_are_the_whole_block_at_or_over_the_threshold_and_none_below():
    host = HostMemory(first_touch_bandwidth=4e8, map_threshold_bytes=32.0)
    got = first_touch.faulted_bytes(np.array([10.0, 31.9, 32.0, 100.0]), host)
    assert list(got) == [0.0, 0.0, 32.0, 100.0]


def one(hw: HardwareProfile, mesh: Mesh):
    return estimate(MOE, TRAIN, hw, Plans.single(mesh, TRAIN))


def test_step_pays_scratch_over_first_touch_bandwidth_when_the_block_is_mapped_afresh():
    mesh = Mesh(data=8)
    plain = one(CPU, mesh)
    assert "first_touch" not in plain.compute_detail_s
    assert "first_touch_bytes_per_device" not in plain.row(0)
    host = HostMemory(first_touch_bandwidth=4e8, map_threshold_bytes=1.0, all_reduce_out_of_place=False)
    est = one(CPU.model_copy(update={"host_memory": host}), mesh)
    scratch = float(scratch_bytes(est.memory_detail)[0])
    assert scratch > 1e6
    assert est.first_touch_bytes[0] == pytest.approx(scratch)
    assert est.compute_detail_s["first_touch"][0] == pytest.approx(scratch / 4e8)
    assert est.compute_s[0] == pytest.approx(plain.compute_s[0] + scratch / 4e8)
    assert est.row(0)["first_touch_bytes_per_device"] == pytest.approx(scratch)
    # the same scratch under a threshold above it is recycled: no faults, no time
    high = host.model_copy(update={"map_threshold_bytes": 2 * scratch})
    est_high = one(CPU.model_copy(update={"host_memory": high}), mesh)
    assert est_high.compute_detail_s["first_touch"][0] == 0.0
    assert est_high.compute_s[0] == pytest.approx(plain.compute_s[0])


def test_out_of_place_all_reduce_enlarges_memory_and_the_faulted_block():
    mesh = Mesh(data=8)
    inplace = HostMemory(first_touch_bandwidth=4e8, map_threshold_bytes=1.0, all_reduce_out_of_place=False)
    outplace = inplace.model_copy(update={"all_reduce_out_of_place": True})
    a = one(CPU.model_copy(update={"host_memory": inplace}), mesh)
    b = one(CPU.model_copy(update={"host_memory": outplace}), mesh)
    detail = {k: float(v[0]) for k, v in b.memory_detail.items()}
    assert float(a.memory_detail["reduce_buffer"][0]) == 0
    # data=8, expert=1: one combined all-reduce whose output is as large as all the gradients,
    # live beside them at the end of backward, which it makes the peak
    assert detail["reduce_buffer"] == detail["gradients"] > 0
    assert b.memory_bytes_per_device[0] == pytest.approx(
        detail["weights"] + detail["optimizer"] + 2 * detail["gradients"])
    grown = b.memory_bytes_per_device[0] - a.memory_bytes_per_device[0]
    assert grown > 0
    assert b.first_touch_bytes[0] == pytest.approx(a.first_touch_bytes[0] + grown)


def test_scratch_is_every_term_but_the_donated_state():
    mem = {"weights": np.array([5.0]), "optimizer": np.array([10.0]), "gradients": np.array([5.0]),
           "activations": np.array([3.0]), "reduce_buffer": np.array([1.0])}
    assert scratch_bytes(mem)[0] == 9.0
