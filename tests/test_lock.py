"""modelmatrix/lock.py and the pinned inputs of images/*: pip locks with hashes, apt pins, the epoch arg.

The build-failure texts below were captured from real failed builds on this project's engine (Docker
20.10, classic builder): a scratch recipe whose lock carried a wrong hash for six 1.16.0, and one that
asked the bookworm minbase's apt for a python3 version the mirror does not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelmatrix import images, lock
from modelmatrix.errors import ModelMatrixError

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"

# `docker build` of FROM <onnxruntime image> + pip install --require-hashes -r requirements.txt (six, wrong hash)
PIP_HASH_FAILURE = """\
Step 3/3 : RUN PIP_CERT=/tmp/ca.pem PIP_NO_CACHE_DIR=1 pip install --no-compile --no-deps --require-hashes \
--only-binary :all: --target /tmp/t -r /tmp/requirements.txt
 ---> Running in fccdec57e551
Collecting six==1.16.0
  Downloading six-1.16.0-py2.py3-none-any.whl (11 kB)
\x1b[91mERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. If you have updated the package \
versions, please update the hashes. Otherwise, examine the package contents carefully; someone may have tampered with them.
    six==1.16.0 from https://files.pythonhosted.org/packages/d9/5a/e7c31adbe875f2abbb91bd84cf2dc52d792b5a01506781dbcf2\
5c91daf11/six-1.16.0-py2.py3-none-any.whl (from -r /tmp/requirements.txt (line 1)):
        Expected sha256 0000000000000000000000000000000000000000000000000000000000000000
             Got        8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254

\x1b[0mThe command '/bin/sh -c PIP_CERT=/tmp/ca.pem PIP_NO_CACHE_DIR=1 pip install ...' returned a non-zero code: 1
""".splitlines()

# `docker build` of FROM modelmatrix/base:bookworm-minbase + apt-get install python3=3.11.2-0+gone1: apt's
# stderr "E: Version ..." arrives interleaved with its stdout (the "E" on a line of its own output).
APT_VERSION_FAILURE = """\
Building dependency tree...
\x1b[91mE\x1b[0mPackage python3 is not available, but is referred to by another package.
This may mean that the package is missing, has been obsoleted, or
is only available from another source
However the following packages replace it:
  python3-dev

\x1b[91m: Version '3.11.2-0+gone1' for 'python3' was not found
\x1b[0mThe command '/bin/sh -c apt="-o Dir::State::Lists=/tmp/mm-apt/lists ..."' returned a non-zero code: 100
""".splitlines()

# `apt-cache policy python3 python3-venv` in modelmatrix/base:bookworm-minbase (after apt-get update)
POLICY = """\
python3:
  Installed: (none)
  Candidate: 3.11.2-1+b1
  Version table:
     3.11.2-1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
python3-venv:
  Installed: (none)
  Candidate: 3.11.2-1+b1
  Version table:
     3.11.2-1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
ghost:
  Installed: (none)
  Candidate: (none)
"""


def test_a_hash_mismatch_names_the_package_and_the_lock():
    msg = lock.explain_build_failure(PIP_HASH_FAILURE, "images/torch/requirements.txt")
    assert msg is not None and "\n" not in msg
    assert msg.startswith("images/torch/requirements.txt: six==1.16.0 no longer matches its locked hash")
    assert "invoke lock" in msg


def test_the_lock_named_is_the_one_pip_read():
    lines = [ln.replace("/tmp/requirements.txt", "/tmp/mm/requirements-fake-toolkit.txt") for ln in PIP_HASH_FAILURE]
    msg = lock.explain_build_failure(lines, "images/ascend/requirements.txt")
    assert msg is not None and msg.startswith("images/ascend/requirements-fake-toolkit.txt: six==1.16.0 ")


def test_a_vanished_apt_version_names_the_package_and_the_recipe():
    msg = lock.explain_build_failure(APT_VERSION_FAILURE, "images/caffe/requirements.txt")
    assert msg is not None and "\n" not in msg
    assert msg.startswith("images/caffe/Dockerfile: apt pin python3=3.11.2-0+gone1 is no longer on the mirror")
    assert "invoke lock" in msg


def test_other_failures_are_not_explained():
    other = [ln for ln in PIP_HASH_FAILURE if "HASHES" not in ln]
    assert lock.explain_build_failure(other, "images/torch/requirements.txt") is None
    assert lock.explain_build_failure(["E: Unable to locate package nosuch"], "images/torch/requirements.txt") is None
    assert lock.explain_build_failure([], "images/torch/requirements.txt") is None


def test_lock_image_writes_every_hash_atomically(tmp_path):
    (tmp_path / "requirements.in").write_text("# a tiny pure-Python package\nsix==1.16.0\n")
    out = lock.lock_image(tmp_path, python_version="3.11", find_links=[])
    assert out == tmp_path / "requirements.txt"
    text = out.read_text()
    assert text.startswith(lock.HEADER_MARK)
    # six 1.16.0's wheel on PyPI (the hash pip reported for it in the captured build above)
    assert "--hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254" in text
    assert re.search(r"^six==1\.16\.0 \\$", text, re.M)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.in", "requirements.txt"]  # no temp left
    assert images.read_requirements(out) == {"six": "1.16.0"}  # images.py still reads the pins (wheel selection)


@pytest.mark.parametrize(
    "content, says",
    [
        ("six===>1.16\n", "does not resolve"),
        ("six==999.0.0\n", "does not resolve"),
    ],
)
def test_a_bad_requirements_in_is_one_line_naming_the_file(tmp_path, content, says):
    (tmp_path / "requirements.in").write_text(content)
    (tmp_path / "requirements.txt").write_text("old lock\n")
    with pytest.raises(lock.LockError) as err:
        lock.lock_image(tmp_path, python_version="3.11", find_links=[])
    msg = str(err.value)
    assert isinstance(err.value, ModelMatrixError) and "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'requirements.in'}: {says}") and "invoke lock" in msg
    assert (tmp_path / "requirements.txt").read_text() == "old lock\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.in", "requirements.txt"]


def test_a_missing_requirements_in_is_one_line(tmp_path):
    with pytest.raises(lock.LockError, match=r"requirements\.in: not found"):
        lock.lock_image(tmp_path, python_version="3.11")


def test_apt_pins_round_trip_and_policy(tmp_path):
    df = tmp_path / "Dockerfile"
    df.write_text(
        'FROM x\nARG MM_APT_RUNTIME="python3=0 \\\n    python3-venv=0"\nRUN apt-get install $MM_APT_RUNTIME\n'
    )
    assert lock.read_apt_pins(df, "MM_APT_RUNTIME") == [("python3", "0"), ("python3-venv", "0")]
    found = lock.parse_policy(POLICY)
    assert found == {"python3": "3.11.2-1+b1", "python3-venv": "3.11.2-1+b1"}  # (none) is no candidate
    assert lock.write_apt_pins(df, "MM_APT_RUNTIME", [(n, found[n]) for n in ("python3", "python3-venv")])
    assert lock.read_apt_pins(df, "MM_APT_RUNTIME") == [("python3", "3.11.2-1+b1"), ("python3-venv", "3.11.2-1+b1")]
    assert not lock.write_apt_pins(df, "MM_APT_RUNTIME", lock.read_apt_pins(df, "MM_APT_RUNTIME"))  # no change
    assert df.read_text().endswith("RUN apt-get install $MM_APT_RUNTIME\n")
    with pytest.raises(lock.LockError, match=r"Dockerfile: no ARG MM_APT_BUILDER="):
        lock.read_apt_pins(df, "MM_APT_BUILDER")
    df.write_text('ARG MM_APT_RUNTIME="python3"\n')
    with pytest.raises(lock.LockError, match=r"'python3' is not pkg=version"):
        lock.read_apt_pins(df, "MM_APT_RUNTIME")


# --------------------------------------------------------------------------- the recipes as committed


def _runs(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [ln for ln in joined.splitlines() if ln.startswith("RUN ")]


@pytest.mark.parametrize("spec", lock.PIP_LOCKS, ids=lambda s: f"{s.image}/{s.requirements_in}")
def test_every_lock_is_generated_with_a_hash_on_every_package(spec):
    src = IMAGES / spec.image / spec.requirements_in
    text = src.with_suffix(".txt").read_text()
    assert text.startswith(lock.HEADER_MARK) and f"--python-version {spec.python_version} " in text
    blocks = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    pinned = re.findall(r"^[A-Za-z0-9][^ \n]*==", text, re.M)
    assert blocks and len(blocks) == len(pinned), "a package without its hashes"
    wanted = {images._norm(n) for n in images.read_requirements(src)} - set(spec.no_emit)
    assert wanted <= {images._norm(n) for n, _, _ in blocks}
    for name in spec.no_emit:
        assert name not in {n for n, _, _ in blocks}


def test_the_torch_lock_carries_the_wheelhouse_file_hash():
    text = (IMAGES / "torch" / "requirements.txt").read_text()
    block = re.search(r"^torch==2\.13\.0\+cpu((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    assert block and block.group(1).count("--hash=") == 1  # only the local CPU wheel, not a PyPI file


@pytest.mark.parametrize("target", sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile")))
def test_every_recipe_pins_its_inputs_and_takes_the_epoch_as_an_arg(target):
    text = (IMAGES / target / "Dockerfile").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("FROM "):
            assert lines[i + 1] == "ARG SOURCE_DATE_EPOCH=315532800", f"{target}: after {line!r}"
    body = "\n".join(ln for ln in lines if not ln.startswith("ARG SOURCE_DATE_EPOCH="))
    assert "315532800" not in body, f"{target}: a literal epoch outside the ARG"
    runs = _runs(text)
    for run in runs:
        for m in re.finditer(r"pip install ([^;]*)", run):
            assert "--require-hashes" in m.group(1) and "--no-deps" in m.group(1), f"{target}: {m.group(0)}"
        for m in re.finditer(r"apt-get (?:\$apt )?(?:-o \S+ )*install ([^;]*)", run):
            words = [w for w in m.group(1).split() if not w.startswith("-")]
            assert words and all(w.startswith(("$MM_APT_", "$pkgs")) for w in words), f"{target}: {m.group(0)}"
    pins = {spec.arg for spec in lock.APT_PINS if spec.image == target}
    assert pins and all(lock.read_apt_pins(IMAGES / target / "Dockerfile", arg) for arg in pins)
    assert set(re.findall(r"\$(MM_APT_[A-Z_]+)", text)) == pins  # every pinned arg used, every used one locked
