"""Graph -> cleaned, checked ONNX: torch.onnx (dynamo exporter, dynamic batch), GraphSurgeon, checker."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch

from .. import backends
from . import surgery
from .graphs import GraphSpec, dynamic_shapes

MIN_OPSET = 17
DEFAULT_OPSET = 18
_PROTO_LIMIT = 1_800_000_000  # protobuf caps a single file at 2 GiB: larger weights go to external data


def export_raw(module: torch.nn.Module, spec: GraphSpec, example: tuple, *, opset: int, max_batch: int,
               max_tokens: int):
    """The exporter's ModelProto (not yet cleaned); its console chatter is captured, not printed."""
    backends.import_backend("onnxscript", "export", "ONNX export (torch.onnx's dynamo exporter)")
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset {opset} is too old: the graphs need opset {MIN_OPSET} or later "
                         "(LayerNormalization)")
    shapes = dynamic_shapes(spec.name, spec, max_batch, max_tokens)
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    optimize=True, verbose=False, external_data=False)
    quiet.setLevel(level)
    model = program.model_proto
    names = [o.name for o in model.graph.output]
    if names != spec.output_names:
        raise RuntimeError(f"the exported {spec.name} graph has outputs {names}, expected {spec.output_names}")
    return model


def export_graph(module: torch.nn.Module, spec: GraphSpec, example: tuple, path: Path, *, opset: int = DEFAULT_OPSET,
                 max_batch: int = 256, max_tokens: int = 128, precision: str = "fp32",
                 outputs: list[str] | None = None) -> dict:
    """Exports, cleans, converts to `precision`, checks and saves `path`; returns a report."""
    raw = export_raw(module, spec, example, opset=opset, max_batch=max_batch, max_tokens=max_tokens)
    model, report = surgery.clean(raw, keep_outputs=outputs)
    if precision in ("fp16", "bf16"):
        model = surgery.to_precision(model, precision)
    surgery.check(model)
    save(model, path)
    report.update(opset=opset, precision=precision, bytes=path.stat().st_size, file=path.name)
    return report


def save(model, path: Path) -> None:
    onnx = backends.import_backend("onnx", "export", "ONNX export")
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > _PROTO_LIMIT:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_external_data=True,
                        location=data, size_threshold=1024)
    else:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)


def load(path: Path):
    onnx = backends.import_backend("onnx", "export", "ONNX export")
    return onnx.load(str(path))
