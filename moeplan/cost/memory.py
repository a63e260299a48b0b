"""Bytes each device holds at the peak of one training step, for many plans at once.

Why: a plan that does not fit in HBM is worthless however fast it would be, and MoE plans
run out of memory in their own ways (every local expert's weights and optimizer state, the
[E*C, M] dispatch buffers, the S x S attention scores of a step without flash attention).

Terms (per device; T tokens per microbatch, letters as in compute.py), each the bytes of
that kind live at the step's peak (below, "Peak"):
  weights      params * param bytes; FSDP divides non-expert params over (data, expert)
               and expert params over data (ZeRO-3, Rajbhandari et al. arXiv 1910.02054)
  gradients    the same, in the param dtype (one microbatch's gradients); at a peak at the
               start of backward only the first ones made
  grad_accumulator  with grad_accum > 1, the running sum of the microbatch gradients the
               accumulation loop carries while the next microbatch's gradients are made
               (param dtype; 0 with one microbatch)
  optimizer    optimizer_states * params * opt-state bytes, sharded like the weights
  fsdp_buffers one block's gathered weights in the compute dtype (FSDP only; the least
               XLA can keep live)
  activations  saved for backward under the remat policy (below), compute dtype
  moe_buffers  dispatched tokens [E*C, M] and returned expert outputs [E*C, M] plus the
               expert hidden f x [E*C, H_e/m], per MoE block kept under the remat policy
  logits       [T, V] in float32 (unfused runtimes: two, below)
  reduce_buffer  (runtimes whose all-reduce is out of place: HostMemory.all_reduce_out_of_place)
               the gradient all-reduce's output beside the gradients it reduces, at the end
               of backward. XLA combines all-reduces over the same devices into one op, so
               with expert = 1 the non-expert and expert gradients go in one (measured on 8
               CPU devices: memory_analysis temp = 2 x gradients at data = 8). Accelerators
               reduce in place or fit the output in freed memory (TPU AOT, data = 8: peak =
               this model without it), so it is 0 there.

Peak. Backward walks the layers from last to first, freeing each layer's saved activations
as it makes that layer's gradients, so activations and gradients are never all live at once.
With per-layer activations a_l and gradients g_l, the live bytes while layer l is
differentiated are sum_{j<=l} a_j + sum_{j>=l} g_j: linear in l for layers of one size, so the
peak is at one of backward's two ends (liveness analysis as in Chen et al. arXiv 1604.06174,
sec. 3; XLA's buffer assignment plans its scratch from the same live ranges):
  start  every saved activation, MoE buffer and logit, plus the first gradients made: the
         LM head's and embedding's and the last layer's (never more than all gradients);
  end    every gradient, plus the larger of the first layer's activations (its backward is
         the last one) and an out-of-place all-reduce's output (the activations are freed).
         With grad_accum > 1 the all-reduce runs once, after the loop, on the accumulator:
         its output then sits beside the accumulator alone (XLA's CPU scratch at data = 8,
         grad_accum = 2: 2 x gradients, not 3), so the end is the accumulator + the larger of
         (last microbatch's gradients + the first layer's activations) and that output.
The peak is the larger; the gradient accumulator and FSDP buffers are live at both. Against
XLA's planned scratch (memory_analysis temp_size) on 30 CPU candidates (3 validation shapes x
every mesh of 8 devices, 2026-12-02), the median error went from 7.9% (every term live at
once; worst 29% too high) to 3.7% (worst 14% too low, tiny-moe model = 8), and the 32 MiB
allocator threshold of the first-touch term (first_touch.py) is now on the right side for all
30 (the sum put 3 over it that are under it). XLA's buffer dump of small-moe data=1,expert=8
shows the peak at the start: 52% of the way through the schedule, with forward activations,
the dispatch buffers and 2.6 MiB of the first gradients live.

Per-layer activations adapt Korthikanti et al. (arXiv 2205.05198, sec. 4.1, which gives
sbh(34 + 5as/h) bytes with dropout and fp16) to this layout, with no dropout and no flash
attention, counted in elements:
  attention block  block input and norm output 2TM, Q/K/V T*D*(N + 2N_kv)/m, attention
                   output T*N*D/m; the S x S scores T*S*N/m once, in the compute dtype: a
                   fusing compiler keeps only the probabilities AV's backward reads and
                   recomputes the float32 softmax inside its fused backward (TPU v5p ahead
                   of time, bf16: 2.35 bytes a score element per layer, q/k/v/o included);
                   unfused runtimes twice (below). Plus, once, the backward of the layer
                   being differentiated: one more T*S*N/m buffer in the compute dtype
                   (fusing runtimes only; the same probe reads 4.15 bytes a score element
                   for a single layer, 1.8 over what it keeps, and 4.40 for a single
                   checkpointed layer; the unfused count below already holds more)
  dense FFN block  block input and norm output 2TM, hidden f*T*H/m (gated: two
                   projections and their product; plain: pre- and post-activation)
  MoE block        block input and norm output 2TM, router logits and probabilities
                   2*T*E (float32),
                   shared-expert hidden f*T*H_s/m, and the moe_buffers above
Unfused runtimes (HostMemory.keeps_autodiff_residuals; XLA's CPU backend) materialise every
residual JAX's autodiff saves instead of fusing elementwise work into the matmuls around it:
the float32 softmax output beside its compute-dtype cast (the count of earlier versions, kept
for them; XLA's CPU backend actually holds about 13.75 bytes a score element, 3.4 float32
[S, S] buffers, measured 2026-12-02 at S = 256, a lead not yet taken up);
a gated FFN keeps five hidden-size buffers (x@W1, x@W3, sigmoid(x@W1), silu(x@W1) and the
product) where the count above has f = 3; each RMSNorm keeps its normalised input beside its
output (+T*M per norm, the final norm's two included); and the loss backward holds exp(logits)
and d_logits, two [T, V] float32 buffers. Measured on 8 CPU devices (2026-12-02, XLA's
buffer dump at the peak of tiny-moe model=8; a stack of gated FFN layers grows XLA's scratch
by 5.06 hidden buffers a layer on CPU; on TPU v5p ahead of time 1.1 in float32 and 3.3 in
bfloat16, about the fused count).
Remat policies: none keeps every layer's activations; selective drops the S x S scores of
all layers but the one being recomputed (Korthikanti et al. sec. 5); full keeps only each
block's input [T, M] plus one block's activations while it is recomputed (Chen et al.
arXiv 1604.06174).
"""

