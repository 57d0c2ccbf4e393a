"""Plugins: loading and binding compiled native code (the CUDA op library, the TensorRT plugin spec)."""
