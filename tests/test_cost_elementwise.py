"""Elementwise traffic (moeplan/cost/elementwise.py) against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from moeplan.cost.compute import op_work
from moeplan.cost.elementwise import elementwise_bytes
from moeplan.cost.layout import Plans
from moeplan.specs import Mesh, ModelSpec, MoESpec, TrainSpec

# M=8, L=2, V=16, H=16, plain (GeLU) FFN; T = 2 x 4 = 8 tokens on one device, bf16 (2 bytes)
TINY = ModelSpec(d_model=8, layers=2, heads=4, kv_heads=2, vocab=16, ffn_hidden=16, gated=False)
TRAIN = TrainSpec(seq_len=4, global_batch=2, compute_dtype="bfloat16")


def totals(model: ModelSpec, train: TrainSpec, mesh: Mesh) -> dict[str, float]:
    out = elementwise_bytes(model, train, Plans.single(mesh, train))
    return {k: float(np.squeeze(v)) for k, v in out.items()}


def test_dense_counts_by_hand():
    got = totals(TINY, TRAIN, Mesh())
    tm = 8 * 8  # T x M
    # blocks 2 x (10 fwd + 12 bwd) TM, final norm 5 TM, embedding 4 TM + V M = 16 x 8
    assert got["norms_residuals"] == (2 * 22 * tm + 5 * tm + 4 * tm + 16 * 8) * 2
    # GeLU: 2 + 3 elements per hidden unit and token, 2 dense layers of T x H = 8 x 16
    assert got["activations"] == 2 * 5 * 8 * 16 * 2
    assert got["routing"] == 0.0
    # float32 logits [8, 16]: two reads forward, one read and one write backward
    assert got["loss_softmax"] == 4 * 8 * 16 * 4


def test_model_axis_replicates_norms_but_splits_activations():
    one, two = totals(TINY, TRAIN, Mesh()), totals(TINY, TRAIN, Mesh(model=2))
    assert two["norms_residuals"] == one["norms_residuals"]  # every model rank holds all T tokens
    assert two["loss_softmax"] == one["loss_softmax"]  # the LM head is replicated too
    assert two["activations"] == pytest.approx(one["activations"] / 2)  # hidden is split


def test_full_remat_replays_block_forwards():
    none = totals(TINY, TRAIN, Mesh())
    full = totals(TINY, TRAIN.model_copy(update={"remat": "full"}), Mesh())
    assert full["norms_residuals"] - none["norms_residuals"] == 2 * 10 * 64 * 2  # 10 TM per block
    assert full["activations"] - none["activations"] == 2 * 2 * 8 * 16 * 2  # GeLU forward again
    assert full["loss_softmax"] == none["loss_softmax"]


def test_routing_counts_by_hand():
    moe = TINY.model_copy(update={"moe": MoESpec(num_experts=4, top_k=2, expert_hidden=8, every=1)})
    got = totals(moe, TRAIN, Mesh())
    t, e, k = 8, 4, 2
    assert got["routing"] == 2 * (3 * t * e + 6 * k * t * e + 3 * t * e) * 4
    # experts: E x C slots, C = ceil(1.25 * 8 * 2 / 4) = 5, of width 8; GeLU 2 + 3
    assert got["activations"] == 2 * 5 * (4 * 5) * 8 * 2


def test_op_work_carries_the_elementwise_classes():
    work = op_work(TINY, TRAIN, Plans.single(Mesh(), TRAIN))
    assert float(work["loss_softmax"].bytes[0]) == 4 * 8 * 16 * 4
    assert float(work["norms_residuals"].flops[0]) == 0.0


def test_gradient_sums_counts_by_hand():
    # plain FFN: only the q/k/v fan-in, n = 3 -> 4 TM per block, 2 blocks, bf16
    assert totals(TINY, TRAIN, Mesh())["gradient_sums"] == 2 * 4 * 8 * 8 * 2
    gated = TINY.model_copy(update={"gated": True})
    # + the gated dense FFN's two input matrices: 3 TM per block
    assert totals(gated, TRAIN, Mesh())["gradient_sums"] == 2 * (4 + 3) * 8 * 8 * 2
    moe = gated.model_copy(update={"moe": MoESpec(num_experts=4, top_k=2, expert_hidden=8, every=1)})
    # MoE blocks: q/k/v 4 TM, router + dispatch 3 TM, and the experts' two input matrices
    # over E x C = 4 x 5 slots of width 8: 3 x 20 x 8
    assert totals(moe, TRAIN, Mesh())["gradient_sums"] == 2 * ((4 + 3) * 8 * 8 + 3 * 20 * 8) * 2
    shared = moe.model_copy(update={"moe": moe.moe.model_copy(update={"shared_experts": 1})})
    # a shared expert adds a third reader of the normed input (4 TM) and its own gated sum (3 TM)
    assert totals(shared, TRAIN, Mesh())["gradient_sums"] == 2 * ((4 + 4 + 3) * 8 * 8 + 3 * 20 * 8) * 2


def test_gradient_sums_are_backward_only_and_replicated_over_model():
    base = totals(TINY, TRAIN, Mesh())["gradient_sums"]
    assert totals(TINY, TRAIN.model_copy(update={"remat": "full"}), Mesh())["gradient_sums"] == base
    assert totals(TINY, TRAIN, Mesh(model=2))["gradient_sums"] == base  # full rows on every rank
    assert totals(TINY, TRAIN.model_copy(update={"grad_accum": 2, "global_batch": 4}), Mesh())["gradient_sums"] == 2 * base
