"""The one place that decides which optional backends are available, and says why one is not.

Everything that needs a compiled or optional piece asks here and raises ``BackendUnavailable``
with the fix, so the package itself always imports on a plain CPU machine.
"""
from __future__ import annotations

import functools
import importlib
import os
import platform
from dataclasses import dataclass


class BackendUnavailable(RuntimeError):
    """A feature needs a backend that is not available here; the message names the fix."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str  # version or reason

    def __bool__(self) -> bool:
        return self.ok


@functools.lru_cache(maxsize=None)
def cuda() -> Availability:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency
        return Availability(False, f"torch is not importable: {exc}")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return Availability(False, why)
    return Availability(True, f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")


@functools.lru_cache(maxsize=None)
def triton() -> Availability:
    try:
        mod = importlib.import_module("triton")
    except ImportError:
        return Availability(False, "triton is not installed: pip install 'clinvla-engine[gpu]'")
    return Availability(True, getattr(mod, "__version__", "unknown"))


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), as in the tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def extension() -> Availability:
    """The compiled C++/CUDA core, clinvla_engine._C."""
    try:
        mod = importlib.import_module("clinvla_engine._C")
    except ImportError as exc:
        return Availability(
            False,
            f"clinvla_engine._C is not built ({exc}); build it with `pip install -e .` "
            "(needs a C++17 compiler; CLINVLA_NO_CUDA=1 for a CPU-only build)",
        )
    return Availability(True, getattr(mod, "__version__", "built"))


@functools.lru_cache(maxsize=None)
def module(name: str, extra: str) -> Availability:
    """An optional Python package; `extra` names the pip extra that installs it."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return Availability(False, f"{name} is not installed: pip install 'clinvla-engine[{extra}]'")
    return Availability(True, getattr(mod, "__version__", "installed"))


def require(avail: Availability, feature: str) -> None:
    if not avail:
        raise BackendUnavailable(f"{feature} is unavailable: {avail.why}")


def build_info() -> dict:
    """What is built and available on this machine, with the reason for everything that is not."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": cuda().why if cuda() else f"unavailable: {cuda().why}",
        "triton": triton().why if triton() else f"unavailable: {triton().why}",
        "extension": extension().why if extension() else f"unavailable: {extension().why}",
        "onnxruntime": _describe(module("onnxruntime", "export")),
        "tensorrt": _describe(module("tensorrt", "trt")),
    }
    if extension():
        ext = importlib.import_module("clinvla_engine._C")
        if hasattr(ext, "build_info"):
            info["extension_build"] = dict(ext.build_info())
    return info


def _describe(avail: Availability) -> str:
    return avail.why if avail else f"unavailable: {avail.why}"


# ---- engine backends (clinvla-build-engine and clinvla_engine.runtime) -----------------------
def onnx_graphsurgeon() -> Availability:
    """onnx-graphsurgeon, which the ONNX export's cleanup and precision passes need."""
    return module("onnx_graphsurgeon", "export")


def import_backend(name: str, extra: str, feature: str):
    """Imports optional package `name` or raises BackendUnavailable naming `feature` and the fix."""
    avail = module(name, extra)
    require(avail, feature)
    return importlib.import_module(name)


@functools.lru_cache(maxsize=None)
def onnxruntime_providers() -> tuple[str, ...]:
    """ONNX Runtime's execution providers here (empty when onnxruntime is not installed)."""
    if not module("onnxruntime", "export"):
        return ()
    return tuple(importlib.import_module("onnxruntime").get_available_providers())


def onnxruntime_cuda() -> Availability:
    if not module("onnxruntime", "export"):
        return module("onnxruntime", "export")
    if "CUDAExecutionProvider" not in onnxruntime_providers():
        return Availability(False, "this onnxruntime has no CUDA execution provider: pip install onnxruntime-gpu")
    return cuda()


def tensorrt() -> Availability:
    """TensorRT usable for building and running engines: the Python package and a CUDA GPU."""
    trt = module("tensorrt", "trt")
    if not trt:
        return Availability(False, f"{trt.why} (TensorRT also needs a CUDA GPU)")
    if not cuda():
        return Availability(False, f"TensorRT {trt.why} is installed but there is no GPU: {cuda().why}")
    return trt


def openvino() -> Availability:
    """OpenVINO for building and running CPU engines (``--backend openvino``); int8 builds also
    need NNCF, which ``module("nncf", "openvino")`` reports."""
    return module("openvino", "openvino")


# ---- devices --------------------------------------------------------------------------------
def resolve_device(name: "str | None" = None, flag: str = "--device"):
    """The torch.device for a user's `name` (cpu, cuda, cuda:N; None = cuda when available, else
    cpu), checked here once for train, eval and the CLI: an unknown name is a ValueError and a CUDA
    device that is not there a BackendUnavailable, each saying what to pass instead."""
    import torch

    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "auto")):
        return torch.device("cuda" if cuda() else "cpu")
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name!r}: not a device clinvla can use; pass cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not cuda():
            raise BackendUnavailable(f"{flag} {name}: CUDA is unavailable here ({cuda().why}); pass {flag} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BackendUnavailable(
                f"{flag} {name}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                "pass one of them"
            )
    return dev
