"""TensorRT backend (TensorRT 10 and 11 Python API): cleaned ONNX -> parser -> builder -> plan.

* One optimisation profile per batch bucket (min = opt = max = the bucket; text: 3..max_text_len
  tokens, optimised for max_text_len, which is what the runtime pads to).
* Precision. Strongly typed networks (the only kind TensorRT 11 builds, available since 10.x):
  the ONNX itself carries the precision, from ``surgery.to_precision`` (fp16 / bf16 with
  LayerNorm, Softmax and the final L2 norm in float32) and, for fp8, ``quantize.insert_fp8_qdq``
  (E4M3 Q/DQ before every weight GEMM on top of fp16). On a TensorRT 10 without strong typing, or
  with ``trt_typing="weak"``, the float32 ONNX is built with BuilderFlag.FP16 / BF16 and every
  normalisation and softmax layer pinned to float32 (OBEY_PRECISION_CONSTRAINTS).
* A timing cache (``trt_timing.cache``) is loaded from and saved to the bundle, so a rebuild on the
  same GPU and TensorRT skips most tactic timing.
* The plan records the TensorRT version; the runtime refuses a plan from another release.
"""
from __future__ import annotations

import json

from .. import backends
from ..files import atomic_write_bytes
from . import surgery
from .context import BuildContext, BuildError
from .graphs import MIN_TOKENS
from .onnx_export import save

NAME = "tensorrt"
TIMING_CACHE = "trt_timing.cache"
WORKSPACE = 8 << 30


def unsupported(device: str, precision: str) -> str | None:
    if device != "cuda":
        return "TensorRT builds GPU engines only: use --device cuda"
    avail = backends.tensorrt()
    return None if avail else avail.why


def typing_mode(trt, asked: str | None = None) -> str:
    strong = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    weak = hasattr(trt.BuilderFlag, "FP16")
    if asked == "weak" and not weak:
        raise BuildError(f"TensorRT {trt.__version__} has no weak typing (BuilderFlag.FP16): use the default strong typing")
    if asked in ("weak", "strong"):
        return asked
    return "strong" if strong else "weak"


def profile_shapes(spec: dict, bucket: int, tokens: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """input name -> (min, opt, max) shapes of the profile for one batch bucket."""
    out = {}
    for t in spec["inputs"]:
        lo, hi = [], []
        for d in t["shape"]:
            if d == "batch":
                lo.append(bucket), hi.append(bucket)
            elif d == "tokens":
                lo.append(MIN_TOKENS), hi.append(tokens)
            else:
                lo.append(int(d)), hi.append(int(d))
        out[t["name"]] = (tuple(lo), tuple(hi), tuple(hi))
    return out


def fp32_layer(layer, trt, marked: list[str]) -> bool:
    types = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, n)}
    return layer.type in types or any(layer.name == n or layer.name.startswith(n + "_") for n in marked)


def build_plan(trt, onnx_path, spec: dict, buckets: list[int], tokens: int, precision: str, typing: str,
               timing_cache: bytes, marked: list[str]) -> tuple[bytes, bytes, dict]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if typing == "strong" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser refused {onnx_path.name}: {'; '.join(errors)[:600]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    pinned = 0
    if typing == "weak" and precision != "fp32":
        flag = {"fp16": "FP16", "bf16": "BF16", "fp8": "FP8"}[precision]
        config.set_flag(getattr(trt.BuilderFlag, flag))
        if precision == "fp8":
            config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if fp32_layer(layer, trt, marked):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
    for bucket in buckets:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(spec, bucket, tokens).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    return bytes(plan), bytes(cache.serialize()), {"layers": network.num_layers, "fp32_pinned_layers": pinned,
                                                   "typing": typing}


def _fp8_onnx(ctx: BuildContext, graph: str):
    from .quantize import calibrate, insert_fp8_qdq

    fp32, _ = ctx.fp32_onnx(graph)
    feeds = ctx.calibration_feeds(graph)
    with ctx.progress.stage(f"FP8 calibration ({sum(len(next(iter(f.values()))) for f in feeds)} samples) "
                            f"+ Q/DQ insertion for the {graph} graph"):
        amax = calibrate(fp32, feeds)
        model = insert_fp8_qdq(ctx.onnx_at(graph, "fp16"), amax)
        surgery.check(model)
    return model


def build(ctx: BuildContext) -> dict:
    trt = backends.import_backend("tensorrt", "trt", "the TensorRT engine backend")
    typing = typing_mode(trt, ctx.options.get("trt_typing"))
    cache_path = ctx.out / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.exists() else ctx.options.get("trt_timing_cache", b"")
    graphs, details = {}, {"typing": typing, "tensorrt": trt.__version__, "graphs": {}}
    for graph in ("image", "text"):
        if typing == "weak":
            model = ctx.fp32_onnx(graph)[0]
        elif ctx.precision == "fp8":
            model = _fp8_onnx(ctx, graph)
        else:
            model = ctx.onnx_at(graph, ctx.precision)
        onnx_file = f"{graph}.onnx"
        save(model, ctx.out / onnx_file)
        entry = ctx.graph_entry(graph, f"{graph}.plan", onnx=onnx_file, profiles=sorted(ctx.batch_sizes))
        with ctx.progress.stage(f"TensorRT build of the {graph} graph ({ctx.precision}, {typing} typing, "
                                f"{len(ctx.batch_sizes)} profiles)") as st:
            plan, cache, info = build_plan(trt, ctx.out / onnx_file, entry, sorted(ctx.batch_sizes), ctx.tokens,
                                           ctx.precision, typing, cache, surgery.fp32_nodes(model))
            atomic_write_bytes(ctx.out / entry["file"], plan)
            st["note"] = f"{len(plan) / 2**20:.1f} MiB plan, {info['layers']} layers"
        details["graphs"][graph] = info
        graphs[graph] = entry
    atomic_write_bytes(cache_path, cache)
    return {"graphs": graphs, "backend_details": json.loads(json.dumps(details))}
