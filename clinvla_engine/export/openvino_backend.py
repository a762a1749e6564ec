"""OpenVINO backend: the cleaned ONNX graphs converted to OpenVINO IR (``image.xml`` + ``image.bin``,
``text.xml`` + ``text.bin``) for the CPU, at one of three precisions:

* ``fp32``: the IR as converted (weights kept float32: ``compress_to_fp16=False``), run with
  ``INFERENCE_PRECISION_HINT=f32``. It must be asked for: on a CPU with AVX-512 bf16 or AMX,
  OpenVINO's default inference precision is bf16.
* ``bf16``: the same float32 IR, run with ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO keeps norms
  and softmax accumulations in float32 itself). Only built where OpenVINO reports the CPU's
  ``OPTIMIZATION_CAPABILITIES`` include BF16; elsewhere it would silently run float32 (or emulate
  bf16 slowly), so the build is refused with that reason.
* ``int8``: NNCF post-training quantization of the IR (``model_type=TRANSFORMER``, which keeps
  the attention softmax, norms and residual adds out of int8), calibrated on the user's studies
  and reports (``--calibration DIR``) or, only when none are given, on a synthetic archive (the
  builder supplies it; the manifest's ``calibration`` says which). Calibration must follow the
  real input distribution: ranges taken from random tensors ruin the quantized model.
  Non-quantized operations run in float32 (``INFERENCE_PRECISION_HINT=f32``), so the error the
  parity check sees is int8's own.

The runtime (``clinvla_engine.runtime.runners.OpenVinoRunner``) compiles the IR at load time with
the inference precision recorded here in ``backend_details.inference_precision``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import backends
from ..files import TMP_MARK
from ..runtime.runners import SATURATION_FREE_ISA, openvino_cpu_info
from .context import BuildContext, BuildError

NAME = "openvino"
PRECISIONS = ("fp32", "bf16", "int8")
# What the runtime sets as INFERENCE_PRECISION_HINT for each bundle precision (see module docstring).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def unsupported(device: str, precision: str) -> str | None:
    """Why this backend cannot build (device, precision) here, or None when it can."""
    avail = backends.openvino()
    if not avail:
        return avail.why
    if not backends.onnx_graphsurgeon():  # the graphs come from the ONNX export and its cleanup
        return backends.onnx_graphsurgeon().why
    if device != "cpu":
        return "the openvino backend builds CPU engines only: use --device cpu (on a GPU use tensorrt, aoti or compile)"
    if precision not in PRECISIONS:
        return f"the openvino backend builds {', '.join(PRECISIONS)}, not {precision}"
    if precision == "bf16":
        caps = openvino_cpu_info()["capabilities"]
        if "BF16" not in caps:
            return (f"this CPU ({openvino_cpu_info()['name']}) has no native bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES "
                    f"are {', '.join(caps)}); build fp32 or int8 here, or bf16 on a CPU with AVX-512 bf16 or AMX")
    if precision == "int8":
        nncf = backends.module("nncf", "openvino")
        if not nncf:
            return f"int8 needs NNCF for post-training quantization: {nncf.why}"
    return None


def _to_ir(onnx_model, workdir: Path):
    """The OpenVINO model of an ONNX ModelProto (written to `workdir` first: read_model takes files)."""
    import openvino as ov

    from .onnx_export import save

    path = workdir / "graph.onnx"
    save(onnx_model, path)
    return ov.Core().read_model(str(path))


def save_ir(model, xml: Path) -> None:
    """Writes `model` as `xml` + its weights `xml.with_suffix('.bin')`, both through a private
    temporary folder in the same file system, weights renamed into place first so that an .xml
    never points at a missing or partial .bin. Weights stay float32 (compress_to_fp16=False:
    save_model's default would round every weight to fp16)."""
    import openvino as ov

    work = Path(tempfile.mkdtemp(prefix=f".{xml.name}{TMP_MARK}", dir=xml.parent))
    try:
        ov.save_model(model, str(work / xml.name), compress_to_fp16=False)
        bin_name = xml.with_suffix(".bin").name
        for name in (bin_name, xml.name):
            if not (work / name).is_file():
                raise BuildError(f"openvino.save_model wrote no {name} for {xml.name}")
        os.replace(work / bin_name, xml.parent / bin_name)
        os.replace(work / xml.name, xml)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def overflow_fix_for(isa) -> str:
    """NNCF's overflow_fix for an int8 build on a CPU with the ISA flags `isa` (runners.cpu_isa):
    "first_layer_only" (NNCF's default) where the 8-bit dot product cannot saturate, else "enable"
    (7-bit weights in every layer; see runners.SATURATION_FREE_ISA). Measured on an AVX2-only AMD
    EPYC: with the default the tiny test model's int8 image embeddings fell to cosine 0.972 against
    fp32 and failed the 0.98 parity gate."""
    return "first_layer_only" if any(flag in isa for flag in SATURATION_FREE_ISA) else "enable"


def quantize_int8(model, feeds: list[dict], graph: str, overflow_fix: str = "first_layer_only"):
    """NNCF post-training int8 quantization of an OpenVINO model on `feeds` (graph inputs, one
    batch per item, NumPy by input name) with NNCF's `overflow_fix` (see overflow_fix_for);
    returns the quantized model."""
    import nncf

    if not feeds:
        raise BuildError(f"int8 calibration of the {graph} graph got no inputs; give --calibration a folder of "
                         "studies with reports")
    dataset = nncf.Dataset(feeds)  # items are already the model's input dicts
    # NNCF draws rich progress bars on stdout and logs each algorithm; the build's own stage line
    # reports this step, and a --quiet build must stay quiet.
    level = nncf.common.logging.nncf_logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
                                 advanced_parameters=nncf.AdvancedQuantizationParameters(
                                     overflow_fix=nncf.OverflowFix(overflow_fix)))
    finally:
        nncf.set_log_level(level)


