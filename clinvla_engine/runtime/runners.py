"""One runner per backend: runs a bundle's ``image`` or ``text`` graph on a batch of graph inputs.

Every runner takes CPU or device tensors keyed by input name and returns float32 CPU tensors keyed
by output name. ``static_shapes`` runners (TensorRT, and anything replayed as a CUDA graph) only
take the bundle's batch buckets (and, for text, ``max_text_len`` tokens): the engine pads to them.
Runners that are not safe to call from two threads at once say so with ``thread_safe = False``;
their ``run`` then holds a per-graph lock.
"""
from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import backends
from .bundle import BundleError, model_from_bundle
from .graphs import PRECISION_DTYPES, graph_modules


class Runner:
    backend = "?"
    static_shapes = False
    thread_safe = False

    def __init__(self, directory: Path, manifest: dict, device: torch.device):
        self.directory = directory
        self.manifest = manifest
        self.device = device
        self.graphs = manifest["graphs"]
        self.notes: list[str] = []
        # On a GPU one lock serves both graphs: captures and replays of CUDA graphs never overlap,
        # and the device runs one graph at a time anyway. On a CPU each graph has its own.
        shared = threading.Lock()
        self._locks = {g: shared if device.type == "cuda" else threading.Lock() for g in self.graphs}

    def output_names(self, graph: str) -> list[str]:
        return [t["name"] for t in self.graphs[graph]["outputs"]]

    def run(self, graph: str, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        outputs = outputs or self.output_names(graph)
        if self.thread_safe:
            return self._run(graph, feeds, outputs)
        with self._locks[graph]:
            return self._run(graph, feeds, outputs)

    def _run(self, graph, feeds, outputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.backend, "device": str(self.device), "static_shapes": self.static_shapes,
                "thread_safe": self.thread_safe, "notes": list(self.notes)}

    def close(self) -> None:
        pass


# ---- CUDA graphs over fixed buckets ------------------------------------------------------------
class CudaGraphs:
    """Replays `fn(*inputs)` as one CUDA graph per input shape (a launch-bound batch-2 ViT runs ~7x
    faster replayed). The first call per shape captures after two warm-up runs and checks the
    replay against a plain call; any failure turns graphs off for that shape, with a note why."""

    def __init__(self, fn: Callable, notes: list[str], enabled: bool = True):
        self.fn = fn
        self.notes = notes
        self.enabled = enabled
        self.cache: dict[tuple, Any] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return tuple(self.fn(*inputs))
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = self._capture(inputs)
        if entry == "eager":
            return tuple(self.fn(*inputs))
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _capture(self, inputs):
        try:
            static_in = [t.clone() for t in inputs]
            side = torch.cuda.Stream(device=inputs[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    expected = tuple(t.clone() for t in self.fn(*static_in))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = tuple(self.fn(*static_in))
            graph.replay()
            torch.cuda.synchronize()
            for a, b in zip(static_out, expected):
                if not torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3):
                    raise RuntimeError("the replayed graph disagrees with a plain call")
            return graph, static_in, static_out
        except Exception as exc:  # capture is an optimisation: fall back to plain calls
            shapes = [tuple(t.shape) for t in inputs]
            self.notes.append(f"CUDA graph capture off for inputs {shapes}: {type(exc).__name__}: {str(exc)[:160]}")
            torch.cuda.synchronize()
            return "eager"


# ---- ONNX Runtime ------------------------------------------------------------------------------
class OrtRunner(Runner):
    backend = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called concurrently

    def __init__(self, directory, manifest, device, threads: int | None = None):
        super().__init__(directory, manifest, device)
        ort = backends.import_backend("onnxruntime", "export", "the onnxruntime engine backend")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            backends.require(backends.onnxruntime_cuda(), "an onnxruntime engine on the GPU")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        self.sessions = {}
        for name, g in self.graphs.items():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = int(threads)
            # no busy-waiting after a run: spinning intra-op threads took the cores from the top-k
            # scan and the re-ranking that follow an encode (search p99 70 ms -> 27.5 ms, 1M studies)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[name] = ort.InferenceSession(str(directory / g["file"]), opts, providers=providers)

    def _run(self, graph, feeds, outputs):
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        result = self.sessions[graph].run(outputs, arrays)
        return {k: torch.from_numpy(v).float() for k, v in zip(outputs, result)}


# ---- AOTInductor ---------------------------------------------------------------------------
def _aoti_load_parameters() -> frozenset:
    """The keyword arguments this torch's ``aoti_load_package`` takes. ``run_single_threaded``
    came with torch 2.7 (pytorch PR 148601) and ``device_index`` with 2.8, so torch 2.11-2.14 take
    both; the check keeps a torch that renames them from turning into a TypeError mid-load."""
    import torch._inductor

    try:
        return frozenset(inspect.signature(torch._inductor.aoti_load_package).parameters)
    except (TypeError, ValueError):  # a C-implemented or wrapped loader: assume the documented API
        return frozenset({"path", "run_single_threaded", "device_index"})


def aoti_load_kwargs(device: torch.device, single_threaded: bool) -> dict:
    """The keyword arguments for ``aoti_load_package`` on `device`; raises BundleError when CUDA
    graph replay needs ``run_single_threaded`` and this torch does not have it."""
    params = _aoti_load_parameters()
    kwargs = {}
    if device.type == "cuda" and "device_index" in params:
        kwargs["device_index"] = device.index if device.index is not None else torch.cuda.current_device()
    if single_threaded:
        # The default (multi-threaded) AOTI container records and queries CUDA events around each
        # run; inside a CUDA graph capture that is "operation not permitted when stream is
        # capturing", and the capture falls back to eager. Single-threaded mode skips that logic;
        # the runner's per-graph lock already keeps calls from overlapping.
        if "run_single_threaded" not in params:
            raise BundleError(f"torch {torch.__version__}'s aoti_load_package has no run_single_threaded, which "
                              "CUDA graph replay needs; load with cuda_graphs=False or use torch 2.11-2.14")
        kwargs["run_single_threaded"] = True
    return kwargs


_AOTI_LOAD_LOCK = threading.Lock()  # one load at a time: the extraction folder is found by what it maps


def _mapped_aoti_folders() -> set[str]:
    """The ``aotinductor_*`` folders (under any temporary directory) that shared objects mapped by this
    process live in; empty where /proc/self/maps does not exist (not Linux)."""
    folders = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""  # a removed file reads "... (deleted)"
                head, sep, tail = path.partition("/aotinductor_")
                if sep and path.endswith(".so"):
                    folders.add(head + sep + tail.split("/", 1)[0])
    except OSError:
        pass
    return folders


def _remove_extraction(folders: set[str], device: torch.device, compiled) -> None:
    """torch's package loader extracts each .pt2 into a fresh ``$TMPDIR/aotinductor_*`` folder and
    removes it only when the loaded model is destroyed, which a process that exits (or is killed)
    while holding it never does: one folder leaked per load (12 MB for the `small` image package).
    On the CPU the model needs nothing from the folder once its shared object is mapped (the kernels
    are compiled into it; checked: a model runs the same after its folder is removed), so it goes at
    once. On CUDA the kernel binaries may be read on first use, so the folder goes when the model is
    garbage-collected or the interpreter exits, whichever comes first."""
    import shutil
    import weakref

    for folder in folders:
        if device.type == "cpu":
            shutil.rmtree(folder, ignore_errors=True)
        else:
            weakref.finalize(compiled, shutil.rmtree, folder, ignore_errors=True)


def load_aoti_package(path: Path, device: torch.device, constants: Path | None = None, *,
                      single_threaded: bool = False):
    """A loaded .pt2 package; `constants` = a safetensors file for packages built without their
    constants in the shared object (``aot_inductor.package_constants_in_so=False``).
    single_threaded=True when the package will be captured in CUDA graphs (see aoti_load_kwargs).
    The folder torch extracts the package into is removed (see _remove_extraction)."""
    import torch._inductor

    kwargs = aoti_load_kwargs(device, single_threaded)
    with _AOTI_LOAD_LOCK:
        before = _mapped_aoti_folders()
        compiled = torch._inductor.aoti_load_package(str(path), **kwargs)
        _remove_extraction(_mapped_aoti_folders() - before, device, compiled)
    if constants is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(constants), device=str(device))
        wanted = set(compiled.get_constant_fqns())
        missing = sorted(wanted - set(tensors))
        if missing:
            raise BundleError(f"{constants.name} lacks {len(missing)} constants the package needs ({', '.join(missing[:4])})")
        compiled.load_constants({k: tensors[k] for k in wanted}, check_full_update=True)
    return compiled


class _TorchCallRunner(Runner):
    """A runner whose graphs are Python callables on torch tensors (self.calls[graph])."""

    def _run(self, graph, feeds, outputs):
        names = [t["name"] for t in self.graphs[graph]["inputs"]]
        xs = [feeds[n].to(self.device, non_blocking=True) for n in names]
        with torch.inference_mode():
            result = self.calls[graph](*xs)
        produced = dict(zip(self.output_names(graph), result))
        return {k: produced[k].float().cpu() for k in outputs}


class AotiRunner(_TorchCallRunner):
    backend = "aoti"

    def __init__(self, directory, manifest, device, cuda_graphs: bool = True):
        super().__init__(directory, manifest, device)
        self.static_shapes = device.type == "cuda" and cuda_graphs
        if self.static_shapes and "run_single_threaded" not in _aoti_load_parameters():
            # Capturing the default container fails anyway (see aoti_load_kwargs): say so once.
            self.static_shapes = False
            self.notes.append(f"CUDA graphs off: torch {torch.__version__}'s aoti_load_package has no "
                              "run_single_threaded")
        self.modules = {}
        self.calls = {}
        for name, g in self.graphs.items():
            consts = directory / g["constants"] if g.get("constants") else None
            module = load_aoti_package(directory / g["file"], device, consts, single_threaded=self.static_shapes)
            self.modules[name] = module
            call = (lambda m: (lambda *xs: m(*xs)))(module)
            self.calls[name] = CudaGraphs(call, self.notes, enabled=self.static_shapes)


# ---- torch.compile (+ CUDA graphs) -----------------------------------------------------------
class CompileRunner(_TorchCallRunner):
    """The encoders rebuilt from the bundle's weights and compiled with torch.compile at load time
    (lazily, per bucket shape); on the GPU each bucket is then replayed as a CUDA graph. The GPU
    fallback where an AOTInductor package cannot be loaded."""

    backend = "compile"
    static_shapes = True  # one compiled shape per bucket, never a recompile per request

    def __init__(self, directory, manifest, device, cuda_graphs: bool = True):
        super().__init__(directory, manifest, device)
        dtype = PRECISION_DTYPES[manifest["precision"]]
        model = model_from_bundle(directory, manifest).to(device=device, dtype=dtype).eval()
        self.model = model
        mods = graph_modules(model, dtype)
        self.calls = {}
        for name in self.graphs:
            compiled = torch.compile(mods[name], dynamic=False, fullgraph=True)
            self.calls[name] = CudaGraphs(compiled, self.notes, enabled=device.type == "cuda" and cuda_graphs)


# ---- TensorRT ------------------------------------------------------------------------------
class TrtRunner(Runner):
    """Serialized TensorRT plans, one execution context per optimisation profile (= batch bucket),
    bound by tensor name (TensorRT 10 / 11 API) and replayed as CUDA graphs."""

    backend = "tensorrt"
    static_shapes = True

    def __init__(self, directory, manifest, device, cuda_graphs: bool = True):
        super().__init__(directory, manifest, device)
        backends.require(backends.tensorrt(), "a TensorRT engine")
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.calls = {}, {}, {}
        torch.cuda.set_device(device)
        stream = torch.cuda.current_stream(device)
        for name, g in self.graphs.items():
            plan = (directory / g["file"]).read_bytes()
            engine = self.runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BundleError(f"TensorRT could not deserialize {g['file']} (built with TensorRT "
                                  f"{manifest['versions'].get('tensorrt')}, this is {trt.__version__})")
            self.engines[name] = engine
            buckets = g["profiles"]
            contexts = {}
            for k, bucket in enumerate(buckets):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(k, stream.cuda_stream)
                contexts[bucket] = ctx
            self.contexts[name] = contexts
            self.calls[name] = CudaGraphs(self._enqueue_fn(name), self.notes, enabled=cuda_graphs)
        stream.synchronize()

    def _enqueue_fn(self, graph: str):
        trt = self.trt
        engine = self.engines[graph]
        in_names = [t["name"] for t in self.graphs[graph]["inputs"]]
        out_names = [t["name"] for t in self.graphs[graph]["outputs"]]
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                    trt.int32: torch.int32, trt.bool: torch.bool}
        if hasattr(trt, "bfloat16"):
            to_torch[trt.bfloat16] = torch.bfloat16

        def enqueue(*xs: torch.Tensor):
            ctx = self.contexts[graph].get(int(xs[0].shape[0]))
            if ctx is None:
                raise ValueError(f"batch {xs[0].shape[0]} is not one of the engine's buckets {sorted(self.contexts[graph])}")
            for name, x in zip(in_names, xs):
                ctx.set_input_shape(name, tuple(x.shape))
                ctx.set_tensor_address(name, x.data_ptr())
            outs = []
            for name in out_names:
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=to_torch[engine.get_tensor_dtype(name)],
                                  device=xs[0].device)
                ctx.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for the {graph} graph")
            return outs

        return enqueue

    def _run(self, graph, feeds, outputs):
        names = [t["name"] for t in self.graphs[graph]["inputs"]]
        xs = [feeds[n].to(self.device, non_blocking=True).contiguous() for n in names]
        result = self.calls[graph](*xs)
        produced = dict(zip(self.output_names(graph), result))
        return {k: produced[k].float().cpu() for k in outputs}


