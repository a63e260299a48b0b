"""Per-device memory terms, on a tiny model worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from moeplan.cost.layout import Plans
from moeplan.cost.memory import activation_bytes, memory_per_device
from moeplan.specs import Mesh, ModelSpec, MoESpec, TrainSpec

# M=8, L=2, N=4 (D=2), N_kv=2, V=16, H=16, plain FFN; on model=2 -> 2 local q heads, 1 kv head
TINY = ModelSpec(d_model=8, layers=2, heads=4, kv_heads=2, vocab=16, ffn_hidden=16, gated=False)


def mem(model: ModelSpec, mesh: Mesh, **train_kw) -> dict[str, float]:
    train = TrainSpec(**({"seq_len": 4, "global_batch": 2} | train_kw))
    out = memory_per_device(model, train, Plans.single(mesh, train))
    return {k: float(v[0]) for k, v in out.items()}


def test_tiny_dense_model_memory_by_hand():
    # params per device: replicated = embedding + head 2*16*8 = 256, final norm 8, block norms
    # 2*2*8 = 32 -> 296; sharded over model=2: attention 2 layers * 8*2*(2*4 + 2*2) = 384,
    # FFN 2 layers * 2*8*16 = 512 -> 896 / 2 = 448. Total 744 params.
    # weights fp32 2976 B, all gradients 2976 B, Adam 2 * 4 B * 744 = 5952 B.
    # activations, T = 8 tokens, bf16, per layer:
    #   attention 2*T*M + T*D*(2*2 + 2*1) = 128 + 96 = 224 el = 448 B
    #   scores T*S*N/m = 8*4*2 = 64 el, kept as the bf16 probabilities only (a fusing
    #     runtime recomputes the float32 softmax): 64 * 2 = 128 B
    #   FFN 2*T*M + 2*T*H/m = 128 + 128 = 256 el = 512 B
    #   -> 1088 B per layer, 2176 B for 2 layers
    # plus, once, the attention backward of one layer: one more bf16 [S, S] per head,
    #   64 * 2 = 128 B -> 2304 B
    # logits T*V*4 = 8*16*4 = 512 B
    # peak: start of backward = activations + logits + the first gradients (embedding and
    #   head 256 params + the last block's 8*2*12/2 + 16 norms + 2*8*16/2 = 240 -> 496 params,
    #   1984 B) = 4800 B; end = all gradients 2976 + the first layer's activations (1088 +
    #   128) = 4192 B. The start is the larger.
    m = mem(TINY, Mesh(model=2))
    assert m["weights"] == 2976
    assert m["gradients"] == 1984
    assert m["optimizer"] == 5952
    assert m["activations"] == 2304
    assert m["logits"] == 512
    assert m["moe_buffers"] == 0 and m["fsdp_buffers"] == 0
    assert sum(m.values()) == 2976 + 1984 + 5952 + 2304 + 512


def test_peak_moves_to_the_end_of_backward_when_gradients_outweigh_activations():
    # grad_accum 2 halves the live tokens (T = 4): start = activations 1152 + logits 256 + first
    # gradients 1984 = 3392 B; end = all gradients 2976 + the first layer's activations
    # (attention 224 + scores 64 + its backward 64 + FFN 256 = 608 B) = 3584 B: the end wins,
    # with every gradient and one layer's activations live, and no logits
    m = mem(TINY, Mesh(model=2), grad_accum=2)
    assert m["gradients"] == 2976
    assert m["activations"] == 608
    assert m["logits"] == 0 and m["moe_buffers"] == 0
    assert m["grad_accumulator"] == 2976  # the running sum of the microbatch gradients, live throughout
    assert sum(m.values()) == 2976 + 2976 + 2976 + 5952 + 608


def test_remat_policies_by_hand():
    # full: block inputs L*T*M*2 = 2*8*8*2 = 256 B + one block (448 + 128 + 512) = 1344 B
    # selective: every layer but the scores (2 * (448 + 512)) + one layer's scores 128 = 2048 B
    # each + one layer's attention backward 128 B (one bf16 [S, S] per head, as without remat)
    train = lambda remat: TrainSpec(seq_len=4, global_batch=2, remat=remat)  # noqa: E731
    saved = lambda remat: float(activation_bytes(TINY, train(remat), Plans.single(Mesh(model=2), train(remat)))[0][0])  # noqa: E731
    assert saved("full") == 1344 + 128
    assert saved("selective") == 2048 + 128
    # full remat saves so little that the peak is at the end of backward: every gradient and
    # the one block being differentiated (1216 B)
    m = mem(TINY, Mesh(model=2), remat="full")
    assert m["gradients"] == 2976 and m["activations"] == 1216


def test_fsdp_shards_weights_and_state():
    # data=2 with FSDP: the 744 params per device halve -> 372 -> weights 1488 B, grads 1488 B,
    # Adam 2976 B; one gathered block in bf16: attention 192/2 = 96, norms 16, FFN 256/2 = 128
    # -> 240 params * 2 B = 480 B
    m = mem(TINY, Mesh(data=2, model=2), fsdp=True)
    assert m["weights"] == 1488
    assert m["gradients"] == 1488
    assert m["optimizer"] == 2976
    assert m["fsdp_buffers"] == 480


def test_moe_buffers_and_expert_weights():
    # one MoE layer: M=8, E=4, K=2, H_e=8, cf=1, plain; T = 8 tokens -> C = ceil(8*2/4) = 4,
    # E*C = 16 slots. buffers: dispatched in + returned out 2*16*8 = 256 el, expert hidden
    # 2*16*8 = 256 el -> 512 el * 2 B = 1024 B.
    # expert params on expert=2: 2 local experts * 2 * 8 * 8 = 256 params -> FSDP over data=1
    # leaves them; non-FSDP weights include them.
    model = ModelSpec(d_model=8, layers=1, heads=2, vocab=16, ffn_hidden=16, gated=False,
                      moe=MoESpec(num_experts=4, top_k=2, expert_hidden=8, capacity_factor=1.0))
    m = mem(model, Mesh(expert=2), global_batch=4)  # 4 seqs * 4 / expert 2 = 8 tokens
    assert m["moe_buffers"] == 1024
    # non-expert: embedding+head 256, final norm 8, block norms 16, attention 256, router 32
    # -> 568; + 256 expert -> 824 params * 4 B = 3296 B
    assert m["weights"] == 3296
    # the MoE block keeps 2*T*M = 128 el (256 B) + router logits and probs 2*T*E*4 = 256 B;
    # attention (D = 4, 2 q and 2 kv heads) 2*T*M + T*D*(2*2 + 2*2) = 128 + 256 = 384 el
    # (768 B); scores T*S*N = 8*4*2 = 64 el kept as bf16 probabilities (128 B) + the one
    # layer's attention backward 64 el * 2 B = 128 B
    assert m["activations"] == 256 + 256 + 768 + 128 + 128


def test_memory_is_vectorised_over_plans():
    train = TrainSpec(seq_len=4, global_batch=8)
    many = Plans(np.array([1, 2, 1]), np.array([1, 1, 1]), np.array([2, 2, 1]),
                 np.array([False, True, False]), np.array([0, 2, 1]))
    out = memory_per_device(TINY, train, many)
    for i in range(3):
        alone = memory_per_device(TINY, train, many.take(np.array([i])))
        for k in out:
            assert out[k][i] == pytest.approx(alone[k][0], rel=1e-12)


# the MoE model of test_moe_buffers_and_expert_weights: 568 non-expert params and 2 * 2 * 8 * 8
# = 256 params per expert pair; on expert=1 all 4 experts are local (512 params)
MOE1 = ModelSpec(d_model=8, layers=1, heads=2, vocab=16, ffn_hidden=16, gated=False,
                 moe=MoESpec(num_experts=4, top_k=2, expert_hidden=8, capacity_factor=1.0))


def mem_cpu(mesh: Mesh, **train_kw) -> dict[str, float]:
    """Memory with an out-of-place all-reduce (CPU runtime)."""
    train = TrainSpec(**({"seq_len": 4, "global_batch": 16} | train_kw))
    out = memory_per_device(MOE1, train, Plans.single(mesh, train), reduce_out_of_place=True)
    return {k: float(v[0]) for k, v in out.items()}


def test_reduce_buffer_is_zero_unless_the_all_reduce_is_out_of_place():
    assert mem(MOE1, Mesh(data=8), global_batch=16)["reduce_buffer"] == 0


def test_reduce_buffer_holds_the_combined_gradient_all_reduce_output_at_the_end():
    # data=8, expert=1, T = 8: one combined all-reduce over (568 + 512) params * 4 B = 4320 B,
    # written beside the 4320 B of gradients it reduces. End of backward: 4320 + max(the
    # all-reduce output 4320, the layer's activations 2560) = 8640 B; start: activations
    # 1536 + MoE buffers 1024 + logits 512 + first gradients (256 + 816 params) 4288 = 7360 B
    m = mem_cpu(Mesh(data=8))
    assert m["reduce_buffer"] == 4320
    assert m["gradients"] == 4320
    assert m["activations"] == m["moe_buffers"] == m["logits"] == 0  # all freed by then


def test_reduce_buffer_takes_the_larger_of_two_ops_on_different_groups():
    # data=2, expert=2, T = 4: non-expert grads (568 params) over (data, expert), the 2 local
    # experts' (256 params) over data: two ops, the larger 568 * 4 = 2272 B. End: 3296 + 2272
    # = 5568 B against a start of 768 + 512 + 256 + (256 + 560) * 4 = 4800 B
    m = mem_cpu(Mesh(data=2, expert=2), global_batch=4)  # 4 tokens per device
    assert m["reduce_buffer"] == 2272
    assert m["gradients"] == 3296


def test_no_reduce_buffer_without_a_gradient_all_reduce():
    assert mem_cpu(Mesh(model=2))["reduce_buffer"] == 0  # no data or expert axis: nothing to reduce
    assert mem_cpu(Mesh(data=8), fsdp=True)["reduce_buffer"] == 0  # FSDP reduce-scatters instead


# gated MoE model for the unfused-runtime counts: M=8, 1 MoE layer of 4 experts top-2 width 8
GATED_MOE = ModelSpec(d_model=8, layers=1, heads=2, vocab=16, ffn_hidden=16, gated=True,
                      moe=MoESpec(num_experts=4, top_k=2, expert_hidden=8, capacity_factor=1.0))


def test_unfused_runtime_keeps_every_autodiff_residual_by_hand():
    # seq 4 x batch 2 on one device: T = 8 tokens, float32 (4 B); capacity ceil(8*2/4) = 4, so
    # E*C = 16 slots; on model=2 each rank holds H_e/m = 4 of the expert hidden.
    train = TrainSpec(seq_len=4, global_batch=2, compute_dtype="float32")
    plans = Plans.single(Mesh(model=2), train)
    fused = {k: float(v[0]) for k, v in memory_per_device(GATED_MOE, train, plans).items()}
    unfused = {k: float(v[0]) for k, v in memory_per_device(GATED_MOE, train, plans, unfused=True).items()}
    # gated hidden: 5 buffers [E*C, H_e/m] instead of 3 -> 2 * 16 * 4 * 4 B = 512 B
    assert unfused["moe_buffers"] - fused["moe_buffers"] == 512
    # one more [T, M] per block norm (attention and MoE block: 2 * 8*8*4 = 512 B) plus the
    # final norm's input and output (2 * 256 B); scores T*S*N/m = 8*4*2/2 = 32 el: unfused
    # the float32 softmax output and its (here float32) cast, 8 B/el; fused the probabilities
    # (4 B/el) + one layer's backward buffer (4 B/el): 32 * (8 - 8) = 0 B
    assert unfused["activations"] - fused["activations"] == 512 + 512
    # exp(logits) and d_logits: two [T, V] float32 instead of one
    assert unfused["logits"] == 2 * fused["logits"] == 2 * 8 * 16 * 4
    for term in ("weights", "gradients", "optimizer"):
        assert unfused[term] == fused[term]


def test_unfused_counts_follow_the_remat_policy():
    # full remat keeps one block's hidden: the extra over fused is the same 512 B as with none,
    # but not once per layer as under none (two layers here)
    two = GATED_MOE.model_copy(update={"layers": 2})
    extra = {}
    for remat in ("none", "full"):
        train = TrainSpec(seq_len=4, global_batch=2, compute_dtype="float32", remat=remat)
        plans = Plans.single(Mesh(model=2), train)
        f, u = (activation_bytes(two, train, plans, unfused=x)[1][0] for x in (False, True))
        extra[remat] = float(u - f)
    assert extra == {"none": 2 * 512.0, "full": 512.0}
