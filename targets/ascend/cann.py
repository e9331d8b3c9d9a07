"""CANN 5.0.1 as the Ascend ModelZoo ReID guide uses it: the atc and benchmark command lines, the
toolkit's version, and the files the benchmark tool reads and writes.

Everything here is plain Python 3.7 (the toolkit's interpreter) and the standard library; numpy is
imported only where arrays are read. The real toolkit was NOT executed on this project's machines
(it is proprietary and there is no Ascend device): the layouts below follow Huawei's documentation
and the guide, and the tests exercise them against a test double (tests/fake_cann).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from targets.common.contract import StageError

#: where the toolkit installs (``--install`` as root, the guide's ``install_path``)
INSTALL_PATH = "/usr/local/Ascend/ascend-toolkit/latest"
TOOLKIT_VERSION = "5.0.1"
#: the opset ATC 5.0.1 takes ("注意目前ATC支持的onnx算子版本为11")
ATC_OPSET = 11
#: a 310 card carries 4 chips; the guide's card throughput is Interface throughputRate x 4
CHIPS_PER_CARD = 4
BENCHMARK = "benchmark.x86_64"
#: the ONNX operators ATC 5.0.1 converts (default domain), transcribed from Huawei's "ATC ONNX operator
#: list" for CANN 5.0.x; not checked against the toolkit here (it was not available)
ATC_ONNX_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BitShift Cast
Ceil Celu Clip Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements
GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater HardSigmoid Hardmax Identity If
InstanceNormalization IsInf IsNaN LRN LSTM LeakyRelu Less Log LogSoftmax LpNormalization LpPool MatMul
Max MaxPool MaxRoiPool MaxUnpool Mean Min Mod Mul Multinomial Neg NonMaxSuppression NonZero Not OneHot
Or PRelu Pad Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where Xor
""".split()
)
PRECISION_MODES = ("force_fp16", "force_fp32", "allow_mix_precision", "allow_fp32_to_fp16", "must_keep_origin_dtype")
LOG_LEVELS = ("debug", "info", "warning", "error", "null")


# --------------------------------------------------------------------------- checks before atc


def check_onnx_for_atc(info: Dict[str, Any], path: Path) -> None:
    """Refuse, in one line, an ONNX that ATC 5.0.1 cannot take: an opset other than 11, or operators
    outside its list (all of them named, with their counts)."""
    opset = info["opsets"].get("")
    if opset != ATC_OPSET:
        raise StageError(
            "%s: ONNX opset %s; ATC (CANN %s) takes opset %d: export with model.export.opset: %d"
            % (path, opset, TOOLKIT_VERSION, ATC_OPSET, ATC_OPSET)
        )
    missing: Dict[str, int] = {}
    for domain, op, _name in info["ops"]:
        key = op if not domain else "%s:%s" % (domain, op)
        if domain or op not in ATC_ONNX_OPS:
            missing[key] = missing.get(key, 0) + 1
    if missing:
        listed = ", ".join("%s (%d node%s)" % (k, n, "s" if n > 1 else "") for k, n in sorted(missing.items()))
        raise StageError(
            "%s: operators ATC (CANN %s) does not convert: %s; change the model or its export"
            % (path, TOOLKIT_VERSION, listed)
        )


# --------------------------------------------------------------------------- command lines


def atc_command(
    model: str,
    output: str,
    input_name: str,
    batch: int,
    height: int,
    width: int,
    soc_version: str = "Ascend310",
    precision_mode: str = "force_fp16",
    log: str = "error",
    auto_tune_mode: str = "",
    atc: str = "atc",
) -> List[str]:
    """The guide's conversion, one batch size: ``atc --framework=5 --model=... --output=<stem>
    --input_format=NCHW --input_shape=image:<bs>,3,256,128 --log=... --soc_version=Ascend310``,
    plus --precision_mode (atc's own default is force_fp16) and --auto_tune_mode when given."""
    if precision_mode not in PRECISION_MODES:
        raise StageError("precision_mode %r: expected one of %s" % (precision_mode, ", ".join(PRECISION_MODES)))
    if log not in LOG_LEVELS:
        raise StageError("atc_log %r: expected one of %s" % (log, ", ".join(LOG_LEVELS)))
    if auto_tune_mode and not re.fullmatch(r"(RL|GA)(,(RL|GA))?", auto_tune_mode):
        raise StageError(
            "auto_tune_mode %r: expected RL, GA or RL,GA (the guide tunes bs16 with RL,GA)" % auto_tune_mode
        )
    cmd = [
        atc,
        "--framework=5",
        "--model=%s" % model,
        "--output=%s" % output,
        "--input_format=NCHW",
        "--input_shape=%s:%d,3,%d,%d" % (input_name, batch, height, width),
        "--log=%s" % log,
        "--soc_version=%s" % soc_version,
        "--precision_mode=%s" % precision_mode,
    ]
    if auto_tune_mode:
        cmd.append("--auto_tune_mode=%s" % auto_tune_mode)
    return cmd


