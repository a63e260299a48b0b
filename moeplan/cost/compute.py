"""FLOPs, HBM bytes and roofline time of one training step, per op class, for many plans.

Why per op class: a dense FFN matmul of 8k tokens runs near peak, while one expert's
matmul over a few dozen capacity slots reads a whole weight matrix for little arithmetic
and is bound by memory bandwidth. Timing each class on its own roofline keeps that
difference; one FLOP total at one efficiency would hide it.

Letters (per device, per microbatch): T tokens, S sequence, M model dim, D head dim,
N / N_kv query / key-value heads, H dense FFN hidden, H_e expert hidden, H_s shared-expert
hidden (all shared experts side by side), E experts, C capacity, V vocab, f FFN matrices
(3 gated, 2 plain); mesh axes x (expert), m (model). Sharding as in docs/cost-model.md:
heads and FFN hidden over m, experts over x, router and LM head replicated over m.

Counts: a [r, k] x [k, c] matmul is 2rkc FLOPs (one multiply and one add per term) and
moves r*k + k*c + r*c elements (inputs, weights, output). The backward pass of a matmul is
two matmuls of the same size (input gradient and weight gradient), so it costs 2x the
forward in FLOPs and in bytes (Kaplan et al. arXiv 2001.08361 sec. 2.1; Narayanan et al.
arXiv 2104.04473 sec. 5.1). Rematerialisation adds forward passes (see `passes`; full
remat skips the replay of what only feeds a block's output, see `op_work`).
Attention scores are counted over the full S x S matrix: the JAX step computes QK^T and AV
unmasked and applies the causal mask afterwards, so no FLOPs are saved by causality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from moeplan.cost.layout import (
    REMAT_CODES,
    Plans,
    activated_params,
    bytes_of,
    capacity,
    shared_hidden,
    tokens_per_microbatch,
    total_params,
)
from moeplan.cost import elementwise
from moeplan.cost.memory import sharded_params
from moeplan.specs import HardwareProfile, ModelSpec, TrainSpec

OP_CLASSES: tuple[str, ...] = (
    "attention_proj",  # q, k, v, o projections
    "attention_scores",  # QK^T and AV over the full S x S matrix
    "attention_softmax",  # float32 softmax over the S x S scores: bytes only, no FLOPs
    "dense_ffn",  # FFN of dense blocks
    "router",  # [T, M] x [M, E], replicated over model
    "expert_ffn",  # routed experts, padded to capacity
    "shared_experts",  # always-on experts (DeepSeekMoE)
    "lm_head",  # [T, M] x [M, V], replicated over model
    "moe_permute",  # dispatch / combine gathers and scatters: bytes only, no FLOPs
    "optimizer_update",  # Adam's elementwise update of the local parameters: bytes only
    *elementwise.CLASSES,  # norms, residuals, activations, routing, loss: bytes only (elementwise.py)
)
SOFTMAX_BYTES = 4  # the JAX step takes the softmax of the scores in float32 (validate/model.py)


class _Op(NamedTuple):
    """One forward pass of one layer of one op class, on one device."""

    flops: np.ndarray | float
    elems: np.ndarray | float  # elements read + written
    size: np.ndarray | float = 0.0  # FLOPs of one matrix product (matmul_curve key)
    rows: np.ndarray | float = 0.0  # rows of one expert's product (matmul_rows_curve key); 0: none


@dataclass(frozen=True)
class Work:
    """One op class's work on one device over one optimizer step."""

    flops: np.ndarray
    bytes: np.ndarray  # HBM traffic: inputs + weights + outputs (compute dtype for matmuls)
    size: np.ndarray | float = 0.0  # FLOPs of one matrix product (matmul_curve key); 0: none
    rows: np.ndarray | float = 0.0  # rows of one expert's product (matmul_rows_curve key); 0: none
    memory_only: bool = False  # no FLOPs at all: timed on the memory roofline alone
    in_place: bool = False  # writes into its inputs' buffers (donated state): hw.inplace_bandwidth


def passes(train: TrainSpec, recompute: np.ndarray | bool | float) -> np.ndarray | float:
    """Forward-pass equivalents per step: (1 fwd + 2 bwd + recompute) x microbatches.

    Recomputation replays one forward inside backward (Chen et al. arXiv 1604.06174 for full
    remat; Korthikanti et al. arXiv 2205.05198 sec. 5 for selective remat of attention).
    """
    return (3.0 + recompute) * train.grad_accum


