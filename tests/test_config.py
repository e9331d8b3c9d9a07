"""matrix.yaml validation: every bad key is one line naming the key path."""

from __future__ import annotations

import pytest
import yaml

from modelmatrix.config import load_matrix
from modelmatrix.errors import ConfigError

from mm_testing import REPO


def _write(tmp_path, data) -> str:
    p = tmp_path / "matrix.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def _error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as exc:
        load_matrix(_write(tmp_path, data))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_shipped_matrix_lists_the_five_backends_and_the_reduced_precision_ones_off():
    m = load_matrix(REPO / "matrix.yaml")
    assert list(m.raw["targets"])[:5] == ["torch", "onnxruntime", "caffe", "tensorrt", "ascend"]
    reduced = {"quantize", "onnxruntime_int8", "onnxruntime_fp16"}
    assert set(list(m.raw["targets"])[5:]) == reduced
    assert not any(m.raw["targets"][t]["enabled"] for t in reduced)  # random default weights cannot pass int8
    assert m.model["export"]["opset"] == 11
    assert m.target_cfg("caffe")["tolerance"]["rtol"] == pytest.approx(1e-3)
    assert m.target_cfg("caffe")["tolerance"]["cosine_min"] == pytest.approx(0.99999)


def test_wrong_type_names_the_key_path(tmp_path):
    msg = _error(tmp_path, {"targets": {"torch": {}, "onnxruntime": {"tolerance": {"rtol": "x"}}}})
    assert msg.endswith("targets.onnxruntime.tolerance.rtol: expected a number, got 'x'")
    assert "matrix.yaml" in msg


def test_yaml_style_exponent_strings_are_numbers(tmp_path):
    m = load_matrix(_write(tmp_path, "targets:\n  torch: {}\n  onnxruntime:\n    tolerance: {rtol: 1e-3}\n"))
    assert m.target_cfg("onnxruntime")["tolerance"]["rtol"] == pytest.approx(1e-3)


def test_unknown_key(tmp_path):
    msg = _error(tmp_path, {"model": {"arch": "reid-strong-baseline", "lastride": 1}})
    assert "model.lastride: unknown key" in msg


def test_unknown_target(tmp_path):
    msg = _error(tmp_path, {"targets": {"torch": {}, "openvino": {}}})
    assert "targets.openvino: unknown target" in msg


def test_unknown_target_param_and_bad_choice(tmp_path):
    assert "targets.onnxruntime.params.batchsize: unknown key" in _error(
        tmp_path, {"targets": {"torch": {}, "onnxruntime": {"params": {"batchsize": 4}}}}
    )
    assert "targets.tensorrt.params.precision: expected one of fp32, fp16, int8, got 'fp8'" in _error(
        tmp_path, {"targets": {"torch": {}, "tensorrt": {"params": {"precision": "fp8"}}}}
    )


def test_integer_and_bool_checks(tmp_path):
    assert "targets.torch.params.batch_size: expected an integer, got 1.5" in _error(
        tmp_path, {"targets": {"torch": {"params": {"batch_size": 1.5}}}}
    )
    assert "targets.torch.params.batch_size: must be >= 1, got 0" in _error(
        tmp_path, {"targets": {"torch": {"params": {"batch_size": 0}}}}
    )
    assert "targets.torch.enabled: expected true or false" in _error(
        tmp_path, {"targets": {"torch": {"enabled": "yes"}}}
    )


def test_bad_arch_and_reference(tmp_path):
    assert "model.arch: expected one of" in _error(tmp_path, {"model": {"arch": "osnet"}})
    assert "verify.reference: 'torch' is not a target" in _error(tmp_path, {"targets": {"onnxruntime": {}}})


