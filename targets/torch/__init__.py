"""PyTorch target: model build, ONNX export, reference features (runs inside the torch image)."""
