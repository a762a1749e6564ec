"""What every backend builder gets: the model, the options, the staging folder, shared ONNX exports."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import ClinVLA
from .graphs import GraphSpec, example_inputs, graph_modules, specs, text_limit

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


class BuildError(RuntimeError):
    """An engine that cannot be built as asked; the message says why and what to do instead."""


class Progress:
    """One line per build stage on stderr, with the time it took (and a running total)."""

    def __init__(self, enabled: bool = True, stream=None, prefix: str = "clinvla-build-engine"):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self.n = 0
        self.log: list[dict] = []

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.prefix}] {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str):
        self.n += 1
        self.say(f"{self.n:>2}. {name} ...")
        t = time.perf_counter()
        entry = {"stage": name}
        try:
            yield entry
        except BaseException as exc:
            entry.update(seconds=round(time.perf_counter() - t, 2), failed=f"{type(exc).__name__}: {exc}"[:300])
            self.log.append(entry)
            self.say(f"    {name}: failed after {entry['seconds']:.1f} s")
            raise
        entry["seconds"] = round(time.perf_counter() - t, 2)
        self.log.append(entry)
        extra = entry.get("note")
        self.say(f"    done in {entry['seconds']:.1f} s (total {time.perf_counter() - self.t0:.0f} s)"
                 + (f": {extra}" if extra else ""))


@dataclass
class BuildContext:
    model: ClinVLA  # float32, CPU, eval
    device: torch.device
    precision: str
    batch_sizes: list[int]
    max_text_len: int  # asked; see tokens
    out: Path  # staging folder of this backend's bundle
    progress: Progress
    opset: int = 18
    options: dict = field(default_factory=dict)
    onnx_cache: dict = field(default_factory=dict)  # graph -> cleaned fp32 ModelProto, shared by candidates
    calibration: list | None = None  # the user's studies for FP8 calibration; None = random inputs

    @property
    def tokens(self) -> int:
        return text_limit(self.model, self.max_text_len)

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def specs(self) -> dict[str, GraphSpec]:
        return specs(self.model)

    def modules(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        model = self.model
        if device is not None or dtype != torch.float32:
            import copy

            model = copy.deepcopy(self.model).to(device=device or "cpu", dtype=dtype).eval()
        return graph_modules(model, dtype)

    def example(self, graph: str, device: torch.device | str = "cpu", batch: int | None = None):
        """Inputs to trace with: a batch inside the dynamic range (2..max(2, largest bucket))."""
        if batch is None:
            batch = min(4, max(2, self.max_batch))
        return example_inputs(self.model, graph, batch=batch, device=device, max_tokens=self.tokens)

    def calibration_feeds(self, graph: str) -> list[dict]:
        """Inputs to collect FP8 activation ranges with: the user's studies, or one random batch."""
        if self.calibration is not None:
            from .studies import study_feeds

            return study_feeds(self.model, graph, self.calibration, self.tokens)
        names = [t.name for t in self.specs[graph].inputs]
        return [{n: x.numpy() for n, x in zip(names, self.example(graph, batch=8))}]

    def graph_entry(self, graph: str, file: str, **extra) -> dict:
        spec = self.specs[graph].to_dict()
        return {"file": file, **spec, **extra}

    def fp32_onnx(self, graph: str):
        """The cleaned float32 ONNX of `graph`, exported once per build (candidates share it)."""
        if graph not in self.onnx_cache:
            from . import surgery
            from .onnx_export import export_raw

            spec = self.specs[graph]
            with self.progress.stage(f"export the {graph} graph to ONNX (opset {self.opset}, dynamic batch)") as st:
                raw = export_raw(self.modules()[graph], spec, self.example(graph), opset=self.opset,
                                 max_batch=self.max_batch, max_tokens=self.tokens)
                st["note"] = f"{len(raw.graph.node)} nodes"
            with self.progress.stage(f"GraphSurgeon passes on the {graph} graph") as st:
                model, report = surgery.clean(raw)
                surgery.check(model)
                st["note"] = (f"{report['nodes_before']} -> {report['nodes_after']} nodes, "
                              f"{report['casts_removed']} casts and {report['optional_outputs_removed']} dead outputs "
                              f"removed, {report['fp32_nodes']} nodes marked float32; onnx.checker passed")
            self.onnx_cache[graph] = (model, report)
        return self.onnx_cache[graph]

    def onnx_at(self, graph: str, precision: str):
        """The cleaned ONNX of `graph` converted to `precision` (fp32 / fp16 / bf16) and checked."""
        from . import surgery

        model, report = self.fp32_onnx(graph)
        if precision == "fp32":
            return model
        with self.progress.stage(f"convert the {graph} graph to {precision} (norms and softmax kept in float32)"):
            converted = surgery.to_precision(model, precision)
            surgery.check(converted)
        return converted
