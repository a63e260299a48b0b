"""The real sharded MoE training step, built from the same specs as the cost model.

`build_step(model, train, mesh)` returns a `BuiltStep`: a jitted `shard_map` program that
runs grad_accum microbatches (forward + backward), reduces gradients once, and applies Adam.
It issues exactly the collectives listed in `moeplan/cost/traffic.py`, so the compiled HLO
can be checked against the cost model byte for byte (`moeplan.validate.hlo`).

How the step keeps collectives under control (and why):
- Weights enter the loss already `pcast` to varying over the axes their gradient reduces
  over ((data, expert), or data for expert weights). jax.grad then leaves gradients
  unreduced, instead of inserting one reduction per use in every microbatch.
- Microbatches run in `lax.scan` (one copy in HLO, trip count grad_accum: `hlo.py`
  multiplies what is inside by the loop's known trip count; compile time stays flat in
  grad_accum). With grad_accum = 1 there is no loop.
- After the loop: one psum of the non-expert gradients over (data, expert), one of the expert
  gradients over data, one float32 psum of the metrics vector over (data, expert). Adam is
  then purely local (Kingma & Ba, arXiv 1412.6980).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moeplan.cost.layout import Plans, capacity, shared_hidden, tokens_per_microbatch
from moeplan.errors import MoeplanError
from moeplan.specs import AXES, Mesh, ModelSpec, TrainSpec
from moeplan.validate.model import Dims, forward_loss
from moeplan.validate.params import BATCH_AXES, ParamInfo, init_params, param_table, tree_from_table

BATCH_SPEC = P(BATCH_AXES, None)  # sequences over (data, expert), positions whole


@dataclass(frozen=True)
class StepOptions:
    """Knobs of the validation step that the specs do not fix."""

    aux_coef: float = 1e-2  # Switch arXiv 2101.03961 sec. 2.2 uses 1e-2
    z_coef: float = 1e-3  # ST-MoE arXiv 2202.08906 sec. 3.1 uses 1e-3
    learning_rate: float = 1e-3
    b1: float = 0.9  # Adam defaults, Kingma & Ba arXiv 1412.6980 alg. 1
    b2: float = 0.999
    eps: float = 1e-8
    donate: bool = True  # donate the state buffers, as a real training loop would
    # XLA options for jit/compile, e.g. {"xla_backend_optimization_level": 0} to halve CPU
    # compile time in tests (LLVM opt level only; the HLO, collectives included, is the same)
    compiler_options: dict | None = None
    # Drive the router to a chosen skew (moeplan.cost.balance.router_bias gives the bias for a
    # routing spec): router_bias [E] is added to the router logits; router_noise picks the
    # top-k of logits + Gumbel noise (sampling without replacement ~ softmax(logits); Kool et
    # al. arXiv 1903.06059). The noise key folds in router_seed, the step count, the device on
    # (data, expert), the microbatch and the layer; it is the same on every `model` rank.
    router_bias: tuple[float, ...] | None = None
    router_noise: bool = False
    router_seed: int = 0


class TrainState(NamedTuple):
    """Parameters, Adam moments (same tree and sharding) and the step counter."""

    params: dict
    mu: dict
    nu: dict
    count: Any


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def check_plan(model: ModelSpec, train: TrainSpec, mesh: Mesh) -> None:
    """Reject plans the validator cannot build, with one line saying why."""
    if train.fsdp:
        raise MoeplanError("fsdp=True is not supported by the validation step yet (the cost model still covers it)")
    per_mb = train.batch / (mesh.batch_shards * train.grad_accum)
    if per_mb != int(per_mb) or per_mb < 1:
        raise MoeplanError(
            f"batch {train.batch} does not split into whole sequences over data*expert={mesh.batch_shards} "
            f"x grad_accum={train.grad_accum}"
        )
    splits = {
        "heads": (model.heads, mesh.model),
        "kv_heads": (model.n_kv_heads, mesh.model),
        "ffn_hidden": (model.ffn_hidden, mesh.model),
    }
    if model.moe is not None:
        splits["num_experts"] = (model.moe.num_experts, mesh.expert)
        splits["expert_hidden"] = (model.moe.expert_hidden, mesh.model)
        if shared_hidden(model):
            splits["shared expert hidden"] = (shared_hidden(model), mesh.model)
    for name, (size, parts) in splits.items():
        axis = "expert" if name == "num_experts" else "model"
        if size % parts:
            raise MoeplanError(f"{name}={size} does not divide over {axis}={parts}")


def _adam(p, g, mu, nu, count, opt: StepOptions):
    """One Adam update of one local shard (bias-corrected moments, Kingma & Ba alg. 1)."""
    with jax.named_scope("adam"):  # the optimizer_update term of profile --breakdown
        g32 = g.astype(mu.dtype)
        mu = opt.b1 * mu + (1 - opt.b1) * g32
        nu = opt.b2 * nu + (1 - opt.b2) * g32 * g32
        t = count.astype(jnp.float32)
        mhat = mu / (1 - opt.b1**t)
        vhat = nu / (1 - opt.b2**t)
        p = (p.astype(jnp.float32) - opt.learning_rate * mhat / (jnp.sqrt(vhat) + opt.eps)).astype(p.dtype)
        return p, mu, nu


class BuiltStep:
    """A compiled-on-demand sharded training step for one (model, train, mesh)."""

    def __init__(self, model: ModelSpec, train: TrainSpec, mesh: Mesh, devices: Sequence, options: StepOptions):
        self.model, self.train, self.mesh, self.options = model, train, mesh, options
        self.jax_mesh = jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(mesh.data, mesh.expert, mesh.model), AXES)
        plans = Plans.single(mesh, train)
        self.tokens_per_microbatch = int(tokens_per_microbatch(train, plans)[0])
        self.capacity = int(capacity(model, np.array([float(self.tokens_per_microbatch)]))[0])
        self.table: list[ParamInfo] = param_table(model)
        self.dims = Dims(
            model=model,
            capacity=self.capacity,
            compute_dtype=train.compute_dtype,
            remat=train.remat,
            global_tokens=train.batch * train.seq_len,
            groups=mesh.batch_shards * train.grad_accum,
            aux_coef=options.aux_coef,
            z_coef=options.z_coef,
            router_bias=_router_bias(model, options),
            router_noise=options.router_noise and model.moe is not None,
        )
        self._compiled = None

    # ---- placement ---------------------------------------------------------------------
    @cached_property
    def param_specs(self) -> dict:
        return tree_from_table(self.table, lambda info: info.spec)

    @cached_property
    def state_specs(self) -> TrainState:
        s = self.param_specs
        return TrainState(s, s, s, P())

    def state_shapes(self) -> TrainState:
        """Abstract state (ShapeDtypeStruct with NamedSharding): enough to lower and compile."""
        def leaves(dtype):
            return tree_from_table(
                self.table,
                lambda i: jax.ShapeDtypeStruct(i.shape, dtype, sharding=NamedSharding(self.jax_mesh, i.spec)),
            )
        count = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(self.jax_mesh, P()))
        opt = self.train.opt_state_dtype
        return TrainState(leaves(self.train.param_dtype), leaves(opt), leaves(opt), count)

    def batch_shapes(self) -> dict:
        shape = (self.train.batch, self.train.seq_len)
        sds = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(self.jax_mesh, BATCH_SPEC))
        return {"inputs": sds, "targets": sds}

    # ---- concrete data -----------------------------------------------------------------
    def init_state(self, seed: int = 0, zero_router: bool = False) -> TrainState:
        """Deterministic sharded parameters (same values on every mesh) and zero Adam moments.

        zero_router: router weights at zero, so the logits are the router bias alone and a
        noisy router (StepOptions.router_noise) follows the bias's routing law exactly.
        """
        pdt, odt = jnp.dtype(self.train.param_dtype), jnp.dtype(self.train.opt_state_dtype)
        host = init_params(self.table, seed)
        if zero_router:
            for info in self.table:
                if info.path[-1] == "router":
                    _get(host, info.path[:-1])["router"] = np.zeros(info.shape, np.float32)

        def put(info: ParamInfo, value=None, dtype=pdt):
            sharding = NamedSharding(self.jax_mesh, info.spec)
            if value is None:
                return jnp.zeros(info.shape, dtype, device=sharding)
            return jax.device_put(value.astype(dtype), sharding)

        params = tree_from_table(self.table, lambda i: put(i, _get(host, i.path)))
        mu = tree_from_table(self.table, lambda i: put(i, dtype=odt))
        nu = tree_from_table(self.table, lambda i: put(i, dtype=odt))
        count = jax.device_put(np.int32(0), NamedSharding(self.jax_mesh, P()))
        return TrainState(params, mu, nu, count)

    def make_batch(self, seed: int = 0) -> dict:
        """Deterministic random token ids (numpy stream `seed`); targets = inputs shifted by one."""
        b, s, v = self.train.batch, self.train.seq_len, self.model.vocab
        tokens = np.random.default_rng(seed).integers(0, v, size=(b, s + 1), dtype=np.int32)
        sh = NamedSharding(self.jax_mesh, BATCH_SPEC)
        return {"inputs": jax.device_put(tokens[:, :-1], sh), "targets": jax.device_put(tokens[:, 1:], sh)}

    # ---- the local program ---------------------------------------------------------------
    def _device_key(self, count: jax.Array) -> jax.Array | None:
        """Router-noise key of this device for step `count`, or None when noise is off.

        axis_index is a per-device constant (no collective); leaving out `model` keeps the
        key, and so the routing, identical on the model-axis ranks that share a token group.
        """
        if not self.dims.router_noise:
            return None
        key = jax.random.fold_in(jax.random.key(self.options.router_seed), count)
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        return jax.random.fold_in(key, jax.lax.axis_index("expert"))

    def _local_grads(self, params: dict, batch: dict, count: jax.Array | None = None) -> tuple[dict, jax.Array]:
        """Per-device: accumulate microbatch gradients, then reduce each group once."""
        ga = self.train.grad_accum
        pv = tree_from_table(self.table, lambda i: jax.lax.pcast(_get(params, i.path), i.grad_axes, to="varying"))
        split = lambda a: a.reshape(ga, a.shape[0] // ga, *a.shape[1:])  # noqa: E731
        inputs, targets = split(batch["inputs"]), split(batch["targets"])
        key = self._device_key(jnp.int32(0) if count is None else count)
        micro_key = lambda mb: None if key is None else jax.random.fold_in(key, mb)  # noqa: E731
        grad_fn = jax.grad(lambda p, i, t, k: forward_loss(p, i, t, self.dims, k), has_aux=True)
        if ga == 1:
            grads, metrics = grad_fn(pv, inputs[0], targets[0], micro_key(0))
        else:
            def body(carry, mb):
                g_acc, m_acc = carry
                i, t, index = mb
                g, m = grad_fn(pv, i, t, micro_key(index))
                return (jax.tree.map(jnp.add, g_acc, g), m_acc + m), None

            zeros = tree_from_table(
                self.table,
                lambda i: jax.lax.pcast(jnp.zeros(_get(params, i.path).shape, _get(params, i.path).dtype),
                                        i.varying_axes, to="varying"),
            )
            m0 = jax.lax.pcast(jnp.zeros((self.metric_size,), jnp.float32), BATCH_AXES, to="varying")
            (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), (inputs, targets, jnp.arange(ga, dtype=jnp.int32)))
        with jax.named_scope("metrics"):
            metrics = jax.lax.psum(metrics, BATCH_AXES)
        return self._reduce(grads), metrics

    def _reduce(self, grads: dict) -> dict:
        """One psum per gradient group: non-expert over (data, expert), expert over data."""
        out = {}
        for expert in (False, True):
            group = [i for i in self.table if i.expert == expert]
            if not group:
                continue
            with jax.named_scope("grad_reduce"):
                summed = jax.lax.psum([_get(grads, i.path) for i in group], group[0].grad_axes)
            out.update({i.path: g for i, g in zip(group, summed)})
        return tree_from_table(self.table, lambda i: out[i.path])

    def _local_step(self, state: TrainState, batch: dict) -> tuple[TrainState, jax.Array]:
        grads, metrics = self._local_grads(state.params, batch, state.count)
        count = state.count + 1
        new = {i.path: _adam(_get(state.params, i.path), _get(grads, i.path), _get(state.mu, i.path),
                             _get(state.nu, i.path), count, self.options) for i in self.table}
        pick = lambda k: tree_from_table(self.table, lambda i: new[i.path][k])  # noqa: E731
        return TrainState(pick(0), pick(1), pick(2), count), metrics

    # ---- jitted entry points -----------------------------------------------------------------
    @property
    def metric_size(self) -> int:
        from moeplan.cost.traffic import metric_floats

        return metric_floats(self.model)

    @cached_property
    def _step_jit(self):
        f = jax.shard_map(self._local_step, mesh=self.jax_mesh,
                          in_specs=(self.state_specs, {"inputs": BATCH_SPEC, "targets": BATCH_SPEC}),
                          out_specs=(self.state_specs, P()))
        return jax.jit(f, donate_argnums=(0,) if self.options.donate else (),
                       compiler_options=self.options.compiler_options)

    @cached_property
    def _grads_jit(self):
        f = jax.shard_map(self._local_grads, mesh=self.jax_mesh,
                          in_specs=(self.param_specs, {"inputs": BATCH_SPEC, "targets": BATCH_SPEC}, P()),
                          out_specs=(self.param_specs, P()))
        return jax.jit(f, compiler_options=self.options.compiler_options)

    def lower_abstract(self) -> jax.stages.Lowered:
        """Lower the step from abstract shapes only (works for AOT topology devices)."""
        return self._step_jit.lower(self.state_shapes(), self.batch_shapes())

    def lower(self) -> jax.stages.Lowered:
        return self.lower_abstract()

    def compile(self) -> jax.stages.Compiled:
        if self._compiled is None:
            self._compiled = self.lower_abstract().compile()
        return self._compiled

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, jax.Array]:
        """One optimizer step: (new state, metrics vector)."""
        return self._step_jit(state, batch)

    __call__ = step

    def grads(self, params: dict, batch: dict, count: int = 0) -> tuple[dict, jax.Array]:
        """Reduced gradients of the step objective (before Adam) and the metrics vector.

        `count` stands in for the step counter in the router-noise key (as `step` uses
        state.count): pass a different one per call for independent noise.
        """
        return self._grads_jit(params, batch, np.int32(count))

    def metrics_dict(self, metrics) -> dict:
        """Name the entries of the metrics vector."""
        v = np.asarray(metrics, dtype=np.float64)
        out = {"lm_loss": float(v[0]), "aux_loss": float(v[1]), "z_loss": float(v[2])}
        if self.model.moe is not None:
            per = v[3:].reshape(self.model.moe_layers, self.model.moe.num_experts + 1)
            out["expert_load"], out["dropped"] = per[:, :-1], per[:, -1]
        return out


def _router_bias(model: ModelSpec, options: StepOptions) -> tuple[float, ...] | None:
    """The validated router bias as a tuple of floats (None for no bias or a dense model)."""
    bias = options.router_bias
    if bias is None or model.moe is None:
        return None
    values = tuple(float(b) for b in bias)
    if len(values) != model.moe.num_experts:
        raise MoeplanError(f"router_bias has {len(values)} entries; the model has {model.moe.num_experts} experts")
    if any(math.isnan(b) or b == math.inf for b in values):
        raise MoeplanError("router_bias entries must be finite or -inf (an expert no token picks)")
    return values


def build_step(model: ModelSpec, train: TrainSpec, mesh: Mesh, devices: Sequence | None = None,
               options: StepOptions | None = None) -> BuiltStep:
    """The sharded training step for one plan; `devices` defaults to the first mesh.devices
    of jax.devices() and may be topology devices (ahead-of-time compile only)."""
    check_plan(model, train, mesh)
    if devices is None:
        available = jax.devices()
        if len(available) < mesh.devices:
            raise MoeplanError(f"mesh {mesh} needs {mesh.devices} devices; jax sees {len(available)}")
        devices = available[: mesh.devices]
    if len(devices) != mesh.devices:
        raise MoeplanError(f"mesh {mesh} needs {mesh.devices} devices; {len(devices)} were given")
    return BuiltStep(model, train, mesh, list(devices), options or StepOptions())
