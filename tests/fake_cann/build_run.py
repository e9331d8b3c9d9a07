"""Write the FAKE toolkit installer (tests/fake_cann): a self-extracting shell script like Huawei's
``Ascend-cann-toolkit_5.0.1_linux-x86_64.run`` (makeself), carrying fake_atc.py as ``atc``.

``python tests/fake_cann/build_run.py OUT_DIR`` or :func:`build_run`. The output is deterministic
(fixed tar mtimes, no gzip timestamp), so its sha256 is stable across runs.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_NAME = "Ascend-cann-toolkit_5.0.1_linux-x86_64.run"
BENCHMARK_NAME = "benchmark.x86_64"
VERSION_INFO = "Version=5.0.1\nversion_dir=5.0.1\ntest_double=true\n"

HEADER = r"""#!/bin/sh
# FAKE CANN 5.0.1 toolkit installer (modelmatrix tests/fake_cann): a TEST DOUBLE, not Huawei's.
# Honours --install --quiet [--install-path=DIR] [--install-for-all]; refuses anything else.
set -eu
install=0; quiet=0; path=/usr/local/Ascend
for arg in "$@"; do
    case "$arg" in
        --install) install=1 ;;
        --quiet) quiet=1 ;;
        --install-for-all) ;;
        --install-path=*) path="${arg#--install-path=}" ;;
        *) echo "[Toolkit] [ERROR]: unsupported parameter: $arg" >&2; exit 1 ;;
    esac
done
if [ "$install" != 1 ]; then echo "[Toolkit] [ERROR]: nothing to do: give --install" >&2; exit 1; fi
if [ "$quiet" != 1 ]; then echo "[Toolkit] [ERROR]: this fake installs only non-interactively (--quiet)" >&2; exit 1; fi
dest="$path/ascend-toolkit/5.0.1"
mkdir -p "$dest"
line=$(awk '/^__PAYLOAD_BELOW__$/ {print NR + 1; exit 0}' "$0")
tail -n +"$line" "$0" | base64 -d | tar -xzf - -C "$dest"
ln -sfn 5.0.1 "$path/ascend-toolkit/latest"
chmod -R a+rX "$path"
echo "[Toolkit] [INFO]: Ascend-cann-toolkit 5.0.1 (FAKE) install success, path: $dest"
exit 0
__PAYLOAD_BELOW__
"""


def _payload() -> bytes:
    buf = io.BytesIO()
    entries = [
        ("atc/bin/atc", (HERE / "fake_atc.py").read_bytes(), 0o755),
        ("version.info", VERSION_INFO.encode(), 0o644),
        ("atc/version.info", VERSION_INFO.encode(), 0o644),
    ]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in (
            "atc",
            "atc/bin",
            "atc/lib64",
            "atc/python",
            "atc/python/site-packages",
            "atc/ccec_compiler",
            "atc/ccec_compiler/bin",
            "acllib",
            "acllib/lib64",
            "opp",
        ):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 315532800
            tf.addfile(info)
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 315532800
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def build_run(out_dir: Path) -> dict:
    """Write the fake installer and the fake benchmark tool into ``out_dir``; returns their paths and sha256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = out_dir / RUN_NAME
    body = base64.encodebytes(_payload())
    run.write_bytes(HEADER.encode() + body)
    run.chmod(0o755)
    bench = out_dir / BENCHMARK_NAME
    bench.write_bytes((HERE / "fake_benchmark.py").read_bytes())
    bench.chmod(0o755)
    return {
        name: {"path": p, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for name, p in (("toolkit", run), ("benchmark", bench))
    }


if __name__ == "__main__":
    for name, row in build_run(Path(sys.argv[1])).items():
        print(name, row["path"], row["sha256"])
