"""Load and validate matrix.yaml and the target manifests (targets/<t>/target.yaml).

Design, in three layers:

1. **Reading** (:func:`read_yaml`): the bytes must be UTF-8 and a mapping; the YAML goes through
   a ``yaml.SafeLoader`` subclass that, on the composed node graph and before any value is
   built, refuses duplicate keys (naming both lines), recursive aliases and alias "bombs"
   (aliases that would expand past ``MAX_ALIAS_EXPANSION`` nodes). Anchors, aliases and ``<<:``
   merge keys keep working within that bound. ``1e-3`` reads as a number (YAML 1.2), not a string.
2. **Schema** (pydantic v2 models): every mapping is a closed :class:`_Strict` model (an unknown
   key is an error listing the allowed ones) and every scalar has its own plain validator
   (booleans are not numbers, integers may be whole floats, ranges are bounded). The per-target
   stanzas of matrix.yaml are models built from each target's manifest (its params and
   tolerance defaults), see :func:`target_stanza_model`.
3. **Messages**: a pydantic ``ValidationError`` never reaches the user. Its first error becomes
   ONE line, ``<file>: <key.path>: <what is wrong and what to do>``, e.g.
   ``matrix.yaml: targets.onnxruntime.tolerance.rtol: expected a number, got 'x'``.

Validation fills in defaults, so the rest of the code reads plain, complete dicts
(:attr:`Matrix.raw`, :class:`TargetDef`, :class:`StageDef`).

New keys: per target stanza in matrix.yaml ``required`` (bool, default false: a skip of a
required target fails the run) and ``allow_skip`` (null, or the reason why a skip is
acceptable, as a string); per stage in target.yaml ``requires`` (same shape as the target's
``requires``; each of modules/commands/devices defaults to the target's); per list param in
target.yaml ``items`` (the item type: int, float, number, str or bool).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from targets.common.archs import ARCH_CONTRACTS

from . import REPO_ROOT, TARGETS_DIR
from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "ARCH_CONTRACTS",
    "Matrix",
    "StageDef",
    "TargetDef",
    "TOLERANCE",
    "discover_targets",
    "load_matrix",
    "load_target",
    "read_yaml",
    "target_stanza_model",
]

#: Bounds on what a config file may be. A matrix.yaml is a few KiB with a few hundred nodes.
MAX_FILE_BYTES = 1 << 20
MAX_ALIAS_EXPANSION = 10_000  # nodes that aliases may add to a document when expanded
MAX_DEPTH = 32  # nesting levels (matrix.yaml uses 4)
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_SEED = 2**32 - 1
INPUT_SIDE = (16, 4096)

PARAM_TYPES = ("int", "float", "number", "str", "bool", "list")
ITEM_TYPES = ("int", "float", "number", "str", "bool")
CHECK_NAMES = ("allclose", "cosine", "retrieval")
REQUIRE_KINDS = ("modules", "commands", "devices")


# --------------------------------------------------------------------------- reading YAML


class _Refused(Exception):
    """A YAML document the strict loader will not build (the message is one line, no file)."""


# YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every user read it as a number.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


# libyaml's parser when PyYAML has it (10x faster; the constructor is SafeConstructor either way)
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses duplicate keys, deep nesting, recursive aliases and alias bombs."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._inspect(node)  # on the node graph, before any value is built
        return self.construct_document(node)

    def _inspect(self, root: yaml.Node) -> None:
        """One pass over the node graph: duplicate keys, and the size aliases expand to."""
        sizes: dict[int, int] = {}  # id(node) -> expanded size
        active: set[int] = set()
        added = 0  # nodes added by expanding aliases

        def size(node: yaml.Node, depth: int) -> int:
            nonlocal added
            if depth > MAX_DEPTH:
                raise _Refused(
                    f"nested more than {MAX_DEPTH} levels deep at line "
                    f"{node.start_mark.line + 1}; a config file is a few levels deep"
                )
            nid = id(node)
            if nid in sizes:  # a second way to reach a node: an alias
                added += sizes[nid]
                if added > MAX_ALIAS_EXPANSION:
                    raise _Refused(
                        f"aliases expand past {MAX_ALIAS_EXPANSION} nodes (the anchor at line "
                        f"{node.start_mark.line + 1} is repeated too often); anchors and "
                        "aliases (&name / *name) are for small repeats: write the values out"
                    )
                return sizes[nid]
            if nid in active:
                raise _Refused(
                    f"recursive alias at line {node.start_mark.line + 1}: a value contains itself; write the values out"
                )
            active.add(nid)
            n = 1
            if isinstance(node, yaml.SequenceNode):
                n += sum(size(child, depth + 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                self._check_duplicates(node)
                n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
            active.discard(nid)
            sizes[nid] = n
            return n

        size(root, 0)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the constructor reports it
                continue
            if first is not None:
                raise _Refused(f"duplicate key {key!r} at lines {first} and {line} (the second would silently win)")
            seen[key] = line


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file ({} when the file is empty or only comments); ConfigError else."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(
                f"{path}: is a directory, not a YAML file; give the file itself (e.g. {path / 'matrix.yaml'})"
            )
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config file (at most {MAX_FILE_BYTES}); is it the right file?"
            )
        data_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data_bytes[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data_bytes[exc.start]:02x} at line {line}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
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


_read_yaml = read_yaml  # the old name


# --------------------------------------------------------------------------- scalar validators


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _err(msg: str, *loc: str | int) -> PydanticCustomError:
    """A validation error with our own one-line message; ``loc`` extends pydantic's key path."""
    return PydanticCustomError("modelmatrix", "{msg}", {"msg": msg, "loc": tuple(loc)})


