"""The three inputs every plan and every measured step are built from.

`ModelSpec` (what is trained), `TrainSpec` (how) and `HardwareProfile` (on what), plus
`Mesh` (how devices are split). The cost model and the JAX step both read these and
nothing else, so a predicted term always has a compiled counterpart to check against.
Loading from YAML files and preset names lives in `moeplan.presets`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
Dtype = Literal["float32", "bfloat16", "float16", "float8"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MoESpec(_Spec):
    """The sparse feed-forward block: which layers have it and how tokens are routed."""

    num_experts: PositiveInt = Field(description="Routed experts per MoE layer (E).")
    top_k: PositiveInt = Field(2, description="Experts each token is sent to (K).")
    expert_hidden: PositiveInt = Field(description="Hidden size of one expert's FFN (H_e).")
    capacity_factor: PositiveFloat | None = Field(
        1.25,
        description="Expert capacity = ceil(cf * tokens * K / E) per routing group (GShard, "
        "arXiv 2006.16668). null means dropless: time is set by the most-loaded expert.",
    )
    every: PositiveInt = Field(1, description="Every k-th layer (after first_dense) is MoE.")
    first_dense: int = Field(0, ge=0, description="The first n layers stay dense.")
    shared_experts: int = Field(0, ge=0, description="Always-on shared experts (DeepSeekMoE).")
    shared_expert_hidden: PositiveInt | None = Field(
        None, description="Hidden size of one shared expert; defaults to expert_hidden."
    )

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class ModelSpec(_Spec):
    """A decoder-only transformer; with `moe` set, some FFN blocks are mixtures of experts."""

    name: str = Field("custom", description="Display name.")
    d_model: PositiveInt = Field(description="Model (residual) width M.")
    layers: PositiveInt = Field(description="Transformer blocks L.")
    heads: PositiveInt = Field(description="Query heads N.")
    kv_heads: PositiveInt | None = Field(None, description="Key/value heads (GQA); default = heads.")
    head_dim: PositiveInt | None = Field(None, description="Per-head width D; default d_model/heads.")
    vocab: PositiveInt = Field(description="Vocabulary size V.")
    ffn_hidden: PositiveInt = Field(description="Hidden size of the dense FFN (H).")
    gated: bool = Field(True, description="Gated FFN (SwiGLU: 3 matrices) or plain (2 matrices).")
    tie_embeddings: bool = Field(False, description="LM head shares the embedding matrix.")
    moe: MoESpec | None = Field(None, description="Sparse FFN settings; absent for a dense model.")
    notes: str = Field("", description="What this spec approximates and where its numbers come from.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.head_dim is None and self.d_model % self.heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by heads={self.heads}; set head_dim"
            )
        return self

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.heads

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated else 2

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) carries the MoE FFN instead of the dense one."""
        m = self.moe
        return m is not None and layer >= m.first_dense and (layer - m.first_dense) % m.every == 0

    @property
    def moe_layers(self) -> int:
        """Count of blocks with the MoE FFN: layers first_dense, first_dense+every, ... < layers."""
        m = self.moe
        if m is None or self.layers <= m.first_dense:
            return 0
        return -(-(self.layers - m.first_dense) // m.every)

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def dense_backbone(self) -> ModelSpec:
        """The same model with every MoE block replaced by the dense FFN (arXiv 2405.15052)."""
        return self.model_copy(update={"moe": None, "name": f"{self.name} (dense backbone)"})

    def with_experts(self, num_experts: int) -> ModelSpec:
        """The same model with a different routed-expert count (top_k clipped to fit)."""
        if self.moe is None:
            raise ValueError("a dense model has no experts to change")
        moe = self.moe.model_copy(
            update={"num_experts": num_experts, "top_k": min(self.moe.top_k, num_experts)}
        )
        return self.model_copy(update={"moe": moe, "name": f"{self.name} E={num_experts}"})


class TrainSpec(_Spec):
    """How one training step is run: batch, precision, optimizer, memory savers."""

    seq_len: PositiveInt = Field(4096, description="Tokens per sequence S.")
    global_batch: PositiveInt | None = Field(
        None, description="Sequences per optimizer step B (give this or global_batch_tokens)."
    )
    global_batch_tokens: PositiveInt | None = Field(
        None, description="Tokens per optimizer step; converted to sequences of seq_len."
    )
    param_dtype: Dtype = Field("float32", description="Master weights and gradients.")
    compute_dtype: Dtype = Field("bfloat16", description="Matmuls, activations and collectives.")
    opt_state_dtype: Dtype = Field("float32", description="Optimizer moments.")
    optimizer_states: int = Field(2, ge=0, description="Moments per parameter (Adam: 2).")
    remat: Literal["none", "full", "selective"] = Field(
        "none",
        description="Activation recomputation: none keeps all; full recomputes each block's "
        "forward in backward (Chen et al. arXiv 1604.06174); selective recomputes only "
        "attention scores (Korthikanti et al. arXiv 2205.05198).",
    )
    grad_accum: PositiveInt = Field(1, description="Microbatches per optimizer step.")
    fsdp: bool = Field(False, description="Shard weights and optimizer state over the batch axes.")
    train_tokens: PositiveFloat | None = Field(
        None, description="Token budget; default 20 tokens per parameter (Chinchilla, arXiv 2203.15556)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_batch(cls, data: object) -> object:
        """256 sequences unless the batch is given in sequences or in tokens."""
        if isinstance(data, dict) and data.get("global_batch") is None and data.get("global_batch_tokens") is None:
            return {**data, "global_batch": 256}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.global_batch is not None and self.global_batch_tokens is not None:
            raise ValueError("give global_batch or global_batch_tokens, not both")
        return self

    @property
    def batch(self) -> int:
        """Sequences per optimizer step."""
        if self.global_batch is not None:
            return self.global_batch
        return max(1, math.ceil(self.global_batch_tokens / self.seq_len))  # type: ignore[operator]

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


class Link(_Spec):
    """One class of interconnect, seen from one device."""

    bandwidth: PositiveFloat = Field(
        description="Bytes/s one device can send on it, one direction. For a torus scale-up "
        "fabric this is ONE link; the cost model multiplies by the links a group can use."
    )
    latency: float = Field(ge=0, description="Seconds per collective step (alpha).")


class CurvePoint(_Spec):
    """One point of a size-dependent efficiency curve (see HardwareProfile.matmul_curve)."""

    size: PositiveFloat = Field(description="FLOPs of one matrix product (2mkn).")
    efficiency: float = Field(gt=0, le=1, description="Achieved fraction of peak_flops at that size.")


class RowsPoint(_Spec):
    """One point of the per-expert row-count efficiency curve (HardwareProfile.matmul_rows_curve)."""

    rows: PositiveFloat = Field(description="Rows of the product: tokens one expert holds on a device.")
    efficiency: float = Field(gt=0, le=1, description="Achieved fraction of peak_flops of a forward + "
                              "backward product with that many rows.")


class SizeFactor(_Spec):
    """One point of a collective kind's time multiplier by buffer size (KindScale.by_size)."""

    size: PositiveFloat = Field(description="Buffer bytes per device (traffic.py convention).")
    factor: PositiveFloat = Field(description="Measured time over the kind's alpha-beta fit at that size.")


class KindScale(_Spec):
    """One collective kind's measured alpha and beta relative to its link's (see collective_scale)."""

    latency: float = Field(1.0, ge=0, description="Multiplier of the link's per-step latency.")
    bandwidth: PositiveFloat = Field(1.0, description="Multiplier of the link's bandwidth.")
    by_size: list[SizeFactor] | None = Field(
        None,
        description="Measured time over the alpha-beta fit, by buffer size (interpolated in log "
        "size, held beyond the ends): what a straight line in bytes cannot say. On CPU devices "
        "a large collective also pays first-touch page faults on its fresh output (32 MiB "
        "all-reduces measured 2-4x their fit); calibrate takes the counted faults out first, "
        "since host_memory prices them on the step's scratch. Accelerators need no curve.",
    )

    @model_validator(mode="after")
    def _check(self) -> KindScale:
        if self.by_size is not None:
            sizes = [p.size for p in self.by_size]
            if not sizes or sizes != sorted(set(sizes)):
                raise ValueError("by_size needs at least one point, sizes strictly increasing")
        return self


class HostMemory(_Spec):
    """How a host (CPU) runtime's memory behaves, where it differs from a device's HBM.

    Why: XLA's CPU runtime allocates each execution's scratch (one block, memory_analysis's
    temp_size) with the C library's malloc, and glibc serves requests at or above its mmap
    threshold with fresh pages from the kernel, which fault on first touch every step
    (measured on 8 simulated devices: page faults per step equal to the scratch block when it
    is over 32 MiB, none below; moeplan pins glibc's thresholds while simulated devices run,
    validate/host_allocator.py, so that rule holds for a process running one program). It also describes
    what XLA's CPU backend keeps in memory where a device compiler fuses (the out-of-place
    all-reduce, the unfused autodiff residuals). Accelerators keep a pooled allocator and a
    fusing compiler: vendor presets leave this unset.
    """

    first_touch_bandwidth: PositiveFloat = Field(
        description="Bytes/s per device at which freshly mapped pages are first touched (fault "
        "and zeroing), measured by `moeplan calibrate` from the fresh and in-place copies.")
    map_threshold_bytes: PositiveFloat = Field(
        32 * 2**20,
        description="A scratch block at least this large is mapped afresh every step. Default: "
        "glibc's largest dynamic mmap threshold, DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * "
        "sizeof(long) = 32 MiB on 64-bit hosts (glibc malloc/malloc.c; mallopt(3), M_MMAP_THRESHOLD).")
    all_reduce_out_of_place: bool = Field(
        True,
        description="The runtime's all-reduce writes a new buffer rather than its operand's, so "
        "the gradient all-reduce needs its output beside the gradients (measured by `moeplan "
        "calibrate` from the scratch XLA plans for one all-reduce).")
    keeps_autodiff_residuals: bool = Field(
        False,
        description="The runtime materialises every residual JAX's autodiff saves rather than "
        "fusing elementwise work into the matmuls: a gated FFN keeps 5 hidden-size buffers, not "
        "3; an RMSNorm its normalised input beside its output; the loss backward exp(logits) "
        "and d_logits (moeplan/cost/memory.py). Measured by `moeplan calibrate` from the scratch "
        "XLA plans for a stack of gated FFN layers (CPU: 5.06 hidden buffers a layer; TPU v5p "
        "ahead of time: 1.1).")


class HardwareProfile(_Spec):
    """One accelerator and its interconnect, as the cost model needs them."""

    name: str = Field("custom", description="Display name.")
    peak_flops: PositiveFloat = Field(description="Dense bf16 FLOP/s per device.")
    matmul_efficiency: float = Field(0.6, gt=0, le=1, description="Achievable fraction of peak.")
    matmul_curve: list[CurvePoint] | None = Field(
        None,
        description="Achieved fraction of peak by matmul size, measured by `moeplan calibrate`: "
        "small matrix products run far below peak (launch, tiling and cache effects). Where "
        "given it replaces matmul_efficiency; between points the cost model interpolates in "
        "log(size), beyond the ends it holds the end value.",
    )
    matmul_rows_curve: list[RowsPoint] | None = Field(
        None,
        description="Achieved fraction of peak of an expert's products by their row count (the "
        "tokens one expert holds on a device), forward and backward, measured by `moeplan "
        "calibrate`: an expert with few tokens multiplies a skinny [rows, M] by a full weight, "
        "which runs far below a square product of the same FLOPs (8 CPU devices: 20 rows x "
        "256 x 1024 at 8.5 GFLOP/s against 22 for the size curve). The expert FFN takes the "
        "lower of this and matmul_curve; from the largest rows measured on, no limit.",
    )
    hbm_bytes: PositiveFloat = Field(description="Device memory capacity in bytes.")
    hbm_bandwidth: PositiveFloat = Field(description="Device memory bandwidth in bytes/s.")
    memory_efficiency: float = Field(0.8, gt=0, le=1, description="Achievable fraction of HBM bandwidth.")
    inplace_bandwidth: PositiveFloat | None = Field(
        None,
        description="Bytes/s of an elementwise update written into its own input's buffer, as the "
        "optimizer updates the donated training state; measured by `moeplan calibrate`. None: "
        "hbm_bandwidth. On CPU devices a fresh output buffer costs first-touch page faults that "
        "an in-place update does not (measured 3-6x faster); on accelerators the two are equal.",
    )
    scale_up: Link = Field(description="Fast domain: NVLink / ICI / on-host.")
    scale_up_size: PositiveInt = Field(description="Devices in one scale-up domain.")
    scale_out: Link = Field(description="Between domains: InfiniBand / RoCE / DCN.")
    topology: Literal["switch", "torus"] = Field("switch", description="Scale-up fabric shape.")
    torus_dims: list[PositiveInt] | None = Field(None, description="Torus extent per dimension.")
    overlap: float = Field(0.5, ge=0, le=1, description="Fraction of communication hidden under compute.")
    collective_scale: dict[Literal["all-reduce", "all-gather", "reduce-scatter", "all-to-all"], KindScale] | None = Field(
        None,
        description="Per collective kind, its own alpha-beta fit relative to the link's joint fit, "
        "measured by `moeplan calibrate` (on 8 CPU devices an all-to-all reaches ~0.4 of the "
        "joint bandwidth). Kinds not listed use the link as it is.",
    )
    host_memory: HostMemory | None = Field(
        None,
        description="Simulated CPU devices only: the allocator's first-touch page faults on "
        "large scratch blocks (see HostMemory). Measured by `moeplan calibrate`; None: none.",
    )
    source: str = Field("", description="Where these numbers come from.")
    measured: dict | None = Field(None, description="Calibration record, for measured profiles.")

    @model_validator(mode="after")
    def _check(self) -> HardwareProfile:
        if self.topology == "torus":
            if not self.torus_dims:
                raise ValueError("topology torus needs torus_dims")
        for name, key, plural in (("matmul_curve", "size", "sizes"), ("matmul_rows_curve", "rows", "rows")):
            curve = getattr(self, name)
            keys = [getattr(p, key) for p in curve] if curve is not None else None
            if keys is not None and (not keys or keys != sorted(set(keys))):
                raise ValueError(f"{name} needs at least one point, {plural} strictly increasing")
        return self


AXES = ("data", "expert", "model")


class Mesh(_Spec):
    """Devices split as data x expert x model; `model` is innermost (stride 1) in device order."""

    data: PositiveInt = 1
    expert: PositiveInt = 1
    model: PositiveInt = 1

    @property
    def devices(self) -> int:
        return self.data * self.expert * self.model

    @property
    def batch_shards(self) -> int:
        """Outside MoE layers the expert axis acts as more data parallelism."""
        return self.data * self.expert

    def __str__(self) -> str:
        return f"data={self.data},expert={self.expert},model={self.model}"

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parse 'data=8,expert=4,model=2' (missing axes are 1) or '8x4x2'."""
        from moeplan.errors import MoeplanError

        text = text.strip()
        try:
            if "=" not in text:
                parts = [int(p) for p in text.lower().split("x")]
                if len(parts) != 3:
                    raise ValueError
                return cls(data=parts[0], expert=parts[1], model=parts[2])
            sizes: dict[str, int] = {}
            for item in text.split(","):
                key, _, value = item.partition("=")
                key = key.strip()
                if key not in AXES:
                    raise MoeplanError(f"mesh axis '{key}' is unknown; axes are {', '.join(AXES)}")
                sizes[key] = int(value)
            return cls(**sizes)
        except MoeplanError:
            raise
        except (ValueError, TypeError):
            raise MoeplanError(
                f"mesh '{text}' is not of the form data=8,expert=4,model=2 (positive integers)"
            ) from None
