"""Fast tests of the image recipes (no Docker engine needed): context assembly, the recipe hash,
the normalised context tar, wheel/CA selection, mirror detection, labels, the build-log display and
the engine-unreachable message."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import textwrap
from pathlib import Path

import pytest

from modelmatrix import REPO_ROOT, bases, images
from modelmatrix.bases import BaseInfo
from modelmatrix.config import load_matrix
from modelmatrix.docker_client import Engine, engine_reason
from modelmatrix.errors import BuildFailed, ConfigError, DockerError

BASE = BaseInfo("example/base:1", "example/base:1", "sha256:" + "a" * 64, "local", "test")
WHEEL = "demo_pkg-1.0-py3-none-any.whl"


def make_project(root: Path, ca: str | None = None, build_args: dict | None = None) -> Path:
    """A throwaway project: targets/{__init__,common,demo,other}, images/demo, a wheelhouse, matrix.yaml."""
    targets = root / "targets"
    shutil.copytree(REPO_ROOT / "targets" / "common", targets / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO_ROOT / "targets" / "__init__.py", targets / "__init__.py")
    for name in ("demo", "other"):
        (targets / name).mkdir()
        (targets / name / "target.yaml").write_text(
            f"name: {name}\nimage: {{base: 'example/base:1'}}\nstages: {{run: {{}}}}\n"
        )
        (targets / name / "run.py").write_text("print('hello')\n")
    (targets / "demo" / "__pycache__").mkdir()
    (targets / "demo" / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"junk")
    img = root / "images" / "demo"
    img.mkdir(parents=True)
    (img / "Dockerfile").write_text("ARG BASE_IMAGE=example/base:1\nFROM ${BASE_IMAGE}\n")
    (img / "requirements.txt").write_text("demo-pkg==1.0  # pinned\nnumpy==2.0\n")
    wh = root / "wheels"
    wh.mkdir()
    (wh / WHEEL).write_bytes(b"wheel v1")
    (wh / "unrelated-3.0-py3-none-any.whl").write_bytes(b"other")
    (wh / "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"wrong version")
    stanza = {"demo": {"image": {"build_args": build_args}}} if build_args else {"demo": {}}
    import yaml

    (root / "matrix.yaml").write_text(
        yaml.safe_dump(
            {"verify": {"reference": "demo"}, "images": {"ca_bundle": ca, "wheelhouses": ["wheels"]}, "targets": stanza}
        )
    )
    return root / "matrix.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    path = make_project(tmp_path)
    return load_matrix(path, targets_dir=tmp_path / "targets")


def test_context_holds_exactly_the_recipe(project):
    recipe = images.plan(project, "demo", BASE)
    names = set(recipe.files)
    assert {
        "Dockerfile",
        "requirements.txt",
        "targets/__init__.py",
        "targets/common/contract.py",
        "targets/demo/run.py",
        "targets/demo/target.yaml",
        images.CA_ARCNAME,
        f"{images.WHEELS_DIR}/{WHEEL}",
    } <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith("targets/other/")]
    assert [w.name for w in recipe.wheels] == [WHEEL]  # not unrelated-*, not numpy 2.4.6
    assert recipe.files[images.CA_ARCNAME] == b""  # ca_bundle: null -> empty file
    assert recipe.tag == f"modelmatrix/demo:{recipe.hash[:16]}"
    assert recipe.builder_args() == {"BASE_IMAGE": BASE.image_id, "SOURCE_DATE_EPOCH": str(BASE.epoch)}


def test_hash_is_stable_and_follows_every_input(tmp_path, monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)

    def hash_of(**kw):
        path = make_project(tmp_path / str(len(list(tmp_path.iterdir()))), **kw)
        return images.plan(load_matrix(path, targets_dir=path.parent / "targets"), "demo", BASE)

    first = hash_of()
    again = hash_of()
    assert first.hash == again.hash
    root = first.dockerfile.parent.parent.parent

    def rehash(base=BASE):
        m = load_matrix(root / "matrix.yaml", targets_dir=root / "targets")
        return images.plan(m, "demo", base).hash

    os.utime(root / "targets" / "demo" / "run.py", (1, 1))  # mtimes do not matter
    assert rehash() == first.hash
    (root / "images" / "demo" / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nUSER 1\n")
    h_dockerfile = rehash()
    assert h_dockerfile != first.hash
    (root / "targets" / "demo" / "run.py").write_text("print('changed')\n")
    h_code = rehash()
    assert h_code != h_dockerfile
    (root / "wheels" / WHEEL).write_bytes(b"wheel v2")
    h_wheel = rehash()
    assert h_wheel != h_code
    other_base = BaseInfo(BASE.requested, BASE.ref, "sha256:" + "b" * 64, "local", "test")
    assert rehash(other_base) != h_wheel
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    with_ca = hash_of(ca=str(ca))
    with_args = hash_of(build_args={"FLAVOUR": "a"})
    assert len({first.hash, with_ca.hash, with_args.hash}) == 3
    assert with_ca.files[images.CA_ARCNAME] == ca.read_bytes()
    assert with_ca.ca_label.startswith("sha256:") and first.ca_label == "none"


def test_context_tar_is_normalised(project):
    recipe = images.plan(project, "demo", BASE)
    first = io.BytesIO()
    images.write_context(recipe.files, first)
    for path in recipe.files.values():
        if isinstance(path, Path):
            os.utime(path, (12345, 12345))
    again = io.BytesIO()
    images.write_context(images.plan(project, "demo", BASE).files, again)
    assert first.getvalue() == again.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert ".mm/wheels" in names and "Dockerfile" in names
    assert {m.mtime for m in members} == {images.CONTEXT_MTIME}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} <= {0o644, 0o755}


def test_requirements_and_wheel_selection(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# c\n--index-url x\ntorch==2.13.0+cpu\nTyping_Extensions == 4.16.0\nJinja2[i18n]==3.1.6\nnumpy\n")
    reqs = images.read_requirements(req)
    assert reqs == {"torch": "2.13.0+cpu", "typing-extensions": "4.16.0", "jinja2": "3.1.6", "numpy": None}
    (tmp_path / "w").mkdir()
    for name in (
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
        "numpy-2.4.6-cp311-cp311-linux_x86_64.whl",
        "notes.txt",
    ):
        (tmp_path / "w" / name).write_bytes(b"x")
    chosen = [p.name for p in images.select_wheels([tmp_path / "w"], reqs)]
    assert chosen == [
        "numpy-2.4.6-cp311-cp311-linux_x86_64.whl",
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
    ]
    public_pin = images.select_wheels([tmp_path / "w"], {"torch": "2.13.0"})
    assert [p.name for p in public_pin] == ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]


def test_ca_bundle_choice(project, tmp_path, monkeypatch):
    pem = tmp_path / "extra.pem"
    pem.write_text("pem")
    project.raw["images"]["ca_bundle"] = "auto"
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    assert images.ca_bundle(project) == pem
    for var in images.CA_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert images.ca_bundle(project) is None
    project.raw["images"]["ca_bundle"] = None
    assert images.ca_bundle(project) is None
    project.raw["images"]["ca_bundle"] = "nowhere/ca.pem"
    with pytest.raises(ConfigError, match=r"images\.ca_bundle: .*nowhere/ca\.pem is not a file"):
        images.ca_bundle(project)


def test_wheelhouses_from_config_and_pip_find_links(project, tmp_path, monkeypatch):
    extra = tmp_path / "extra-wheels"
    extra.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", f"https://example.org/simple {tmp_path / 'absent'} file://{extra}")
    assert images.wheelhouses(project) == [project.root / "wheels", extra]
    project.raw["images"]["wheelhouses"] = ["gone"]
    with pytest.raises(ConfigError, match=r"images\.wheelhouses\[0\]: .*gone is not a folder"):
        images.wheelhouses(project)


def test_proxies_never_reach_the_builder(tmp_path, monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    path = make_project(tmp_path, build_args={"HTTPS_PROXY": "http://proxy:3128"})
    m = load_matrix(path, targets_dir=tmp_path / "targets")
    with pytest.raises(ConfigError, match=r"build_args\.HTTPS_PROXY: proxy settings"):
        images.plan(m, "demo", BASE)

    # The SDK call itself: use_config_proxy off, rm/forcerm on, no pull, build args as given.
    calls = []

    class Recorder:
        def build(self, **kw):
            calls.append(kw)
            yield {"aux": {"ID": "sha256:" + "c" * 64}}

    engine = Engine.__new__(Engine)
    engine.long = Recorder()
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    list(engine.build(io.BytesIO(b""), buildargs={"BASE_IMAGE": "sha256:x"}, labels={}))
    (kw,) = calls
    assert kw["use_config_proxy"] is False and kw["rm"] is True and kw["forcerm"] is True
    assert kw["pull"] is False and kw["buildargs"] == {"BASE_IMAGE": "sha256:x"}


def test_labels(project):
    recipe = images.plan(project, "demo", BASE)
    labels = images.image_labels(recipe, {"demo": "1.0", "python": "3.11.2"})
    # nothing of the clone (its path, its HEAD) is a label: two builds of one recipe must agree
    assert "org.opencontainers.image.revision" not in labels
    assert not any(str(REPO_ROOT) in v for v in labels.values())
    assert labels["io.modelmatrix.source-date-epoch"] == str(BASE.epoch)
    for key in (
        "org.opencontainers.image.version",
        "org.opencontainers.image.base.digest",
    ):
        assert labels[key]
    assert labels["org.opencontainers.image.base.digest"] == BASE.image_id
    assert not [
        k for k in labels if k.endswith(("base.name", "base-requested", "base-source"))
    ]  # naming is not content
    assert labels["io.modelmatrix.recipe-hash"] == recipe.hash
    assert labels["io.modelmatrix.target"] == "demo"
    assert labels["io.modelmatrix.ca-bundle"] == "none"
    assert labels["io.modelmatrix.wheelhouse"] == WHEEL
    assert labels["io.modelmatrix.versions"] == '{"demo":"1.0","python":"3.11.2"}'
    assert labels["io.modelmatrix.base-id"] == BASE.image_id


def test_mirror_detection(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-local.sources").write_text(
        "Types: deb\n# URIs: http://commented.example/debian\nURIs: file:/srv/repo\nSuites: stable\n"
    )
    (d / "debian.sources").write_text(
        textwrap.dedent("""\
        Types: deb
        URIs: http://deb.debian.org/debian
        Suites: bookworm bookworm-updates
        Components: main
        """)
    )
    (d / "vendor.list.disabled").write_text("deb https://vendor.example/apt stable main\n")
    assert bases.detect_mirror(d, tmp_path / "none") == "http://deb.debian.org/debian"
    lst = tmp_path / "sources.list"
    lst.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example/debian bookworm main\n"
    )
    assert bases.detect_mirror(tmp_path / "empty", lst) == "https://mirror.example/debian"
    assert bases.detect_mirror(tmp_path / "empty", tmp_path / "none") is None


def test_build_stream_shows_the_failing_step(caplog):
    # Messages as the classic builder sends them (recorded from Docker 20.10 through the SDK).
    chunks = [
        {"stream": "Step 1/3 : ARG BASE_IMAGE"},
        {"stream": "\n"},
        {"stream": "Step 2/3 : FROM ${BASE_IMAGE}"},
        {"stream": "\n"},
        {"stream": " ---> a874550ceae6\n"},
        {"stream": "Step 3/3 : RUN echo about to fail && exit 3"},
        {"stream": "\n"},
        {"stream": " ---> Running in 8fed557509d0\n"},
        {"stream": "about to"},
        {"stream": " fail\n"},
        {"stream": "Removing intermediate container 8fed557509d0\n"},
        {
            "errorDetail": {
                "code": 3,
                "message": "The command '/bin/sh -c echo about to fail && exit 3' returned a non-zero code: 3",
            },
            "error": "The command '/bin/sh -c echo about to fail && exit 3' returned a non-zero code: 3",
        },
    ]
    caplog.set_level(logging.DEBUG, logger="modelmatrix")
    stream = images.BuildStream("demo", "images/demo/Dockerfile")
    with pytest.raises(BuildFailed) as err:
        stream.consume(iter(chunks))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("images/demo/Dockerfile: step 3/3 (RUN echo about to fail && exit 3) failed: exited 3")
    assert msg.endswith("last output: about to fail")
    assert "about to fail" in err.value.log_tail and "Step 3/3" in err.value.log_tail
    shown = "\n".join(r.getMessage() for r in caplog.records)
    assert "[demo] Step 3/3 : RUN echo about to fail && exit 3" in shown
    assert "[demo]   about to fail" in shown and "Removing intermediate" not in shown

    ok = images.BuildStream("demo", "Dockerfile")
    assert ok.consume(iter(chunks[:5] + [{"aux": {"ID": "sha256:feed"}}])) == "sha256:feed"
    with pytest.raises(BuildFailed, match="without an image ID"):
        images.BuildStream("demo", "Dockerfile").consume(iter(chunks[:5]))


def test_engine_unreachable_is_one_clear_line(monkeypatch, project):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent")
    reason = engine_reason()
    assert reason is not None and "\n" not in reason
    assert "unix:///nonexistent" in reason and "--runner local" in reason
    with pytest.raises(DockerError, match="not reachable"):
        images.list_images(project)
    from modelmatrix.runners.docker import DockerRunner

    assert DockerRunner(project).unavailable_reason(project.targets["demo"]) == reason


def test_push_needs_a_registry(project):
    with pytest.raises(ConfigError, match=r"images\.registry: not set"):
        images.push(project, "demo")


def test_device_requirements(project):
    from modelmatrix.runners.docker import device_reason

    tdef = project.targets["demo"]
    assert device_reason(tdef) is None
    tdef.requires["devices"] = ["quantum-qpu"]
    assert "unknown kind 'quantum-qpu'" in device_reason(tdef)
    if not Path("/dev/nvidiactl").exists():
        tdef.requires["devices"] = ["nvidia-gpu"]
        assert device_reason(tdef) == "demo needs nvidia-gpu (requires.devices): no /dev/nvidiactl on this host"


def test_manifest_sits_next_to_the_archive(tmp_path):
    assert images.manifest_path(tmp_path / "modelmatrix-x-0123.tar.gz") == tmp_path / "modelmatrix-x-0123.manifest.json"


def test_base_declarations(project):
    decls = project.raw["images"]["bases"]
    decls["python:3.11-slim-bookworm"] = {
        "suite": "bookworm",
        "variant": "minbase",
        "mirror": "auto",
        "tag": "modelmatrix/base:bookworm-minbase",
    }
    assert bases.declaration(project, "python:3.11-slim-bookworm")[0] == "python:3.11-slim-bookworm"
    assert bases.declaration(project, "modelmatrix/base:bookworm-minbase")[0] == "python:3.11-slim-bookworm"
    assert bases.declaration(project, "debian:bullseye-slim") is None
    with pytest.raises(
        ConfigError,
        match=r"images\.bases: no declaration for 'debian:bullseye-slim' "
        r"\(declared: python:3\.11-slim-bookworm\)",
    ):
        bases.bootstrap(project, "debian:bullseye-slim", engine=object())
    assert bases.target_base(project, "demo") == "example/base:1"
    project.raw["targets"]["demo"]["image"]["base"] = ""
    with pytest.raises(ConfigError, match=r"targets\.demo\.image\.base: empty"):
        bases.target_base(project, "demo")


def test_image_refs_split():
    from modelmatrix.docker_client import _split_ref

    assert _split_ref("python:3.11-slim-bookworm") == ("python", "3.11-slim-bookworm")
    assert _split_ref("localhost:5000/modelmatrix/torch:abc") == ("localhost:5000/modelmatrix/torch", "abc")
    assert _split_ref("localhost:5000/modelmatrix/torch") == ("localhost:5000/modelmatrix/torch", "latest")
    assert _split_ref("debian@sha256:" + "0" * 64) == ("debian@sha256:" + "0" * 64, None)


def _layer(path: Path, entries: dict[str, bytes]) -> images.Layer:
    with tarfile.open(path, "w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return images.Layer("sha256:" + "0" * 64, path)


def test_sbom_reads_dpkg_and_python_from_the_layers_and_honours_whiteouts(tmp_path):
    status = (
        b"Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4\n\n"
        b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n"
    )
    site = "opt/venv/lib/python3.11/site-packages"
    meta = b"Metadata-Version: 2.1\nName: onnx\nVersion: 1.23.2\n\nName: not-the-header\n"
    first = _layer(
        tmp_path / "1.tar",
        {
            "var/lib/dpkg/status": status,
            f"{site}/onnx-1.23.2.dist-info/METADATA": meta,
            f"{site}/six-1.16.0.dist-info/METADATA": b"Name: six\nVersion: 1.16.0\n",
            "usr/lib/py/old-1.dist-info/METADATA": b"Name: old\nVersion: 1\n",
        },
    )
    second = _layer(tmp_path / "2.tar", {f"{site}/.wh.six-1.16.0.dist-info": b"", "usr/lib/py/.wh..wh..opq": b""})
    sbom = images.sbom_of([first, second], "modelmatrix/x:1", 315532800)
    assert sbom["dpkg"] == [{"package": "base-files", "version": "12.4", "arch": "amd64"}]  # installed only
    comps = sbom["python"]["components"]
    assert [(c["name"], c["version"], c["purl"]) for c in comps] == [("onnx", "1.23.2", "pkg:pypi/onnx@1.23.2")]
    assert (
        sbom["python"]["bomFormat"] == "CycloneDX" and sbom["python"]["metadata"]["timestamp"] == "1980-01-01T00:00:00Z"
    )
