"""The TensorRT target's pure logic: which ONNX a precision builds, the optimization profile, the
batches, the engine sidecar and when an engine is stale, parser-error messages, and the equivalent
``trtexec`` command for a dry run.

Standard library only (no tensorrt, no numpy): the host's tests import it, and so do convert.py and
infer.py inside the image. Everything that needs TensorRT or a GPU lives in those two and in
cudart.py, imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from targets.common.contract import StageError

SIDECAR_SCHEMA = "modelmatrix-tensorrt-engine-1"
ENGINE_NAME = "model.engine"
SIDECAR_NAME = "model.engine.json"
TIMING_CACHE_NAME = "timing.cache"

#: precision -> (the convert stage's input name, the file, the stage that writes it). Strongly typed:
#: the ONNX's tensor types are the precision, so each precision is a different ONNX file.
PRECISION_INPUTS: Dict[str, Tuple[str, str, str]] = {
    "fp32": ("onnx", "model.onnx", "torch.export"),
    "fp16": ("fp16", "model.fp16.onnx", "quantize.fp16"),
    "int8": ("qdq", "model.qdq.onnx", "quantize.int8"),
}


# --------------------------------------------------------------------------- inputs per precision


def onnx_input(precision: str, inputs: Mapping[str, Path]) -> Tuple[str, Path]:
    """(input name, path) of the ONNX this precision builds, or one line naming the stage to run."""
    if precision not in PRECISION_INPUTS:
        raise StageError(f"precision: expected one of {', '.join(PRECISION_INPUTS)}, got {precision!r}")
    name, file, producer = PRECISION_INPUTS[precision]
    path = inputs.get(name)
    hint = (
        f"run {producer} first (enable the {producer.split('.')[0]} target in matrix.yaml)"
        if precision != "fp32"
        else "run torch.export first"
    )
    if path is None:
        raise StageError(f"precision {precision} builds {producer}/{file}, which this stage was not given; {hint}")
    if not Path(path).is_file():
        raise StageError(f"{path}: not found (precision {precision} builds {producer}/{file}); {hint}")
    return name, Path(path)


# --------------------------------------------------------------------------- the optimization profile


def dims(shape: Any) -> Tuple[int, ...]:
    """A ``tensorrt.Dims`` (indexable, with a length; not typed as iterable) as a tuple of ints."""
    return tuple(int(shape[i]) for i in range(len(shape)))


@dataclass(frozen=True)
class Profile:
    """One optimization profile for the one image input: batch min 1, opt batch_size, max max_batch."""

    input: str
    chw: Tuple[int, int, int]
    min_batch: int
    opt_batch: int
    max_batch: int

    def shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        return ((self.min_batch,) + self.chw, (self.opt_batch,) + self.chw, (self.max_batch,) + self.chw)

    def as_json(self) -> Dict[str, Any]:
        lo, opt, hi = self.shapes()
        return {"input": self.input, "min": list(lo), "opt": list(opt), "max": list(hi)}


def plan_profile(
    input_name: str, shape: Sequence[int], batch_size: int, max_batch: int, where: str = "the ONNX model"
) -> Profile:
    """The profile for an input of ``shape`` as TensorRT's network reports it (-1 = dynamic)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4:
        raise StageError(f"{where}: input {input_name!r} has shape {list(shape)}, expected (batch, 3, H, W)")
    if any(v < 1 for v in shape[1:]):
        raise StageError(
            f"{where}: input {input_name!r} has a dynamic C/H/W ({list(shape)}); export with a fixed model.input_size"
        )
    if batch_size < 1 or max_batch < 1:
        raise StageError(f"batch_size and max_batch must be >= 1, got {batch_size} and {max_batch}")
    if batch_size > max_batch:
        raise StageError(
            f"batch_size {batch_size} is larger than max_batch {max_batch} (the optimization "
            "profile's max); raise targets.tensorrt.params.max_batch or lower batch_size"
        )
    chw = (shape[1], shape[2], shape[3])
    if shape[0] >= 1:  # a fixed batch: one shape only
        if shape[0] != batch_size:
            raise StageError(
                f"{where}: exported with a fixed batch of {shape[0]}, but batch_size is {batch_size}; "
                "export with model.export.dynamic_batch: true"
            )
        return Profile(input_name, chw, shape[0], shape[0], shape[0])
    return Profile(input_name, chw, 1, batch_size, max_batch)


