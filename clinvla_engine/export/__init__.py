"""Compiling ClinVLA's encoders for deployment: ``clinvla-build-engine`` and its parts.

    from clinvla_engine.export import build_engine
    result = build_engine("runs/small", "engine_dir", backend="auto", device="cpu")
    print(result.report)                      # the parity report

Modules: ``graphs`` (the image and text graphs and their I/O specs), ``onnx_export`` and
``surgery`` (ONNX export, GraphSurgeon passes, mixed precision), ``quantize`` (FP8 Q/DQ),
``aoti_backend`` / ``ort_backend`` / ``trt_backend`` / ``compile_backend`` (one builder each),
``parity`` (engine vs PyTorch), ``build`` (orchestration), ``inspection`` (inspect / compare),
``commands`` (the CLI). Importing this package imports neither onnx nor TensorRT.
"""
from .context import BuildError


def build_engine(*args, **kwargs):
    from .build import build_engine as _build

    return _build(*args, **kwargs)


__all__ = ["BuildError", "build_engine"]
