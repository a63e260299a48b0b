"""A regression suite: model shapes x meshes x backends, with the tolerances that judge them.

The suite file is YAML (see `tests/regress_suite.yaml` and docs/ci.md). Paths in it are
relative to the file itself, so a suite and the calibrated hardware profile it names can be
committed side by side and run from any directory. Loading it needs no jax.

Every candidate carries a *fingerprint*: a hash of everything its prediction is computed
from (model, train, hardware profile, mesh, backend). The baseline stores the fingerprint
with the predicted figures, so `moeplan regress` can tell "the inputs changed" (re-baseline)
from "the same inputs now predict something else" (the cost model changed: a regression
unless re-baselined on purpose).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from moeplan import presets
from moeplan.errors import MoeplanError
from moeplan.specs import HardwareProfile, Mesh, ModelSpec, TrainSpec

Backend = Literal["cpu", "tpu-aot"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimingSettings(_Strict):
    """How steps are timed. Rounds interleave candidates so load drift hits all of them alike."""

    clock: Literal["cpu", "wall"] = Field(
        "cpu", description="Clock that is judged: process CPU time (robust to other jobs) or wall time."
    )
    rounds: PositiveInt = Field(5, description="Rounds; each times every candidate once.")
    steps_per_round: PositiveInt = Field(3, description="Timed steps per candidate per round (median kept).")
    warmup: int = Field(2, ge=0, description="Untimed steps per candidate before the first round.")
    max_cv: PositiveFloat = Field(
        0.10, description="A candidate whose per-round ratios vary more than this is re-measured."
    )
    remeasure: int = Field(2, ge=0, description="Extra attempts (each `rounds` rounds) for noisy candidates.")
    min_judged: PositiveInt = Field(
        4, description="Fewest quiet candidates the timing checks need; fewer means inconclusive."
    )


class Tolerances(_Strict):
    """How much worse than the baseline the suite may get before it fails."""

    median_abs_error_pp: PositiveFloat = Field(
        description="Allowed rise of the median absolute step-time error, in percentage points."
    )
    spearman_drop: PositiveFloat = Field(description="Allowed fall of Spearman's rank correlation.")
    prediction_rel: PositiveFloat = Field(
        1e-9,
        description="Relative change of a predicted figure counted as 'changed' (float rounding "
        "across CPUs, not model changes, lives below this).",
    )


class Bounds(_Strict):
    """Predicted / compiled ratios a candidate must stay within (checked without timing)."""

    flops_ratio: tuple[PositiveFloat, PositiveFloat] = Field(description="predicted / XLA cost_analysis FLOPs.")
    memory_ratio: tuple[PositiveFloat, PositiveFloat] = Field(
        description="predicted / XLA memory_analysis bytes per device."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        for name in ("flops_ratio", "memory_ratio"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} exceeds upper bound {hi}")
        return self


class CpuBackend(_Strict):
    """Simulated CPU devices (`--xla_force_host_platform_device_count`): compiled and timed."""

    devices: PositiveInt = Field(8, description="Simulated devices; every mesh must use all of them.")
    meshes: list[str] = Field(description="Meshes as 'DxExM' (data x expert x model).")
    models: list[str] | None = Field(None, description="Models to run here (default: all of the suite's).")


class TpuAotBackend(_Strict):
    """A TPU slice compiled ahead of time with libtpu: compiled, never timed."""

    topology: str = Field(description="TPU target as `moeplan profile` takes it, e.g. 'tpu-v5e:4x4'.")
    hardware: str | None = Field(
        None, description="Hardware profile (preset or path); default the generation's preset. "
        "It is resized to the slice (moeplan.validate.tpu_aot.target_hardware)."
    )
    meshes: list[str] = Field(description="Meshes as 'DxExM' over all chips of the topology.")
    models: list[str] | None = Field(None, description="Models to run here (default: all of the suite's).")
    train: dict = Field(default_factory=dict, description="TrainSpec fields overriding the suite's here.")


class SuiteFile(_Strict):
    """The YAML document, before its references (presets, files) are resolved."""

    name: str = Field(description="Suite name, shown in reports.")
    description: str = ""
    hardware: str = Field(description="Hardware profile for the CPU backend (path or preset).")
    train: dict = Field(description="TrainSpec fields shared by every candidate.")
    models: dict[str, str | dict] = Field(description="name -> preset/path or inline ModelSpec fields.")
    cpu: CpuBackend | None = None
    tpu_aot: TpuAotBackend | None = Field(None, alias="tpu-aot")
    timing: TimingSettings = TimingSettings()
    tolerances: Tolerances
    bounds: Bounds

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class Candidate:
    """One model on one mesh on one backend: the unit that is predicted, compiled and judged."""

    id: str
    model_name: str
    model: ModelSpec
    train: TrainSpec
    hardware: HardwareProfile
    mesh: Mesh
    backend: Backend
    topology: str | None = None

    @property
    def timed(self) -> bool:
        return self.backend == "cpu"

    def fingerprint(self) -> str:
        """sha256 over the canonical JSON of every input of the prediction.

        Fields left at their defaults are not hashed, so a new optional spec field that keeps
        the old behaviour by default does not invalidate every baseline.
        """
        doc = {
            "model": self.model.model_dump(mode="json", exclude_defaults=True),
            "train": self.train.model_dump(mode="json", exclude_defaults=True),
            "hardware": self.hardware.model_dump(mode="json", exclude_defaults=True),
            "mesh": self.mesh.model_dump(mode="json"),
            "backend": self.backend,
            "topology": self.topology,
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Suite:
    """A loaded suite: settings plus the expanded candidate list."""

    path: Path
    spec: SuiteFile
    candidates: list[Candidate]

    @property
    def timing(self) -> TimingSettings:
        return self.spec.timing

    @property
    def tolerances(self) -> Tolerances:
        return self.spec.tolerances

    @property
    def bounds(self) -> Bounds:
        return self.spec.bounds

    def backend(self, name: str) -> list[Candidate]:
        return [c for c in self.candidates if c.backend == name]


def _resolve(base: Path, ref: str) -> str | Path:
    """A reference relative to the suite file if such a file exists, else as given (preset)."""
    local = base / ref
    return local if local.exists() else ref


def _mesh(text: str, where: str) -> Mesh:
    try:
        return Mesh.parse(text)
    except MoeplanError as e:
        raise MoeplanError(f"{where}: {e}") from None


def _model(base: Path, name: str, ref: str | dict, where: str) -> ModelSpec:
    if isinstance(ref, dict):
        data = {"name": name, **ref}
        return presets.build(ModelSpec, data, f"{where} (models.{name})")
    return presets.load_model(_resolve(base, ref))


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file, resolving presets and expanding its candidates."""
    path = Path(path)
    if not path.exists():
        raise MoeplanError(f"{path}: no such suite file")
    data, root = presets.parse_yaml(path)
    spec = presets.build(SuiteFile, data, str(path), root)
    base = path.parent
    train = presets.build(TrainSpec, dict(spec.train), f"{path} (train)")
    models = {n: _model(base, n, ref, str(path)) for n, ref in spec.models.items()}
    if not models:
        raise MoeplanError(f"{path}: the suite names no models")
    cands: list[Candidate] = []
    if spec.cpu is not None:
        hw = presets.load_hardware(_resolve(base, spec.hardware))
        chosen = _pick(models, spec.cpu.models, str(path))
        for text in spec.cpu.meshes:
            mesh = _mesh(text, str(path))
            if mesh.devices != spec.cpu.devices:
                raise MoeplanError(f"{path}: cpu mesh {text} uses {mesh.devices} devices, not {spec.cpu.devices}")
            cands += [_cand(n, m, train, hw, mesh, "cpu") for n, m in chosen.items()]
    if spec.tpu_aot is not None:
        chosen = _pick(models, spec.tpu_aot.models, str(path))
        tpu_train = presets.build(TrainSpec, {**spec.train, **spec.tpu_aot.train}, f"{path} (tpu-aot.train)")
        cands += _tpu_candidates(spec.tpu_aot, base, str(path), chosen, tpu_train)
    if not cands:
        raise MoeplanError(f"{path}: the suite has no backend (add 'cpu' or 'tpu-aot')")
    ids = [c.id for c in cands]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MoeplanError(f"{path}: candidate {dup[0]} appears twice")
    return Suite(path=path, spec=spec, candidates=cands)


