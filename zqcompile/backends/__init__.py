"""Backends: where a compiled graph runs or is exported to (ONNX standard / TensorRT dialects, TensorRT plans).

Each backend is a table `zq op -> implementation or translator`; backends never run passes.
"""
