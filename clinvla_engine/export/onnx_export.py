"""Graph -> ONNX: torch.onnx (dynamo exporter, dynamic batch); ``save`` writes a model atomically.

The cleanup and checks (GraphSurgeon, onnx.checker) are in ``surgery``; ``BuildContext.fp32_onnx``
chains them."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .. import backends
from ..files import TMP_MARK, atomic_path
from .graphs import GraphSpec, dynamic_shapes

MIN_OPSET = 17
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


def save(model, path: Path) -> None:
    """Writes `model` to `path` through unique temporary names renamed into place. A model over
    protobuf's 2 GiB goes to `path` + its external data file `NAME.data`, both written in a private
    temporary folder first (ONNX records the data file's name relative to the model)."""
    onnx = backends.import_backend("onnx", "export", "ONNX export")
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > _PROTO_LIMIT:
        data = path.name + ".data"
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
        try:
            onnx.save_model(model, str(work / path.name), save_as_external_data=True,
                            all_tensors_to_external_data=True, location=data, size_threshold=1024)
            os.replace(work / data, path.parent / data)  # data first: the model must never point at nothing
            os.replace(work / path.name, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        with atomic_path(path, suffix=".onnx") as tmp:
            onnx.save_model(model, str(tmp))