def plan_batches(n_images: int, batch_size: int, profile_max: int, profile_min: int = 1) -> List[Tuple[int, int]]:
    """[(start, stop), ...] over ``n_images``, the last partial batch included; a batch the engine's
    profile cannot take is refused before any work."""
    if batch_size < 1:
        raise StageError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > profile_max:
        raise StageError(
            f"batch_size {batch_size} is larger than the engine's optimization profile max "
            f"{profile_max}; rebuild the engine with targets.tensorrt.params.max_batch >= "
            f"{batch_size} or lower batch_size"
        )
    batches = [(i, min(i + batch_size, n_images)) for i in range(0, n_images, batch_size)]
    small = [b for b in batches if b[1] - b[0] < profile_min]
    if small:
        raise StageError(
            f"a batch of {small[0][1] - small[0][0]} images is below the engine's profile min "
            f"{profile_min} (a fixed-batch engine needs a multiple of {profile_min} images)"
        )
    return batches


# --------------------------------------------------------------------------- the sidecar


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_sidecar(
    *,
    tensorrt_version: str,
    device: Mapping[str, Any],
    precision: str,
    profile: Profile,
    io: List[Dict[str, Any]],
    onnx_file: str,
    onnx_sha256: str,
    engine_sha256: str,
    builder: Mapping[str, Any],
) -> Dict[str, Any]:
    """What an engine was built by and for: TensorRT refuses (or misbehaves on) an engine of another
    TensorRT version or GPU, so infer checks these before deserializing."""
    return {
        "schema": SIDECAR_SCHEMA,
        "tensorrt": tensorrt_version,
        "gpu": {"name": device.get("name"), "compute_capability": device.get("compute_capability")},
        "cuda_driver": device.get("cuda_driver"),
        "precision": precision,
        "profile": profile.as_json(),
        "io": io,
        "onnx": {"file": onnx_file, "sha256": onnx_sha256},
        "engine_sha256": engine_sha256,
        "builder": dict(builder),
    }


def read_sidecar(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run tensorrt.convert") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not a readable engine sidecar ({exc}); run tensorrt.convert again") from None
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise StageError(
            f"{path}: not an engine sidecar of this code (schema "
            f"{data.get('schema') if isinstance(data, dict) else None!r}); run tensorrt.convert again"
        )
    for key in ("tensorrt", "gpu", "profile", "io", "engine_sha256"):
        if key not in data:
            raise StageError(f"{path}: sidecar has no {key!r}; run tensorrt.convert again")
    return data


def stale_reason(sidecar: Mapping[str, Any], tensorrt_version: str, device: Mapping[str, Any]) -> Optional[str]:
    """Why an engine must not be loaded here (another TensorRT version, another GPU), or None."""
    built_gpu = sidecar.get("gpu") or {}
    if sidecar.get("tensorrt") != tensorrt_version:
        return f"it was built by TensorRT {sidecar.get('tensorrt')}, this is TensorRT {tensorrt_version}"
    here = (device.get("name"), device.get("compute_capability"))
    there = (built_gpu.get("name"), built_gpu.get("compute_capability"))
    if here != there:
        return (
            f"it was built for {there[0]} (compute capability {there[1]}), this GPU is {here[0]} "
            f"(compute capability {here[1]})"
        )
    return None


