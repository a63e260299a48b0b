"""One device's forward pass and loss, written for use inside `jax.shard_map`.

A decoder-only transformer: token embedding, L pre-norm blocks (RMSNorm -> causal GQA
attention -> residual; RMSNorm -> dense FFN or MoE FFN -> residual), final RMSNorm, LM head,
next-token cross-entropy. No position encoding (a stated simplification: positions do not
change any shape, FLOP count or collective the validator checks).

Tensor parallelism follows Megatron-LM (Shoeybi et al. arXiv 1909.08053, sec. 3): heads and
FFN hidden are split over `model`; each sub-block's input is `pcast` to varying over `model`
ONCE (so backward issues one all-reduce for it, not one per matmul) and its output is
`psum`-ed over `model` once. Everything else is replicated over `model`.

Letters: b sequences, S sequence, M model dim, N heads (local), K_v kv heads (local),
G query heads per kv head, D head dim, V vocab, T = b*S tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from moeplan.specs import ModelSpec
from moeplan.validate import moe as moe_lib

RMS_EPS = 1e-6


@dataclass(frozen=True)
class Dims:
    """Static facts the local forward needs beyond the weights (all per optimizer step)."""

    model: ModelSpec
    capacity: int  # C slots per expert per routing group
    compute_dtype: str
    remat: str  # "none" | "selective" | "full"
    global_tokens: int  # B*S: the LM loss is a mean over all of them
    groups: int  # routing groups per step (devices on (data, expert) x microbatches)
    aux_coef: float
    z_coef: float
    router_bias: tuple[float, ...] | None = None  # [E] added to router logits (StepOptions)
    router_noise: bool = False  # Gumbel-top-k expert choice; forward_loss then needs a key


def rmsnorm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """RMSNorm (Zhang & Sennrich, arXiv 1910.07467), computed in float32."""
    with jax.named_scope("norm"):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax(q k^T / sqrt(D)) v with GQA; full S x S scores (no flash)."""
    b, s, n, d = q.shape
    kv = k.shape[2]
    with jax.named_scope("attn_scores"):
        q = q.reshape(b, s, kv, n // kv, d)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k) / math.sqrt(d)
        with jax.named_scope("attn_softmax"):
            causal = jnp.tril(jnp.ones((s, s), dtype=bool))
            scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, n, d)


def attention(x: jax.Array, w: dict, dims: Dims) -> jax.Array:
    """Pre-norm attention sub-block output (before the residual add), [b, S, M]."""
    cd = dims.compute_dtype
    with jax.named_scope("attention"):
        xv = jax.lax.pcast(rmsnorm(x, w["attn_norm"]), "model", to="varying")
        q = jnp.einsum("bsm,mnd->bsnd", xv, w["wq"].astype(cd))
        k = jnp.einsum("bsm,mnd->bsnd", xv, w["wk"].astype(cd))
        v = jnp.einsum("bsm,mnd->bsnd", xv, w["wv"].astype(cd))
        # selective remat (Korthikanti et al. arXiv 2205.05198): keep q, k, v, recompute scores
        core = jax.checkpoint(attention_core) if dims.remat == "selective" else attention_core
        ctx = core(q, k, v)
        return jax.lax.psum(jnp.einsum("bsnd,ndm->bsm", ctx, w["wo"].astype(cd)), "model")


def ffn(xn: jax.Array, w: dict, gated: bool, dtype) -> jax.Array:
    """Dense FFN, hidden over `model`: one pcast in, one psum out."""
    with jax.named_scope("ffn"):
        xv = jax.lax.pcast(xn, "model", to="varying")
        h = xv @ w["w1"].astype(dtype)
        h = jax.nn.silu(h) * (xv @ w["w3"].astype(dtype)) if gated else jax.nn.gelu(h)
        return jax.lax.psum(h @ w["w2"].astype(dtype), "model")


def block(x: jax.Array, w: dict, layer: int, dims: Dims, key: jax.Array | None = None) -> tuple[jax.Array, tuple]:
    """One transformer block; returns the new residual stream and its router statistics.

    `key` (router noise on) is this routing group's key; the layer index is folded in here.
    """
    model, cd = dims.model, dims.compute_dtype
    x = x + attention(x, w, dims)
    xn = rmsnorm(x, w["ffn_norm"])
    if not model.is_moe_layer(layer):
        return x + ffn(xn, w["ffn"], model.gated, cd), ()
    b, s, m = xn.shape
    flat = xn.reshape(b * s, m)
    bias = None if dims.router_bias is None else jnp.asarray(dims.router_bias, jnp.float32)
    noise_key = None if key is None else jax.random.fold_in(key, layer)
    with jax.named_scope("moe"):
        y, r = moe_lib.moe_ffn(flat, w, model.moe.top_k, dims.capacity, model.gated, cd, bias, noise_key)
        if "shared" in w:  # always-on shared experts (DeepSeekMoE, arXiv 2401.06066)
            y = y + ffn(flat, w["shared"], model.gated, cd)
    return x + y.reshape(b, s, m), (r.load, r.dropped, r.aux, r.z)


def forward_loss(params: dict, inputs: jax.Array, targets: jax.Array, dims: Dims,
                 key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """This device's share of the step objective, and its share of the metrics vector.

    `key`: this device's and microbatch's router-noise key (required when dims.router_noise).

    Shares are scaled so that summing over devices and microbatches gives global means:
    LM loss / (B*S), router losses / routing groups. Objective = lm + aux_coef * aux +
    z_coef * z, router losses summed over MoE layers (each layer adds its own, Switch sec. 2.2).
    """
    model, cd = dims.model, dims.compute_dtype
    with jax.named_scope("embed"):
        x = params["embed"][inputs].astype(cd)
    stats = []
    for layer in range(model.layers):
        fn = lambda x, w, layer=layer: block(x, w, layer, dims, key)  # noqa: E731
        if dims.remat == "full":  # Chen et al. arXiv 1604.06174: keep only block inputs
            fn = jax.checkpoint(fn)
        x, st = fn(x, params["blocks"][str(layer)])
        if st:
            stats.append(st)
    x = rmsnorm(x, params["final_norm"])
    head = params["embed"].T if model.tie_embeddings else params["head"]
    with jax.named_scope("lm_head"):
        logits = jnp.dot(x, head.astype(cd)).astype(jnp.float32)
    with jax.named_scope("loss"):
        gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        lm = jnp.sum(jax.nn.logsumexp(logits, axis=-1) - gold) / dims.global_tokens
    aux = sum((st[2] for st in stats), jnp.float32(0)) / dims.groups
    z = sum((st[3] for st in stats), jnp.float32(0)) / dims.groups
    objective = lm + dims.aux_coef * aux + dims.z_coef * z
    parts = [jnp.stack([lm, aux, z])]
    for load, dropped, _, _ in stats:
        parts += [load, dropped[None]]
    return objective, jax.lax.stop_gradient(jnp.concatenate(parts))
