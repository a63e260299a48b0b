"""Find and load specs from preset names or YAML files, with errors a user can act on.

Presets are YAML files under `profiles/hardware/` and `profiles/models/` (override the folder
with MOEPLAN_PROFILES). A name that is neither a file nor a preset lists the presets and the
closest match; a malformed file names the file and line; an invalid value names the field.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moeplan.errors import MoeplanError
from moeplan.specs import HardwareProfile, ModelSpec, TrainSpec

T = TypeVar("T", bound=BaseModel)

KINDS: dict[str, type[BaseModel]] = {
    "hardware": HardwareProfile,
    "models": ModelSpec,
    "train": TrainSpec,
}


def profiles_dir() -> Path:
    """The folder that holds the preset YAML files."""
    env = os.environ.get("MOEPLAN_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def preset_names(kind: str) -> list[str]:
    folder = profiles_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _line_of(node: yaml.Node, path: tuple) -> int | None:
    """1-based line of the YAML key at `path` (as pydantic reports it), if it can be found."""
    line = None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _format_validation(err: ValidationError, where: str, root: yaml.Node | None) -> str:
    errors = err.errors()
    # an unknown key usually explains a missing one (a typo): report it first
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(root, loc) if root is not None else None
    at = f"{where}:{line}" if line else where
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{at}: unknown field '{field}'{_suggest_field(err, loc)}{more}"
    if first["type"] == "missing":
        return f"{at}: missing required field '{field}'{more}"
    return f"{at}: invalid value for '{field}': {msg}{more}"


def _suggest_field(err: ValidationError, loc: tuple) -> str:
    """' (did you mean 'x'?)' when a required field of the same model is missing and similar."""
    missing = [str(e["loc"][-1]) for e in err.errors() if e["type"] == "missing" and e["loc"][:-1] == loc[:-1]]
    close = difflib.get_close_matches(str(loc[-1]), missing, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    """Read a YAML mapping, turning syntax errors into 'file:line: problem'."""
    try:
        text = path.read_text()
    except OSError as e:
        raise MoeplanError(f"cannot read {path}: {e.strerror}") from None
    try:
        # Parse once (what yaml.safe_load does, keeping the tree for error lines): parsing is
        # most of `moeplan presets`' time. Building data rewrites merge keys (<<) in the
        # tree, so such a file is parsed again for an untouched tree.
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            rewritten = _has_merge_keys(root)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
        if rewritten:
            root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise MoeplanError(f"{path}:{line}: malformed YAML: {e.problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MoeplanError(f"{path}:1: expected a mapping of fields, got {type(data).__name__}")
    return data, root


def _has_merge_keys(root: yaml.Node | None) -> bool:
    """Whether a mapping in the tree has a '<<' or '=' key, which SafeLoader rewrites in place.

    Each node is visited once: aliases share nodes, and a tree of aliases can be exponentially
    larger than the file.
    """
    todo, seen = [root], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                    return True
                todo.append(value)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return False


def build(cls: type[T], data: dict, where: str, root: yaml.Node | None = None) -> T:
    """Validate `data` as `cls`, with a one-line error naming the field and why."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise MoeplanError(_format_validation(e, where, root)) from None


def load(kind: str, name_or_path: str | Path) -> BaseModel:
    """Load a spec of `kind` ('hardware', 'models', 'train') from a preset name or YAML path."""
    cls = KINDS[kind]
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = profiles_dir() / kind / f"{name_or_path}.yaml"
        if not path.exists():
            raise MoeplanError(unknown_preset_message(kind, str(name_or_path)))
    elif not path.exists():
        raise MoeplanError(f"{path}: no such file")
    data, root = parse_yaml(path)
    data.setdefault("name", path.stem) if "name" in cls.model_fields else None
    return build(cls, data, str(path), root)


def unknown_preset_message(kind: str, name: str) -> str:
    names = preset_names(kind)
    label = {"models": "model", "hardware": "hardware", "train": "train"}[kind]
    close = closest_name(name, names)
    hint = f" Did you mean '{close}'?" if close else ""
    return f"unknown {label} preset '{name}'.{hint} Known: {', '.join(names) or '(none)'}"


def closest_name(name: str, names: list[str]) -> str | None:
    """The preset a user most likely meant: one the name starts (or is contained in), else difflib."""
    low = name.lower()
    prefixed = [n for n in names if n.startswith(low)] or [n for n in names if low and low in n]
    if prefixed:
        return min(prefixed, key=len)
    close = difflib.get_close_matches(low, names, n=1, cutoff=0.4)
    return close[0] if close else None


def load_model(name_or_path: str | Path) -> ModelSpec:
    return load("models", name_or_path)  # type: ignore[return-value]


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    return load("hardware", name_or_path)  # type: ignore[return-value]


def load_train(name_or_path: str | Path | None, **overrides) -> TrainSpec:
    """A TrainSpec from a YAML file (or defaults), with CLI overrides applied on top."""
    data: dict = {}
    root = None
    where = "train options"
    if name_or_path is not None:
        path = Path(name_or_path)
        if not path.exists():
            raise MoeplanError(f"{path}: no such file")
        data, root = parse_yaml(path)
        where = str(path)
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
            if key == "global_batch_tokens":
                data.pop("global_batch", None)
            if key == "global_batch":
                data.pop("global_batch_tokens", None)
    return build(TrainSpec, data, where, root)
