"""Load and validate matrix.yaml and the target manifests (targets/<t>/target.yaml).

Every problem is reported as ONE line naming the key path, e.g.
``matrix.yaml: targets.onnxruntime.tolerance.rtol: expected a number, got 'x'``.
Validation fills in defaults, so the rest of the code reads plain, complete dicts.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from targets.common.archs import ARCH_CONTRACTS

from . import TARGETS_DIR
from .errors import ConfigError

# --------------------------------------------------------------------------- schema nodes


class _Node:
    default: Any = None
    required = False

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _fail(path: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


class Num(_Node):
    def __init__(self, default=None, min=None, max=None, required=False):
        self.default, self.min, self.max, self.required = default, min, max, required

    def check(self, value, path):
        if isinstance(value, bool):
            raise _fail(path, f"expected a number, got {_show(value)}")
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                raise _fail(path, f"expected a number, got {_show(value)}") from None
        if not isinstance(value, (int, float)):
            raise _fail(path, f"expected a number, got {_show(value)}")
        if self.min is not None and value < self.min:
            raise _fail(path, f"must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise _fail(path, f"must be <= {self.max}, got {value}")
        return float(value)


class Int(Num):
    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected an integer, got {_show(value)}")
        super().check(value, path)
        return value


class Bool(_Node):
    def __init__(self, default=None):
        self.default = default

    def check(self, value, path):
        if not isinstance(value, bool):
            raise _fail(path, f"expected true or false, got {_show(value)}")
        return value


class Str(_Node):
    def __init__(self, default=None, choices=None, required=False, pattern=None, example=None):
        self.default, self.choices, self.required = default, choices, required
        self.pattern, self.example = pattern, example

    def check(self, value, path):
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {_show(value)}")
        if self.choices and value not in self.choices:
            raise _fail(path, f"expected one of {', '.join(self.choices)}, got {value!r}")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise _fail(path, f"expected {self.example}, got {value!r}")
        return value


class Any_(_Node):
    def __init__(self, default=None):
        self.default = default

    def check(self, value, path):
        return value


class Opt(_Node):
    """None allowed."""

    def __init__(self, node: _Node, default=None):
        self.node, self.default = node, default

    def check(self, value, path):
        return None if value is None else self.node.check(value, path)


class List(_Node):
    def __init__(self, item: _Node, default=None, length=None):
        self.item, self.default, self.length = item, default if default is not None else [], length

    def check(self, value, path):
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {_show(value)}")
        if self.length is not None and len(value) != self.length:
            raise _fail(path, f"expected {self.length} items, got {len(value)}")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


class Map(_Node):
    """A closed mapping: unknown keys are errors."""

    def __init__(self, fields: dict[str, _Node]):
        self.fields = fields

    @property
    def default(self):
        return {}

    def check(self, value, path):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {_show(value)}")
        out = {}
        for key in value:
            if key not in self.fields:
                raise _fail(_join(path, key), f"unknown key (allowed: {', '.join(self.fields)})")
        for key, node in self.fields.items():
            sub = _join(path, key)
            if key in value:
                out[key] = node.check(value[key], sub)
            elif node.required:
                raise _fail(sub, "required key is missing")
            else:
                out[key] = node.check(copy.deepcopy(node.default), sub) if isinstance(node, Map) \
                    else copy.deepcopy(node.default)
        return out


class DictOf(_Node):
    def __init__(self, value: _Node):
        self.value = value

    @property
    def default(self):
        return {}

    def check(self, value, path):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {_show(value)}")
        return {str(k): self.value.check(v, _join(path, str(k))) for k, v in value.items()}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------- model contracts

TOLERANCE = Map({
    "rtol": Num(0.0, min=0), "atol": Num(0.0, min=0),
    "cosine_min": Num(0.0, min=-1, max=1),
    "rank1_delta": Num(0.0, min=0), "map_delta": Num(0.0, min=0),
    "checks": List(Str(choices=["allclose", "cosine", "retrieval"]),
                   default=["allclose", "cosine", "retrieval"]),
})

MATRIX = Map({
    "workspace": Str("workspace"),
    "runner": Str("auto", choices=["auto", "local", "docker"]),
    "stage_timeout_s": Int(3600, min=1),
    "model": Map({
        "arch": Str("reid-strong-baseline", choices=list(ARCH_CONTRACTS)),
        "checkpoint": Opt(Str(pattern=r".*\S.*", example="a path, or null for seeded random weights")),
        "seed": Int(0),
        "num_classes": Int(751, min=1),
        "last_stride": Int(1, min=1, max=2),
        "neck_feat": Str("after", choices=["after", "before"]),
        "input_size": List(Int(min=16), default=[256, 128], length=2),
        "calibration_batches": Int(4, min=1),
        "export": Map({
            "opset": Int(11, min=7),
            "input_name": Str("image"),
            "output_name": Str("class"),
            "dynamic_batch": Bool(True),
        }),
    }),
    "data": Map({
        "dataset": Str("data/market1501-synthetic"),
        "synthetic": Map({
            "identities": Int(30, min=2), "cameras": Int(6, min=2, max=6),
            "gallery_per_camera": Int(2, min=1), "junk": Int(4, min=0), "distractors": Int(6, min=0),
            "seed": Int(0),
        }),
        "limit": Opt(Int(min=1)),
        "ascend_bins": Bool(True),
        "workers": Int(0, min=0),
    }),
    "verify": Map({
        "reference": Str("torch"),
        "max_rank": Int(50, min=1),
    }),
    "images": Map({
        "ca_bundle": Opt(Str(), default="auto"),
        "wheelhouses": List(Str()),
        "registry": Opt(Str()),
        "memory_limit": Str("8g", pattern=r"\d+(\.\d+)?[bkmgBKMG]?", example="8g or 512m"),
        "bases": DictOf(Map({
            "suite": Str(required=True), "variant": Str("minbase"),
            "mirror": Str("auto"), "tag": Str(required=True),
        })),
    }),
    "targets": Any_({}),   # validated against each target's manifest below
})

_PARAM_TYPES = {"int": Int, "float": Num, "number": Num, "str": Str, "bool": Bool}


# --------------------------------------------------------------------------- target manifests

@dataclass
class StageDef:
    name: str
    inputs: dict[str, str]        # input name -> "producer/file", optional when ending in "?"
    params: list[str]
    outputs: list[str]
    on_demand: bool = False       # e.g. bench: run by its own task, not part of `invoke matrix`


@dataclass
class TargetDef:
    name: str
    summary: str
    folder: Path
    requires: dict[str, list[str]]
    image: dict[str, Any]
    params: dict[str, dict[str, Any]]
    stages: dict[str, StageDef]
    tolerance: dict[str, Any] = field(default_factory=dict)

    @property
    def matrix_stages(self) -> dict[str, StageDef]:
        """The stages `invoke matrix` runs (on-demand ones such as bench excluded)."""
        return {n: s for n, s in self.stages.items() if not s.on_demand}

    @property
    def dockerfile(self) -> Path:
        return self.folder.parent.parent / "images" / self.name / "Dockerfile"


def load_target(folder: Path) -> TargetDef:
    path = folder / "target.yaml"
    raw = _read_yaml(path)
    where = str(path)
    for key in ("name", "stages"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: required key is missing")
    if raw["name"] != folder.name:
        raise ConfigError(f"{where}: name: {raw['name']!r} must equal the folder name {folder.name!r}")
    stages = {}
    for sname, s in (raw.get("stages") or {}).items():
        s = s or {}
        stages[sname] = StageDef(sname, dict(s.get("inputs") or {}), list(s.get("params") or []),
                                 list(s.get("outputs") or []), bool(s.get("on_demand", False)))
    return TargetDef(name=raw["name"], summary=raw.get("summary", ""), folder=folder,
                     requires={k: list(v) for k, v in (raw.get("requires") or {}).items()},
                     image=dict(raw.get("image") or {}), params=dict(raw.get("params") or {}),
                     stages=stages, tolerance=dict(raw.get("tolerance") or {}))


def discover_targets(targets_dir: Path = TARGETS_DIR) -> dict[str, TargetDef]:
    return {p.name: load_target(p) for p in sorted(targets_dir.iterdir())
            if (p / "target.yaml").is_file()}


def _param_node(spec: dict[str, Any]) -> _Node:
    kind = spec.get("type", "str")
    default = spec.get("default")
    if kind == "list":
        return List(Any_(), default=default)
    if kind == "str":
        return Str(default, choices=spec.get("choices"))
    if kind in ("int", "float", "number"):
        return _PARAM_TYPES[kind](default, min=spec.get("min"), max=spec.get("max"))
    return _PARAM_TYPES[kind](default)


def target_schema(t: TargetDef) -> Map:
    tol = copy.deepcopy(TOLERANCE)
    for key, value in t.tolerance.items():
        tol.fields[key].default = value
    image = Map({"base": Str(t.image.get("base", "")), "build_args": DictOf(Str())})
    return Map({
        "enabled": Bool(True),
        "params": Map({k: _param_node(v) for k, v in t.params.items()}),
        "tolerance": tol,
        "image": image,
    })


# --------------------------------------------------------------------------- loading

@dataclass
class Matrix:
    path: Path
    root: Path                      # folder of matrix.yaml; relative paths are taken from here
    raw: dict[str, Any]             # validated, defaults filled
    targets: dict[str, TargetDef]

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    def resolve(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.root / p)

    @property
    def workspace(self) -> Path:
        return self.resolve(self.raw["workspace"])

    def target_cfg(self, name: str) -> dict[str, Any]:
        return self.raw["targets"][name]

    def enabled_targets(self) -> list[str]:
        return [n for n, c in self.raw["targets"].items() if c["enabled"]]

    def contract(self) -> dict[str, Any]:
        c = dict(ARCH_CONTRACTS[self.model["arch"]])
        c["input_size"] = list(self.model["input_size"])
        return c


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_matrix(path: str | Path = "matrix.yaml", overrides: dict[str, Any] | None = None,
                targets_dir: Path = TARGETS_DIR) -> Matrix:
    path = Path(path)
    raw = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    known = discover_targets(targets_dir)
    try:
        data = MATRIX.check(raw, "")
        tcfg = data["targets"] or {}
        if not isinstance(tcfg, dict):
            raise _fail("targets", f"expected a mapping, got {_show(tcfg)}")
        out = {}
        for name, stanza in tcfg.items():
            if name not in known:
                raise _fail(f"targets.{name}", f"unknown target (known: {', '.join(known)}); "
                            f"a target is a folder targets/<name>/ with a target.yaml")
            out[name] = target_schema(known[name]).check(stanza, f"targets.{name}")
        data["targets"] = out
        if data["verify"]["reference"] not in out:
            raise _fail("verify.reference", f"{data['verify']['reference']!r} is not a target in targets")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return Matrix(path=path.resolve(), root=path.resolve().parent, raw=data,
                  targets={n: known[n] for n in out})


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a mapping")
    d[keys[-1]] = value
