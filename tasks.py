"""Invoke tasks: thin shells that parse flags, call modelmatrix, and turn errors into exit codes.

The logic lives in the importable `modelmatrix` package, which does not know Invoke exists.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from invoke import Collection, Exit, task

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = str(HERE / "matrix.yaml")


def _errors_to_exit(fn):
    """A ModelMatrixError becomes one `error: ...` line and its exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from modelmatrix.errors import ModelMatrixError
        try:
            return fn(*args, **kwargs)
        except ModelMatrixError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None

    return wrapper


def _known(matrix, config: str, name: str) -> str:
    if name not in matrix.raw["targets"]:
        raise Exit(f"error: --target {name}: not in {config} targets "
                   f"(known: {', '.join(matrix.raw['targets'])})", code=2)
    return name


def _load(config: str, targets: list[str] | None = None, dataset: str | None = None):
    from modelmatrix.config import load_matrix
    overrides = {"data.dataset": dataset} if dataset else {}
    matrix = load_matrix(config, overrides)
    if targets:
        for t in targets:
            _known(matrix, config, t)
        keep = set(targets) | {matrix.raw["verify"]["reference"]}
        for name, stanza in matrix.raw["targets"].items():
            stanza["enabled"] = stanza["enabled"] and name in keep or name in targets
    return matrix


@task(help={"synthetic": "write the synthetic Market1501-style set (else: check the configured dataset)",
            "out": "folder to write (default: data.dataset of matrix.yaml)",
            "force": "replace an existing folder",
            "config": "matrix file"})
@_errors_to_exit
def data(c, synthetic=False, out="", force=False, config=DEFAULT_CONFIG):
    """Make the synthetic dataset, or check the configured one."""
    from modelmatrix import data as mdata
    matrix = _load(config)
    folder = matrix.resolve(out or matrix.raw["data"]["dataset"])
    if synthetic:
        s = matrix.raw["data"]["synthetic"]
        summary = mdata.make_synthetic(folder, identities=s["identities"], cameras=s["cameras"],
                                       gallery_per_camera=s["gallery_per_camera"], junk=s["junk"],
                                       distractors=s["distractors"], seed=s["seed"], force=force)
        counts = {k: v for k, v in summary.items() if k not in ("recipe", "path", "status")}
        print(f"{folder}: {summary['status']} ({json.dumps(counts)})")
    else:
        items = mdata.scan_dataset(folder, matrix.raw["data"]["limit"])
        q = sum(i["split"] == "query" for i in items)
        print(f"{folder}: {q} query, {len(items) - q} gallery images")


@task(iterable=["target"],
      help={"runner": "auto | local | docker (default: matrix.yaml runner)",
            "target": "only this target (plus the reference); repeatable",
            "force": "re-run every stage even if up to date",
            "dataset": "override data.dataset", "config": "matrix file"})
@_errors_to_exit
def matrix(c, runner="", target=None, force=False, dataset="", config=DEFAULT_CONFIG):
    """Convert, run every target, verify against the reference; exit 0 only if all checks pass."""
    from modelmatrix.pipeline import run_matrix
    from modelmatrix.report import summary_lines
    m = _load(config, target, dataset)
    summary = run_matrix(m, runner or None, force=force)
    if summary.report is None:
        raise Exit("error: no report: verify did not run (see the stage lines above)", code=1)
    for line in summary_lines(summary.report):
        print(line)
    print(f"report: {summary.workspace / 'report.md'}  junit: {summary.workspace / 'junit.xml'}")
    if not summary.passed:
        raise Exit("FAILED: at least one enabled check did not pass (see the report)", code=1)


@task(iterable=["target"], help={"target": "target to build; repeatable", "all": "every target in matrix.yaml",
                                 "force": "rebuild even if up to date", "config": "matrix file"})
@_errors_to_exit
def build(c, target=None, all=False, force=False, config=DEFAULT_CONFIG):
    """Build target images through the Docker SDK (content-addressed tags; no-op when up to date)."""
    from modelmatrix import images
    from modelmatrix.errors import ModelMatrixError
    m = _load(config)
    names = [_known(m, config, t) for t in target or []]
    if all:
        names = [t for t in m.raw["targets"] if m.targets[t].dockerfile.is_file()]
        for t in m.raw["targets"]:
            if t not in names:
                print(f"{t:<12} {'no image':<10} images/{t}/Dockerfile does not exist yet")
    if not names:
        raise Exit("error: say which image: --target <name> (repeatable) or --all", code=2)
    failed = []
    for name in names:
        try:
            st = images.build(m, name, force=force)
        except ModelMatrixError as exc:
            if not all:
                raise
            failed.append(name)           # --all: build what can be built, then report the rest
            print(f"{name:<12} {'FAILED':<10} {exc}")
            continue
        state = "built" if st.get("built") else "up to date"
        print(f"{name:<12} {state:<10} {st['tag']}  {st.get('image_id', '')[:19]}")
    if failed:
        raise Exit(f"error: could not build {', '.join(failed)} (reasons above)", code=1)