def _nested(exc: PydanticCustomError, *loc: str | int) -> PydanticCustomError:
    ctx = exc.context or {}
    return _err(str(ctx.get("msg", exc.message())), *loc, *ctx.get("loc", ()))


def _fmt(x: float) -> str:
    """1, 0.001, 100000000000: whole numbers without a fraction or an exponent."""
    if isinstance(x, int) or (x.is_integer() and abs(x) < 1e18):
        return str(int(x))
    return repr(x)


def _range(value: float, lo: float | None, hi: float | None, hint: str | None) -> None:
    note = f" ({hint})" if hint else ""
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise _err(f"must be between {_fmt(lo)} and {_fmt(hi)}{note}, got {_fmt(value)}")
    if lo is not None and value < lo:
        raise _err(f"must be >= {_fmt(lo)}{note}, got {_fmt(value)}")
    if hi is not None and value > hi:
        raise _err(f"must be <= {_fmt(hi)}{note}, got {_fmt(value)}")


_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number(
    lo: float | None = None, hi: float | None = None, hint: str | None = None, keep_int: bool = False
) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            value = float(value)  # a quoted number, or one from code (TOLERANCE.check)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(f"expected a number, got {_show(value)}")
        try:
            out = float(value)
        except OverflowError:
            raise _err(f"expected a finite number, got {value}") from None
        if not math.isfinite(out):
            raise _err(f"expected a finite number, got {value}")
        _range(out, lo, hi, hint)
        return value if keep_int and isinstance(value, int) else out

    return check


