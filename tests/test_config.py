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


def test_shipped_matrix_lists_all_five_targets():
    m = load_matrix(REPO / "matrix.yaml")
    assert list(m.raw["targets"]) == ["torch", "onnxruntime", "caffe", "tensorrt", "ascend"]
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
        tmp_path, {"targets": {"torch": {}, "onnxruntime": {"params": {"batchsize": 4}}}})
    assert "targets.tensorrt.params.precision: expected one of fp32, fp16, int8, got 'fp8'" in _error(
        tmp_path, {"targets": {"torch": {}, "tensorrt": {"params": {"precision": "fp8"}}}})


def test_integer_and_bool_checks(tmp_path):
    assert "targets.torch.params.batch_size: expected an integer, got 1.5" in _error(
        tmp_path, {"targets": {"torch": {"params": {"batch_size": 1.5}}}})
    assert "targets.torch.params.batch_size: must be >= 1, got 0" in _error(
        tmp_path, {"targets": {"torch": {"params": {"batch_size": 0}}}})
    assert "targets.torch.enabled: expected true or false" in _error(
        tmp_path, {"targets": {"torch": {"enabled": "yes"}}})


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
        tmp_path, {"images": {"memory_limit": "lots"}})
    assert "model.checkpoint: expected a path, or null for seeded random weights, got ''" in _error(
        tmp_path, {"model": {"checkpoint": ""}})


def test_an_input_the_producer_does_not_write_is_refused_when_planning(tmp_path):
    from modelmatrix.plan import build_plan
    m = load_matrix(_write(tmp_path, {"data": {"ascend_bins": False}, "targets": {"torch": {}, "ascend": {}}}))
    with pytest.raises(ConfigError, match=r"stages.infer.inputs.bins: prepare has no output 'ascend'.*"
                                          r"data.ascend_bins: true"):
        build_plan(m)