from __future__ import annotations

import numpy as np

from moeplan.cost.layout import (
    REMAT_CODES,
    Plans,
    attention_params,
    bytes_of,
    capacity,
    embedding_params,
    params_per_device,
    shared_hidden,
    tokens_per_microbatch,
)
from moeplan.specs import ModelSpec, TrainSpec

SOFTMAX_BYTES = 4  # attention and router softmaxes run in float32 in the JAX step

MEMORY_TERMS: tuple[str, ...] = (
    "weights", "gradients", "grad_accumulator", "optimizer", "fsdp_buffers", "activations", "moe_buffers",
    "logits", "reduce_buffer",
)
STATE_TERMS = ("weights", "optimizer")  # the donated training state: the step's arguments, not scratch


def sharded_params(model: ModelSpec, plans: Plans) -> np.ndarray:
    """Parameters stored per device after FSDP sharding (weights, grads and moments alike)."""
    p = params_per_device(model, plans)
    # divisor 1 without FSDP, the batch shards with it (a 0/1 blend, faster than np.where)
    fsdp = plans.fsdp.astype(np.float64)
    keep = 1.0 - fsdp
    non_expert = p.non_expert / (keep + fsdp * (plans.data * plans.expert))
    expert = p.expert / (keep + fsdp * plans.data)
    return non_expert + expert


def block_params(model: ModelSpec, plans: Plans) -> np.ndarray:
    """Parameters of the largest block on one device before FSDP (what one gather brings)."""
    inv_m, dm, f = 1.0 / plans.model, model.d_model, model.ffn_matrices
    common = inv_m * float(attention_params(model)) + 2.0 * dm  # attention + 2 norm scales
    dense = inv_m * float(f * dm * model.ffn_hidden) if model.dense_layers else 0.0
    moe = model.moe
    if moe is None:
        return common + dense
    hidden = shared_hidden(model) + moe.num_experts / plans.expert * moe.expert_hidden
    sparse = float(dm * moe.num_experts) + inv_m * (f * dm) * hidden  # router + experts
    return common + np.maximum(dense, sparse)