def _integer(lo: float | None = None, hi: float | None = None, hint: str | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 3600.0 is 3600; 1.5 is not an integer
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(f"expected an integer, got {_show(value)}")
        _range(value, lo, hi, hint)
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _err(f"expected true or false, got {_show(value)}")
    return value


def _string(
    choices: Iterable[str] | None = None, pattern: str | None = None, example: str | None = None
) -> Callable[[Any], str]:
    allowed = list(choices) if choices is not None else None

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _err(f"expected a string, got {_show(value)}")
        if allowed is not None and value not in allowed:
            raise _err(f"expected one of {', '.join(allowed)}, got {value!r}")
        if pattern and not re.fullmatch(pattern, value):
            raise _err(f"expected {example}, got {value!r}")
        return value

    return check


def _timestamp(value: Any) -> str:
    """A UTC time as debuerreotype takes it; YAML's own (unquoted) timestamps are accepted too."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _string(pattern=r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", example="a UTC time like 2025-05-20T00:00:00Z")(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, (dict, list)) or value is None or not isinstance(value, (str, int, float, bool)):
        raise _err(
            f"expected a plain value (a string, number or true/false), got {_show(value)}; "
            "a list parameter holds no nested structures"
        )
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _list_of(item: Callable[[Any], Any], length: int | None = None, unique: bool = False) -> Callable[[Any], list[Any]]:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _err(f"expected a list, got {_show(value)}")
        if length is not None and len(value) != length:
            raise _err(f"expected {length} items, got {len(value)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except PydanticCustomError as exc:
                raise _nested(exc, i) from None
            if unique and out[-1] in out[:-1]:
                raise _err(f"{out[-1]!r} is listed twice", i)
        return out

    return check


def _dict_of(value_check: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    def check(value: Any) -> dict[str, Any]:
        out = {}
        for k, v in _mapping(value).items():
            try:
                out[k] = value_check(v)
            except PydanticCustomError as exc:
                raise _nested(exc, k) from None
        return out

    return check


def _mapping(value: Any) -> dict[str, Any]:
    """null is an empty mapping; keys must be strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(f"expected a mapping, got {_show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise _err(f"keys must be strings, got {key!r}; quote it")
    return value


def _v(check: Callable[[Any], Any]) -> PlainValidator:
    return PlainValidator(check)


_Mapping = BeforeValidator(_mapping)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_NONEMPTY = _v(_string(pattern=r".*\S.*", example="a non-empty string"))


def _skip_reason(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _err(
            f'give the reason as a string (e.g. allow_skip: "no GPU on the CI runners"), '
            f"got {_show(value)}; or leave allow_skip out"
        )
    return value


def _input_ref(value: Any) -> str:
    """``producer/file``, optional when it ends in ``?``: producer is source, prepare or <target>.<stage>."""
    if not isinstance(value, str):
        raise _err(f"expected a string 'producer/file', got {_show(value)}")
    text = value[:-1] if value.endswith("?") else value
    if "/" not in text:
        raise _err(
            f"input {text!r} must look like 'producer/file' (e.g. torch.export/model.onnx or prepare/inputs.npy)"
        )
    producer, file = text.split("/", 1)
    if not re.fullmatch(rf"source|prepare|{_NAME}\.{_NAME}", producer):
        raise _err(f"producer {producer!r} must be source, prepare or <target>.<stage> (e.g. torch.export)")
    if not file or file.startswith("/") or ".." in file.split("/"):
        raise _err(f"file {file!r} must be a path inside the producer's output folder (e.g. model.onnx)")
    return value


def _input_decl(value: Any) -> str | dict[str, Any]:
    """An input: ``producer/file`` (see _input_ref), or ``{from: producer/file, when: {param: value
    or [values]}}``: read only when every named stage parameter has one of the values (e.g. the
    TensorRT engine reads the QDQ model only at ``precision: int8``, so an fp32 engine does not
    depend on calibration data)."""
    if not isinstance(value, dict):
        return _input_ref(value)
    unknown = [k for k in value if k not in ("from", "when")]
    if unknown:
        raise _err("unknown key (allowed: from, when)", unknown[0])
    if "from" not in value:
        raise _err("required key is missing", "from")
    try:
        ref = _input_ref(value["from"])
    except PydanticCustomError as exc:
        raise _nested(exc, "from") from None
    when = _mapping(value.get("when"))
    if not when:
        raise _err("give the condition as {param: value} (or drop the mapping for an unconditional input)", "when")
    cond = {}
    for k, v in when.items():
        values = v if isinstance(v, list) else [v]
        if not values or any(isinstance(x, (dict, list)) or x is None for x in values):
            raise _err(f"expected a value or a list of values, got {_show(v)}", "when", k)
        cond[k] = values
    return {"from": ref, "when": cond}


def _output_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(f"expected a file name, got {_show(value)}")
    if "/" in value or "\\" in value or value in (".", ".."):
        raise _err(f"expected a plain file name in the stage folder, got {value!r}")
    return value


# --------------------------------------------------------------------------- models and messages


class _Strict(BaseModel):
    """A closed mapping: null reads as {}, an unknown key is an error listing the allowed ones."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _closed(cls, data: Any) -> Any:
        data = _mapping(data)
        allowed = [f.alias or name for name, f in cls.model_fields.items()]
        for key in data:
            if key not in allowed:
                raise _err(f"unknown key (allowed: {', '.join(allowed)})", key)
        return data


def _where(prefix: str, loc: Iterable[str | int]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _one_line(exc: ValidationError, prefix: str) -> str:
    """The first error of a ValidationError as ``<key.path>: <message>``."""
    first = exc.errors(include_url=False)[0]
    loc = [p for p in first["loc"] if isinstance(p, (str, int))]
    ctx = first.get("ctx") or {}
    if first["type"] == "modelmatrix":
        loc += list(ctx.get("loc", ()))
        msg = str(ctx["msg"])
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:  # not expected: every field has our own validator
        text = first["msg"]
        msg = f"{text[:1].lower()}{text[1:]}, got {_show(first.get('input'))}"
    where = _where(prefix, loc)
    return f"{where}: {msg}" if where else msg


def _validate(cls: type[_Strict], value: Any, path: str) -> _Strict:
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, path)) from None


class _Checker:
    """``.check(value, path) -> dict``: validate one section, fill its defaults, one-line errors."""

    def __init__(self, model: type[_Strict]):
        self.model = model

    @property
    def fields(self) -> list[str]:
        return [f.alias or n for n, f in self.model.model_fields.items()]

    def check(self, value: Any, path: str) -> dict[str, Any]:
        return _validate(self.model, value, path).model_dump(by_alias=True)


# --------------------------------------------------------------------------- matrix.yaml

_TOLERANCE_FIELDS: dict[str, tuple[Any, Any]] = {
    "rtol": (Annotated[float, _v(_number(0))], 0.0),
    "atol": (Annotated[float, _v(_number(0))], 0.0),
    "cosine_min": (Annotated[float, _v(_number(-1, 1))], 0.0),
    "rank1_delta": (Annotated[float, _v(_number(0, 1, "a fraction, not %"))], 0.0),
    "map_delta": (Annotated[float, _v(_number(0, 1, "a fraction, not %"))], 0.0),
    "checks": (Annotated[list[str], _v(_list_of(_string(CHECK_NAMES), unique=True))], list(CHECK_NAMES)),
}


def _tolerance_model(name: str, defaults: dict[str, Any]) -> type[_Strict]:
    fields: dict[str, Any] = {k: (t, copy.deepcopy(defaults.get(k, d))) for k, (t, d) in _TOLERANCE_FIELDS.items()}
    return create_model(name, __base__=_Strict, **fields)


#: The tolerance section: ``TOLERANCE.check(dict(tol), "targets.t.tolerance")`` -> complete dict.
TOLERANCE = _Checker(_tolerance_model("Tolerance", {}))


class ExportSection(_Strict):
    opset: Annotated[int, _v(_integer(7, 100))] = 11
    input_name: Annotated[str, _NONEMPTY] = "image"
    output_name: Annotated[str, _NONEMPTY] = "class"
    dynamic_batch: Annotated[bool, _v(_boolean)] = True


class ModelSection(_Strict):
    arch: Annotated[str, _v(_string(ARCH_CONTRACTS))] = "reid-strong-baseline"
    checkpoint: Annotated[
        str | None, _v(_optional(_string(pattern=r".*\S.*", example="a path, or null for seeded random weights")))
    ] = None
    seed: Annotated[int, _v(_integer(0, MAX_SEED))] = 0
    num_classes: Annotated[int, _v(_integer(1, 1_000_000))] = 751
    last_stride: Annotated[int, _v(_integer(1, 2))] = 1
    neck_feat: Annotated[str, _v(_string(["after", "before"]))] = "after"
    input_size: Annotated[list[int], _v(_list_of(_integer(*INPUT_SIDE, "pixels, H and W"), length=2))] = Field(
        default_factory=lambda: [256, 128]
    )
    calibration_batches: Annotated[int, _v(_integer(1, 1000))] = 4
    export: ExportSection = Field(default_factory=ExportSection)


class SyntheticSection(_Strict):  # the same ranges data.make_synthetic checks
    identities: Annotated[int, _v(_integer(2, 3000))] = 30
    cameras: Annotated[int, _v(_integer(2, 6))] = 6
    gallery_per_camera: Annotated[int, _v(_integer(1, 50))] = 2
    junk: Annotated[int, _v(_integer(0, 1000))] = 4
    distractors: Annotated[int, _v(_integer(0, 1000))] = 6
    seed: Annotated[int, _v(_integer(0, MAX_SEED))] = 0


class DataSection(_Strict):
    dataset: Annotated[str, _NONEMPTY] = "data/market1501-synthetic"
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    limit: Annotated[int | None, _v(_optional(_integer(1)))] = None
    ascend_bins: Annotated[bool, _v(_boolean)] = True
    workers: Annotated[int, _v(_integer(0, 1024))] = 0


class VerifySection(_Strict):
    reference: Annotated[str, _v(_string())] = "torch"
    max_rank: Annotated[int, _v(_integer(1, 100_000))] = 50


class BaseSpec(_Strict):
    suite: Annotated[str, _NONEMPTY]
    variant: Annotated[str, _v(_string())] = "minbase"
    mirror: Annotated[str, _v(_string())] = "auto"
    # Debian's snapshot archive at this time instead of the mirror (debuerreotype's native mode)
    timestamp: Annotated[str | None, _v(_optional(_timestamp))] = None
    tag: Annotated[str, _NONEMPTY]


class ImagesSection(_Strict):
    ca_bundle: Annotated[str | None, _v(_optional(_string()))] = "auto"
    wheelhouses: Annotated[list[str], _v(_list_of(_string()))] = Field(default_factory=list)
    registry: Annotated[str | None, _v(_optional(_string()))] = None
    memory_limit: Annotated[str, _v(_string(pattern=r"\d+(\.\d+)?[bkmgBKMG]?", example="8g or 512m"))] = "8g"
    bases: Annotated[dict[str, BaseSpec], _Mapping] = Field(default_factory=dict)


class MatrixFile(_Strict):
    """matrix.yaml; ``targets`` holds raw stanzas, each checked against its target's manifest."""

    workspace: Annotated[str, _NONEMPTY] = "workspace"
    runner: Annotated[str, _v(_string(["auto", "local", "docker"]))] = "auto"
    stage_timeout_s: Annotated[int, _v(_integer(1, MAX_TIMEOUT_S, "seconds, 7 days at most"))] = 3600
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    targets: Annotated[dict[str, Any], _Mapping] = Field(default_factory=dict)


_SIZE = _v(_string(pattern=r"\d+(\.\d+)?[bkmgBKMG]?", example="a size such as 8g or 512m"))


def _device_spec(value: Any) -> str:
    """``/dev/x`` or ``/dev/x:/dev/y[:rwm]`` (Docker's device syntax)."""
    text = _string()(value)
    parts = text.split(":")
    if (
        not parts[0].startswith("/dev/")
        or len(parts) > 3
        or (len(parts) == 3 and not re.fullmatch(r"[rwm]+", parts[2]))
    ):
        raise _err(f"expected /dev/NAME or /dev/NAME:/dev/NAME[:rwm], got {text!r}")
    return text


def _ulimit(value: Any) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"soft": value, "hard": value}
    m = _mapping(value)
    unknown = [k for k in m if k not in ("soft", "hard")]
    if unknown or not m:
        raise _err("expected a number, or {soft: N, hard: N}")
    soft = _integer(lo=-1)(m.get("soft", m.get("hard")))
    hard = _integer(lo=-1)(m.get("hard", soft))
    return {"soft": soft, "hard": hard}


class GpuRequest(_Strict):
    """Which GPUs a stage container gets (Docker's DeviceRequest): ``count`` (-1 = all) or ``device_ids``."""

    count: Annotated[int | None, _v(_integer(lo=-1))] = None
    device_ids: Annotated[list[str], _v(_list_of(_string(), unique=True))] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self) -> GpuRequest:
        if self.count is not None and self.device_ids:
            raise _err("give count or device_ids, not both")
        return self


class ContainerOptions(_Strict):
    """What a target's stage containers get from the Docker runner, declared instead of special-cased:
    in targets/<t>/target.yaml (the target's needs) and overridable per matrix.yaml stanza (this
    host's device ids). Every field left out keeps the manifest's value."""

    devices: Annotated[list[str], _v(_list_of(_device_spec, unique=True))] = Field(default_factory=list)
    group_add: Annotated[list[str], _v(_list_of(_string(), unique=True))] = Field(default_factory=list)
    shm_size: Annotated[str | None, _SIZE] = None
    ulimits: Annotated[dict[str, dict[str, int]], _v(_dict_of(_ulimit))] = Field(default_factory=dict)
    env: Annotated[dict[str, str], _v(_dict_of(_string()))] = Field(default_factory=dict)
    binds_ro: Annotated[
        list[str], _v(_list_of(_string(pattern=r"/.*", example="an absolute host path"), unique=True))
    ] = Field(default_factory=list)
    gpus: GpuRequest | None = None


def _docker_host(value: Any) -> str | None:
    if value is None:
        return None
    text = _string()(value)
    if not re.fullmatch(r"(unix|tcp|ssh|npipe)://\S+", text):
        raise _err(
            f"expected an engine address such as unix:///var/run/docker.sock, tcp://host:2376 or "
            f"ssh://user@host, got {text!r}"
        )
    return text


class _StanzaBase(_Strict):
    """targets.<t> in matrix.yaml; params, tolerance and image come from the target's manifest."""

    enabled: Annotated[bool, _v(_boolean)] = True
    required: Annotated[bool, _v(_boolean)] = False
    allow_skip: Annotated[str | None, _v(_skip_reason)] = None
    #: the Docker engine this target's stages run on (default: DOCKER_HOST / the local socket)
    docker_host: Annotated[str | None, _v(_docker_host)] = None

    @model_validator(mode="after")
    def _no_contradiction(self) -> _StanzaBase:
        if self.required and self.allow_skip is not None:
            raise _err(
                "contradicts required: true (a required target must run; a skip fails the run): drop one of the two",
                "allow_skip",
            )
        return self


# --------------------------------------------------------------------------- target manifests

_ITEM_CHECKS: dict[str, Callable[..., Callable[[Any], Any]]] = {"int": _integer, "float": _number, "number": _number}


def _value_check(
    kind: str, lo: float | None = None, hi: float | None = None, choices: list[Any] | None = None
) -> Callable[[Any], Any]:
    """The validator for one value of a param type (list items use the item type)."""
    if kind in _ITEM_CHECKS:
        base = _ITEM_CHECKS[kind](lo, hi)
    elif kind == "bool":
        base = _boolean
    elif kind == "str":
        base = _string()
    else:
        base = _scalar
    if not choices:
        return base

    def check(value: Any) -> Any:
        value = base(value)
        if value not in choices:
            raise _err(f"expected one of {', '.join(str(c) for c in choices)}, got {value!r}")
        return value

    return check


class ParamSpec(_Strict):
    type: Annotated[str, _v(_string(PARAM_TYPES))] = "str"
    default: Any = None
    min: Annotated[float | None, _v(_optional(_number(keep_int=True)))] = None
    max: Annotated[float | None, _v(_optional(_number(keep_int=True)))] = None
    choices: Annotated[list[Any] | None, _v(_optional(_list_of(_scalar, unique=True)))] = None
    help: Annotated[str | None, _v(_optional(_string()))] = None
    items: Annotated[str | None, _v(_optional(_string(ITEM_TYPES)))] = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        kind = self.items if self.type == "list" else self.type
        numeric = kind in ("int", "float", "number")
        for key in ("min", "max"):
            if getattr(self, key) is not None and not numeric:
                raise _err(f"only for int, float or number params (or lists of them); this one is {self.type}", key)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _err(f"must be >= min ({self.min:g}), got {self.max:g}", "max")
        if self.items is not None and self.type != "list":
            raise _err(f"only for list params; this one is {self.type}", "items")
        if self.choices is not None:
            if kind == "bool":
                raise _err("not for true/false params", "choices")
            if not self.choices:
                raise _err("expected at least one choice", "choices")
            item = _value_check(kind or "list", self.min, self.max)
            for i, c in enumerate(self.choices):
                try:
                    item(c)
                except PydanticCustomError as exc:
                    raise _nested(exc, "choices", i) from None
        if self.default is not None:
            try:
                self.default = self.value_check()(self.default)
            except PydanticCustomError as exc:
                raise _nested(exc, "default") from None
        return self

    def value_check(self) -> Callable[[Any], Any]:
        """The validator for a value of this param in matrix.yaml."""
        if self.type == "list":
            return _list_of(_value_check(self.items or "list", self.min, self.max, self.choices))
        return _value_check(self.type, self.min, self.max, self.choices)


_NameList = Annotated[
    list[str],
    _v(
        _list_of(
            _string(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", example="a name such as numpy or nvidia-gpu"), unique=True
        )
    ),
]


class Requires(_Strict):
    """What a target (or one stage) needs where it runs."""

    modules: _NameList = Field(default_factory=list)  # Python modules (probed without importing)
    commands: _NameList = Field(default_factory=list)  # executables on PATH
    devices: _NameList = Field(default_factory=list)  # device kinds (runners.base.DEVICE_PROBES)


_Reasons = Annotated[dict[str, str], _v(_dict_of(_string(pattern=r".*\S.*", example="a reason")))]


class StageSpec(_Strict):
    inputs: Annotated[dict[str, Any], _v(_dict_of(_input_decl))] = Field(default_factory=dict)
    params: Annotated[list[str], _v(_list_of(_string(), unique=True))] = Field(default_factory=list)
    outputs: Annotated[list[str], _v(_list_of(_output_name, unique=True))] = Field(default_factory=list)
    on_demand: Annotated[bool, _v(_boolean)] = False
    requires: Requires = Field(default_factory=Requires)
    #: output -> why its bytes differ from run to run (a vendor tool's timing); compared by outputs instead
    nondeterministic: _Reasons = Field(default_factory=dict)


class UserFile(_Strict):
    """A file the user must supply to build the image (a proprietary installer): checked by sha256."""

    name: Annotated[str, _v(_string(pattern=_NAME, example="a Python identifier such as toolkit"))]
    filename: Annotated[str, _v(_output_name)]
    sha256: Annotated[str, _v(_string(pattern=r"[0-9a-f]{64}", example="64 lowercase hex digits"))]
    where: Annotated[str, _NONEMPTY]  # where the vendor publishes it (for the message)


class TargetImage(_Strict):
    base: Annotated[str, _v(_string())] = ""
    #: run in another target's image instead of one of its own (e.g. onnxruntime_int8 -> onnxruntime)
    use: Annotated[str | None, _v(_string(pattern=_NAME, example="a target name"))] = None
    files: Annotated[list[UserFile], BeforeValidator(lambda v: [] if v is None else v)] = Field(default_factory=list)


_PartialTolerance = create_model(
    "PartialTolerance", __base__=_Strict, **{k: (t, None) for k, (t, _) in _TOLERANCE_FIELDS.items()}
)  # type: ignore[call-overload]


class Manifest(_Strict):
    """targets/<t>/target.yaml."""

    name: Annotated[str, _v(_string(pattern=_NAME, example="a Python identifier (the folder name)"))]
    summary: Annotated[str, _v(_string())] = ""
    requires: Requires = Field(default_factory=Requires)
    image: TargetImage = Field(default_factory=TargetImage)
    params: Annotated[dict[str, ParamSpec], _Mapping] = Field(default_factory=dict)
    stages: Annotated[dict[str, StageSpec | None], _Mapping]
    tolerance: _PartialTolerance = Field(default_factory=_PartialTolerance)
    container: ContainerOptions = Field(default_factory=ContainerOptions)

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        for pname in self.params:
            if not re.fullmatch(_NAME, pname) or pname == "model":
                raise _err(
                    "a param name is a Python identifier other than `model` (stages list "
                    "`model` for the model section)",
                    "params",
                    pname,
                )
        if not self.stages:
            raise _err("no stages: declare at least one (stages: {infer: {...}})", "stages")
        for sname, stage in self.stages.items():
            if not re.fullmatch(_NAME, sname):
                raise _err(
                    f"stage name {sname!r} must be a Python identifier (it runs as "
                    f"python -m targets.{self.name}.<stage>)",
                    "stages",
                    sname,
                )
            if stage is None:
                self.stages[sname] = stage = StageSpec()
            for oname in stage.nondeterministic:
                if oname not in stage.outputs:
                    raise _err(
                        f"{oname!r} is not one of this stage's outputs ({', '.join(stage.outputs) or 'none'})",
                        "stages",
                        sname,
                        "nondeterministic",
                        oname,
                    )
            for i, pname in enumerate(stage.params):
                if pname != "model" and pname not in self.params:
                    declared = ", ".join(self.params) or "none"
                    raise _err(
                        f"{pname!r} is not declared under params: (declared: {declared}; `model` is the model section)",
                        "stages",
                        sname,
                        "params",
                        i,
                    )
            for iname, decl in stage.inputs.items():
                ref = decl["from"] if isinstance(decl, dict) else decl
                for pname in decl["when"] if isinstance(decl, dict) else {}:
                    if pname not in stage.params:
                        raise _err(
                            f"condition on {pname!r}, which is not one of this stage's params "
                            f"({', '.join(stage.params) or 'none'})",
                            "stages",
                            sname,
                            "inputs",
                            iname,
                            "when",
                            pname,
                        )
                producer = ref.split("/", 1)[0]
                target, _, other = producer.partition(".")
                if target == self.name and other not in self.stages:
                    raise _err(
                        f"{self.name} has no stage {other!r} (stages: {', '.join(self.stages)})",
                        "stages",
                        sname,
                        "inputs",
                        iname,
                    )
        return self


@dataclass
class StageDef:
    name: str
    inputs: dict[str, str]  # input name -> "producer/file", optional when ending in "?"
    params: list[str]
    outputs: list[str]
    on_demand: bool = False  # e.g. bench: run by its own task, not part of `invoke matrix`
    #: modules/commands/devices this stage needs: the stage's own lists, else the target's
    requires: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in REQUIRE_KINDS})
    #: input name -> {param: [values]}: the input is read only when each param has one of its values
    when: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: output -> why it is not byte-identical from run to run (target.yaml ``nondeterministic:``)
    nondeterministic: dict[str, str] = field(default_factory=dict)

    def inputs_for(self, params: dict[str, Any]) -> dict[str, str]:
        """The inputs this stage reads with these (resolved) parameter values."""
        return {
            name: ref
            for name, ref in self.inputs.items()
            if all(params.get(k) in values for k, values in self.when.get(name, {}).items())
        }


