"""Lowering an engine to other runtimes: ONNX (standard and TensorRT dialects) and TensorRT."""
