"""AOTInductor backend: ``torch.export`` with a dynamic batch (and token count), then
``torch._inductor.aoti_compile_and_package`` to one ``.pt2`` per graph, for CPU or CUDA. The same
package loads in C++ with ``torch::inductor::AOTIModelPackageLoader``.

The GPU crash. On the H200 (torch 2.11, CUDA 13) ``aoti_load_package`` of a ViT-B/16 package died
with SIGSEGV, twice, also in a fresh process. Public reports show the same symptom when a constant
of a CUDA package lives in host memory ("The specified pointer resides on host memory", pytorch
issue 172739: the error is raised while constants are loaded and the process then dies) or when a
package is run without its constants (the ``package_constants_in_so=False`` path, pytorch PR
142246). So this builder (1) moves the model *and* every lifted constant to the target device
before export and refuses a program with a constant elsewhere, (2) loads and runs each CUDA
package in a child process first (``clinvla_engine.runtime.aoti_probe``), so that a crash is a
result and not the end of the build, (3) on a crash rebuilds with the constants kept outside the
shared object (a safetensors file in the bundle, loaded with ``load_constants``) and probes again,
and (4) if that crashes too, gives up with the evidence (signal, last lines of the child's
output), which ``--backend auto`` records before it picks another backend (``compile``: torch.compile
with CUDA graphs over the fixed buckets). The probe results are written to the manifest.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..runtime import aoti_probe
from ..files import atomic_path
from ..runtime.graphs import PRECISION_DTYPES
from .context import BuildContext, BuildError
from .graphs import dynamic_shapes

NAME = "aoti"
PACKAGINGS = ("constants_in_so", "external_constants")


def unsupported(device: str, precision: str) -> str | None:
    if precision == "fp8":
        return "fp8 needs TensorRT (--backend tensorrt)"
    if device == "cpu" and precision == "fp16":
        return "fp16 on the CPU is slower than fp32; use fp32 or bf16"
    return None


def _check_constants(ep, device: torch.device, graph: str) -> None:
    wrong = []
    for name, t in list(ep.state_dict.items()) + list(ep.constants.items()):
        if isinstance(t, torch.Tensor) and t.device.type != device.type:
            wrong.append(f"{name} on {t.device}")
    if wrong:
        raise BuildError(f"the exported {graph} graph keeps constants off {device.type} ({', '.join(wrong[:4])}); "
                         "a CUDA package with host constants crashes when loaded")


def _compile(ep, path, packaging: str, device: torch.device) -> None:
    import torch._inductor

    configs = {"aot_inductor.package_constants_in_so": packaging == "constants_in_so"}
    if device.type == "cpu":
        configs["max_autotune"] = False
    with warnings.catch_warnings(), atomic_path(path, suffix=".pt2") as tmp:
        warnings.simplefilter("ignore")  # e.g. torch's own FutureWarnings about pytree internals
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)


def _constants_file(ep, path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in list(ep.state_dict.items()) + list(ep.constants.items())
               if isinstance(v, torch.Tensor)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))


def should_probe(ctx: BuildContext) -> bool:
    forced = os.environ.get("CLINVLA_AOTI_PROBE")
    if forced is not None:
        return forced == "1"
    return ctx.options.get("aoti_probe", ctx.device.type == "cuda")


def build(ctx: BuildContext, graph_names: tuple[str, ...] = ("image", "text")) -> dict:
    dtype = PRECISION_DTYPES[ctx.precision]
    device = ctx.device
    modules = ctx.modules(device=device, dtype=dtype)
    order = list(PACKAGINGS)
    if ctx.options.get("aoti_constants") == "external":
        order = ["external_constants"]
    elif ctx.options.get("aoti_constants") == "so":
        order = ["constants_in_so"]
    graphs, attempts = {}, []
    for graph in graph_names:
        spec = ctx.specs[graph]
        example = ctx.example(graph, device=device)
        with ctx.progress.stage(f"torch.export the {graph} graph ({ctx.precision}, {device.type}, dynamic batch)"):
            with torch.no_grad():
                ep = torch.export.export(modules[graph], example,
                                         dynamic_shapes=dynamic_shapes(graph, spec, ctx.max_batch, ctx.tokens))
            _check_constants(ep, device, graph)
        file = f"{graph}.pt2"
        entry = None
        for packaging in order:
            with ctx.progress.stage(f"AOTInductor compile + package the {graph} graph ({packaging})") as st:
                _compile(ep, ctx.out / file, packaging, device)
                consts = None
                if packaging == "external_constants":
                    consts = f"{graph}.constants.safetensors"
                    _constants_file(ep, ctx.out / consts)
                st["note"] = f"{(ctx.out / file).stat().st_size / 2**20:.1f} MiB"
            record = {"graph": graph, "packaging": packaging}
            if should_probe(ctx):
                manifest_like = {"graphs": {graph: ctx.graph_entry(graph, file)}, "max_text_len": ctx.tokens,
                                 "config": ctx.model.config.to_dict(), "batch_sizes": ctx.batch_sizes}
                with ctx.progress.stage(f"load + run the {graph} package in a child process") as st:
                    result = aoti_probe.probe(str(ctx.out / file), str(ctx.out / consts) if consts else None, str(device),
                                   aoti_probe.probe_inputs(manifest_like, graph, batch=min(ctx.batch_sizes)))
                    st["note"] = "ok" if result["ok"] else f"CRASHED ({result.get('signal') or result['returncode']})"
                record["probe"] = result
            attempts.append(record)
            if record.get("probe", {"ok": True})["ok"]:
                entry = ctx.graph_entry(graph, file, **({"constants": consts} if consts else {}), packaging=packaging)
                break
            for stale in (file, consts):
                if stale and (ctx.out / stale).exists():
                    (ctx.out / stale).unlink()
        if entry is None:
            evidence = "; ".join(f"{a['packaging']}: {a['probe'].get('signal') or a['probe']['returncode']}"
                                 for a in attempts if a["graph"] == graph)
            raise BuildError(f"every AOTInductor packaging of the {graph} graph crashed when loaded on "
                             f"{device} ({evidence}); use --backend compile (torch.compile + CUDA graphs) or auto. "
                             f"Last probe output:\n{attempts[-1]['probe']['output']}")
        graphs[graph] = entry
    details = {"attempts": attempts, "fingerprint": aoti_probe.machine_fingerprint(device) if should_probe(ctx) else None,
               "torch": torch.__version__}
    return {"graphs": graphs, "backend_details": details, "aoti": details}
