"""Invoke tasks: thin shells that parse flags, call modelmatrix, and turn errors into exit codes.

The logic lives in the importable `modelmatrix` package, which does not know Invoke exists.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

from invoke import Collection, Exit, task

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = str(HERE / "matrix.yaml")


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The one console handler: rich's on a terminal, plain lines in CI and pipes. -v shows the
    stages' own output and debug lines, -q only warnings and errors."""
    import logging
    import os

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("modelmatrix")
    for h in list(root.handlers):
        root.removeHandler(h)
    if sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            show_time=False, show_path=False, show_level=False, markup=False, highlighter=None
        )
    else:
        handler = logging.StreamHandler(sys.stderr)

        class Plain(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                text = super().format(record)
                return (
                    f"warning: {text}"
                    if record.levelno == logging.WARNING and not text.startswith(("warning:", "notice:"))
                    else text
                )

        handler.setFormatter(Plain("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _cli(fn):
    """Every task: logging set up from -v/-q; a ModelMatrixError becomes one `error: ...` line and
    its exit code (README, "Exit codes"), never a traceback; Ctrl-C prints `interrupted`, exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from modelmatrix.errors import EXIT_INTERRUPTED, ModelMatrixError

        _setup_logging(kwargs.get("verbose", False), kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except ModelMatrixError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=EXIT_INTERRUPTED) from None

    return wrapper


VERBOSITY = {
    "verbose": "show each stage's own output and debug lines",
    "quiet": "only warnings, errors and the verdict",
}


def _known(matrix, config: str, name: str) -> str:
    if name not in matrix.raw["targets"]:
        raise Exit(
            f"error: --target {name}: not in {config} targets (known: {', '.join(matrix.raw['targets'])})", code=2
        )
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


@task(
    help={
        **VERBOSITY,
        "synthetic": "write the synthetic Market1501-style set (else: check the configured dataset)",
        "out": "folder to write (default: data.dataset of matrix.yaml)",
        "force": "replace an existing folder",
        "config": "matrix file",
    }
)
@_cli
def data(c, synthetic=False, out="", force=False, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Make the synthetic dataset, or check the configured one."""
    from modelmatrix import data as mdata

    matrix = _load(config)
    folder = matrix.resolve(out or matrix.raw["data"]["dataset"])
    if synthetic:
        from modelmatrix.workspace import Workspace

        s = matrix.raw["data"]["synthetic"]
        # --force replaces a folder a running matrix may be reading: take that workspace's lock.
        with Workspace(matrix.workspace).lock() if force else contextlib.nullcontext():
            summary = mdata.make_synthetic(
                folder,
                identities=s["identities"],
                cameras=s["cameras"],
                gallery_per_camera=s["gallery_per_camera"],
                junk=s["junk"],
                distractors=s["distractors"],
                seed=s["seed"],
                force=force,
            )
        counts = {k: v for k, v in summary.items() if k not in ("recipe", "path", "status")}
        print(f"{folder}: {summary['status']} ({json.dumps(counts)})")
    else:
        items = mdata.scan_dataset(folder, matrix.raw["data"]["limit"])
        q = sum(i["split"] == "query" for i in items)
        print(f"{folder}: {q} query, {len(items) - q} gallery images")


@task(
    iterable=["target", "require"],
    help={
        **VERBOSITY,
        "runner": "auto | local | docker (default: matrix.yaml runner)",
        "target": "only this target (plus the reference); repeatable; a named target must run",
        "require": "this target must run: skipped fails the run (exit 3); repeatable",
        "force": "re-run every stage even if up to date",
        "dry_run": "print what would run, be up to date or be skipped (and vendor command lines); run nothing",
        "plots": "also write report.html with its plots (default on; --no-plots skips it)",
        "dataset": "override data.dataset",
        "config": "matrix file",
    },
)
@_cli
def matrix(
    c,
    runner="",
    target=None,
    require=None,
    force=False,
    dataset="",
    config=DEFAULT_CONFIG,
    verbose=False,
    quiet=False,
    plots=True,
    dry_run=False,
):
    """Convert, run every target, verify against the reference; the exit code says how it went (README)."""
    from modelmatrix.errors import ConfigError
    from modelmatrix.pipeline import run_matrix

    m = _load(config, target, dataset)
    for t in require or []:
        _known(m, config, t)
        if not m.target_cfg(t)["enabled"]:
            raise ConfigError(
                f"--require {t}: the target is not enabled (targets.{t}.enabled in {config}, "
                "or --target selected others); enable it or drop --require"
            )
    if dry_run:
        import shlex

        from modelmatrix.pipeline import dry_run as plan_dry_run

        lines = plan_dry_run(m, runner or None, force=force, require=[*(require or []), *(target or [])])
        print(f"dry run ({runner or m.raw['runner']} runner): nothing is run, built or written")
        for d in lines:
            print(f"  {d.status:<11} {d.node:<22} {d.reason}".rstrip())
            for cmd in d.commands:
                print(f"  {'':<11} {'':<22} $ {shlex.join(cmd)}")
        return
    summary = run_matrix(
        m,
        runner or None,
        force=force,
        require=[*(require or []), *(target or [])],
        html=plots,
        progress=_live_progress(),
    )
    if summary.report is None:
        raise Exit("error: no report: verify did not run (see the stage lines above)", code=summary.exit_code)
    _print_verdict(summary, quiet)


def _live_progress():
    """A live line per running stage on a terminal; start lines only in CI logs and pipes."""
    import os

    from modelmatrix.pipeline import RichProgress, StageProgress

    if sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return RichProgress()
    return StageProgress()


def _print_verdict(summary, quiet: bool) -> None:
    from modelmatrix.report import summary_lines

    lines = summary_lines(summary.report)
    for line in lines[-1:] if quiet else lines:
        print(line)
    if not quiet:
        print(f"report: {summary.workspace / 'report.md'}  junit: {summary.workspace / 'junit.xml'}")
    if summary.exit_code:
        raise Exit(code=summary.exit_code)


@task(
    iterable=["target", "file"],
    help={
        **VERBOSITY,
        "target": "target to build; repeatable",
        "all": "every target in matrix.yaml",
        "force": "rebuild even if up to date",
        "config": "matrix file",
        "file": "NAME=PATH: a file the target's image.files declares (a vendor "
        "installer), checked by sha256 before the build; repeatable",
    },
)
@_cli
def build(c, target=None, all=False, force=False, config=DEFAULT_CONFIG, verbose=False, quiet=False, file=None):
    """Build target images through the Docker SDK (content-addressed tags; no-op when up to date)."""
    from modelmatrix import images
    from modelmatrix.errors import ModelMatrixError

    m = _load(config)
    supplied = {}
    for item in file or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise Exit(
                f"error: --file {item!r}: expected NAME=PATH (e.g. --file toolkit=Ascend-cann-toolkit_5.0.1_"
                "linux-x86_64.run)",
                code=2,
            )
        supplied[name] = path
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
            st = images.build(m, name, force=force, files=supplied or None)
        except ModelMatrixError as exc:
            if not all:
                raise
            failed.append(name)  # --all: build what can be built, then report the rest
            print(f"{name:<12} {'FAILED':<10} {exc}")
            continue
        state = "built" if st.get("built") else "up to date"
        print(f"{name:<12} {state:<10} {st['tag']}  {st.get('image_id', '')[:19]}")
    if failed:
        raise Exit(f"error: could not build {', '.join(failed)} (reasons above)", code=3)


@task(help={**VERBOSITY, "config": "matrix file"})
@_cli
def images(c, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """List target images: tag, id, size, up to date or not."""
    from modelmatrix import images as mimages

    m = _load(config)
    print(f"{'target':<12} {'up to date':<10} {'tag':<36} {'id':<19} {'size':>9}  base / versions / problem")
    for st in mimages.list_images(m):
        size = f"{st['size'] / 1e6:.0f} MB" if st.get("size") else "-"
        versions = " ".join(f"{k}={v}" for k, v in sorted((st.get("versions") or {}).items()))
        extra = st.get("problem") or versions
        print(
            f"{st['target']:<12} {'yes' if st['up_to_date'] else 'no':<10} {st['tag'] or '-':<36} "
            f"{(st.get('image_id') or '-')[:19]:<19} {size:>9}  {st.get('base') or '-'}  {extra}"
        )


@task(help={**VERBOSITY, "force": "build again even if the base exists", "config": "matrix file"})
@_cli
def bases(c, force=False, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Build the base images declared in matrix.yaml (debuerreotype, reproducible), for hosts with no registry."""
    from modelmatrix import bases as mbases

    m = _load(config)
    for ref in m.raw["images"]["bases"]:
        info = mbases.bootstrap(m, ref, force=force)
        state = "built" if info.get("created") else "already present"
        layers = ",".join(d[7:19] for d in info["diff_ids"]) or "-"
        print(f"{ref:<28} -> {info['tag']} ({state}) image {info['image_id'][7:19]} layer {layers}")


@task(
    help={
        **VERBOSITY,
        "target": "target whose image to ship",
        "out": "output folder",
        "push": "also push to images.registry",
        "config": "matrix file",
    }
)
@_cli
def ship(c, target, out="dist", push=False, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Write a target image as a deterministic .tar.gz plus a manifest JSON with its SBOM (optionally push it)."""
    from modelmatrix import images

    m = _load(config)
    path = images.ship(m, _known(m, config, target), m.resolve(out))
    print(f"wrote {path}")
    if push:
        print(f"pushed {images.push(m, target)}")


@task(help={**VERBOSITY, "archive": "a .tar.gz written by `invoke ship`"})
@_cli
def load(c, archive, verbose=False, quiet=False):
    """Load an image written by `invoke ship` (checks it against its manifest)."""
    from modelmatrix import images

    info = images.load(Path(archive))
    print(json.dumps(info, indent=2))


@task(
    help={
        **VERBOSITY,
        "target": "only this image's locks (default: every image)",
        "pip": "refresh the pip locks (images/<t>/requirements.in -> requirements.txt with hashes)",
        "apt": "refresh the apt pins (the MM_APT_* defaults in each Dockerfile, from its base)",
        "config": "matrix file (for the wheelhouses)",
    }
)
@_cli
def lock(c, target=None, pip=True, apt=False, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Regenerate the pinned inputs of the image recipes: pip locks with hashes, optionally apt pins."""
    from modelmatrix import REPO_ROOT, images
    from modelmatrix import lock as mlock

    m = _load(config)
    root = REPO_ROOT / "images"
    if pip:
        for path in mlock.lock_pip(root, find_links=images.wheelhouses(m), only=target):
            print(f"locked {path.relative_to(REPO_ROOT)}")
    if apt:
        for path in mlock.lock_apt(root, only=target):
            print(f"pinned {path.relative_to(REPO_ROOT)}")


@task(
    name="verify-image",
    help={
        **VERBOSITY,
        "target": "target whose image to rebuild and compare",
        "keep": "keep the rebuilt image (tag modelmatrix/<t>:verify-<hash>)",
        "out": "also write the comparison as JSON to this file",
        "config": "matrix file",
    },
)
@_cli
def verify_image(c, target, keep=False, out=None, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Rebuild a target's image without cache and prove it identical (layers, shipped archive sha256)."""
    from modelmatrix import images
    from modelmatrix.errors import EXIT_CHECK_FAILED

    m = _load(config)
    r = images.verify_image(m, _known(m, config, target), keep=keep)
    if out:
        from targets.common.contract import atomic_write_json

        atomic_write_json(Path(out), r)
    print(f"{r['tag']}: {r['layers']} layers, rebuilt without cache in {r['seconds']:.0f}s")
    print(f"  archive sha256 {r['archive_sha256']} (current)")
    print(f"  archive sha256 {r['rebuild_archive_sha256']} (rebuild)")
    for d in r["differences"]:
        print(f"  layer {d['layer']}: {(d['current'] or '-')[:19]} != {(d['rebuild'] or '-')[:19]}")
        for line in d["paths"]:
            print(f"    {line}")
        for line in d["diffoscope"] or []:
            print(f"    | {line}")
    if r["identical"]:
        print("identical")
        return
    if not r["differences"]:
        print("  the layers are identical; the archives differ (the image config: labels or history)")
    raise Exit("differs: the rebuild is not identical", code=EXIT_CHECK_FAILED)


@task(
    help={
        **VERBOSITY,
        "images": "also remove modelmatrix images",
        "workspace": "also delete the workspace's contents (refused while a run holds it)",
        "force": "also remove containers of live runs and of other hosts sharing the engine",
        "config": "matrix file",
    }
)
@_cli
def clean(c, images=False, workspace=False, force=False, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Remove containers whose run is gone (found by label); optionally images and the workspace."""
    from modelmatrix.runners import docker as docker_runner

    if docker_runner.engine_reason() is None:
        print(json.dumps(docker_runner.clean(all_images=images, force=force)))
    else:
        print("no Docker engine: no containers to clean", file=sys.stderr)
    if workspace:
        from modelmatrix.workspace import Workspace

        ws = Workspace(_load(config).workspace)
        if not ws.root.is_dir():
            print(f"{ws.root}: no workspace, nothing removed")
            return
        with ws.lock():
            removed = ws.clear()
        print(f"{ws.root}: removed {', '.join(removed) if removed else 'nothing (it was empty)'}")


@task(
    iterable=["target"],
    help={
        **VERBOSITY,
        "target": "target to benchmark; repeatable (default: torch and onnxruntime)",
        "runner": "auto | local | docker",
        "out": "results file (JSON)",
        "compare_runners": "also time a forced full matrix run with each runner",
        "market_sized": "also time the no-op dataset digest on a Market1501-sized "
        "set of this many files (e.g. 32000; written once, kept)",
        "config": "matrix file",
    },
)
@_cli
def bench(
    c,
    target=None,
    runner="",
    out="",
    compare_runners=False,
    market_sized=0,
    config=DEFAULT_CONFIG,
    verbose=False,
    quiet=False,
):
    """Benchmark backends (img/s, p50/p95 at several batch sizes) and the pipeline itself; writes a JSON file."""
    from modelmatrix.bench import run_bench, summary_lines

    m = _load(config)
    # by default the fp32 pair, plus the reduced-precision targets when the matrix lists them
    default = ["torch", "onnxruntime"] + [t for t in ("onnxruntime_int8", "onnxruntime_fp16") if t in m.raw["targets"]]
    path = run_bench(
        m,
        target or default,
        runner or None,
        Path(out) if out else None,
        compare_runners=compare_runners,
        market_sized=int(market_sized),
    )
    for line in summary_lines(json.loads(path.read_text())):
        print(line)
    print(f"wrote {path}")


@task(
    help={
        **VERBOSITY,
        "synthetic": "train on a synthetic training split (the only source for now)",
        "runner": "auto | local | docker (default: matrix.yaml runner)",
        "out": "where to copy the checkpoint (default: <workspace>/finetune/checkpoint.pth)",
        "identities": "training identities (default 64)",
        "images_per_identity": "crops each (default 8)",
        "force": "train again even if up to date",
        "config": "matrix file",
    }
)
@_cli
def finetune(
    c,
    synthetic=False,
    runner="",
    out="",
    identities=64,
    images_per_identity=8,
    force=False,
    config=DEFAULT_CONFIG,
    verbose=False,
    quiet=False,
):
    """Train the ReID model briefly (seeded) for reduced-precision tests and demos; writes a state dict."""
    from modelmatrix.finetune import run_finetune

    if not synthetic:
        raise Exit("error: say where the training images come from: --synthetic", code=2)
    m = _load(config)
    s = run_finetune(
        m,
        runner or None,
        Path(out) if out else None,
        identities=int(identities),
        images_per_identity=int(images_per_identity),
        force=force,
    )
    r = s["retrieval"]
    print(
        f"Rank-1 {r['trained']['rank1']:.3f} mAP {r['trained']['mAP']:.3f} trained "
        f"(random weights: Rank-1 {r['random']['rank1']:.3f} mAP {r['random']['mAP']:.3f}); "
        f"{s['train_seconds']:.0f} s of training"
    )
    print(f"wrote {s['checkpoint']}  (use it: model.checkpoint: {s['checkpoint']})")


@task(
    iterable=["require"],
    help={
        **VERBOSITY,
        "require": "this target must be able to run here, else exit 3; repeatable",
        "runner": "auto | local | docker (default: matrix.yaml runner)",
        "config": "matrix file",
    },
)
@_cli
def doctor(c, require=None, runner="", config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """What this host can do: Docker engine, bases, each target's image and toolchains, and what
    `invoke matrix` would do with it (builds, pulls, runs and writes nothing)."""
    from modelmatrix import doctor as mdoctor

    diagnosis = mdoctor.diagnose(_load(config), runner or None, require or [])
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(mdoctor.rich_table(diagnosis))
    else:
        for line in mdoctor.plain_lines(diagnosis):
            print(line)
    diagnosis.check_required()


@task(help={**VERBOSITY, "runner": "the runner each CI job uses (default docker)", "config": "matrix file"})
@_cli
def ci_plan(c, runner="docker", config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """The CI job matrix as JSON: one job per enabled target (stages, runner labels, runs-on)."""
    from modelmatrix.fanout import ci_plan as plan

    print(json.dumps({"include": plan(_load(config), runner)}, separators=(",", ":")))


@task(
    help={
        **VERBOSITY,
        "target": "the target the last `invoke matrix --target T` ran",
        "out": "folder to write",
        "config": "matrix file",
    }
)
@_cli
def export_results(c, target, out, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Pack what the report needs about one target (features, stamps, digests) for `invoke verify --from`."""
    from modelmatrix.fanout import export_results as export

    m = _load(config)
    print(f"wrote {export(m, _known(m, config, target), Path(out)).parent}")


@task(
    iterable=["from_"],
    help={
        **VERBOSITY,
        "from_": "an export folder (`invoke export-results`); repeatable",
        "force": "verify again even if up to date",
        "plots": "also write report.html with its plots (default on; --no-plots skips it)",
        "config": "matrix file",
    },
)
@_cli
def verify(c, from_=None, force=False, plots=True, config=DEFAULT_CONFIG, verbose=False, quiet=False):
    """Gather per-target exports (same prepared inputs, same ONNX) and write one report here."""
    from modelmatrix.fanout import gather

    summary = gather(_load(config), [Path(f) for f in from_ or []], force=force, html=plots)
    _print_verdict(summary, quiet)


ns = Collection(
    data,
    matrix,
    build,
    images,
    bases,
    lock,
    ship,
    load,
    verify_image,
    clean,
    bench,
    doctor,
    finetune,
    ci_plan,
    export_results,
    verify,
)
