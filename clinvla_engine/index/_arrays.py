"""Hands NumPy / PyTorch / CuPy arrays to the C++ core without copying, and makes outputs alike.

The core reads a DLPack capsule (or, for NumPy arrays DLPack cannot export, the buffer protocol)
and checks shape, dtype, device and contiguity itself, so refusals read the same for every
framework. Nothing here imports torch or cupy unless the caller's array is one.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def kind(x: Any) -> str:
    """'numpy' | 'torch' | 'cupy' | 'dlpack' | 'other' (the array's framework)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__ or ""
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return "other"


def is_bf16_numpy(x: np.ndarray) -> bool:
    return x.dtype.name == "bfloat16"  # ml_dtypes.bfloat16: NumPy has no bfloat16 of its own


def export(x: Any) -> tuple[Any, bool]:
    """Returns (object for the core: a DLPack capsule or a NumPy array, bf16_bits flag)."""
    k = kind(x)
    if k == "other":
        x, k = np.asarray(x), "numpy"
    if k == "numpy":
        bf16 = is_bf16_numpy(x)
        if bf16:
            x = x.view(np.uint16)
        for kwargs in ({"max_version": (1, 0)}, {}):
            try:
                return x.__dlpack__(**kwargs), bf16
            except (TypeError, BufferError):
                continue
        return x, bf16  # buffer protocol (e.g. read-only arrays on NumPy < 2.1)
    if k == "torch":
        return _torch_capsule(x), False
    if k == "cupy":
        try:
            return x.__dlpack__(), False
        except (TypeError, BufferError, AttributeError):
            return x.toDlpack(), False
    return x.__dlpack__(), False


def _torch_capsule(t: Any) -> Any:
    import torch

    t = t.detach()
    if t.is_cuda:
        # Same-stream use (the core runs on torch's current stream): no cross-stream sync needed.
        with torch.cuda.device(t.device):
            for kwargs in ({"stream": -1, "max_version": (1, 0)}, {"stream": -1}, {}):
                try:
                    return t.__dlpack__(**kwargs)
                except TypeError:
                    continue
            return torch.utils.dlpack.to_dlpack(t)
    for kwargs in ({"max_version": (1, 0)}, {}):
        try:
            return t.__dlpack__(**kwargs)
        except TypeError:
            continue
    return torch.utils.dlpack.to_dlpack(t)


def empty_like_results(queries: Any, nq: int, k: int) -> tuple[Any, Any]:
    """(scores float32, ids int64), both (nq, k), of the queries' framework and device."""
    kd = kind(queries)
    if kd == "torch":
        import torch

        return (torch.empty((nq, k), dtype=torch.float32, device=queries.device),
                torch.empty((nq, k), dtype=torch.int64, device=queries.device))
    if kd == "cupy":
        import cupy

        with queries.device:
            return cupy.empty((nq, k), dtype=cupy.float32), cupy.empty((nq, k), dtype=cupy.int64)
    return np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)


def current_stream(queries: Any) -> int:
    """The CUDA stream the caller's framework is using now (0 = legacy default stream)."""
    kd = kind(queries)
    if kd == "torch" and queries.is_cuda:
        import torch

        return int(torch.cuda.current_stream(queries.device).cuda_stream)
    if kd == "cupy":
        import cupy

        with queries.device:
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def wait_for_producer(x: Any) -> None:
    """Waits for the caller's current CUDA stream (before the core reads x on another stream)."""
    kd = kind(x)
    if kd == "torch" and x.is_cuda:
        import torch

        torch.cuda.current_stream(x.device).synchronize()
    elif kd == "cupy":
        import cupy

        with x.device:
            cupy.cuda.get_current_stream().synchronize()


def n_rows(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    return int(shape[0]) if len(shape) else 1


def host_int64(ids: Any, name: str) -> np.ndarray:
    """Ids as a contiguous 1-D int64 NumPy array (ids are small next to vectors: copying is fine)."""
    if np.isscalar(ids) or (hasattr(ids, "ndim") and ids.ndim == 0):
        ids = [int(ids)]
    k = kind(ids)
    if k == "torch":
        ids = ids.detach().cpu().numpy()
    elif k == "cupy":
        ids = ids.get()
    arr = np.asarray(ids)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1) if arr.ndim <= 1 else arr, dtype=np.int64)


def allow_array(allow: Any, queries: Any, on_cuda: bool) -> Any:
    """allow as the core takes it: a bool mask or uint8 bitmap on the queries' device.

    A list / array of integer ids becomes a bool mask over 0..max(ids); bool masks and uint8
    bitmaps (numpy.packbits(mask, bitorder='little')) pass through untouched.
    """
    if allow is None:
        return None
    k = kind(allow)
    if k == "other":
        allow = np.asarray(allow)
        k = "numpy"
    dtype = str(allow.dtype)
    if dtype.endswith("bool") or dtype.endswith("uint8"):
        return allow
    ids = host_int64(allow, "allow")
    if ids.ndim != 1:
        raise ValueError("allow given as ids must be 1-D (one list shared by all queries)")
    if ids.size and ids.min() < 0:
        raise ValueError(f"allow ids must be >= 0, got {int(ids.min())}")
    mask = np.zeros(int(ids.max()) + 1 if ids.size else 0, dtype=bool)
    mask[ids] = True
    if not on_cuda:
        return mask
    kq = kind(queries)
    if kq == "cupy":
        import cupy

        with queries.device:
            return cupy.asarray(mask)
    import torch

    return torch.as_tensor(mask, device=queries.device)
