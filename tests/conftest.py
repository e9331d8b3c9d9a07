"""Root conftest: its presence puts tests/ on sys.path (pytest's prepend import mode), so test
files in tests/docker/ can import the shared helpers in tests/mm_testing.py.

Tests use real torch, ONNX Runtime, Caffe and Docker; nothing here fakes a toolchain."""
