"""The plan: targets x stages as a graph of nodes, each keyed by the hash of its inputs.

Node ids: ``source`` (the checkpoint, imported into the workspace), ``prepare`` (host
preprocessing), ``<target>.<stage>`` (from targets/<t>/target.yaml) and ``verify`` (host).
A node's key is sha256 over its id, its code version, its runner fingerprint, its
parameters and the digests of the exact files it reads. Upstream digests come from the
upstream stamps, so a re-run that reproduces identical bytes stops the cascade there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .config import Matrix
from .errors import ConfigError
from .hashing import iter_files, sha256_json

#: Host nodes run code of the host package: their key covers all of it (and the shared contract),
#: not a hand-kept list of modules that would go stale the day verify imports a new one.
HOST_CODE_DIRS = ("modelmatrix", "targets/common")


@dataclass
class Ref:
    producer: str  # node id
    file: str  # output of that node (file or folder)
    optional: bool = False


@dataclass
class Node:
    id: str
    target: str | None  # None for host nodes
    stage: str
    inputs: dict[str, Ref] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    @property
    def host(self) -> bool:
        return self.target is None


def parse_ref(text: str, where: str) -> Ref:
    optional = text.endswith("?")
    text = text.rstrip("?")
    if "/" not in text:
        raise ConfigError(
            f"{where}: input {text!r} must look like 'producer/file' "
            "(e.g. torch.export/model.onnx or prepare/inputs.npy)"
        )
    producer, file = text.split("/", 1)
    return Ref(producer, file, optional)


_code_cache: dict[str, str] = {}


def code_hash(node: Node, folder: Path | None = None) -> str:
    """Hash of the code a node runs: the whole target folder (``folder``), the folder of the target
    whose image it uses, and the shared contract; or for a host node the whole host package."""
    cache_key = str(folder) if folder else "host"
    if cache_key in _code_cache:
        return _code_cache[cache_key]
    h = hashlib.sha256()
    if folder is None:
        paths = [(f.relative_to(REPO_ROOT).as_posix(), f) for d in HOST_CODE_DIRS for f in iter_files(REPO_ROOT / d)]
    else:
        common = REPO_ROOT / "targets"
        paths = [
            (f"targets/{f.relative_to(common).as_posix()}", f)
            for f in [common / "__init__.py", *iter_files(common / "common")]
        ]
        paths += [(f"target/{f.relative_to(folder).as_posix()}", f) for f in iter_files(folder)]
        # A target that runs in another's image (image.use) runs that target's code too (e.g.
        # onnxruntime_int8 imports targets.onnxruntime): its folder is part of the key as well.
        from .config import load_target

        used = load_target(folder).image.get("use")
        if used:
            other = folder.parent / used
            paths += [(f"uses/{used}/{f.relative_to(other).as_posix()}", f) for f in iter_files(other)]
    for name, p in paths:
        if p.is_file():
            h.update(str(name).encode() + b"\0" + p.read_bytes())
    _code_cache[cache_key] = h.hexdigest()
    return _code_cache[cache_key]


def stage_params(matrix: Matrix, target: str, names: list[str]) -> dict[str, Any]:
    """The parameters a stage declares, from its stanza's params or (for `model`) the model section."""
    stanza = matrix.target_cfg(target)["params"]
    out = {}
    for name in names:
        if name == "model":
            # The checkpoint enters through its content digest (the `source` node), not its path.
            out["model"] = {
                **{k: v for k, v in matrix.model.items() if k != "checkpoint"},
                "contract": matrix.contract(),
            }
        elif name in stanza:
            out[name] = stanza[name]
        else:
            raise ConfigError(f"targets/{target}/target.yaml: stage parameter {name!r} is not declared under params:")
    return out


def stage_node(matrix: Matrix, target: str, stage: str) -> Node:
    sdef = matrix.targets[target].stages[stage]
    where = f"targets/{target}/target.yaml: stages.{stage}"
    node = Node(
        f"{target}.{stage}", target, stage, outputs=list(sdef.outputs), params=stage_params(matrix, target, sdef.params)
    )
    for iname, text in sdef.inputs_for(node.params).items():
        node.inputs[iname] = parse_ref(text, f"{where}.inputs.{iname}")
    return node


