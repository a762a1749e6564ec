"""Whether a graph is being captured: eager-only shortcuts (data-dependent shapes or branches) step
aside for ONNX export, torch.export, torch.compile and tracing."""
from __future__ import annotations

import torch


def capturing() -> bool:
    """True while a graph is being captured (ONNX export, torch.export, torch.compile, tracing)."""
    compiler = getattr(torch, "compiler", None)
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or (compiler is not None and getattr(compiler, "is_compiling", lambda: False)())
        or (compiler is not None and getattr(compiler, "is_exporting", lambda: False)())
    )
