"""Measured time by cost term (moeplan/validate/term_times.py): the pure parts on hand-made
HLO lines and profiler events; the traced step itself in tests/test_profile_breakdown.py."""

from __future__ import annotations

import pytest

from moeplan.validate import term_times as tt

STEP = "jit(_local_step)/shard_map"


@pytest.mark.parametrize("op_name, opcode, term", [
    (f"{STEP}/jvp(attention)/bsm,mnd->bsnd", "fusion", "attention_proj"),
    (f"{STEP}/transpose(jvp(attention))/bsnd,ndm->bsm", "dot", "attention_proj"),
    (f"{STEP}/jvp(attention)/attn_scores/bskgd,btkd->bkgst", "fusion", "attention_scores"),
    (f"{STEP}/transpose(jvp(attention))/attn_scores/div", "fusion", "attention_softmax"),
    (f"{STEP}/jvp(attention)/attn_scores/attn_softmax/exp", "fusion", "attention_softmax"),
    (f"{STEP}/jvp(attention)/norm/rsqrt", "fusion", "norms_residuals"),
    (f"{STEP}/jvp(moe)/route/dot_general", "dot", "router"),
    (f"{STEP}/jvp(moe)/route/jit(_one_hot)/eq", "fusion", "routing"),
    (f"{STEP}/transpose(jvp(moe))/permute/gather", "gather", "moe_permute"),
    (f"{STEP}/jvp(moe)/unpermute/tk,tkm->tm", "fusion", "moe_permute"),
    (f"{STEP}/jvp(moe)/experts/ecm,emh->ech", "fusion", "expert_ffn"),
    (f"{STEP}/jvp(moe)/experts/jit(silu)/logistic", "fusion", "activations"),
    (f"{STEP}/jvp(moe)/ffn/dot_general", "dot", "shared_experts"),
    (f"{STEP}/jvp(ffn)/dot_general", "dot", "dense_ffn"),
    (f"{STEP}/transpose(jvp(ffn))/jit(silu)/mul", "fusion", "activations"),
    (f"{STEP}/jvp(lm_head)/dot_general", "dot", "lm_head"),
    (f"{STEP}/jvp(loss)/reduce_max", "fusion", "loss_softmax"),
    (f"{STEP}/adam/sqrt", "fusion", "optimizer_update"),
    (f"{STEP}/transpose(jvp())/add_any", "fusion", "gradient_sums"),
    (f"{STEP}/jvp()/add", "fusion", "norms_residuals"),
    (f"{STEP}/jvp(embed)/gather", "gather", "other"),
    (f"{STEP}/jvp()/convert_element_type", "fusion", "other"),
    # collectives: by kind, then by the scope that issued them
    (f"{STEP}/jvp(moe)/permute/all_to_all", "all-to-all", "all_to_all"),
    (f"{STEP}/jvp(attention)/psum", "all-reduce", "model_axis"),
    (f"{STEP}/transpose(jvp(moe))/experts/pcast", "all-reduce-start", "model_axis"),
    (f"{STEP}/grad_reduce/psum", "all-reduce", "data_axis"),
    (f"{STEP}/metrics/psum", "all-reduce", "data_axis"),
    (f"{STEP}/grad_reduce/psum", "reduce-scatter", "data_axis"),
])
def test_classify(op_name: str, opcode: str, term: str) -> None:
    assert tt.classify(op_name, opcode) == term


def test_instruction_terms_reads_names_opcodes_and_tuple_shapes() -> None:
    hlo = "\n".join([
        '%bare.3 (p0: f32[8,128], p1: f32[128,256]) -> f32[8,256] {',
        '  ROOT %dot.2 = f32[8,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
        '}',
        '%ynn_fused.7 (p0: f32[8,4], p1: f32[4,16]) -> f32[8,16] {',
        '  %p0 = f32[8,4]{1,0} parameter(0)',
        '  %p1 = f32[4,16]{1,0} parameter(1)',
        f'  ROOT %dot.1 = f32[8,16]{{1,0}} dot(%p0, %p1), metadata={{op_name="{STEP}/jvp(lm_head)/dot_general"}}',
        '}',
        '',
        'ENTRY %main (a: f32[4]) -> f32[4] {',
        '  %ynn_fusion.8 = f32[8,16]{1,0} fusion(%x, %y), kind=kCustom, calls=%ynn_fused.7',
        '  %w.4 = f32[128,256]{1,0} parameter(4), metadata={op_name="state.params[\'blocks\'][\'0\'][\'experts\'][\'w1\']"}',
        f'  %buf.2 = f32[8,128]{{1,0}} fusion(%z), calls=%c.5, metadata={{op_name="{STEP}/jvp(moe)/permute/all_to_all"}}',
        '  %ynn_fusion.9 = f32[8,256]{1,0} fusion(%buf.2, %w.4), kind=kCustom, calls=%bare.3',
        '  %ynn_fusion.3 = f32[8,16]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%f3, '
        f'metadata={{op_name="{STEP}/jvp(moe)/experts/ecm,emh->ech" stack_frame_id=4}}',
        '  %all-reduce.1 = (f32[4]{0}, f32[8]{0}) all-reduce(%a, %b), replica_groups={{0,1}}, '
        f'to_apply=%add, metadata={{op_name="{STEP}/grad_reduce/psum"}}',
        '  ROOT %tuple.9 = (f32[4]{0}) tuple(%x)',
        '}',
    ])
    got = tt.instruction_terms(hlo)
    assert {k: got[k] for k in ("ynn_fusion.3", "all-reduce.1", "ynn_fusion.8", "ynn_fusion.9")} == {
        "ynn_fusion.3": "expert_ffn", "all-reduce.1": "data_axis",
        "ynn_fusion.8": "lm_head",  # no metadata of its own: its fused computation's root
        "ynn_fusion.9": "expert_ffn"}  # none anywhere: the weight operand's parameter path
    assert "tuple.9" not in got


