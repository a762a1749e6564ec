"""FP8 (E4M3) explicit quantization: Q/DQ pairs in front of every weight GEMM, for TensorRT.

TensorRT 10 only picks FP8 kernels where the graph says so (QuantizeLinear / DequantizeLinear
pairs), and TensorRT 11 has no FP8 builder flag at all, so FP8 is a graph rewrite:

* calibration: the float32 graph runs in ONNX Runtime on sample inputs with the activation input
  of every MatMul / Gemm whose other input is a constant (a weight) exposed as an extra output;
  ``amax`` = the largest magnitude seen per activation;
* rewrite: activation ``x`` -> Q(scale = amax / 448, E4M3) -> DQ -> GEMM (one scale per tensor),
  and the weight ``W`` -> Q(scale = max|W| / 448 per output channel) -> DQ -> GEMM (448 = the
  largest E4M3 value).

Everything else (norms, softmax, residual adds) keeps the graph's precision. The opset is raised
to 19, the first with FLOAT8 Q/DQ. On a CPU the rewritten float32 graph runs in ONNX Runtime as a
fake-quantised model, which is how the pass is tested without a GPU.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from .surgery import _set_meta, typed_constant

E4M3_MAX = 448.0
GEMMS = ("MatMul", "Gemm")


def _weight_gemms(graph, gs):
    """(node, activation input index, weight input index) for GEMMs with a constant weight."""
    out = []
    for node in graph.nodes:
        if node.op not in GEMMS or len(node.inputs) < 2:
            continue
        a, b = node.inputs[0], node.inputs[1]
        if isinstance(b, gs.Constant) and isinstance(a, gs.Variable):
            out.append((node, 0, 1))
        elif isinstance(a, gs.Constant) and isinstance(b, gs.Variable):
            out.append((node, 1, 0))
    return out


def calibrate(model_fp32, feeds_list: list[dict]) -> dict[str, float]:
    """amax of every weight-GEMM activation, over ONNX Runtime runs of the float32 graph."""
    gs = backends.import_backend("onnx_graphsurgeon", "export", "FP8 calibration")
    ort = backends.import_backend("onnxruntime", "export", "FP8 calibration")
    graph = gs.import_onnx(model_fp32)
    acts = []
    for node, ai, _ in _weight_gemms(graph, gs):
        t = node.inputs[ai]
        if t.name not in {o.name for o in graph.outputs} and t.name not in acts:
            acts.append(t.name)
    tensors = graph.tensors()
    for name in acts:
        var = tensors[name]
        var.dtype = var.dtype or np.float32
        graph.outputs.append(var)
    probe = gs.export_onnx(graph)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    amax = {n: 0.0 for n in acts}
    for feeds in feeds_list:
        values = sess.run(acts, feeds)
        for n, v in zip(acts, values):
            amax[n] = max(amax[n], float(np.abs(v).max()) if v.size else 0.0)
    return amax


def insert_fp8_qdq(model, amax: dict[str, float]):
    """`model` (fp32 or fp16, cleaned) with E4M3 Q/DQ before each weight GEMM (see module docstring)."""
    gs = backends.import_backend("onnx_graphsurgeon", "export", "FP8 quantization")
    onnx = backends.import_backend("onnx", "export", "FP8 quantization")
    TP = onnx.TensorProto
    graph = gs.import_onnx(model)
    count = 0

    def qdq(tensor, amax, dtype, tag: str, axis: int | None = None):
        """Q/DQ pair on `tensor`; amax is a float (per tensor) or a 1-D array (per channel on axis)."""
        nonlocal count
        count += 1
        amax = np.maximum(np.asarray(amax, dtype=np.float32), 1e-12)
        scale = gs.Constant(f"fp8_scale_{tag}_{count}", np.asarray(amax / E4M3_MAX, dtype=dtype))
        zp = typed_constant(f"fp8_zero_{tag}_{count}", np.zeros(amax.shape, np.float32), TP.FLOAT8E4M3FN)
        q = gs.Variable(f"{tensor.name}_q{count}", dtype=None, shape=tensor.shape)
        dq = gs.Variable(f"{tensor.name}_dq{count}", dtype=dtype, shape=tensor.shape)
        extra = {"axis": axis} if axis is not None else {}
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"QuantizeLinear_{tag}_{count}", inputs=[tensor, scale, zp],
                                   outputs=[q], attrs={"saturate": 1, **extra}))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"DequantizeLinear_{tag}_{count}", inputs=[q, scale, zp],
                                   outputs=[dq], attrs=extra))
        return dq

    gemms = _weight_gemms(graph, gs)
    for node, ai, wi in gemms:
        act, weight = node.inputs[ai], node.inputs[wi]
        wvals = np.asarray(weight.values)
        dtype = wvals.dtype if wvals.dtype in (np.float16, np.float32) else np.float32
        a_amax = amax.get(act.name)
        if a_amax is None:  # not calibrated (renamed by a rewrite): leave this GEMM unquantised
            continue
        w32 = np.abs(wvals.astype(np.float32))
        axis = None  # per output channel where the layout is known: x @ W (W: K x N) or Gemm(transB)
        if wvals.ndim == 2 and wi == 1:
            axis = 0 if (node.op == "Gemm" and node.attrs.get("transB", 0)) else 1
        w_amax = w32.max(axis=1 - axis) if axis is not None else float(w32.max())
        inputs = list(node.inputs)
        inputs[ai] = qdq(act, a_amax, dtype, "act")
        inputs[wi] = qdq(weight, w_amax, dtype, "w", axis)
        node.inputs = inputs
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.graph.value_info[:]
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 19:
            imp.version = 19
    for prop in model.metadata_props:
        _set_meta(out, prop.key, prop.value)
    _set_meta(out, "clinvla.fp8_gemms", str(len(gemms)))
    return out