def test_not_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in _error(tmp_path, "targets: [unclosed\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_matrix(tmp_path / "nope.yaml")
    assert "expected a mapping at the top level" in _error(tmp_path, "- a\n- b\n")


def test_defaults_filled_and_relative_paths(tmp_path):
    m = load_matrix(_write(tmp_path, {"targets": {"torch": {}}}))
    assert m.workspace == tmp_path / "workspace"
    assert m.target_cfg("torch")["params"]["batch_size"] == 16
    assert m.contract()["input_size"] == [256, 128]
    assert m.contract()["interpolation"] == "bilinear"


def test_values_checked_on_load_not_at_first_use(tmp_path):
    assert "images.memory_limit: expected 8g or 512m, got 'lots'" in _error(
        tmp_path, {"images": {"memory_limit": "lots"}}
    )
    assert "model.checkpoint: expected a path, or null for seeded random weights, got ''" in _error(
        tmp_path, {"model": {"checkpoint": ""}}
    )


def test_an_input_the_producer_does_not_write_is_refused_when_planning(tmp_path):
    from modelmatrix.plan import build_plan

    m = load_matrix(_write(tmp_path, {"data": {"ascend_bins": False}, "targets": {"torch": {}, "ascend": {}}}))
    with pytest.raises(
        ConfigError,
        match=r"stages.infer.inputs.bins: prepare has no output 'ascend'.*"
        r"data.ascend_bins: true",
    ):
        build_plan(m)


# --------------------------------------------------------------------------- required / allow_skip


def test_required_and_allow_skip_default_and_round_trip(tmp_path):
    m = load_matrix(
        _write(
            tmp_path, "targets:\n  torch: {required: true}\n  tensorrt: {allow_skip: no NVIDIA GPU on the CI runners}\n"
        )
    )
    assert m.target_cfg("torch")["required"] is True and m.target_cfg("torch")["allow_skip"] is None
    assert m.target_cfg("tensorrt")["required"] is False
    assert m.target_cfg("tensorrt")["allow_skip"] == "no NVIDIA GPU on the CI runners"


@pytest.mark.parametrize("value", ["true", "''", "'  '", "3"])
def test_allow_skip_needs_a_reason_string(tmp_path, value):
    msg = _error(tmp_path, f"targets:\n  torch: {{}}\n  caffe: {{allow_skip: {value}}}\n")
    assert "matrix.yaml: targets.caffe.allow_skip: give the reason as a string" in msg


def test_required_with_allow_skip_is_a_contradiction(tmp_path):
    msg = _error(tmp_path, {"targets": {"torch": {}, "caffe": {"required": True, "allow_skip": "no caffe"}}})
    assert "targets.caffe.allow_skip: contradicts required: true" in msg
    assert "expected true or false, got 'yes please'" in _error(
        tmp_path, {"targets": {"torch": {"required": "yes please"}}}
    )


# --------------------------------------------------------------------------- target manifests


def _targets(tmp_path, edit: dict[str, tuple[str, str]] | None = None):
    """A copy of the shipped manifests in tmp_path/targets; ``edit``: target -> (old, new) text."""
    root = tmp_path / "targets"
    for src in sorted((REPO / "targets").glob("*/target.yaml")):
        text = src.read_text()
        if edit and src.parent.name in edit:
            old, new = edit[src.parent.name]
            assert old in text
            text = text.replace(old, new, 1)
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        (root / src.parent.name / "target.yaml").write_text(text)  # overwrites an earlier edit
    return root


def _target_error(tmp_path, target: str, old: str, new: str) -> str:
    root = _targets(tmp_path, {target: (old, new)})
    with pytest.raises(ConfigError) as exc:
        load_matrix(_write(tmp_path, {"targets": {"torch": {}}}), targets_dir=root)
    msg = str(exc.value)
    assert "\n" not in msg
    prefix = f"{root / target / 'target.yaml'}: "
    assert msg.startswith(prefix), msg
    return msg[len(prefix) :]


def test_shipped_manifests_pass_with_complete_requires():
    from modelmatrix.config import discover_targets

    known = discover_targets()
    assert {"torch", "onnxruntime", "caffe", "tensorrt", "ascend"} <= set(known)
    for t in known.values():  # every stage's requires is complete (merged)
        for stage in t.stages.values():
            assert set(stage.requires) == {"modules", "commands", "devices"}, (t.name, stage.name)
    assert "nvidia-gpu" in known["tensorrt"].stages["infer"].requires["devices"]
    # per-stage: atc converts on any x86 host with the toolkit; only inference needs the NPU
    assert known["ascend"].stages["convert"].requires["devices"] == []
    assert "ascend-npu" in known["ascend"].stages["infer"].requires["devices"]


def test_manifest_unknown_keys_anywhere(tmp_path):
    assert (
        _target_error(tmp_path, "onnxruntime", "outputs: [features.npy]", "ouputs: [features.npy]")
        == "stages.infer.ouputs: unknown key (allowed: inputs, params, outputs, on_demand, requires, nondeterministic)"
    )
    assert (
        _target_error(tmp_path, "caffe", "requires:", "requirs:")
        == "requirs: unknown key (allowed: name, summary, requires, image, params, stages, tolerance, container)"
    )
    assert _target_error(tmp_path, "torch", "type: int, default: 16", "type: int, defualt: 16").startswith(
        "params.batch_size.defualt: unknown key (allowed: type, default, min, max, choices, help, items)"
    )
    assert _target_error(tmp_path, "ascend", "tolerance: {rtol:", "tolerance: {rtl:").startswith(
        "tolerance.rtl: unknown key"
    )
    assert (
        _target_error(tmp_path, "tensorrt", "devices: [nvidia-gpu]", "devices: [nvidia-gpu]\n  gpus: 1")
        == "requires.gpus: unknown key (allowed: modules, commands, devices)"
    )


def test_manifest_param_specs(tmp_path):
    assert (
        _target_error(tmp_path, "torch", "type: int, default: 16", "type: integer, default: 16")
        == "params.batch_size.type: expected one of int, float, number, str, bool, list, got 'integer'"
    )
    assert (
        _target_error(tmp_path, "torch", "type: int, default: 16", "type: int, default: 0")
        == "params.batch_size.default: must be >= 1, got 0"
    )
    assert _target_error(
        tmp_path, "caffe", "{type: str, default: output", "{type: str, min: 1, default: output"
    ).startswith("params.output_name.min: only for int")
    assert (
        _target_error(
            tmp_path,
            "tensorrt",
            "default: fp32, choices: [fp32, fp16, int8]",
            "default: fp8, choices: [fp32, fp16, int8]",
        )
        == "params.precision.default: expected one of fp32, fp16, int8, got 'fp8'"
    )
    assert (
        _target_error(tmp_path, "torch", "help: images per forward pass", "help: [images]")
        == "params.batch_size.help: expected a string, got list"
    )


def test_manifest_stage_inputs_outputs_params(tmp_path):
    assert (
        _target_error(tmp_path, "onnxruntime", "onnx: torch.export/model.onnx", "onnx: model.onnx")
        == "stages.infer.inputs.onnx: input 'model.onnx' must look like 'producer/file' "
        "(e.g. torch.export/model.onnx or prepare/inputs.npy)"
    )
    assert (
        _target_error(tmp_path, "ascend", "om: ascend.convert/om", "om: ascend.convrt/om")
        == "stages.infer.inputs.om: ascend has no stage 'convrt' (stages: convert, infer)"
    )
    assert (
        _target_error(tmp_path, "caffe", "outputs: [model.prototxt, model.caffemodel]", "outputs: model.prototxt")
        == "stages.convert.outputs: expected a list, got 'model.prototxt'"
    )
    assert _target_error(tmp_path, "tensorrt", "params: [batch_size]\n", "params: [batchsize]\n").startswith(
        "stages.infer.params[0]: 'batchsize' is not declared under params:"
    )
    assert (
        _target_error(tmp_path, "torch", "on_demand: true", "on_demand: sometimes")
        == "stages.bench.on_demand: expected true or false, got 'sometimes'"
    )
    # an optional input ("?") is fine, and a stage with nothing declared is an empty stage
    root = _targets(tmp_path / "ok", {"caffe": ("inputs: prepare/inputs.npy\n", "inputs: prepare/inputs.npy?\n")})
    (root / "demo").mkdir()
    (root / "demo" / "target.yaml").write_text("name: demo\nstages: {run: }\n")
    from modelmatrix.config import discover_targets

    known = discover_targets(root)
    assert known["caffe"].stages["infer"].inputs["inputs"] == "prepare/inputs.npy?"
    run = known["demo"].stages["run"]
    assert (run.inputs, run.params, run.outputs, run.on_demand) == ({}, [], [], False)


def test_per_stage_requires_default_to_the_targets(tmp_path):
    from modelmatrix.config import discover_targets

    root = _targets(
        tmp_path,
        {
            "onnxruntime": (
                "outputs: [bench.json]\n",
                "outputs: [bench.json]\n    requires: {devices: [nvidia-gpu], commands: []}\n",
            )
        },
    )
    ort = discover_targets(root)["onnxruntime"]
    assert ort.requires == {"modules": ["onnxruntime", "numpy"], "commands": [], "devices": []}
    assert ort.stages["infer"].requires == ort.requires
    assert ort.stages["bench"].requires == {
        "modules": ["onnxruntime", "numpy"],
        "commands": [],
        "devices": ["nvidia-gpu"],
    }
    assert (
        _target_error(
            tmp_path / "bad",
            "onnxruntime",
            "outputs: [bench.json]\n",
            "outputs: [bench.json]\n    requires: {device: [nvidia-gpu]}\n",
        )
        == "stages.bench.requires.device: unknown key (allowed: modules, commands, devices)"
    )


# --------------------------------------------------------------------------- file edge cases


def test_not_utf8_directory_and_empty_files(tmp_path):
    p = tmp_path / "matrix.yaml"
    p.write_bytes(b"targets:\n  torch: {}\nworkspace: caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load_matrix(p)
    assert str(exc.value) == f"{p}: not UTF-8 text (byte 0xe9 at line 3); save the file as UTF-8"
    with pytest.raises(ConfigError) as exc:
        load_matrix(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: is a directory, not a YAML file")
    for text in ("", "# nothing here\n\n   # really\n"):
        msg = _error(tmp_path, text)
        assert msg.startswith(f"{p}: empty: nothing to build or check; list the targets, e.g. `targets:")
    assert "matrix.yaml: targets: no targets; list at least the reference ('torch')" in _error(
        tmp_path, "runner: local\n"
    )


def test_absurd_numbers_are_refused_at_load(tmp_path):
    t = {"torch": {}}
    assert _error(tmp_path, {"targets": t, "model": {"input_size": [100000, 100000]}}).endswith(
        "model.input_size[0]: must be between 16 and 4096 (pixels, H and W), got 100000"
    )
    assert _error(tmp_path, {"targets": t, "model": {"input_size": [256, 8]}}).endswith(
        "model.input_size[1]: must be between 16 and 4096 (pixels, H and W), got 8"
    )
    for text in ("1e11", "100000000000", "1.0e+11"):
        assert _error(tmp_path, f"targets: {{torch: {{}}}}\nstage_timeout_s: {text}\n").endswith(
            "stage_timeout_s: must be between 1 and 604800 (seconds, 7 days at most), got 100000000000"
        )
    assert _error(tmp_path, {"targets": t, "stage_timeout_s": 90.5}).endswith(
        "stage_timeout_s: expected an integer, got 90.5"
    )
    assert _error(tmp_path, {"targets": t, "stage_timeout_s": True}).endswith(
        "stage_timeout_s: expected an integer, got True"
    )
    assert _error(tmp_path, {"targets": {"torch": {}, "caffe": {"tolerance": {"atol": True}}}}).endswith(
        "targets.caffe.tolerance.atol: expected a number, got True"
    )
    assert _error(tmp_path, "targets: {torch: {}, caffe: {tolerance: {atol: .inf}}}\n").endswith(
        "targets.caffe.tolerance.atol: expected a finite number, got inf"
    )
    m = load_matrix(_write(tmp_path, {"targets": t, "stage_timeout_s": 7200.0}))
    assert m.raw["stage_timeout_s"] == 7200 and isinstance(m.raw["stage_timeout_s"], int)


# --------------------------------------------------------------------------- YAML itself


def test_duplicate_keys_name_both_lines(tmp_path):
    text = (
        "targets:\n  torch: {}\n  caffe:\n    tolerance:\n      rtol: 1.0e-3\n      atol: 1.0e-3\n      rtol: 1.0e-2\n"
    )
    assert (
        _error(tmp_path, text)
        == f"{tmp_path / 'matrix.yaml'}: duplicate key 'rtol' at lines 5 and 7 (the second would silently win)"
    )
    assert _error(tmp_path, "targets: {torch: {}}\nrunner: local\nrunner: docker\n").endswith(
        "duplicate key 'runner' at lines 2 and 3 (the second would silently win)"
    )
    root = _targets(tmp_path, {"caffe": ("image:\n", "image: {}\nimage:\n")})
    with pytest.raises(ConfigError, match=r"caffe/target.yaml: duplicate key 'image' at lines \d+ and \d+"):
        load_matrix(_write(tmp_path, {"targets": {"torch": {}}}), targets_dir=root)


def test_merge_keys_still_work_and_override(tmp_path):
    m = load_matrix(
        _write(
            tmp_path,
            (
                "targets:\n  torch: {}\n"
                "  caffe:\n    tolerance: &fp32 {rtol: 1.0e-3, atol: 1.0e-3, cosine_min: 0.99999}\n"
                "  onnxruntime:\n    tolerance: {<<: *fp32, atol: 2.0e-3}\n"
            ),
        )
    )
    tol = m.target_cfg("onnxruntime")["tolerance"]
    assert (tol["rtol"], tol["atol"], tol["cosine_min"]) == (
        pytest.approx(1e-3),
        pytest.approx(2e-3),
        pytest.approx(0.99999),
    )


def test_alias_bomb_is_refused_fast(tmp_path):
    import time

    # "billion laughs": 9 levels of 9 aliases each, 9 ** 9 = 387 million strings when expanded
    rows = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "targets:\n  torch: {}\n  onnxruntime:\n    params:\n      providers:\n" + "".join(
        f"        - {row}\n" for row in rows
    )
    start = time.perf_counter()
    msg = _error(tmp_path, text)
    elapsed = time.perf_counter() - start
    assert "matrix.yaml: aliases expand past 10000 nodes" in msg
    assert elapsed < 0.5, elapsed
    assert "recursive alias at line 2" in _error(tmp_path, "targets: {torch: {}}\nx: &r [1, *r]\n")


def test_deep_nesting_is_refused(tmp_path):
    assert "nested more than 32 levels deep" in _error(
        tmp_path, "targets: {torch: {}}\nx: " + "[" * 100 + "]" * 100 + "\n"
    )


# --------------------------------------------------------------------------- list params


def test_list_params_hold_plain_values_of_the_declared_type(tmp_path):
    for bad, what in (("[CPUExecutionProvider, [a, b]]", "list"), ("[{a: 1}]", "dict"), ("[null]", "None")):
        msg = _error(tmp_path, f"targets: {{torch: {{}}, onnxruntime: {{params: {{providers: {bad}}}}}}}\n")
        assert f"targets.onnxruntime.params.providers[{1 if 'CPU' in bad else 0}]: expected a" in msg
        assert f"got {what}" in msg
    # the shipped manifest types its items (items: str)
    root = _targets(tmp_path, {})
    assert "items: str" in (root / "onnxruntime" / "target.yaml").read_text()
    with pytest.raises(ConfigError) as exc:
        load_matrix(
            _write(tmp_path, {"targets": {"torch": {}, "onnxruntime": {"params": {"providers": ["a", 3]}}}}),
            targets_dir=root,
        )
    assert str(exc.value).endswith("targets.onnxruntime.params.providers[1]: expected a string, got 3")
    m = load_matrix(_write(tmp_path, {"targets": {"torch": {}, "onnxruntime": {}}}), targets_dir=root)
    assert m.target_cfg("onnxruntime")["params"]["providers"] == ["CPUExecutionProvider"]


def test_tolerance_check_fills_defaults_and_names_the_key():
    from modelmatrix.config import TOLERANCE

    tol = TOLERANCE.check({"rtol": 1e-3}, "targets.t.tolerance")
    assert tol == {
        "rtol": 1e-3,
        "atol": 0.0,
        "cosine_min": 0.0,
        "rank1_delta": 0.0,
        "map_delta": 0.0,
        "checks": ["allclose", "cosine", "retrieval"],
    }
    with pytest.raises(ConfigError) as exc:
        TOLERANCE.check({"checks": ["cosine", "l2"]}, "targets.t.tolerance")
    assert str(exc.value) == "targets.t.tolerance.checks[1]: expected one of allclose, cosine, retrieval, got 'l2'"


# --------------------------------------------------------------------------- conditional inputs

COND = """
name: cond
params:
  precision: {type: str, default: fp32, choices: [fp32, fp16, int8]}
stages:
  convert:
    inputs:
      onnx: torch.export/model.onnx
      qdq: {from: torch.export/meta.json, when: {precision: int8}}
      half: {from: torch.export/weights.pt, when: {precision: [fp16, int8]}}
    params: [precision]
    outputs: [model.engine]
"""


def test_conditional_inputs_follow_the_stage_params(tmp_path):
    from modelmatrix.plan import stage_node

    root = _targets(tmp_path, {})
    (root / "cond").mkdir()
    (root / "cond" / "target.yaml").write_text(COND)
    seen = {}
    for precision in ("fp32", "fp16", "int8"):
        m = load_matrix(
            _write(tmp_path, {"targets": {"torch": {}, "cond": {"params": {"precision": precision}}}}), targets_dir=root
        )
        seen[precision] = sorted(stage_node(m, "cond", "convert").inputs)
    assert seen == {"fp32": ["onnx"], "fp16": ["half", "onnx"], "int8": ["half", "onnx", "qdq"]}


@pytest.mark.parametrize(
    "decl,msg",
    [
        (
            "{from: torch.export/meta.json, when: {batch: 1}}",
            "stages.convert.inputs.qdq.when.batch: condition on 'batch', which is not one of this stage's params",
        ),
        ("{from: torch.export/meta.json}", "stages.convert.inputs.qdq.when: give the condition"),
        ("{frm: torch.export/meta.json, when: {precision: int8}}", "stages.convert.inputs.qdq.frm: unknown key"),
        (
            "{from: nonsense, when: {precision: int8}}",
            "stages.convert.inputs.qdq.from: input 'nonsense' must look like",
        ),
    ],
)
def test_bad_conditional_inputs_are_one_line(tmp_path, decl, msg):
    root = _targets(tmp_path, {})
    (root / "cond").mkdir()
    (root / "cond" / "target.yaml").write_text(
        COND.replace("{from: torch.export/meta.json, when: {precision: int8}}", decl)
    )
    with pytest.raises(ConfigError) as exc:
        load_matrix(_write(tmp_path, {"targets": {"torch": {}}}), targets_dir=root)
    assert msg in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


# --------------------------------------------------------------------------- container options, engines


def test_container_options_merge_manifest_and_stanza_and_refuse_nonsense(tmp_path):
    root = _targets(
        tmp_path, {"onnxruntime": ("stages:", "container: {shm_size: 1g, ulimits: {memlock: -1}}\nstages:")}
    )
    m = load_matrix(
        _write(
            tmp_path,
            {
                "targets": {
                    "torch": {},
                    "onnxruntime": {"docker_host": "ssh://me@gpu-box", "container": {"gpus": {"device_ids": ["0"]}}},
                }
            },
        ),
        targets_dir=root,
    )
    c = m.target_cfg("onnxruntime")["container"]
    assert c["shm_size"] == "1g" and c["ulimits"] == {"memlock": {"soft": -1, "hard": -1}}  # the manifest's
    assert c["gpus"] == {"count": None, "device_ids": ["0"]}  # the stanza's
    assert m.target_cfg("onnxruntime")["docker_host"] == "ssh://me@gpu-box"
    for bad, msg in (
        (({"container": {"gpus": {"count": 1, "device_ids": ["a"]}}}), "give count or device_ids"),
        (({"container": {"devices": ["/tmp/x"]}}), "devices[0]: expected /dev/NAME"),
        (({"docker_host": "gpu-box"}), "docker_host: expected an engine address"),
    ):
        with pytest.raises(ConfigError) as exc:
            load_matrix(_write(tmp_path, {"targets": {"torch": {}, "onnxruntime": bad}}), targets_dir=root)
        assert msg in str(exc.value) and "targets.onnxruntime." in str(exc.value)


def test_user_file_paths_in_the_stanza_must_be_declared(tmp_path):
    m = load_matrix(_write(tmp_path, {"targets": {"torch": {}, "ascend": {"image": {"files": {"toolkit": "/x.run"}}}}}))
    assert m.target_cfg("ascend")["image"]["files"] == {"toolkit": "/x.run"}
    msg = _error(tmp_path, {"targets": {"torch": {}, "ascend": {"image": {"files": {"tolkit": "/x.run"}}}}})
    assert "targets.ascend.image.files.tolkit: targets/ascend/target.yaml declares no such file" in msg