def _event(name: str, device: int, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name, "device_ordinal": str(device)}}


def test_exclusive_events_subtract_nested_ops_and_skip_the_rest() -> None:
    raw = [
        _event("while.1", 0, ts=0.0, dur=100.0),  # a loop whose body ran two ops
        _event("dot.2", 0, ts=10.0, dur=30.0),
        _event("add.3", 0, ts=50.0, dur=20.0),
        _event("dot.2", 1, ts=5.0, dur=40.0, tid=2),  # another device's thread
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 500.0, "name": "ThunkExecutor::Execute"},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    got = sorted((e.name, e.device, round(e.seconds * 1e6, 6)) for e in tt.exclusive_events(raw))
    assert got == [("add.3", "0", 20.0), ("dot.2", "0", 30.0), ("dot.2", "1", 40.0), ("while.1", "0", 50.0)]


def test_seconds_by_term_is_per_device_and_step_and_scales_to_the_step() -> None:
    events = [tt.OpEvent("dot.2", "0", 0.030), tt.OpEvent("dot.2", "1", 0.050),
              tt.OpEvent("ar.1", "0", 0.020), tt.OpEvent("ar.1", "1", 0.020), tt.OpEvent("x.9", "1", 0.010)]
    terms = {"dot.2": "expert_ffn", "ar.1": "data_axis"}
    got = tt.seconds_by_term(events, terms, steps=2)
    assert got == pytest.approx({"expert_ffn": 0.020, "data_axis": 0.010, "other": 0.0025})
    assert list(got) == ["expert_ffn", "data_axis", "other"]  # largest first
    scaled = tt.scale_to(got, step_s=0.065)
    assert sum(scaled.values()) == pytest.approx(0.065)
    assert scaled["expert_ffn"] / scaled["data_axis"] == pytest.approx(2.0)
    assert tt.scale_to({}, 1.0) == {}


def test_term_rows_fold_small_terms_into_rest() -> None:
    row = {"compute_s_by_op": {"expert_ffn": 0.5, "router": 0.001},
           "breakdown_s": {"all_to_all": 0.2, "model_axis": 0.0, "data_axis": 0.1}}
    pred = tt.predicted_terms(row)
    assert pred == {"expert_ffn": 0.5, "router": 0.001, "all_to_all": 0.2, "model_axis": 0.0, "data_axis": 0.1}
    meas = {"all_to_all": 0.4, "expert_ffn": 0.3, "other": 0.005, "router": 0.002}
    rows = tt.term_rows(pred, meas)
    assert [r[0] for r in rows] == ["all_to_all", "expert_ffn", "data_axis", tt.REST]
    assert rows[-1][1:] == pytest.approx((0.001, 0.007))


def _wait(ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": "Wait: pending_threads=3/8"}


def test_rendezvous_waits_inside_a_collective_become_their_own_event():
    raw = [
        _event("all-reduce.4", 0, ts=0.0, dur=100.0),
        _wait(10.0, 20.0), _wait(20.0, 20.0),  # overlapping: their union is 10..40
        _wait(50.0, 10.0),
        _wait(150.0, 10.0),  # outside any op: nobody's
        _event("while.1", 1, ts=0.0, dur=100.0, tid=2),  # waits inside a loop's collective
        _event("all-to-all.2", 1, ts=10.0, dur=50.0, tid=2),
        _wait(20.0, 30.0, tid=2),
    ]
    got = sorted((e.name, round(e.seconds * 1e6, 6)) for e in tt.exclusive_events(raw))
    assert got == [("all-reduce.4", 60.0), ("all-to-all.2", 20.0), ("wait:all-reduce.4", 40.0),
                   ("wait:all-to-all.2", 30.0), ("while.1", 50.0)]
    split = tt.seconds_by_term(tt.exclusive_events(raw), {"all-reduce.4": "data_axis"}, steps=1)
    assert split[tt.WAIT] == pytest.approx(35e-6)  # (40 + 30) us over 2 devices
    assert split["data_axis"] == pytest.approx(30e-6)


def test_untraced_terms_keep_their_prediction_and_have_no_measured_figure() -> None:
    pred = {"expert_ffn": 0.5, "first_touch": 0.001, "all_to_all": 0.2}
    rows = tt.term_rows(pred, {"expert_ffn": 0.6, "all_to_all": 0.1})
    assert ("first_touch", 0.001, None) in rows  # shown even below min_share: it has no measured side
    assert all(m is not None for term, _, m in rows if term != "first_touch")