def _forward_per_layer(model: ModelSpec, train: TrainSpec, plans: Plans, t: np.ndarray) -> dict:
    """(FLOPs, elements) of one forward pass of one layer (or of the LM head), per class.

    Each class sums the 2rkc FLOPs and rk + kc + rc elements of its matmuls, written out
    with the plan-independent factors multiplied first (the search calls this on 10^6
    plans: every array operation counts; tests/test_cost_compute.py checks these closed
    forms against a matmul-by-matmul reference).
    With tm = T/m and heads h = 2N + 2N_kv (q, k, v, o widths in units of D):
      attention_proj  q [T,M]x[M,ND/m], k and v [T,M]x[M,N_kv D/m], o [T,ND/m]x[ND/m,M]
                      FLOPs 2 tm M D h; elements 4TM + (M D h)/m + tm D h
      attention_scores per sequence and local head [S,D]x[D,S] and [S,S]x[S,D], T/S
                      sequences: FLOPs 4 tm S D N; elements tm N (4SD + 2S^2)/S
      attention_softmax reads the S x S scores and writes the probabilities: 2 tm N S
                      float32 elements (no matmul FLOPs; exp and sums are not counted)
      dense_ffn       f x [T,M]x[M,H/m]: FLOPs 2 f tm M H; elements f (TM + MH/m + tm H)
      router          [T,M]x[M,E]: FLOPs 2TME; elements T(M + E) + ME
      expert_ffn      f x E/x experts of [xC,M]x[M,H_e/m]: FLOPs 2 f (EC/m) M H_e;
                      elements f (EC M + (E/x) M H_e/m + (EC/m) H_e)
      shared_experts  f x [T,M]x[M,H_s/m], like dense_ffn
      lm_head         [T,M]x[M,V]: FLOPs 2TMV; elements T(M + V) + MV
    The third entry of each tuple is the FLOPs of ONE matrix product of the class (the key
    of HardwareProfile.matmul_curve): the q projection, one (sequence, K/V head) score
    product [G S, D] x [D, S] with G query heads per K/V head, one expert's [xC, M] x
    [M, H_e/m]; 0 for classes without matmuls.
    """
    inv_m = 1.0 / plans.model
    tm = t * inv_m
    dm, d, s, f = model.d_model, model.d_head, train.seq_len, model.ffn_matrices
    h = 2 * model.heads + 2 * model.n_kv_heads
    group = model.heads // model.n_kv_heads
    scores = tm * (model.heads * (4.0 * s * d + 2.0 * s * s) / s)
    out = {
        "attention_proj": _Op(tm * (2.0 * dm * d * h), t * (4.0 * dm) + inv_m * (dm * d * h) + tm * (d * h),
                              tm * (2.0 * dm * d * model.heads)),
        "attention_scores": _Op(tm * (4.0 * s * d * model.heads), scores, 2.0 * group * s * s * d),
        "attention_softmax": _Op(0.0, tm * (2.0 * model.heads * s)),
        "dense_ffn": _ffn(t, tm, inv_m, dm, model.ffn_hidden, f),
        "lm_head": _Op(t * (2.0 * dm * model.vocab), t * float(dm + model.vocab) + float(dm * model.vocab),
                       t * (2.0 * dm * model.vocab)),
    }
    moe = model.moe
    if moe is not None:
        e, he = moe.num_experts, moe.expert_hidden
        slots = e * capacity(model, t)  # E*C slots per device: E/x experts with x*C each
        slots_m = slots * inv_m
        out["router"] = _Op(t * (2.0 * dm * e), t * float(dm + e) + float(dm * e), t * (2.0 * dm * e))
        experts = slots * (f * dm) + inv_m / plans.expert * (f * e * dm * he) + slots_m * (f * he)
        rows = slots / e * plans.expert  # x*C: each local expert's slots from every expert-axis rank
        out["expert_ffn"] = _Op(slots_m * (2.0 * f * dm * he), experts, slots_m * (2.0 * dm * he / e) * plans.expert,
                                rows)
        out["shared_experts"] = _ffn(t, tm, inv_m, dm, shared_hidden(model), f)
        # dispatch reads [T, M] and writes [E*C, M]; combine does the reverse
        out["moe_permute"] = _Op(0.0, (t + slots) * (2.0 * dm))
    return out