# ---- OpenVINO ------------------------------------------------------------------------------
PERFORMANCE_HINTS = ("latency", "throughput")
# The x86 instruction sets that decide OpenVINO's CPU kernels (and so its speed at each precision).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_fp16")
# Flags of 8-bit dot products that accumulate without saturating (VNNI, AMX). Without them (AVX2,
# AVX-512 without VNNI) an int8 dot product sums pairs of u8 x s8 products in int16, which can
# saturate; NNCF's overflow fix (7-bit weights) avoids it (export/openvino_backend.overflow_fix_for).
SATURATION_FREE_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_isa() -> list[str]:
    """The ISA_FLAGS this CPU has, from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


@functools.lru_cache(maxsize=None)
def openvino_cpu_info() -> dict:
    """{"name", "capabilities" (OpenVINO's OPTIMIZATION_CAPABILITIES: FP32, BF16, INT8 ...),
    "isa"} of this machine's CPU as OpenVINO sees it; the bf16 build and run decisions use it."""
    ov = backends.import_backend("openvino", "openvino", "OpenVINO CPU engines")
    core = ov.Core()
    return {"name": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
            "isa": cpu_isa()}


def machine_threads() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _static_dims(dims, max_tokens) -> tuple[int, ...] | None:
    """An input's dimensions after the batch with the token dimension set to max_tokens, or None
    where one is free and not the token count (no static compile for that graph)."""
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif d == "tokens" and max_tokens:
            out.append(int(max_tokens))
        else:
            return None
    return tuple(out)


class OpenVinoRunner(Runner):
    """OpenVINO IR compiled for the CPU with the bundle's inference precision (f32 must be set:
    OpenVINO's default on a bf16-capable CPU is bf16).

    performance_hint "latency": one stream using every thread; each call runs its batch as one
    request. "throughput": several streams with a few threads each; a call splits its batch over
    that many requests and runs them at once (one request alone would use one stream's threads
    only). Requests come from a pool per graph and a call that finds it empty makes its own, so
    calls from several threads never share a request."""

    backend = "openvino"
    thread_safe = True  # each calling thread takes its own infer requests (see _run)

    def __init__(self, directory, manifest, device, threads: int | None = None, performance_hint: str | None = None):
        super().__init__(directory, manifest, device)
        ov = backends.import_backend("openvino", "openvino", "the openvino engine backend")
        if device.type != "cpu":
            raise BundleError(f"engine bundle {directory} is an OpenVINO CPU engine; load it with device='cpu'")
        hint = (performance_hint or "latency").lower()
        if hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, got {performance_hint!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer (or None for this machine's {machine_threads()}), "
                             f"got {threads!r}")
        precision = manifest["backend_details"]["inference_precision"]
        if precision == "bf16" and "BF16" not in openvino_cpu_info()["capabilities"]:
            # Still correct (more precise), only slower: run it rather than refuse a working engine.
            self.notes.append(f"this CPU ({openvino_cpu_info()['name']}) has no native bf16: the bf16 engine runs in f32")
            precision = "f32"
        quantized = manifest["backend_details"].get("quantization") or {}
        if quantized and quantized.get("overflow_fix", "first_layer_only") != "enable" and not any(
                flag in openvino_cpu_info()["isa"] for flag in SATURATION_FREE_ISA):  # it runs, less accurately
            self.notes.append(f"this int8 engine was built for a CPU with VNNI (NNCF overflow fix "
                              f"{quantized.get('overflow_fix', 'first_layer_only')}); on this CPU "
                              f"({openvino_cpu_info()['name']}, no VNNI) its 8-bit dot products can saturate: "
                              "rebuild it here (clinvla-build-engine --backend openvino --precision int8)")
        self.threads = threads or machine_threads()
        self.hint = hint
        config = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": precision,
                  "INFERENCE_NUM_THREADS": self.threads}
        core = ov.Core()
        # keyed by (graph, rows): rows None is the dynamic model every call can use. In latency mode
        # each graph is also compiled once per batch bucket with static shapes, which a call of
        # exactly that shape takes (OpenVINO's CPU plugin plans memory and picks kernels once for a
        # static shape instead of per call): the image graph at its fixed view size, the text graph
        # at the bundle's max_text_len (the length a batch holding one long report is cut to;
        # shorter batches run on the dynamic model rather than being padded up).
        self.compiled, self.pools, self.requests = {}, {}, {}
        static, self.bucket_shapes = {}, {}
        buckets = sorted(int(b) for b in manifest.get("batch_sizes", ()))
        max_tokens = manifest.get("max_text_len")
        for name, g in self.graphs.items():
            xml, weights = str(directory / g["file"]), str(directory / g["weights"])
            dims = {t["name"]: _static_dims(t["shape"][1:], max_tokens) for t in g["inputs"]}
            shapes = [None]
            if hint == "latency" and buckets and all(d is not None for d in dims.values()):
                shapes += buckets
                static[name] = buckets
            for rows in shapes:
                model = core.read_model(xml, weights)
                if rows is not None:
                    self.bucket_shapes[(name, rows)] = {k: (rows, *d) for k, d in dims.items()}
                    model.reshape({k: ov.PartialShape([rows, *d]) for k, d in dims.items()})
                compiled = core.compile_model(model, "CPU", config)
                key = (name, rows)
                self.compiled[key] = compiled
                n = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if hint == "throughput" else 1
                self.requests[key] = max(1, n)
                self.pools[key] = queue.SimpleQueue()
                for _ in range(self.requests[key]):
                    self.pools[key].put(compiled.create_infer_request())
        self.static = static
        self.notes.append(f"OpenVINO {ov.__version__}: {hint} hint, {self.threads} threads, inference precision "
                          f"{precision}, infer requests {({g: self.requests[(g, None)] for g in self.graphs})}"
                          + (f", static shapes for {', '.join(f'{g} at batch {b}' for g, b in static.items())}"
                             + (f" (text at {max_tokens} tokens)" if "text" in static else "") if static else ""))

    def _run(self, graph, feeds, outputs):
        names = [t["name"] for t in self.graphs[graph]["inputs"]]
        arrays = {k: feeds[k].detach().cpu().numpy() for k in names}
        n = len(arrays[names[0]])
        shapes = self.bucket_shapes.get((graph, n))
        exact = shapes is not None and all(arrays[k].shape == shapes[k] for k in names)
        key = (graph, n) if exact else (graph, None)
        pool = self.pools[key]
        # A request is taken from the pool (or made) for each part, so concurrent callers never
        # share one; a latency engine runs the batch as one part.
        parts = min(n, self.requests[key]) if self.hint == "throughput" else 1
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        taken = []
        try:
            for i in range(parts):
                try:
                    req = pool.get_nowait()
                except queue.Empty:  # more concurrent calls than requests: one more for this call
                    req = self.compiled[key].create_infer_request()
                taken.append(req)
                # The inputs are shared, not copied: the arrays stay alive and unchanged until every
                # request has finished, below. Outputs are copied once, as each request goes back.
                req.start_async({k: np.ascontiguousarray(v[bounds[i]:bounds[i + 1]]) for k, v in arrays.items()},
                                share_inputs=True)
            for req in taken:
                req.wait()
            result = {k: torch.from_numpy(np.array(taken[0].get_tensor(k).data) if len(taken) == 1 else
                                          np.concatenate([req.get_tensor(k).data for req in taken])).float()
                      for k in outputs}
        finally:
            for req in taken:
                pool.put(req)
        return result

    def describe(self) -> dict:
        d = super().describe()
        d.update(performance_hint=self.hint, threads=self.threads)
        return d


RUNNERS = {"onnxruntime": OrtRunner, "aoti": AotiRunner, "compile": CompileRunner, "tensorrt": TrtRunner,
           "openvino": OpenVinoRunner}


def make_runner(directory: Path, manifest: dict, device: torch.device, cuda_graphs: bool = True,
                threads: int | None = None, performance_hint: str | None = None) -> Runner:
    backend = manifest.get("backend")
    cls = RUNNERS.get(backend)
    if cls is None:
        raise BundleError(f"engine bundle {directory}: unknown backend {backend!r} in manifest.json")
    if device.type == "cuda":
        backends.require(backends.cuda(), f"running the {backend} engine on {device}")
    if cls is OrtRunner:
        return cls(directory, manifest, device, threads=threads)
    if cls is OpenVinoRunner:
        return cls(directory, manifest, device, threads=threads, performance_hint=performance_hint)
    return cls(directory, manifest, device, cuda_graphs=cuda_graphs)
