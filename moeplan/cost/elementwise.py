"""Memory traffic of the elementwise work around the matmuls: norms, residuals, activations,
routing bookkeeping and the LM loss. Bytes only (their FLOPs are negligible next to the
matmuls'), timed on the memory roofline.

Why it matters: these ops do almost no arithmetic but each reads and writes whole activation
tensors, and under tensor parallelism they run on the FULL token set of a device on every
device of the model axis (Megatron replicates norms, residuals and the router over `model`;
Korthikanti et al. arXiv 2205.05198 sec. 4.2.2 count the same replicated activations for
memory). So a model-parallel mesh pays them m times over, which a matmul-only count misses.

Counts, elements per device per forward pass (T tokens per microbatch, M model dim, m the
model axis, H/H_e/H_s hidden sizes, E experts, K top-k, V vocab, C capacity). Each op reads
its inputs and writes its outputs once; a backward op reads the forward input(s) and the
output gradient and writes the input gradient:
  norms_residuals per block: 2 RMSNorms (read [T,M], write [T,M]) and 2 residual adds
                  (read 2, write 1): forward 10 TM; backward 2 x 3 TM for the norms and
                  2 x 3 TM to sum the two gradient branches of each residual: 12 TM.
                  Plus the final norm (2 TM fwd, 3 TM bwd) and the embedding lookup
                  (gather 2 TM fwd; its transpose scatter-adds into a zeroed [V, M]
                  gradient: VM + 2 TM).
  activations     per FFN hidden unit and token: SwiGLU silu(a) * b reads 2, writes 1 (fwd)
                  and reads 3, writes 2 (bwd); GeLU reads 1, writes 1 (fwd) and reads 2,
                  writes 1 (bwd). Over tm H (dense), slots/m H_e (experts), tm H_s (shared).
  routing         float32 / int32: softmax over [T, E] (read, write), top-k (read), the
                  slot positions (one-hot [K T, E], running count, select: 4 K T E) and the
                  load histogram (2 K T E): 3 TE + 6 KTE forward; softmax backward 3 TE.
  loss_softmax    float32 logits [T, V]: logsumexp reads them twice (max, exp-sum); the
                  backward writes softmax - one-hot from one more read: 2 TV + 2 TV.
  gradient_sums   backward only. Reverse-mode differentiation sums the gradients of a
                  tensor that several ops read (Griewank & Walther, "Evaluating
                  Derivatives", 2nd ed. 2008, sec. 3.2, the adjoint's incremental
                  updates); one fused sum of n gradients of [R, M] reads n and writes 1:
                  (n + 1) R M. Fan-ins of the step: the attention input read by the q, k
                  and v projections (n = 3, R = T), a gated FFN's input read by its two
                  input matrices (n = 2: R = T dense and shared, R = E C slots routed),
                  and an MoE block's normed input read by the router, the dispatch and the
                  shared experts (n = 2 or 3, R = T). All over the FULL rows on every
                  model-axis rank (the sums precede the model-axis all-reduce).
Full remat replays the forward of block ops (not of the loss or embedding).
"""

from __future__ import annotations

import numpy as np

from moeplan.cost.layout import REMAT_CODES, Plans, bytes_of, capacity, shared_hidden, tokens_per_microbatch
from moeplan.specs import ModelSpec, TrainSpec

CLASSES: tuple[str, ...] = ("norms_residuals", "activations", "routing", "loss_softmax", "gradient_sums")
F32 = 4  # routing and the loss run in float32 (validate/moe.py route, validate/model.py)


def _activation_elems(gated: bool) -> tuple[float, float]:
    """(forward, backward) elements per hidden unit and token of the FFN nonlinearity."""
    return (3.0, 5.0) if gated else (2.0, 3.0)


def elementwise_bytes(model: ModelSpec, train: TrainSpec, plans: Plans) -> dict[str, np.ndarray]:
    """Per class in CLASSES: bytes per device per optimizer step.

    Written as per-plan arrays times constants folded in advance: the search calls this on
    10^6 plans, so each array operation counts (tests/test_cost_elementwise.py checks the
    hand counts in the module doc).
    """
    t = tokens_per_microbatch(train, plans)
    inv_m = 1.0 / plans.model
    dm, v, lyr = float(model.d_model), float(model.vocab), float(model.layers)
    per_step = bytes_of(train.compute_dtype) * float(train.grad_accum)
    f32_step = F32 * float(train.grad_accum)
    replay = (plans.remat == REMAT_CODES["full"]).astype(np.float64)
    fwd_a, bwd_a = _activation_elems(model.gated)

    # L (22 + 10 replay) TM + 9 TM + VM, all times bytes per element and microbatches
    norms = (t * (dm * per_step)) * ((lyr * 22.0 + 9.0) + (lyr * 10.0) * replay) + v * dm * per_step
    hidden = float(model.dense_layers * model.ffn_hidden)  # units per token (before / m)
    route = 0.0 * t
    moe = model.moe
    if moe is not None:
        hidden += float(model.moe_layers * shared_hidden(model))
        e, k, lm = float(moe.num_experts), float(moe.top_k), float(model.moe_layers)
        route = (t * (lm * e * f32_step)) * ((3.0 + 6.0 * k) * (1.0 + replay) + 3.0)
        units = (t * hidden + capacity(model, t) * float(model.moe_layers * moe.num_experts * moe.expert_hidden)) * inv_m
    else:
        units = t * hidden * inv_m
    return {
        "norms_residuals": norms,
        "gradient_sums": _gradient_sum_elems(model, t) * (dm * per_step),
        "activations": units * ((fwd_a + bwd_a) * per_step + (fwd_a * per_step) * replay),
        "routing": route,
        "loss_softmax": t * (4.0 * v * f32_step),
    }


def _gradient_sum_elems(model: ModelSpec, t: np.ndarray) -> np.ndarray:
    """Rows x (n + 1) of every backward fan-in sum per microbatch (module doc), times M later."""
    gated = 3.0 if model.gated else 0.0  # two input matrices: n = 2, else no fan-in
    rows = t * (4.0 * model.layers + gated * model.dense_layers)
    moe = model.moe
    if moe is None:
        return rows
    shared = shared_hidden(model) > 0
    fan_in = 4.0 if shared else 3.0  # router + dispatch (+ shared experts), n + 1
    rows = rows + t * (model.moe_layers * (fan_in + (gated if shared else 0.0)))
    return rows + capacity(model, t) * float(moe.num_experts * model.moe_layers * gated)