def check_engine_file(engine: Path, sidecar: Mapping[str, Any], sidecar_path: Path) -> bytes:
    """The engine's bytes, when they are the ones the sidecar describes (a truncated or replaced
    engine is refused before TensorRT ever sees it)."""
    try:
        data = Path(engine).read_bytes()
    except FileNotFoundError:
        raise StageError(f"{engine}: not found; run tensorrt.convert") from None
    if not data:
        raise StageError(f"{engine}: empty; run tensorrt.convert again")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar.get("engine_sha256"):
        raise StageError(
            f"{engine}: sha256 {digest[:12]} is not the {str(sidecar.get('engine_sha256'))[:12]} "
            f"{sidecar_path.name} records: the engine file is corrupt or was replaced; run "
            "tensorrt.convert again (invoke matrix --target tensorrt --force)"
        )
    return data


def io_tensor(sidecar: Mapping[str, Any], mode: str, where: Path) -> Dict[str, Any]:
    """The one input (mode "input") or output ("output") tensor the sidecar lists."""
    found = [t for t in sidecar.get("io", []) if t.get("mode") == mode]
    if len(found) != 1:
        raise StageError(
            f"{where}: the engine has {len(found)} {mode} tensors, expected one "
            f"({', '.join(t.get('name', '?') for t in found) or 'none'})"
        )
    return found[0]


# --------------------------------------------------------------------------- messages


def describe_parser_errors(onnx: Path, errors: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """One line listing every parser error as ``node N 'name' (op Op): message``."""
    parts = []
    for e in errors:
        node = e.get("node", -1)
        name = e.get("node_name") or ""
        op = e.get("op") or "?"
        where = f"node {node}" + (f" {name!r}" if name else "") if isinstance(node, int) and node >= 0 else "graph"
        desc = " ".join(str(e.get("desc", "")).split())[:200]
        parts.append(f"{where} (op {op}): {desc}")
    shown = "; ".join(parts[:limit]) + (f"; and {len(parts) - limit} more" if len(parts) > limit else "")
    return (
        f"{onnx}: TensorRT's ONNX parser refused it ({len(parts)} error{'s' * (len(parts) != 1)}): "
        f"{shown or 'no error reported'}; an op TensorRT cannot take has to be replaced at export"
    )


# --------------------------------------------------------------------------- dry run


def trtexec_command(
    onnx: Path, profile: Profile, workspace_mib: int, engine: Path, timing_cache: Path, tf32: bool = False
) -> List[str]:
    """The ``trtexec`` line that builds the same engine (for a dry run, and to reproduce by hand)."""
    lo, opt, hi = ("x".join(str(v) for v in s) for s in profile.shapes())
    cmd = [
        "trtexec",
        f"--onnx={onnx}",
        "--stronglyTyped",
        f"--minShapes={profile.input}:{lo}",
        f"--optShapes={profile.input}:{opt}",
        f"--maxShapes={profile.input}:{hi}",
        f"--memPoolSize=workspace:{workspace_mib}M",
        f"--timingCacheFile={timing_cache}",
        f"--saveEngine={engine}",
    ]
    if not tf32:
        cmd.append("--noTF32")
    return cmd


def dry_run_lines(
    precision: str, onnx: Path, profile: Profile, workspace_mib: int, out_dir: Path, tf32: bool = False
) -> List[str]:
    """What convert would do, as lines for people: nothing runs."""
    lo, opt, hi = profile.shapes()
    return [
        f"tensorrt.convert: precision {precision} builds {onnx} strongly typed "
        f"(NetworkDefinitionCreationFlag.STRONGLY_TYPED; no builder precision flags)",
        f"  profile {profile.input}: min {list(lo)} opt {list(opt)} max {list(hi)}; "
        f"workspace pool {workspace_mib} MiB; TF32 {'on' if tf32 else 'off'}",
        f"  writes {out_dir / ENGINE_NAME}, {out_dir / SIDECAR_NAME}, {out_dir / TIMING_CACHE_NAME}",
        "  same as: "
        + shlex.join(
            trtexec_command(onnx, profile, workspace_mib, out_dir / ENGINE_NAME, out_dir / TIMING_CACHE_NAME, tf32)
        ),
    ]
