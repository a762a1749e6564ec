"""onnx-graphsurgeon passes over an exported graph, and the mixed-precision rewrite.

``clean(model)``: shape inference, then constant folding, dead-node and dead-output removal
(including unused optional outputs such as LayerNormalization's Mean / InvStdDev), removal of
redundant Casts (identity casts, and float16 -> float32 -> float16 round trips), a topological
sort, unique node names, and the list of nodes that must compute in float32 (LayerNormalization,
Softmax, the final L2 norm) written into the model's metadata as ``clinvla.fp32_nodes`` for the
TensorRT builder's per-layer precision.

``to_precision(model, "fp16" | "bf16")``: rewrites a float32 graph so that everything runs in the
reduced type except those float32 nodes, which get a Cast to float32 on each input and a Cast back
on each output; graph inputs and outputs stay float32 (a Cast sits right behind each input and in
front of each output). This is what a strongly typed TensorRT network and ONNX Runtime's CUDA
provider execute; TensorRT 11 has no other way to ask for fp16.

``check(model)``: ``onnx.checker`` with full shape and type checking.
"""
from __future__ import annotations

import json

import numpy as np

from .. import backends

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2")
# Ops kept in float32 under bfloat16 as well: ONNX defines Conv for bfloat16 only from opset 22.
FP32_OPS_BF16_EXTRA = ("Conv",)
OPTIONAL_TRAILING_OUTPUTS = ("LayerNormalization", "Dropout", "BatchNormalization", "MaxPool")
METADATA_FP32 = "clinvla.fp32_nodes"
METADATA_PRECISION = "clinvla.precision"


def _gs():
    return backends.import_backend("onnx_graphsurgeon", "export", "the ONNX export's GraphSurgeon passes")


def _onnx():
    return backends.import_backend("onnx", "export", "ONNX export")


def _infer(model):
    onnx = _onnx()
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a help for the passes, not a requirement
        return model


def _set_meta(model, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def get_meta(model, key: str, default: str | None = None) -> str | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return default


def clean(model, keep_outputs: list[str] | None = None) -> tuple[object, dict]:
    """The cleanup passes; returns (model, counts of what each pass removed)."""
    gs = _gs()
    graph = gs.import_onnx(_infer(model))
    report = {"nodes_before": len(graph.nodes)}
    if keep_outputs is not None:
        unknown = [n for n in keep_outputs if n not in {o.name for o in graph.outputs}]
        if unknown:
            raise ValueError(f"graph has no output(s) {unknown}; it has {[o.name for o in graph.outputs]}")
        report["outputs_removed"] = [o.name for o in graph.outputs if o.name not in keep_outputs]
        graph.outputs = [o for o in graph.outputs if o.name in keep_outputs]
    graph.fold_constants()
    report["optional_outputs_removed"] = _trim_optional_outputs(graph)
    graph.cleanup(remove_unused_node_outputs=True)
    report["casts_removed"] = _remove_redundant_casts(graph)
    graph.cleanup(remove_unused_node_outputs=True).toposort()
    _name_nodes(graph)
    fp32 = [n.name for n in graph.nodes if n.op in FP32_OPS]
    out = gs.export_onnx(graph)
    out.producer_name = model.producer_name or "clinvla-engine"
    out.producer_version = model.producer_version
    for prop in model.metadata_props:
        _set_meta(out, prop.key, prop.value)
    _set_meta(out, METADATA_FP32, json.dumps(fp32))
    _set_meta(out, METADATA_PRECISION, "fp32")
    report["nodes_after"] = len(graph.nodes)
    report["fp32_nodes"] = len(fp32)
    return out, report


def _trim_optional_outputs(graph) -> int:
    outputs = {o.name for o in graph.outputs}
    removed = 0
    for node in graph.nodes:
        if node.op not in OPTIONAL_TRAILING_OUTPUTS:
            continue
        while len(node.outputs) > 1 and not node.outputs[-1].outputs and node.outputs[-1].name not in outputs:
            node.outputs.pop()
            removed += 1
    return removed


def _remove_redundant_casts(graph) -> int:
    """Identity casts, and casts that undo a widening cast (x:f16 -> f32 -> f16); returns how many."""
    onnx = _onnx()
    helper = onnx.helper
    graph_outputs = {o.name for o in graph.outputs}
    widening = {(np.dtype(np.float16), np.dtype(np.float32)), (np.dtype(np.float16), np.dtype(np.float64)),
                (np.dtype(np.float32), np.dtype(np.float64)), (np.dtype(np.int32), np.dtype(np.int64))}

    def np_dtype(to):
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(to)))
        except Exception:
            return None

    removed = 0
    for node in list(graph.nodes):
        if node.op != "Cast" or not node.inputs or node.outputs[0].name in graph_outputs:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        target = np_dtype(node.attrs.get("to"))
        source = getattr(src, "dtype", None)
        replacement = None
        if target is not None and source is not None and np.dtype(source) == target:
            replacement = src
        elif src.inputs and src.inputs[0].op == "Cast" and len(src.outputs) == 1:
            inner = src.inputs[0]
            origin = inner.inputs[0]
            origin_dtype = getattr(origin, "dtype", None)
            mid = np_dtype(inner.attrs.get("to"))
            if origin_dtype is not None and target is not None and mid is not None \
                    and np.dtype(origin_dtype) == target and (target, mid) in widening:
                replacement = origin
        if replacement is None:
            continue
        for consumer in list(dst.outputs):
            consumer.inputs = [replacement if t is dst else t for t in consumer.inputs]
        node.outputs.clear()
        removed += 1
    return removed


def _name_nodes(graph) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def fp32_nodes(model) -> list[str]:
    return json.loads(get_meta(model, METADATA_FP32, "[]"))