@task(help={"config": "matrix file"})
@_errors_to_exit
def images(c, config=DEFAULT_CONFIG):
    """List target images: tag, id, size, up to date or not."""
    from modelmatrix import images as mimages
    m = _load(config)
    print(f"{'target':<12} {'up to date':<10} {'tag':<36} {'id':<19} {'size':>9}  base / versions / problem")
    for st in mimages.list_images(m):
        size = f"{st['size'] / 1e6:.0f} MB" if st.get("size") else "-"
        versions = " ".join(f"{k}={v}" for k, v in sorted((st.get("versions") or {}).items()))
        extra = st.get("problem") or versions
        print(f"{st['target']:<12} {'yes' if st['up_to_date'] else 'no':<10} {st['tag'] or '-':<36} "
              f"{(st.get('image_id') or '-')[:19]:<19} {size:>9}  {st.get('base') or '-'}  {extra}")


@task(help={"force": "re-bootstrap even if the base exists", "config": "matrix file"})
@_errors_to_exit
def bases(c, force=False, config=DEFAULT_CONFIG):
    """Bootstrap the base images declared in matrix.yaml (debootstrap + docker import), for hosts with no registry."""
    from modelmatrix import bases as mbases
    m = _load(config)
    for ref in m.raw["images"]["bases"]:
        info = mbases.bootstrap(m, ref, force=force)
        state = "bootstrapped" if info.get("created") else "already present"
        print(f"{ref:<28} -> {info['tag']} ({state})")


@task(help={"target": "target whose image to ship", "out": "output folder", "push": "also push to images.registry",
            "config": "matrix file"})
@_errors_to_exit
def ship(c, target, out="dist", push=False, config=DEFAULT_CONFIG):
    """Write a target image as docker-save .tar.gz plus a manifest JSON (and optionally push it)."""
    from modelmatrix import images
    m = _load(config)
    path = images.ship(m, _known(m, config, target), m.resolve(out))
    print(f"wrote {path}")
    if push:
        print(f"pushed {images.push(m, target)}")


@task(help={"archive": "a .tar.gz written by `invoke ship`"})
@_errors_to_exit
def load(c, archive):
    """Load an image written by `invoke ship` (checks it against its manifest)."""
    from modelmatrix import images
    info = images.load(Path(archive))
    print(json.dumps(info, indent=2))


@task(help={"images": "also remove modelmatrix images", "workspace": "also delete the workspace folder",
            "config": "matrix file"})
@_errors_to_exit
def clean(c, images=False, workspace=False, config=DEFAULT_CONFIG):
    """Remove containers a crash left behind (found by label); optionally images and the workspace."""
    from modelmatrix.runners import docker as docker_runner
    if docker_runner.engine_reason() is None:
        print(json.dumps(docker_runner.clean(all_images=images)))
    else:
        print("no Docker engine: no containers to clean", file=sys.stderr)
    if workspace:
        import shutil
        ws = _load(config).workspace
        shutil.rmtree(ws, ignore_errors=True)
        print(f"removed {ws}")


@task(iterable=["target"], help={"target": "target to benchmark; repeatable (default: torch and onnxruntime)",
                                 "runner": "auto | local | docker", "out": "results file (JSON)",
                                 "compare_runners": "also time a forced full matrix run with each runner",
                                 "config": "matrix file"})
@_errors_to_exit
def bench(c, target=None, runner="", out="", compare_runners=False, config=DEFAULT_CONFIG):
    """Benchmark backends (img/s, p50/p95 at several batch sizes) and the pipeline itself; writes a JSON file."""
    from modelmatrix.bench import run_bench
    m = _load(config)
    path = run_bench(m, target or ["torch", "onnxruntime"], runner or None,
                     Path(out) if out else None, compare_runners=compare_runners)
    print(f"wrote {path}")


ns = Collection(data, matrix, build, images, bases, ship, load, clean, bench)