UNFUSED_GATED_HIDDEN = 5  # residuals of silu(x W1) * (x W3) that JAX saves, each [T, H]


def _activation_parts(model: ModelSpec, train: TrainSpec, plans: Plans, t: np.ndarray,
                      unfused: bool = False) -> dict:
    """Bytes saved per layer of each kind, for one microbatch (formulas in the module doc)."""
    tm = t / plans.model
    cb = bytes_of(train.compute_dtype)
    dm, d, f = model.d_model, model.d_head, model.ffn_matrices
    if unfused and model.gated:
        f = UNFUSED_GATED_HIDDEN
    # block input and norm output, [T, M] each; unfused: the norm's normalised input too
    block_tm = t * ((3.0 if unfused else 2.0) * dm * cb)
    parts = {
        "attention": block_tm + tm * float(d * (2 * model.heads + 2 * model.n_kv_heads) * cb),
        # fused: the compute-dtype probabilities AV's backward reads; unfused: the float32 softmax too
        "scores": tm * float(train.seq_len * model.heads * ((SOFTMAX_BYTES + cb) if unfused else cb)),
        "scores_backward": 0.0 if unfused else tm * float(train.seq_len * model.heads * cb),
        "dense_ffn": block_tm + tm * float(f * model.ffn_hidden * cb),
        "moe_block": 0.0,
        "moe_buffers": 0.0,
    }
    moe = model.moe
    if moe is not None:
        slots = moe.num_experts * capacity(model, t)
        parts["moe_block"] = block_tm + tm * float(f * shared_hidden(model) * cb) + t * (moe.num_experts * 8.0)
        parts["moe_buffers"] = slots * float(2 * dm * cb) + slots / plans.model * float(f * moe.expert_hidden * cb)
    return parts


def _one_block(model: ModelSpec, p: dict) -> tuple:
    """(dense FFN block, MoE block + its buffers) of one layer, 0 for a kind the model lacks."""
    dense_one = p["dense_ffn"] if model.dense_layers else 0.0
    moe_one = p["moe_block"] + p["moe_buffers"] if model.moe_layers else 0.0
    return dense_one, moe_one


def activation_bytes(model: ModelSpec, train: TrainSpec, plans: Plans, t: np.ndarray | None = None,
                     unfused: bool = False, parts: dict | None = None) -> tuple:
    """(activations, moe_buffers) saved for backward under each plan's remat policy;
    `parts`: this plan's `_activation_parts`, when the caller has them already."""
    t = tokens_per_microbatch(train, plans) if t is None else t
    p = _activation_parts(model, train, plans, t, unfused) if parts is None else parts
    lyr, ld, lm = model.layers, model.dense_layers, model.moe_layers
    # 0/1 float masks blend the policies (same values as np.where, faster on 10^6 plans)
    full = (plans.remat == REMAT_CODES["full"]).astype(np.float64)
    kept_share = 1.0 - full
    keep_scores = 1.0 + (lyr - 1.0) * (plans.remat == REMAT_CODES["none"])
    kept = lyr * p["attention"] + keep_scores * p["scores"] + ld * p["dense_ffn"] + lm * p["moe_block"]
    kept_moe = lm * p["moe_buffers"]
    # full remat: block inputs [T, M] for every layer + the one block being recomputed
    dense_one, moe_one = _one_block(model, p)
    moe_bigger = (moe_one > dense_one).astype(np.float64) if ld and lm else float(lm > 0)
    full_act = t * float(lyr * model.d_model * bytes_of(train.compute_dtype)) + p["attention"] + p["scores"]
    full_act = full_act + moe_bigger * p["moe_block"] + (1.0 - moe_bigger) * dense_one
    full_moe = moe_bigger * p["moe_buffers"]
    # unfused: the final norm's input and output, kept under every policy
    final_norm = t * float(2 * model.d_model * bytes_of(train.compute_dtype)) if unfused else 0.0
    # every policy: one layer's attention backward at a time (one compute-dtype [S, S] per head)
    return (kept_share * kept + full * full_act + final_norm + p["scores_backward"],
            kept_share * kept_moe + full * full_moe)