def _ffn(t, tm, inv_m, dm: int, hidden: int, f: int) -> _Op:
    """f matmuls [T,M]x[M,hidden/m] (or their [T,hidden/m]x[hidden/m,M] mirror)."""
    one = tm * (2.0 * dm * hidden)
    elems = t * float(f * dm) + inv_m * float(f * dm * hidden) + tm * float(f * hidden)
    return _Op(one * f, elems, one)


def op_work(
    model: ModelSpec, train: TrainSpec, plans: Plans, expert_factor: np.ndarray | float = 1.0
) -> dict[str, Work]:
    """FLOPs and HBM bytes per device per optimizer step, for every class in OP_CLASSES.

    `expert_factor` scales the expert FFN (the busiest device's expert work relative to the
    capacity-padded uniform case; see moeplan/cost/balance.py). Classes a model lacks are 0.
    """
    t = tokens_per_microbatch(train, plans)
    cb = bytes_of(train.compute_dtype)
    full = (plans.remat == REMAT_CODES["full"]).astype(np.float64)
    any_remat = (plans.remat != REMAT_CODES["none"]).astype(np.float64)
    block = passes(train, full)
    layers = {
        "attention_proj": model.layers,
        "attention_scores": model.layers,
        "attention_softmax": model.layers,
        "dense_ffn": model.dense_layers,
        "router": model.moe_layers,
        "expert_ffn": model.moe_layers,
        "shared_experts": model.moe_layers if shared_hidden(model) else 0,
        "lm_head": 1,
        "moe_permute": model.moe_layers,
    }
    # Full remat replays a block's forward, but jax.checkpoint drops the replay of what only
    # feeds the block's output (backward never needs it): the last FFN matmul of dense and
    # shared-expert FFNs (with its all-reduce, see traffic.py) and the combine gather.
    tail_free = passes(train, full * ((model.ffn_matrices - 1) / model.ffn_matrices))
    mult = {
        "dense_ffn": tail_free,
        "shared_experts": tail_free,
        "attention_scores": passes(train, any_remat),
        # softmax backward reads y and dy and writes dx: 3 S x S passes to forward's 2
        "attention_softmax": (2.5 + any_remat) * train.grad_accum,
        "lm_head": passes(train, 0.0),
        # a gather's transpose is one scatter of the same size: fwd + bwd (2x, not 3x), and
        # full remat replays only the dispatch half
        "moe_permute": (2.0 + 0.5 * full) * train.grad_accum,
    }
    elem_bytes = {"attention_softmax": SOFTMAX_BYTES}
    forward = _forward_per_layer(model, train, plans, t)
    zero = np.zeros(len(plans))
    work: dict[str, Work] = {}
    for name, count in layers.items():  # the per-layer classes; the rest follow below
        if name not in forward or count == 0:
            work[name] = Work(zero, zero)
            continue
        op = forward[name]
        k = count * mult.get(name, block)
        if name == "expert_ffn" and not np.all(np.equal(expert_factor, 1.0)):
            k = k * expert_factor
        no_flops = np.isscalar(op.flops) and op.flops == 0.0
        work[name] = Work(_full(op.flops * k, zero), _full(op.elems * (elem_bytes.get(name, cb) * k), zero), op.size,
                          op.rows, memory_only=no_flops)
    # the step donates its state, so Adam's outputs overwrite its inputs (validate/step.py)
    work["optimizer_update"] = Work(zero, optimizer_update_bytes(model, train, plans), memory_only=True,
                                    in_place=True)
    for name, total in elementwise.elementwise_bytes(model, train, plans).items():
        work[name] = Work(zero, _full(total, zero), memory_only=True)
    return {name: work[name] for name in OP_CLASSES}


def optimizer_update_bytes(model: ModelSpec, train: TrainSpec, plans: Plans) -> np.ndarray:
    """HBM bytes of one Adam step over the local (FSDP-sharded) parameters.

    Adam (Kingma & Ba, arXiv 1412.6980, alg. 1) as the step writes it and XLA compiles it:
    one kernel per moment reads the moment and the gradient and writes the moment, then one
    kernel reads the weight and both new moments and writes the weight (the compiled CPU
    step has exactly these fusions: 10 passes for fp32 Adam). A hand-fused optimizer (one
    pass: read weight, gradient, moments; write weight, moments) moves 7 passes instead.
    """
    pb, ob, k = bytes_of(train.param_dtype), bytes_of(train.opt_state_dtype), train.optimizer_states
    return sharded_params(model, plans) * float(k * (3 * ob + pb) + 2 * pb)