def benchmark_command(
    om: str, info: str, batch: int, height: int, width: int, device_id: int = 0, exe: str = "./" + BENCHMARK
) -> List[str]:
    """The guide's inference: ``./benchmark.x86_64 -model_type=vision -device_id=0 -batch_size=1
    -om_path=... -input_text_path=./prep_bin.info -input_width=128 -input_height=256
    -output_binary=True -useDvpp=False``."""
    return [
        exe,
        "-model_type=vision",
        "-device_id=%d" % device_id,
        "-batch_size=%d" % batch,
        "-om_path=%s" % om,
        "-input_text_path=%s" % info,
        "-input_width=%d" % width,
        "-input_height=%d" % height,
        "-output_binary=True",
        "-useDvpp=False",
    ]


def om_name(batch: int) -> str:
    return "model_bs%d.om" % batch


def batch_sizes(params: Dict[str, Any]) -> List[int]:
    sizes = params.get("batch_sizes", [1, 16])
    if not (
        isinstance(sizes, list)
        and sizes
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
    ):
        raise StageError("batch_sizes: expected a list of integers >= 1, got %r" % (sizes,))
    return sorted(set(sizes))


# --------------------------------------------------------------------------- the installed toolkit


def find_tool(name: str, where: str) -> str:
    """The path of a toolkit executable on PATH, or a one-line StageError saying how to get it."""
    found = shutil.which(name)
    if found is None:
        raise StageError("%s is not on PATH; %s" % (name, where))
    return found


def toolkit_version(install_path: str = "") -> Dict[str, Any]:
    """The toolkit's version.info (``Version=5.0.1``...) as a dict, plus ``test_double: true`` when it
    says it is the project's fake (tests/fake_cann): reports produced with it must say so."""
    root = Path(install_path or os.environ.get("install_path") or INSTALL_PATH)
    out: Dict[str, Any] = {"install_path": str(root)}
    for candidate in (root / "version.info", root / "atc" / "version.info"):
        if candidate.is_file():
            for line in candidate.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    out[key.strip().lower()] = value.strip()
            break
    out["test_double"] = str(out.get("test_double", "")).lower() in ("1", "true", "yes")
    return out


# --------------------------------------------------------------------------- benchmark files


def read_info(path: Path) -> List[Tuple[int, str, int, int]]:
    """prep_bin.info (gen_dataset_info.py bin): lines ``<index> <path> <width> <height>``, indices 0..N-1."""
    rows = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise StageError("%s: not found; run prepare with data.ascend_bins: true" % path) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not (parts[0].isdigit() and parts[2].isdigit() and parts[3].isdigit()):
            raise StageError(
                "%s: line %d is not '<index> <path> <width> <height>': %r; run prepare again" % (path, n, line[:120])
            )
        rows.append((int(parts[0]), parts[1], int(parts[2]), int(parts[3])))
    if [r[0] for r in rows] != list(range(len(rows))):
        raise StageError("%s: indices are not 0..%d in order; run prepare again" % (path, len(rows) - 1))
    return rows


def rewrite_info(rows: Sequence[Tuple[int, str, int, int]], bins_dir: Path) -> str:
    """The info file for the benchmark tool with each path made absolute where the stage sees the
    .bin files (prepare writes them relative to its own folder: ``ascend/<stem>.bin``)."""
    out = []
    for index, rel, width, height in rows:
        path = Path(bins_dir) / Path(rel).name
        if any(ch.isspace() for ch in str(path)):
            raise StageError(
                "%s: the path contains whitespace, which would split its prep_bin.info line; "
                "move the workspace to a path without spaces" % path
            )
        out.append("%d %s %d %d\n" % (index, path, width, height))
    return "".join(out)


def check_bins(rows: Sequence[Tuple[int, str, int, int]], bins_dir: Path, chw: Tuple[int, int, int]) -> None:
    """Every .bin the info file names exists and holds one float32 C x H x W image (393,216 bytes at 256x128)."""
    expected = 4 * chw[0] * chw[1] * chw[2]
    for index, rel, width, height in rows:
        path = Path(bins_dir) / Path(rel).name
        if (width, height) != (chw[2], chw[1]):
            raise StageError(
                "%s: line %d says %dx%d, the model takes %dx%d (W x H); run prepare with the "
                "model's input_size" % (bins_dir / "prep_bin.info", index, width, height, chw[2], chw[1])
            )
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StageError(
                "%s: not found (prep_bin.info line %d names it); run prepare again" % (path, index)
            ) from None
        if size != expected:
            raise StageError(
                "%s: %d bytes, expected %d (float32 %dx%dx%d, no header); run prepare again"
                % (path, size, expected, chw[0], chw[1], chw[2])
            )