def reduce_output_bytes(model: ModelSpec, train: TrainSpec, plans: Plans) -> np.ndarray:
    """Bytes of the largest gradient all-reduce op's output (0 with FSDP, which reduce-scatters).

    Non-expert gradients reduce over (data, expert), expert gradients over data; the two are
    one combined op when they span the same devices (expert = 1), else two ops.
    """
    p = params_per_device(model, plans)
    pb = bytes_of(train.param_dtype)
    non_expert = p.non_expert * pb * (plans.data * plans.expert > 1)
    expert = p.expert * pb * (plans.data > 1)
    one_group = (plans.expert == 1).astype(np.float64)
    largest = one_group * (non_expert + expert) + (1.0 - one_group) * np.maximum(non_expert, expert)
    return largest * (1.0 - plans.fsdp.astype(np.float64))


def one_layer_activation_bytes(model: ModelSpec, parts: dict) -> np.ndarray:
    """Activations of the largest single layer (from its `_activation_parts`), MoE buffers
    and its attention backward included: what the first layer holds while it is
    differentiated, under every remat policy (full remat recomputes exactly one block)."""
    return parts["attention"] + parts["scores"] + parts["scores_backward"] + np.maximum(*_one_block(model, parts))


def memory_per_device(model: ModelSpec, train: TrainSpec, plans: Plans,
                      reduce_out_of_place: bool = False, unfused: bool = False) -> dict[str, np.ndarray]:
    """Bytes per device live at the step's peak, term by term (MEMORY_TERMS); their sum is
    the peak.

    Why a peak and not a sum of everything: backward frees each layer's activations as it
    makes that layer's gradients, so the two are never all live at once. The peak is at one
    of backward's two ends (the module doc, "Peak"), and the terms are what is live there.
    `reduce_out_of_place`: the runtime's all-reduce writes a fresh output (CPU devices, see
    HostMemory), live beside the gradients at the end. `unfused`: the runtime keeps every
    autodiff residual (HostMemory.keeps_autodiff_residuals; counts in the module doc).
    """
    params = sharded_params(model, plans)
    pb = bytes_of(train.param_dtype)
    t = tokens_per_microbatch(train, plans)
    parts = _activation_parts(model, train, plans, t, unfused)
    activations, moe_buffers = activation_bytes(model, train, plans, t, unfused, parts)
    block = block_params(model, plans)
    gathered = block * bytes_of(train.compute_dtype)
    logits = t * (model.vocab * (8.0 if unfused else 4.0))  # unfused: exp(logits) and d_logits
    gradients = params * pb
    accum = float(train.grad_accum > 1)
    # start of backward: every saved activation, plus the first gradients made (LM head and
    # embedding, and the last layer's; never more than all of them)
    first_grads = np.minimum(gradients, (float(embedding_params(model)) + block) * pb)
    start = activations + moe_buffers + logits + first_grads
    # end of backward: every gradient and the first layer's activations (its backward is the
    # last one); an out-of-place all-reduce's output comes after, beside the gradients it
    # reduces (one microbatch's, or with grad_accum > 1 the accumulator's, the microbatch
    # gradients being added in and freed by then)
    last_layer = one_layer_activation_bytes(model, parts)
    reduced = reduce_output_bytes(model, train, plans) if reduce_out_of_place else np.zeros(len(plans))
    backward_end = gradients + last_layer
    reduce_end = reduced + (1.0 - accum) * gradients
    reduce_wins = (reduce_end > backward_end).astype(np.float64)
    end = np.maximum(backward_end, reduce_end)
    at_start = (start >= end).astype(np.float64)
    at_end = 1.0 - at_start
    grads_at_end = gradients * (1.0 - accum * reduce_wins)
    return {
        "weights": params * pb,
        "gradients": at_start * first_grads + at_end * grads_at_end,
        "grad_accumulator": params * (pb * accum),  # the running sum, live throughout
        "optimizer": params * train.optimizer_states * bytes_of(train.opt_state_dtype),
        "fsdp_buffers": plans.fsdp * gathered,
        "activations": at_start * activations + at_end * (1.0 - reduce_wins) * last_layer,
        "moe_buffers": at_start * moe_buffers,
        "logits": at_start * logits,
        "reduce_buffer": at_end * reduce_wins * reduced,
    }


def scratch_bytes(memory: dict[str, np.ndarray]) -> np.ndarray:
    """The step's scratch per device (XLA's temp_size): every term but the donated state."""
    return sum(v for k, v in memory.items() if k not in STATE_TERMS)