def build_plan(matrix: Matrix, per_target_errors: bool = False) -> Any:
    """All nodes in run order (topological).

    With ``per_target_errors`` returns ``(plan, broken)``: a target whose manifest does not plan (an
    undeclared stage parameter, an input its producer does not declare) is left out of the plan and
    named in ``broken`` (target -> one-line problem), so it fails alone; without, the first problem
    raises ConfigError."""
    model = matrix.model
    data = matrix.raw["data"]
    nodes: dict[str, Node] = {}
    broken: dict[str, str] = {}
    if model["checkpoint"]:
        nodes["source"] = Node(
            "source", None, "source", outputs=["checkpoint"], params={"path": str(matrix.resolve(model["checkpoint"]))}
        )
    nodes["prepare"] = Node(
        "prepare",
        None,
        "prepare",
        params={
            "dataset": str(matrix.resolve(data["dataset"])),
            "contract": matrix.contract(),
            "limit": data["limit"],
            "ascend_bins": data["ascend_bins"],
        },
        outputs=["inputs.npy", "index.json"] + (["ascend"] if data["ascend_bins"] else []),
    )
    per_target: dict[str, dict[str, Node]] = {}
    for tname in matrix.enabled_targets():
        try:
            per_target[tname] = {
                f"{tname}.{s}": stage_node(matrix, tname, s) for s in matrix.targets[tname].matrix_stages
            }
        except ConfigError as exc:
            if not per_target_errors or tname == matrix.raw["verify"]["reference"]:
                raise
            broken[tname] = str(exc)
    for mine in per_target.values():
        nodes.update(mine)
    for tname, mine in per_target.items():
        try:
            _check_refs(nodes, only=mine)
        except ConfigError as exc:
            if not per_target_errors or tname == matrix.raw["verify"]["reference"]:
                raise
            broken[tname] = str(exc)
            for nid in mine:
                del nodes[nid]
    features = {
        t: Ref(f"{t}.infer", "features.npy")
        for t in matrix.enabled_targets()
        if t not in broken and "infer" in matrix.targets[t].matrix_stages
    }
    nodes["verify"] = Node(
        "verify",
        None,
        "verify",
        inputs={**{f"features:{t}": r for t, r in features.items()}, "index": Ref("prepare", "index.json")},
        outputs=["report.json", "report.md", "junit.xml"],
    )
    _check_refs(nodes)
    while True:
        try:
            order = _toposort(nodes)
            break
        except _Unplannable as exc:
            target = nodes[exc.node].target
            if not per_target_errors or target is None or target == matrix.raw["verify"]["reference"]:
                raise ConfigError(str(exc)) from None
            broken[target] = str(exc)
            for nid in [n for n, node in nodes.items() if node.target == target]:
                del nodes[nid]
            nodes["verify"].inputs.pop(f"features:{target}", None)
    return (order, broken) if per_target_errors else order


class _Unplannable(Exception):
    def __init__(self, node: str, message: str):
        super().__init__(message)
        self.node = node


def _check_refs(nodes: dict[str, Node], only: dict[str, Node] | None = None) -> None:
    """Every input names an output its producer declares (e.g. prepare/ascend needs ascend_bins)."""
    for node in (only or nodes).values():
        for name, ref in node.inputs.items():
            producer = nodes.get(ref.producer)
            if producer is not None and ref.file not in producer.outputs:
                where = f"targets/{node.target}/target.yaml: stages.{node.stage}" if node.target else node.id
                hint = " (set data.ascend_bins: true in matrix.yaml)" if ref.producer == "prepare" else ""
                raise ConfigError(
                    f"{where}.inputs.{name}: {ref.producer} has no output {ref.file!r} "
                    f"(it declares {', '.join(producer.outputs)}){hint}"
                )


def _toposort(nodes: dict[str, Node]) -> list[Node]:
    order: list[Node] = []
    state: dict[str, int] = {}

    def visit(nid: str, chain: tuple[str, ...]) -> None:
        if state.get(nid) == 2:
            return
        if state.get(nid) == 1:
            raise _Unplannable(nid, f"stage graph has a cycle: {' -> '.join(chain + (nid,))}")
        state[nid] = 1
        for name, ref in nodes[nid].inputs.items():
            if ref.producer in nodes:
                visit(ref.producer, chain + (nid,))
            elif not ref.optional:
                owner = ref.producer.partition(".")[0]
                raise _Unplannable(
                    nid,
                    f"{nid}: input {name} needs {ref.producer}/{ref.file}, and {ref.producer} "
                    f"is not a stage of this plan (is its target enabled in matrix.yaml?): "
                    f"enable targets.{owner} so that {ref.producer} runs first",
                )
        state[nid] = 2
        order.append(nodes[nid])

    for nid in nodes:
        visit(nid, ())
    return order


def node_key(node: Node, fingerprint: str, input_digests: dict[str, str], folder: Path | None = None) -> str:
    return sha256_json(
        {
            "node": node.id,
            "code": code_hash(node, folder),
            "env": fingerprint,
            "params": node.params,
            "inputs": input_digests,
        }
    )


def short(key: str) -> str:
    return key[:12]
