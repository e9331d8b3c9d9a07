"""The Ascend 310 target (CANN 5.0.1): atc ONNX -> OM (convert.py), benchmark-tool inference (infer.py).

Built to Huawei's documented behaviour and the ModelZoo ReID guide; the real toolkit was NOT executed
on the project's machines (proprietary, and no Ascend device): the tests run this code against a
test double of the toolkit (tests/fake_cann), and what it produces says so.
"""