def dump_dir(result_dir: Path, device_id: int) -> Path:
    return Path(result_dir) / ("dumpOutput_device%d" % device_id)


def perf_file(result_dir: Path, batch: int, device_id: int) -> Path:
    return Path(result_dir) / ("perf_vision_batchsize_%d_device_%d.txt" % (batch, device_id))


def read_dump(result_dir: Path, device_id: int, stems: Sequence[str], dim: Optional[int]) -> Any:
    """features (N, D) float32 from ``dumpOutput_device<N>/<stem>_1.bin``, in the order of ``stems``
    (prep_bin.info's, which is inputs.npy's and index.json's), never the folder's. A missing or
    wrong-sized file is named (with how many more are missing)."""
    import numpy as np

    folder = dump_dir(result_dir, device_id)
    if not folder.is_dir():
        raise StageError("%s: the benchmark tool wrote no output folder; see its log" % folder)
    missing = [s for s in stems if not (folder / ("%s_1.bin" % s)).is_file()]
    if missing:
        more = " (and %d more)" % (len(missing) - 1) if len(missing) > 1 else ""
        raise StageError(
            "%s: no output for %s%s of %d inputs; the benchmark tool stopped early (see its log)"
            % (folder, "%s_1.bin" % missing[0], more, len(stems))
        )
    out = None
    for i, stem in enumerate(stems):
        path = folder / ("%s_1.bin" % stem)
        size = path.stat().st_size
        if size % 4 or size == 0 or (dim is not None and size != 4 * dim):
            want = "%d bytes (float32 x %d)" % (4 * dim, dim) if dim else "a non-empty multiple of 4 bytes"
            raise StageError("%s: %d bytes, expected %s; the OM's output is not the feature" % (path, size, want))
        row = np.fromfile(str(path), dtype="<f4")
        if out is None:
            dim = row.size
            out = np.empty((len(stems), dim), dtype=np.float32)
        out[i] = row
    if out is None:
        raise StageError("%s: no inputs were listed" % folder)
    return out


_PERF_LINE = re.compile(r"^\[(?P<stage>[a-z0-9 ]+)\]\s+(?P<rest>.*)$")
_PERF_ITEM = re.compile(r"^\s*(?P<key>[A-Za-z][A-Za-z ]*?):\s*(?P<value>[-+0-9.eE]+)\s*$")


def parse_perf(path: Path, chips_per_card: int = CHIPS_PER_CARD) -> Dict[str, Any]:
    """perf_vision_batchsize_<bs>_device_<N>.txt -> {stage: {key: value}} plus ``chip_fps`` (the
    [infer] line's Interface throughputRate) and ``card_fps`` (x chips per card, as the guide:
    361.547 x 4 = 1446.188). StageError naming the file for anything else."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise StageError("%s: the benchmark tool wrote no performance file; see its log" % path) from None
    stages: Dict[str, Dict[str, float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _PERF_LINE.match(line.strip())
        if not m:
            raise StageError(
                "%s: line %d is not '[stage] key: value, ...': %r (unexpected format; is this "
                "benchmark tool CANN %s's?)" % (path, n, line[:120], TOOLKIT_VERSION)
            )
        items: Dict[str, float] = {}
        for part in m.group("rest").split(","):
            im = _PERF_ITEM.match(part)
            if not im:
                raise StageError(
                    "%s: line %d: %r is not 'key: number' (unexpected format)" % (path, n, part.strip()[:80])
                )
            items[im.group("key").strip()] = float(im.group("value"))
        stages[m.group("stage").strip()] = items
    chip = stages.get("infer", {}).get("Interface throughputRate")
    if chip is None:
        raise StageError("%s: no '[infer] ... Interface throughputRate: N' line (unexpected format)" % path)
    return {
        "stages": stages,
        "chip_fps": chip,
        "chips_per_card": chips_per_card,
        "card_fps": round(chip * chips_per_card, 3),
    }


def entry(run: Any, dry_run: Any) -> None:
    """A stage module's entry point: ``--dry-run SPEC`` prints the command lines, else the stage runs."""
    from targets.common.contract import load_spec, main

    if len(sys.argv) == 3 and sys.argv[1] == "--dry-run":
        try:
            print("\n".join(dry_run(load_spec(sys.argv[2]))))
        except StageError as exc:
            print("error: %s" % exc, file=sys.stderr)
            sys.exit(2)
    else:
        main(run)