@dataclass
class TargetDef:
    name: str
    summary: str
    folder: Path
    requires: dict[str, list[str]]
    image: dict[str, Any]
    params: dict[str, dict[str, Any]]
    stages: dict[str, StageDef]
    tolerance: dict[str, Any] = field(default_factory=dict)  # the keys the manifest sets
    container: dict[str, Any] = field(default_factory=dict)  # ContainerOptions, complete

    @property
    def matrix_stages(self) -> dict[str, StageDef]:
        """The stages `invoke matrix` runs (on-demand ones such as bench excluded)."""
        return {n: s for n, s in self.stages.items() if not s.on_demand}

    @property
    def dockerfile(self) -> Path:
        return self.folder.parent.parent / "images" / self.name / "Dockerfile"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def load_target(folder: Path) -> TargetDef:
    path = Path(folder) / "target.yaml"
    where = _display(path)
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(path), where, 1)) from None
    try:
        spec: Manifest = _validate(Manifest, raw, "")  # type: ignore[assignment]
        if spec.name != folder.name:
            raise ConfigError(f"name: {spec.name!r} must equal the folder name {folder.name!r}")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    requires = spec.requires.model_dump()
    stages = {}
    for sname, s in spec.stages.items():
        assert s is not None  # _cross_checks fills empty stages
        own = s.requires.model_fields_set
        merged = {k: list(getattr(s.requires, k) if k in own else requires[k]) for k in REQUIRE_KINDS}
        refs = {k: (v["from"] if isinstance(v, dict) else v) for k, v in s.inputs.items()}
        when = {k: v["when"] for k, v in s.inputs.items() if isinstance(v, dict)}
        stages[sname] = StageDef(
            sname, refs, list(s.params), list(s.outputs), s.on_demand, merged, when, dict(s.nondeterministic)
        )
    given: BaseModel = spec.tolerance
    tolerance = {k: copy.deepcopy(getattr(given, k)) for k in given.model_fields_set}
    return TargetDef(
        name=spec.name,
        summary=spec.summary,
        folder=folder,
        requires=requires,
        image=spec.image.model_dump(),
        params={k: p.model_dump() for k, p in spec.params.items()},
        stages=stages,
        tolerance=tolerance,
        container=spec.container.model_dump(),
    )


