"""torch.compile backend: the bundle carries the encoders' weights; the runtime rebuilds the model,
compiles it once per batch bucket and, on the GPU, replays each bucket as a CUDA graph.

This is the GPU backend that needs nothing beyond PyTorch: it runs wherever an AOTInductor package
cannot be loaded (see aoti_backend) and it is the torch.compile row of the benchmarks.
"""
from __future__ import annotations

from safetensors.torch import save_file

from ..files import atomic_path
from .aoti_backend import unsupported  # noqa: F401 - the same limits: both run Inductor-generated code
from .context import BuildContext

NAME = "compile"


def build(ctx: BuildContext) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in ctx.model.state_dict().items()
             if not k.startswith("decoder.")}  # the MIM decoder is training-only
    with ctx.progress.stage("write the encoders' weights (weights.safetensors)"):
        with atomic_path(ctx.out / "weights.safetensors", suffix=".safetensors") as tmp:
            save_file(state, str(tmp))
    graphs = {g: ctx.graph_entry(g, "weights.safetensors") for g in ("image", "text")}
    return {"graphs": graphs, "backend_details": {"compiled": "at load time, once per bucket",
                                                  "cuda_graphs": ctx.device.type == "cuda"}}