def to_precision(model, precision: str):
    """A copy of cleaned float32 `model` computing in fp16 or bf16 (see the module docstring)."""
    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"ONNX precision must be fp32, fp16 or bf16, got {precision!r}")
    onnx = _onnx()
    gs = _gs()
    TP = onnx.TensorProto
    low = TP.FLOAT16 if precision == "fp16" else TP.BFLOAT16
    keep_ops = set(FP32_OPS) | (set(FP32_OPS_BF16_EXTRA) if precision == "bf16" else set())
    graph = gs.import_onnx(_infer(model))
    f32 = np.dtype(np.float32)

    def low_const(c):
        values = np.asarray(c.values)
        if precision == "fp16":  # finite values beyond fp16's range (mask fills) clip to +-65504, not inf
            big = np.finfo(np.float16).max
            return gs.Constant(c.name + "_fp16", np.where(np.isfinite(values), np.clip(values, -big, big),
                                                          values).astype(np.float16))
        return typed_constant(c.name + "_bf16", values, TP.BFLOAT16)

    counter = [0]

    def cast(tensor, to, dtype):
        counter[0] += 1
        out = gs.Variable(f"{tensor.name}_cast{counter[0]}", dtype=dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("Cast", name=f"Cast_precision_{counter[0]}", attrs={"to": int(to)},
                                   inputs=[tensor], outputs=[out]))
        return out

    low_np = np.float16 if precision == "fp16" else None  # gs has no numpy bfloat16: leave dtype unset

    kept = [n for n in graph.nodes if n.op in keep_ops]
    kept_set = set(id(n) for n in kept)
    converted: dict[str, object] = {}
    # 1. float32 constants feeding reduced-precision nodes become reduced (kept nodes keep float32).
    for node in list(graph.nodes):
        if id(node) in kept_set:
            continue
        new_inputs = []
        for t in node.inputs:
            if isinstance(t, gs.Constant) and np.asarray(t.values).dtype == f32:
                if t.name not in converted:
                    converted[t.name] = low_const(t)
                t = converted[t.name]
            new_inputs.append(t)
        node.inputs = new_inputs
        if node.op == "Cast" and int(node.attrs.get("to", 0)) == TP.FLOAT:
            node.attrs["to"] = int(low)
        if node.op == "ConstantOfShape" and "value" in node.attrs:
            v = node.attrs["value"]
            if isinstance(v, gs.Constant) and np.asarray(v.values).dtype == f32:
                node.attrs["value"] = low_const(v)
    # 2. kept nodes: Cast reduced inputs up to float32, and their outputs back down.
    for node in kept:
        ins = []
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.name:
                t = cast(t, TP.FLOAT, f32)
            ins.append(t)
        node.inputs = ins
        for j, out in enumerate(list(node.outputs)):
            wide = gs.Variable(out.name + "_fp32", dtype=f32, shape=out.shape)
            node.outputs[j] = wide
            counter[0] += 1
            graph.nodes.append(gs.Node("Cast", name=f"Cast_precision_{counter[0]}", attrs={"to": int(low)},
                                       inputs=[wide], outputs=[out]))
    # 3. float32 graph inputs: a Cast to the reduced type right behind each.
    for inp in graph.inputs:
        if inp.dtype is not None and np.dtype(inp.dtype) == f32:
            consumers = list(inp.outputs)
            casted = cast(inp, low, low_np)
            for c in consumers:
                c.inputs = [casted if t is inp else t for t in c.inputs]
    # 4. float32 graph outputs: computed reduced, then a Cast to float32 under the original name.
    new_outputs = []
    for out in graph.outputs:
        if out.dtype is not None and np.dtype(out.dtype) == f32:
            producer = out.inputs[0] if out.inputs else None
            inner = gs.Variable(out.name + "_reduced", dtype=low_np, shape=out.shape)
            if producer is not None:
                producer.outputs = [inner if t is out else t for t in producer.outputs]
            counter[0] += 1
            graph.nodes.append(gs.Node("Cast", name=f"Cast_output_{counter[0]}", attrs={"to": int(TP.FLOAT)},
                                       inputs=[inner], outputs=[out]))
        new_outputs.append(out)
    graph.outputs = new_outputs
    # 5. intermediate element types changed: drop every recorded intermediate type and shape and
    #    let ONNX shape inference derive them again from the Casts' `to` attributes.
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.graph.value_info[:]
    for prop in model.metadata_props:
        _set_meta(out, prop.key, prop.value)
    _set_meta(out, METADATA_FP32, json.dumps([n.name for n in kept]))
    _set_meta(out, METADATA_PRECISION, precision)
    out = _infer(out)
    return out


def typed_constant(name: str, values, onnx_dtype: int):
    """A gs.Constant holding `values` as bfloat16 or float8 (e4m3fn), which numpy cannot hold:
    the TensorProto is written here (via ml_dtypes, an onnx dependency) and handed to
    GraphSurgeon as lazily loaded values, so its own float32 converters are not needed."""
    import ml_dtypes

    gs = _gs()
    onnx = _onnx()
    TP = onnx.TensorProto
    kinds = {TP.BFLOAT16: ml_dtypes.bfloat16, TP.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn}
    arr = np.asarray(values, dtype=np.float32).astype(kinds[onnx_dtype])
    proto = onnx.helper.make_tensor(name, onnx_dtype, list(arr.shape), arr.tobytes(), raw=True)
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return gs.Constant(name, LazyValues(proto))


def check(model) -> None:
    """onnx.checker with full shape/type inference; raises ValueError naming the problem."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ValueError(f"onnx.checker refused the graph: {str(exc).splitlines()[0][:400]}") from None
