"""Routing skew on the real step: drive the router to a routing law, read back what it did.

Why this module: `moeplan profile --routing` and benchmarks/bench_balance.py both check the
imbalance model (`moeplan.cost.balance`) against compiled steps, and must agree on how the
router is driven, how a step's metrics vector becomes per-layer loads, and what is compared
with what. jax-free (numpy only): the device side hands it `metrics_dict()` outputs, the
parent side the JSON they became, so it runs on either side of the process boundary.

How the router is driven (docs/step.md "Driving the router"): the logit bias
b_e = log w_e (`balance.router_bias`) plus Gumbel noise on a zero-initialised router makes
every token's K experts an exact draw from the routing law, until training moves the router.
That is why the comparison uses the first step and the last step is reported beside it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moeplan.cost import balance as bal
from moeplan.errors import MoeplanError
from moeplan.specs import Mesh, ModelSpec, TrainSpec


def check_routing(model: ModelSpec, routing: bal.Routing) -> None:
    """Fail with one line before anything compiles: a dense model has no router to drive,
    and a histogram must fit the model's experts and top-k."""
    if model.moe is None:
        raise MoeplanError(f"model '{model.name}' is dense: --routing needs a model with experts")
    bal.resolve(routing, model.moe.num_experts, model.moe.top_k)


def step_options(model: ModelSpec, routing: bal.Routing | None, learning_rate: float | None) -> dict:
    """Keyword arguments of `StepOptions` as plain JSON (they cross to the device process).

    Empty when neither is given, so an undriven profile builds exactly the default step.
    """
    options: dict = {}
    if learning_rate is not None:
        options["learning_rate"] = float(learning_rate)
    if routing is not None:
        bias = bal.router_bias(routing, model.moe.num_experts, model.moe.top_k)
        options.update(router_bias=[float(b) for b in bias], router_noise=True)
    return options


def step_kwargs(options: dict | None) -> dict:
    """`step_options` back from JSON into `StepOptions(**kwargs)` form (the bias a tuple, as
    the frozen, hashable options require)."""
    kwargs = dict(options or {})
    if kwargs.get("router_bias") is not None:
        kwargs["router_bias"] = tuple(float(b) for b in kwargs["router_bias"])
    return kwargs


def routing_groups(mesh: Mesh, train: TrainSpec) -> int:
    """Routing groups whose counts one metrics vector sums: one per device on (data, expert)
    per microbatch (the metrics are psum'd over the mesh and accumulated over microbatches)."""
    return mesh.batch_shards * train.grad_accum


def layer_figures(load: Sequence[float], dropped: float, pairs: int) -> dict:
    """Measured figures of one MoE layer in one step: dropped share of the `pairs`
    (token, expert) assignments, pooled max/mean load, and the load vector itself."""
    load = np.asarray(load, dtype=np.float64)
    return {"dropped_fraction": float(dropped) / pairs,
            "max_mean": float(load.max() / load.mean()),
            "tokens_per_expert": load.tolist()}


def step_record(metrics: dict) -> dict:
    """One step's routing read-out as JSON: per layer the loads and dropped counts."""
    return {"tokens_per_expert": np.asarray(metrics["expert_load"]).tolist(),
            "dropped": np.asarray(metrics["dropped"]).tolist()}


def measured_routing(history: Sequence[dict], *, groups: int, tokens: int, capacity: int,
                     learning_rate: float) -> dict:
    """The device side's raw record: first and last step loads, losses of every step.

    `history` is `metrics_dict()` of every step run (warm-up and timed) in order.
    """
    if not history:
        raise ValueError("no step was run")
    return {
        "groups": groups,
        "tokens_per_group": tokens,
        "capacity": capacity,
        "learning_rate": learning_rate,
        "steps": len(history),
        "first": step_record(history[0]),
        "last": step_record(history[-1]),
        "lm_loss": [float(m["lm_loss"]) for m in history],
        "aux_loss": [float(m["aux_loss"]) for m in history],
        "z_loss": [float(m["z_loss"]) for m in history],
    }


def compare(routing: bal.Routing, top_k: int, raw: dict) -> dict:
    """The JSON `routing` object of one result: per layer, predicted vs measured at the first
    step (`balance.compare_measured`), the last step measured, and the loss trajectories."""
    groups, tokens = raw["groups"], raw["tokens_per_group"]
    pairs = groups * tokens * top_k
    first, last = raw["first"], raw["last"]
    layers = []
    for i, (load, dropped) in enumerate(zip(first["tokens_per_expert"], first["dropped"])):
        cmp = bal.compare_measured(routing, top_k=top_k, tokens=tokens, capacity=raw["capacity"],
                                   groups=groups, load=np.asarray(load), dropped=dropped)
        cmp["tokens_per_expert"] = {k: np.asarray(v).tolist() for k, v in cmp["tokens_per_expert"].items()}
        cmp.pop("routing")
        cmp["expected_kept"] = (groups * bal.expected_kept(
            bal.resolve(routing, len(load), top_k).inclusion, tokens, raw["capacity"])).tolist()
        cmp["last"] = layer_figures(last["tokens_per_expert"][i], last["dropped"][i], pairs)
        layers.append(cmp)
    experts = len(first["tokens_per_expert"][0])
    uniform = bal.resolve(bal.UNIFORM, experts, top_k)
    return {
        "routing": str(routing),
        **{k: raw[k] for k in ("groups", "tokens_per_group", "capacity", "learning_rate", "steps")},
        "uniform_max_mean": bal.expected_max_load(uniform, groups * tokens).ratio,
        "aux_loss_predicted": len(layers) * switch_aux(bal.resolve(routing, experts, top_k)),
        "aux_loss_balanced": float(len(layers)),
        "layers": layers,
        **{k: raw[k] for k in ("aux_loss", "z_loss", "lm_loss")},
    }


def switch_aux(law: bal.RoutingLaw) -> float:
    """Expected Switch load-balancing loss of one layer at a zero router: E * sum f_e P_e with
    the router probabilities P = w (the bias alone) and the expected token share
    f_e = pi_e / K; 1 when routing is uniform (the loss's minimum), so the measured aux
    loss of the first step checks the law too, and its fall toward 1 per layer is training
    balancing the load (Switch Transformer arXiv 2101.03961 eq. 4; validate/moe.py `route`)."""
    return float(law.experts * np.sum(law.inclusion / law.top_k * law.weights))


def mean_max_mean(obj: dict, which: str) -> float:
    """Mean over MoE layers of the measured max/mean load, at the 'first' or 'last' step."""
    if which == "first":
        return float(np.mean([layer["max_mean"]["measured"] for layer in obj["layers"]]))
    return float(np.mean([layer["last"]["max_mean"] for layer in obj["layers"]]))
