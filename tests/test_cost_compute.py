"""FLOPs and roofline time per op class, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moeplan.cost.compute import Work, matmul_efficiency, model_flops_per_token, op_work, roofline_s
from moeplan.cost.layout import REMAT_CODES, Plans
from moeplan.specs import CurvePoint, HardwareProfile, Link, Mesh, ModelSpec, MoESpec, TrainSpec

LINK = Link(bandwidth=100e9, latency=1e-6)


def hw(peak=1e15, eff=0.5, bw=2e12, mem_eff=0.5) -> HardwareProfile:
    return HardwareProfile(
        peak_flops=peak, matmul_efficiency=eff, hbm_bytes=80e9, hbm_bandwidth=bw,
        memory_efficiency=mem_eff, scale_up=LINK, scale_up_size=8, scale_out=LINK,
    )


def plans(mesh: Mesh, train: TrainSpec) -> Plans:
    return Plans.single(mesh, train)


# M=8, L=2, N=4 query heads, N_kv=2, D=2, V=16, H=16, plain (2-matrix) FFN
TINY = ModelSpec(d_model=8, layers=2, heads=4, kv_heads=2, vocab=16, ffn_hidden=16, gated=False)


def tiny_flops(remat: str, grad_accum: int = 1) -> dict[str, float]:
    train = TrainSpec(seq_len=4, global_batch=2, remat=remat, grad_accum=grad_accum)
    work = op_work(TINY, train, plans(Mesh(model=2), train))
    return {k: float(w.flops[0]) for k, w in work.items()}


def test_tiny_dense_flops_by_hand():
    # T = 2 seqs * 4 tokens = 8 tokens; model=2 -> 2 local q heads, 1 local kv head.
    # attention proj, fwd, one layer: q 2*8*8*(2*2)=512, k 2*8*8*2=256, v 256, o 2*8*4*8=512
    #   = 1536; x 3 passes (fwd + 2x bwd) x 2 layers = 9216
    # scores: per seq and local head QK^T 2*4*2*4=64 + AV 64 = 128; 2 seqs x 2 heads -> 512
    #   fwd per layer; x 3 x 2 = 3072
    # dense FFN: 2 matrices x 2*8*8*(16/2) = 2048 fwd per layer; x 3 x 2 = 12288
    # LM head (replicated over model): 2*8*8*16 = 2048 fwd; x 3 = 6144
    f = tiny_flops("none")
    assert f["attention_proj"] == 9216
    assert f["attention_scores"] == 3072
    assert f["dense_ffn"] == 12288
    assert f["lm_head"] == 6144
    assert f["router"] == f["expert_ffn"] == f["shared_experts"] == f["moe_permute"] == 0
    assert f["attention_softmax"] == f["optimizer_update"] == 0  # bytes only


def test_tiny_dense_bytes_only_classes():
    # softmax: tm = T/m = 4, N = 4, S = 4: forward reads scores and writes probs,
    #   2 * tm * N * S = 128 float32 elements = 512 B per layer; backward 1.5x -> x 2.5,
    #   2 layers -> 2560 B
    # optimizer: 744 local params (see test_cost_memory); per moment one kernel reads the
    #   moment and the gradient and writes the moment (2 * 3 * 4 B), then one reads the
    #   weight and both moments and writes the weight (4 * 4 B): 744 * 40 = 29760 B
    train = TrainSpec(seq_len=4, global_batch=2)
    work = op_work(TINY, train, plans(Mesh(model=2), train))
    assert work["attention_softmax"].bytes[0] == 2560
    assert work["optimizer_update"].bytes[0] == 29760


def test_remat_adds_forward_passes():
    # full: attention classes x 4 passes instead of 3; the FFN replays all but its last
    #   matmul (its output only feeds the block output, which backward never needs), so
    #   2 plain matrices -> 3 + 1/2 passes; LM head unchanged:
    #   1536*4*2 + 512*4*2 + 2048*3.5*2 + 6144 = 12288 + 4096 + 14336 + 6144 = 36864
    # selective: only the scores get the 4th pass: 9216 + 4096 + 12288 + 6144 = 31744
    assert sum(tiny_flops("full").values()) == 36864
    assert sum(tiny_flops("selective").values()) == 31744
    assert sum(tiny_flops("none").values()) == 30720


def test_grad_accum_keeps_step_flops():
    # 2 microbatches of 4 tokens do the same matmul work as one of 8 (all terms linear in T)
    assert tiny_flops("none", grad_accum=2) == tiny_flops("none", grad_accum=1)


def test_roofline_picks_the_binding_limit():
    h = hw(peak=1e15, eff=0.5, bw=2e12, mem_eff=0.5)  # 5e14 FLOP/s and 1e12 B/s achievable
    # [4096,4096] x [4096,4096]: 2*4096^3 = 137438953472 FLOPs -> 2.7488e-4 s;
    # 3 * 4096^2 * 2 bytes = 100663296 B -> 1.0066e-4 s: compute-bound
    big = Work(np.array([2 * 4096.0**3]), np.array([3 * 4096.0**2 * 2]))
    assert roofline_s(big, h)[0] == pytest.approx(137438953472 / 5e14)
    # [8,1024] x [1024,1024]: 2*8*1024*1024 = 16777216 FLOPs -> 3.36e-8 s;
    # (8*1024 + 1024*1024 + 8*1024) * 2 = 2129920 B -> 2.13e-6 s: memory-bound
    small = Work(np.array([16777216.0]), np.array([2129920.0]))
    assert roofline_s(small, h)[0] == pytest.approx(2129920 / 1e12)


CURVE = [CurvePoint(size=1e6, efficiency=0.1), CurvePoint(size=1e8, efficiency=0.5),
         CurvePoint(size=1e10, efficiency=1.0)]


def test_matmul_curve_interpolates_in_log_size_and_holds_its_ends():
    h = hw(eff=0.5).model_copy(update={"matmul_curve": CURVE})
    got = matmul_efficiency(h, np.array([1e4, 1e6, 1e7, 1e8, 1e9, 1e12]))
    # 1e7 is halfway between 1e6 and 1e8 in log size: (0.1 + 0.5) / 2; 1e9 halfway to 1.0
    assert got == pytest.approx([0.1, 0.1, 0.3, 0.5, 0.75, 1.0])
    assert matmul_efficiency(hw(eff=0.5), np.array([1e4])) == 0.5  # no curve: the scalar


def test_roofline_times_small_products_at_the_curve_rate():
    h = hw(peak=1e12, eff=1.0, bw=1e15, mem_eff=1.0)  # memory never binds here
    curved = h.model_copy(update={"matmul_curve": CURVE})
    work = Work(np.array([4e9, 4e9]), np.array([1.0, 1.0]), np.array([1e7, 1e10]))
    # 4e9 FLOPs of 1e7-FLOP products at 0.3 of 1e12, and of 1e10-FLOP products at the peak
    assert roofline_s(work, curved) == pytest.approx([4e9 / 3e11, 4e9 / 1e12])
    assert roofline_s(work, h) == pytest.approx([4e-3, 4e-3])


def test_op_work_keys_each_class_by_one_matrix_product():
    train = TrainSpec(seq_len=4, global_batch=2)
    model = TINY.model_copy(update={"moe": MoESpec(num_experts=4, top_k=2, expert_hidden=8, every=1)})
    work = op_work(model, train, plans(Mesh(expert=2, model=2), train))
    t, m = 8 / 2, 2  # tokens per device (data x expert = 2 shards), model axis
    c = 3  # capacity ceil(1.25 * T K / E) = ceil(1.25 * 4 * 2 / 4)
    assert float(np.squeeze(work["attention_proj"].size)) == 2 * (t / m) * 8 * (4 * 2)  # q: [T/m, M] x [M, N D]
    assert work["attention_scores"].size == 2 * 2 * 4 * 4 * 2  # [G S, D] x [D, S], G = 4 / 2
    assert float(np.squeeze(work["expert_ffn"].size)) == 2 * (2 * c) * 8 * (8 / m)  # [x C, M] x [M, H_e/m]
    assert float(np.squeeze(work["lm_head"].size)) == 2 * t * 8 * 16
    assert work["moe_permute"].size == 0 and work["optimizer_update"].size == 0


def test_curve_sizes_must_increase():
    with pytest.raises(ValueError, match="strictly increasing"):
        HardwareProfile.model_validate({**hw().model_dump(), "matmul_curve": [
            {"size": 1e8, "efficiency": 0.5}, {"size": 1e6, "efficiency": 0.1}]})


def test_expert_ffn_is_padded_to_capacity_and_memory_bound():
    # M=1024, E=8, K=1, H_e=1024, cf=1, plain FFN; T = 64 tokens -> C = ceil(64/8) = 8.
    # 8 local experts, each [8, 1024] x [1024, 1024], 2 matrices:
    #   FLOPs fwd = 8 * 2 * 2*8*1024*1024 = 268435456; x 3 passes = 805306368
    #   elements fwd = 8 * 2 * (8*1024 + 1024*1024 + 8*1024) = 17039360; bytes x 2 x 3 = 102236160
    # time: 805306368/5e14 = 1.6e-6 s  <  102236160/1e12 = 1.0224e-4 s -> memory-bound
    model = ModelSpec(
        d_model=1024, layers=1, heads=8, vocab=64, ffn_hidden=1024, gated=False,
        moe=MoESpec(num_experts=8, top_k=1, expert_hidden=1024, capacity_factor=1.0),
    )
    train = TrainSpec(seq_len=64, global_batch=1)
    w = op_work(model, train, plans(Mesh(), train))["expert_ffn"]
    assert w.flops[0] == 805306368
    assert w.bytes[0] == 102236160
    assert roofline_s(w, hw())[0] == pytest.approx(102236160 / 1e12)


def test_expert_ffn_splits_over_expert_and_model_axes():
    # same work spread over expert=4, model=2 with the same T per device (global batch x4):
    # per device still E*C = 8*8 = 64 slots, hidden halved -> FLOPs halve: 805306368 / 2
    model = ModelSpec(
        d_model=1024, layers=1, heads=8, vocab=64, ffn_hidden=1024, gated=False,
        moe=MoESpec(num_experts=8, top_k=1, expert_hidden=1024, capacity_factor=1.0),
    )
    train = TrainSpec(seq_len=64, global_batch=4)
    w = op_work(model, train, plans(Mesh(expert=4, model=2), train))["expert_ffn"]
    assert w.flops[0] == 805306368 / 2


def test_gpt_like_dense_flops_match_6n_plus_attention():
    # Dense GPT-like spec: M=4096, L=32, N=32 heads (D=128), V=32000, H=4M=16384, plain FFN,
    # S=2048, 8 sequences = 16384 tokens on one device.
    # N = matmul parameters = 12*L*M^2 (4M^2 attention + 8M^2 FFN per layer) + V*M (LM head;
    # the input embedding is a lookup, not a matmul) = 6442450944 + 131072000 = 6573522944.
    # Attention per token, fwd + bwd, full S x S (the step masks after computing it):
    # 12*L*S*M = 12*32*2048*4096 = 3221225472 (PaLM's 12LHQT; Kaplan/Chinchilla accounting).
    # Causal-aware accounting would halve this term; ours does not, by design.
    m, layers, v, s, tokens = 4096, 32, 32000, 2048, 16384
    model = ModelSpec(d_model=m, layers=layers, heads=32, vocab=v, ffn_hidden=4 * m, gated=False)
    train = TrainSpec(seq_len=s, global_batch=tokens // s)
    n_params = 12 * layers * m * m + v * m
    expected = (6 * n_params + 12 * layers * s * m) * tokens
    work = op_work(model, train, plans(Mesh(), train))
    total = sum(float(w.flops[0]) for w in work.values())
    assert total == pytest.approx(expected, rel=0.02)
    assert model_flops_per_token(model, train) * tokens == pytest.approx(expected, rel=0.02)


def test_moe_flops_equal_model_flops_without_padding():
    # cf = 1 and T*K divisible by E: E*C = T*K slots, so hardware FLOPs = 6*activated*tokens
    # + attention exactly (router included in the activated params)
    model = ModelSpec(
        d_model=64, layers=4, heads=4, vocab=128, ffn_hidden=256,
        moe=MoESpec(num_experts=8, top_k=2, expert_hidden=64, capacity_factor=1.0, every=2,
                    shared_experts=1),
    )
    train = TrainSpec(seq_len=32, global_batch=8)
    work = op_work(model, train, plans(Mesh(data=2, expert=2), train))
    per_device = sum(float(w.flops[0]) for w in work.values())
    assert per_device * 4 == pytest.approx(model_flops_per_token(model, train) * 256, rel=1e-12)
    # cf = 2 doubles the routed-expert work only
    padded = model.model_copy(update={"moe": model.moe.model_copy(update={"capacity_factor": 2.0})})
    work2 = op_work(padded, train, plans(Mesh(data=2, expert=2), train))
    assert work2["expert_ffn"].flops[0] == 2 * work["expert_ffn"].flops[0]
    assert work2["router"].flops[0] == work["router"].flops[0]


def test_expert_factor_scales_only_expert_ffn():
    model = ModelSpec(
        d_model=64, layers=2, heads=4, vocab=128, ffn_hidden=256,
        moe=MoESpec(num_experts=8, top_k=2, expert_hidden=64),
    )
    train = TrainSpec(seq_len=32, global_batch=8)
    p = plans(Mesh(expert=2), train)
    base, skewed = op_work(model, train, p), op_work(model, train, p, expert_factor=1.5)
    assert skewed["expert_ffn"].flops[0] == 1.5 * base["expert_ffn"].flops[0]
    assert skewed["attention_proj"].flops[0] == base["attention_proj"].flops[0]


def test_remat_codes_are_per_plan():
    train = TrainSpec(seq_len=4, global_batch=2)
    p = Plans(*(np.array([1, 1]),) * 2, np.array([2, 2]), np.array([False, False]),
              np.array([REMAT_CODES["none"], REMAT_CODES["full"]]))
    f = op_work(TINY, train, p)["attention_proj"].flops
    assert f[1] / f[0] == pytest.approx(4 / 3)
    f = op_work(TINY, train, p)["dense_ffn"].flops  # plain FFN: 3.5 passes under full remat
    assert f[1] / f[0] == pytest.approx(3.5 / 3)


def reference_forward(model: ModelSpec, s: int, t: float, x: int, m: int) -> dict[str, tuple]:
    """One layer's forward (FLOPs, elements) per class, matmul by matmul: a slow reference."""
    from math import ceil

    def mm(r, k, c):
        return 2 * r * k * c, r * k + k * c + r * c

    def add(*pairs):
        return tuple(map(sum, zip(*pairs)))

    dm, d, f = model.d_model, model.d_head, model.ffn_matrices
    nq, nkv = model.heads // m, model.n_kv_heads // m
    seq_heads = t / s * nq
    out = {
        "attention_proj": add(mm(t, dm, nq * d), mm(t, dm, nkv * d), mm(t, dm, nkv * d), mm(t, nq * d, dm)),
        "attention_scores": tuple(seq_heads * v for v in add(mm(s, d, s), mm(s, s, d))),
        "dense_ffn": add(*[mm(t, dm, model.ffn_hidden // m)] * f),
        "lm_head": mm(t, dm, model.vocab),
    }
    moe = model.moe
    if moe:
        c = ceil(round(moe.capacity_factor * t * moe.top_k / moe.num_experts, 9))
        one_expert = add(*[mm(x * c, dm, moe.expert_hidden // m)] * f)
        out["router"] = mm(t, dm, moe.num_experts)
        out["expert_ffn"] = tuple(moe.num_experts // x * v for v in one_expert)
        out["shared_experts"] = add(*[mm(t, dm, moe.shared_experts * moe.expert_hidden // m)] * f)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_closed_forms_match_matmul_by_matmul_reference(seed):
    rng = np.random.default_rng(seed)
    m, x = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 4]))
    heads = 8 * int(rng.integers(1, 4))  # kv heads 4 (GQA) or all: divisible by m <= 4
    model = ModelSpec(
        d_model=32 * int(rng.integers(1, 5)), layers=3, heads=heads, kv_heads=4 if seed % 2 else heads,
        head_dim=8 * int(rng.integers(1, 4)),
        vocab=int(rng.integers(50, 200)), ffn_hidden=16 * int(rng.integers(1, 9)), gated=bool(seed % 3),
        moe=MoESpec(num_experts=8, top_k=int(rng.integers(1, 4)), expert_hidden=8 * int(rng.integers(1, 9)),
                    capacity_factor=float(rng.choice([1.0, 1.25, 2.0])), first_dense=1, shared_experts=1),
    )
    train = TrainSpec(seq_len=16, global_batch=8 * x)
    t = 8 * 16 / 1  # tokens per device: 8*x sequences over data=1 x expert=x
    work = op_work(model, train, plans(Mesh(expert=x, model=m), train))
    ref = reference_forward(model, 16, t, x, m)
    layers = {"attention_proj": 3, "attention_scores": 3, "dense_ffn": 1, "lm_head": 1,
              "router": 2, "expert_ffn": 2, "shared_experts": 2}
    for name, (flops, elems) in ref.items():
        assert work[name].flops[0] == pytest.approx(flops * 3 * layers[name], rel=1e-12), name
        assert work[name].bytes[0] == pytest.approx(elems * 2 * 3 * layers[name], rel=1e-12), name


def test_in_place_work_streams_at_the_inplace_bandwidth():
    # 4e9 bytes at 2e12 B/s * 0.5 efficiency = 4e-3 s; in place at 8e12 * 0.5 = 1e-3 s
    h = hw(bw=2e12, mem_eff=0.5)
    fresh = Work(np.array([0.0]), np.array([4e9]), memory_only=True)
    in_place = Work(np.array([0.0]), np.array([4e9]), memory_only=True, in_place=True)
    assert roofline_s(in_place, h)[0] == pytest.approx(4e-3)  # no in-place rate: hbm's
    faster = h.model_copy(update={"inplace_bandwidth": 8e12})
    assert roofline_s(in_place, faster)[0] == pytest.approx(1e-3)
    assert roofline_s(fresh, faster)[0] == pytest.approx(4e-3)  # fresh outputs keep hbm's rate
    # the optimizer update is the in-place class: the step donates its state
    train = TrainSpec(seq_len=4, global_batch=2)
    work = op_work(TINY, train, plans(Mesh(), train))
    assert work["optimizer_update"].in_place and not work["norms_residuals"].in_place


WIDE8 = ModelSpec(d_model=1024, layers=1, heads=8, vocab=64, ffn_hidden=1024, gated=False,
                  moe=MoESpec(num_experts=8, top_k=1, expert_hidden=1024, capacity_factor=1.0))


def test_expert_ffn_rows_are_each_local_experts_tokens():
    # T = 64 tokens, E = 8, K = 1, cf = 1 -> C = 8 slots per expert per routing group; after the
    # all-to-all an expert holds x * C rows: 8 on expert=1, 32 on expert=4 (global batch x4)
    for mesh, batch, rows in ((Mesh(), 1, 8), (Mesh(expert=4), 4, 32), (Mesh(expert=4, model=2), 4, 32)):
        train = TrainSpec(seq_len=64, global_batch=batch)
        work = op_work(WIDE8, train, plans(mesh, train))
        assert np.ravel(work["expert_ffn"].rows)[0] == rows
        assert np.all(np.equal(work["dense_ffn"].rows, 0.0)) and np.all(np.equal(work["lm_head"].rows, 0.0))


def test_rows_curve_caps_only_products_with_rows_below_its_last_point():
    from moeplan.cost.compute import rows_efficiency
    from moeplan.specs import RowsPoint

    h = hw(peak=1e12, eff=0.5).model_copy(update={"matmul_rows_curve": [
        RowsPoint(rows=16, efficiency=0.1), RowsPoint(rows=64, efficiency=0.3), RowsPoint(rows=256, efficiency=0.45)]})
    assert rows_efficiency(h, 8.0) == pytest.approx(0.1)  # held below the first point
    assert rows_efficiency(h, 32.0) == pytest.approx(0.2)  # halfway in log rows between 16 and 64
    assert rows_efficiency(h, 256.0) == 1.0 and rows_efficiency(h, 4096.0) == 1.0  # no limit from the last on
    flops = np.array([1e9])
    skinny = Work(flops, np.array([1.0]), size=1e8, rows=32.0)
    assert roofline_s(skinny, h)[0] == pytest.approx(1e9 / (1e12 * 0.2))  # min(0.5, 0.2)
    wide = Work(flops, np.array([1.0]), size=1e8, rows=1024.0)
    assert roofline_s(wide, h)[0] == pytest.approx(1e9 / (1e12 * 0.5))  # the size's own efficiency
    plain = Work(flops, np.array([1.0]), size=1e8)  # no rows: not an expert product
    assert roofline_s(plain, h)[0] == pytest.approx(1e9 / (1e12 * 0.5))
    assert roofline_s(skinny, hw(peak=1e12, eff=0.5))[0] == pytest.approx(1e9 / (1e12 * 0.5))  # no curve: no cap


def test_rows_curve_must_increase():
    from moeplan.specs import RowsPoint

    with pytest.raises(ValueError, match="rows strictly increasing"):
        hw().model_validate({**hw().model_dump(), "matmul_rows_curve": [
            RowsPoint(rows=64, efficiency=0.3).model_dump(), RowsPoint(rows=16, efficiency=0.1).model_dump()]})
