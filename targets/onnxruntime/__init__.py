"""ONNX Runtime target (runs inside the onnxruntime image)."""