def discover_targets(targets_dir: Path = TARGETS_DIR) -> dict[str, TargetDef]:
    return {p.name: load_target(p) for p in sorted(Path(targets_dir).iterdir()) if (p / "target.yaml").is_file()}


_STANZA_MODELS: dict[str, type[_Strict]] = {}


def target_stanza_model(t: TargetDef) -> type[_Strict]:
    """The model of ``targets.<t.name>`` in matrix.yaml, with the manifest's params and defaults."""
    key = json.dumps([t.name, t.params, t.tolerance, t.image, t.container], sort_keys=True, default=repr)
    if key not in _STANZA_MODELS:
        _STANZA_MODELS[key] = _build_stanza_model(t)
    return _STANZA_MODELS[key]


def _build_stanza_model(t: TargetDef) -> type[_Strict]:
    params: dict[str, Any] = {}
    for i, (pname, raw) in enumerate(t.params.items()):
        spec: ParamSpec = _validate(ParamSpec, raw, f"params.{pname}")  # type: ignore[assignment]
        params[f"p{i}"] = (
            Annotated[Any, _v(spec.value_check())],
            Field(default=copy.deepcopy(spec.default), alias=pname),
        )
    param_model = create_model(f"Params_{t.name}", __base__=_Strict, **params)
    tol_model = _tolerance_model(f"Tolerance_{t.name}", t.tolerance)

    class Image(_Strict):
        base: Annotated[str, _v(_string())] = t.image.get("base", "")
        build_args: Annotated[dict[str, str], _v(_dict_of(_string()))] = Field(default_factory=dict)
        #: name -> path of the user-supplied files the manifest's image.files declares
        files: Annotated[dict[str, str], _v(_dict_of(_string()))] = Field(default_factory=dict)

        @model_validator(mode="after")
        def _declared(self) -> Any:
            names = [f.get("name") for f in t.image.get("files") or []]
            for name in self.files:
                if name not in names:
                    raise _err(
                        f"targets/{t.name}/target.yaml declares no such file (image.files: "
                        f"{', '.join(map(str, names)) or 'none'})",
                        "files",
                        name,
                    )
            return self

    Image.__name__ = f"Image_{t.name}"
    defaults = dict(t.container)

    def container(value: Any) -> dict[str, Any]:
        given = _mapping(value)
        try:
            checked = _validate(ContainerOptions, given, "")
        except ConfigError as exc:
            raise _err(str(exc)) from None
        return {**defaults, **{k: v for k, v in checked.model_dump().items() if k in given}}

    return create_model(
        f"Stanza_{t.name}",
        __base__=_StanzaBase,
        params=(param_model, Field(default_factory=param_model)),
        tolerance=(tol_model, Field(default_factory=tol_model)),
        image=(Image, Field(default_factory=Image)),
        container=(Annotated[dict[str, Any], _v(container)], Field(default_factory=lambda: dict(defaults))),
    )