def _pick(models: dict[str, ModelSpec], names: list[str] | None, where: str) -> dict[str, ModelSpec]:
    if names is None:
        return models
    unknown = [n for n in names if n not in models]
    if unknown:
        raise MoeplanError(f"{where}: backend names model '{unknown[0]}', not among {', '.join(models)}")
    return {n: models[n] for n in names}


def _tpu_candidates(tpu: TpuAotBackend, base: Path, where: str, models: dict, train: TrainSpec) -> list[Candidate]:
    """Candidates compiled for a TPU slice; the hardware profile is resized to the slice."""
    from moeplan.validate import tpu_aot  # pure module: parsing targets needs no jax

    target = tpu_aot.parse_target(tpu.topology)
    hw = presets.load_hardware(_resolve(base, tpu.hardware)) if tpu.hardware else None
    hw = tpu_aot.target_hardware(target, hw)
    out = []
    for text in tpu.meshes:
        mesh = _mesh(text, where)
        if mesh.devices != target.chips:
            raise MoeplanError(f"{where}: tpu-aot mesh {text} uses {mesh.devices} devices; {target.text} has {target.chips}")
        out += [_cand(n, m, train, hw, mesh, "tpu-aot", target.text) for n, m in models.items()]
    return out


def mesh_label(mesh: Mesh) -> str:
    return f"{mesh.data}x{mesh.expert}x{mesh.model}"


def _cand(name, model, train, hw, mesh, backend, topology=None) -> Candidate:
    cid = f"{name}/{mesh_label(mesh)}/{topology or backend}"
    return Candidate(cid, name, model, train, hw, mesh, backend, topology)
