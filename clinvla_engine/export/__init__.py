"""Compiling ClinVLA's encoders for deployment: ``clinvla-build-engine`` and its parts.

    from clinvla_engine.export import build_engine
    result = build_engine("runs/small", "engine_dir", backend="auto", device="cpu")
    print(result.report)                      # the parity report

Modules: ``graphs`` (the image and text graphs and their I/O specs), ``onnx_export`` and
``surgery`` (ONNX export, GraphSurgeon passes, mixed precision), ``quantize`` (FP8 Q/DQ),
``aoti_backend`` / ``ort_backend`` / ``trt_backend`` / ``compile_backend`` / ``openvino_backend``
(one builder each),
``parity`` (engine vs PyTorch), ``studies`` (the user's studies for parity and FP8 / int8 calibration),
``build`` (orchestration), ``inspection`` (inspect / compare), ``commands`` (the CLI). The graph
wrappers, dtype maps and file helpers it shares with the runtime live in clinvla_engine.runtime
(the arrow points down: the runtime never imports this package). Importing this package imports
neither onnx nor TensorRT nor OpenVINO.
"""
from .context import BuildError


def build_engine(*args, **kwargs):
    from .build import build_engine as _build

    return _build(*args, **kwargs)


__all__ = ["BuildError", "build_engine"]
