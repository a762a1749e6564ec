"""ONNX Runtime backend: the cleaned ONNX graphs, run with all graph optimisations enabled
(CPU execution provider; the CUDA provider when onnxruntime-gpu is installed)."""
from __future__ import annotations

from .. import backends
from .context import BuildContext
from .onnx_export import save

NAME = "onnxruntime"


def unsupported(device: str, precision: str) -> str | None:
    """Why this backend cannot build (device, precision) here, or None when it can."""
    avail = backends.module("onnxruntime", "export")
    if not avail:
        return avail.why
    if not backends.onnx_graphsurgeon():
        return backends.onnx_graphsurgeon().why
    if device == "cuda" and not backends.onnxruntime_cuda():
        return backends.onnxruntime_cuda().why
    if precision == "fp16" and device != "cuda":
        return "ONNX Runtime runs fp16 graphs fast only on the GPU; use --precision fp32 on the CPU"
    if precision not in ("fp32", "fp16"):
        return f"the onnxruntime backend builds fp32 or fp16 (GPU), not {precision}"
    return None


def build(ctx: BuildContext) -> dict:
    graphs = {}
    for graph in ("image", "text"):
        model = ctx.onnx_at(graph, ctx.precision)
        file = f"{graph}.onnx"
        save(model, ctx.out / file)
        graphs[graph] = ctx.graph_entry(graph, file)
    providers = backends.onnxruntime_providers()
    return {"graphs": graphs, "backend_details": {"providers": list(providers), "graph_optimization": "ORT_ENABLE_ALL"}}