def build(ctx: BuildContext) -> dict:
    import openvino as ov

    if ctx.precision == "int8" and ctx.calibration is None:
        # build.py always supplies studies for int8 (the user's or a synthetic archive); random
        # tensors are not a calibration set (see the module docstring)
        raise BuildError("an int8 openvino build needs calibration studies (--calibration DIR); none were given")
    graphs, quantization = {}, {}
    overflow_fix = overflow_fix_for(openvino_cpu_info()["isa"])
    for graph in ("image", "text"):
        onnx_model, _ = ctx.fp32_onnx(graph)
        with tempfile.TemporaryDirectory(prefix=f".{graph}-onnx{TMP_MARK}", dir=ctx.out.parent) as tmp:
            with ctx.progress.stage(f"convert the {graph} graph to OpenVINO IR") as st:
                model = _to_ir(onnx_model, Path(tmp))
                st["note"] = f"{len(model.get_ops())} operations"
            if ctx.precision == "int8":
                feeds = ctx.calibration_feeds(graph)
                samples = sum(len(next(iter(f.values()))) for f in feeds)
                with ctx.progress.stage(f"NNCF int8 quantization of the {graph} graph on {samples} samples") as st:
                    model = quantize_int8(model, feeds, graph, overflow_fix)
                    fq = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
                    st["note"] = f"{fq} FakeQuantize operations"
                quantization[graph] = {"samples": samples, "batches": len(feeds), "fake_quantize_ops": fq}
            with ctx.progress.stage(f"save the {graph} IR ({graph}.xml + {graph}.bin)") as st:
                save_ir(model, ctx.out / f"{graph}.xml")
                st["note"] = f"{(ctx.out / f'{graph}.bin').stat().st_size / 2**20:.1f} MiB of weights"
        graphs[graph] = ctx.graph_entry(graph, f"{graph}.xml", weights=f"{graph}.bin")
    info = openvino_cpu_info()
    details = {"openvino": ov.__version__, "inference_precision": INFERENCE_PRECISION[ctx.precision],
               "cpu": info["name"], "cpu_capabilities": info["capabilities"]}
    if quantization:
        import nncf

        details["quantization"] = {"tool": f"nncf {nncf.__version__}", "model_type": "TRANSFORMER",
                                   "overflow_fix": overflow_fix, "graphs": quantization}
    return {"graphs": graphs, "backend_details": details}