def _full(a, zero: np.ndarray) -> np.ndarray:
    """`a` as a float array with one entry per plan (constants broadcast)."""
    return a if np.shape(a) == zero.shape else a + zero


def roofline_s(work: Work, hw: HardwareProfile) -> np.ndarray:
    """max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth).

    The roofline model: Williams, Waterman & Patterson, "Roofline: an insightful visual
    performance model for multicore architectures", CACM 52(4), 2009.
    """
    rate = hw.inplace_bandwidth if work.in_place and hw.inplace_bandwidth else hw.hbm_bandwidth
    mem_s = work.bytes / (rate * hw.memory_efficiency)
    if work.memory_only:
        return mem_s
    efficiency = matmul_efficiency(hw, work.size)
    if hw.matmul_rows_curve is not None and not np.all(np.equal(work.rows, 0.0)):
        efficiency = np.minimum(efficiency, rows_efficiency(hw, work.rows))
    flop_s = work.flops / (hw.peak_flops * efficiency)
    return np.maximum(flop_s, mem_s)


def rows_efficiency(hw: HardwareProfile, rows: np.ndarray | float) -> np.ndarray | float:
    """Achieved fraction of peak of an expert's products with `rows` rows (matmul_rows_curve),
    linear in log(rows) between the measured points, held below the first, and 1 (no limit
    beyond the size curve) from the last on.

    Why: per-expert batches are the MoE-specific way to starve a matmul. With few tokens per
    expert the product is a skinny [rows, M] x [M, H] (and its transposes in backward), whose
    rate falls with the row count at equal FLOPs: the size curve, measured on square-ish
    shapes, priced wide-moe's data=8 experts (20 rows) at 0.47 of their isolated time.
    """
    curve = hw.matmul_rows_curve
    keys = [p.rows for p in curve]
    return np.where(np.maximum(rows, 1.0) >= keys[-1], 1.0, _log_interp(rows, keys, [p.efficiency for p in curve]))


def _log_interp(x: np.ndarray | float, keys: list[float], values: list[float]) -> np.ndarray | float:
    """A measured curve read at x: linear in log(x) between its keys, flat beyond its ends."""
    return np.interp(np.log(np.maximum(x, 1.0)), np.log(keys), np.array(values))


def matmul_efficiency(hw: HardwareProfile, size: np.ndarray | float) -> np.ndarray | float:
    """Achieved fraction of peak for matrix products of `size` FLOPs each.

    With a measured curve (hw.matmul_curve), linear in log(size) between its points and flat
    beyond them; otherwise the profile's single matmul_efficiency. The curve is what makes a
    64 x 16 x 64 attention-score product cost what it costs: on the hardware it was measured
    on, such products run several times below the peak of a large square one.
    """
    curve = hw.matmul_curve
    if curve is None or np.all(np.equal(size, 0.0)):
        return hw.matmul_efficiency
    return _log_interp(size, [p.size for p in curve], [p.efficiency for p in curve])


def matmul_params(model: ModelSpec) -> tuple[float, float]:
    """(total, activated) weights that enter a matmul: all parameters minus norms and the
    input embedding (a lookup, not a matmul; with tied embeddings the matrix is the LM head).
    """
    lookup = model.vocab * model.d_model if not model.tie_embeddings else 0
    norms = model.d_model * (2 * model.layers + 1)
    drop = lookup + norms
    return float(total_params(model) - drop), float(activated_params(model) - drop)


def model_flops_per_token(model: ModelSpec, train: TrainSpec) -> float:
    """Useful training FLOPs per token: 6 * activated matmul params + attention.

    6N per token for forward + backward (Kaplan et al. arXiv 2001.08361 sec. 2.1) and
    12 * L * S * N * D for QK^T and AV over the full S x S matrix (PaLM, Chowdhery et al.
    arXiv 2204.02311 app. B, "12LHQT"), without recomputation or capacity padding.
    """
    _, active = matmul_params(model)
    return 6.0 * active + 12.0 * model.layers * train.seq_len * model.heads * model.d_head