def target_schema(t: TargetDef) -> _Checker:
    """``target_schema(t).check(stanza, "targets.t") -> dict`` (the old interface)."""
    return _Checker(target_stanza_model(t))


# --------------------------------------------------------------------------- loading


@dataclass
class Matrix:
    path: Path
    root: Path  # folder of matrix.yaml; relative paths are taken from here
    raw: dict[str, Any]  # validated, defaults filled
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


_EXAMPLE = "e.g. `targets: {torch: {}, onnxruntime: {}}` (see the shipped matrix.yaml)"


def load_matrix(
    path: str | Path = "matrix.yaml", overrides: dict[str, Any] | None = None, targets_dir: Path = TARGETS_DIR
) -> Matrix:
    path = Path(path)
    raw = read_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: empty: nothing to build or check; list the targets, {_EXAMPLE}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    known = discover_targets(targets_dir)
    try:
        top = _validate(MatrixFile, raw, "")
        data = top.model_dump()
        if not data["targets"]:
            raise ConfigError(
                f"targets: no targets; list at least the reference ({data['verify']['reference']!r}), {_EXAMPLE}"
            )
        out = {}
        for name, stanza in data["targets"].items():
            if name not in known:
                raise ConfigError(
                    f"targets.{name}: unknown target (known: {', '.join(known)}); "
                    "a target is a folder targets/<name>/ with a target.yaml"
                )
            out[name] = target_schema(known[name]).check(stanza, f"targets.{name}")
        data["targets"] = out
        if data["verify"]["reference"] not in out:
            raise ConfigError(f"verify.reference: {data['verify']['reference']!r} is not a target in targets")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    log.debug("%s: %d targets, %d enabled", path, len(out), sum(c["enabled"] for c in out.values()))
    return Matrix(path=path.resolve(), root=path.resolve().parent, raw=data, targets={n: known[n] for n in out})


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a mapping")
    d[keys[-1]] = value
