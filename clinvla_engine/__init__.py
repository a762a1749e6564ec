"""ClinVLA: multi-view chest X-ray and report alignment, and the engine that searches an archive."""
from __future__ import annotations

__version__ = "0.1.0"


def build_info() -> dict:
    """What is built and available here (extension, CUDA, Triton, ONNX Runtime, TensorRT), and why not."""
    from .backends import build_info as _build_info

    return _build_info()


from .cpp import cmake_prefix_path  # noqa: E402  (libclinvla's CMake package; torch-free)

__all__ = ["__version__", "build_info", "cmake_prefix_path"]
