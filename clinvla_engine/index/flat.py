"""`Index`: exact inner-product top-k over an archive's embeddings, on the CPU or one GPU.

    index = Index(128, dtype="float16")              # or device="cuda"
    ids = index.add(embeddings)                      # (n, 128): NumPy, PyTorch or CuPy
    scores, ids = index.search(queries, k=10)        # (nq, 10) each, best first
    index.save("archive.clvx"); index = Index.load("archive.clvx", device="cuda")

Results are sorted by score, descending, ties broken by the smaller id; slots beyond the number
of (allowed) vectors hold id -1 and score -inf.

FAISS conventions (for users of `faiss.IndexFlatIP`): `ntotal`, `d`, `add_with_ids(x, ids)`,
`remove_ids(ids)` and `search(x, k)` -> (scores, ids) with -1 padding work as there, and queries of
another float dtype (float32 or float64 into a float16 index) are converted to the index's dtype.
Where it differs, and why:
  * padding scores are -inf, not FAISS's -3.4e38: no real inner product can tie with it;
  * ties are broken by the smaller id, so results are reproducible across threads and devices
    (FAISS leaves the order of equal scores to its heap);
  * `search(..., allow=...)` restricts the scan to a subset of ids (FAISS needs an IDSelector in
    SearchParameters); filtered searches stay exact and return k results where k are allowed;
  * ids given to `add`/`add_with_ids` must be new (FAISS silently keeps duplicates), and `add`
    without ids continues from `next_id` even after removals (FAISS's IndexFlat renumbers);
  * k is bounded by MAX_K (see below); FAISS allocates whatever k asks for. Arrays pass to the C++ core through DLPack without
copying; the GIL is released while it works; CUDA searches run on PyTorch's (or CuPy's) current
stream. The maths, the CPU kernels and the CUDA rounds are described in csrc/core/scan_impl.hpp
and csrc/cuda/flat_index_cuda.cu.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from .. import backends
from . import _arrays

DTYPES = ("float32", "float16", "bfloat16")
MAX_K_CUDA = 4096
# The bound on k (see Index.search). The results are allocated before the core runs, nq x k x 12
# bytes, so an unchecked k = 10**9 asked for 12 GB per query and the process was killed. Exact
# top-k is for retrieval lists a person or a re-ranker reads: 65,536 is far beyond that, and a
# caller who wants every vector in order can page with `allow`.
MAX_K = 65536
# Results of one call (scores + ids, 12 bytes per slot) may take at most this much memory; more
# queries are split by the caller (the error says how many fit).
MAX_RESULT_BYTES = 1 << 30


def _native_module():
    backends.require(backends.extension(), "clinvla_engine.index.Index")
    from .. import _C

    return _C


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "").replace("numpy.", "")
    name = {"float": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _parse_device(device: Any) -> tuple[str, int]:
    text = str(device)
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class Index:
    """A flat inner-product index over float32 / float16 / bfloat16 vectors with int64 ids.

    Args:
        dim: vector length (e.g. 128 for ClinVLA embeddings).
        dtype: storage and query dtype: "float32", "float16" (default) or "bfloat16".
        device: "cpu" or "cuda[:N]". A CUDA index keeps a host copy as the master and mirrors it
            on the GPU; k is limited to 4096 there.
        device_memory: CUDA only: bytes of GPU memory the vectors may occupy (default 80% of what
            is free); the rest is streamed in shard by shard at search time, results merged.
        shard_rows: CUDA only: rows per device shard (default about 1 GiB of vectors).
        workspace_mb: CUDA only: candidate-buffer memory, allocated once and reused.
    """

    MAX_K = MAX_K

    def __init__(self, dim: int, dtype: Any = "float16", device: Any = "cpu", *, device_memory: int | None = None,
                 shard_rows: int = 0, workspace_mb: int = 1024, _native: Any = None):
        _C = _native_module()
        self._kind, self._device_index = _parse_device(device)
        if _native is None:
            dtype = _dtype_name(dtype)
            if self._kind == "cpu":
                _native = _C.FlatIndex(int(dim), dtype)
            else:
                self._require_cuda(_C)
                _native = _C.CudaFlatIndex(int(dim), dtype, device=self._device_index, shard_rows=int(shard_rows),
                                           max_device_bytes=-1 if device_memory is None else int(device_memory),
                                           workspace_bytes=int(workspace_mb) << 20)
        self._native = _native

    @staticmethod
    def _require_cuda(_C) -> None:
        info = _C.build_info()
        if not info.get("cuda"):
            raise backends.BackendUnavailable(
                "Index(device='cuda') needs clinvla_engine._C built with CUDA: install with nvcc on the PATH "
                "and without CLINVLA_NO_CUDA=1 (`pip install -e .`)")
        if _C.cuda_device_count() == 0:
            raise backends.BackendUnavailable("Index(device='cuda'): no CUDA device is visible")

    # ---- properties ----
    @property
    def dim(self) -> int:
        return int(self._native.dim)

    @property
    def dtype(self) -> str:
        return str(self._native.dtype)

    @property
    def device(self) -> str:
        return "cpu" if self._kind == "cpu" else f"cuda:{self._device_index}"

    @property
    def d(self) -> int:
        """FAISS's name for `dim`."""
        return self.dim

    @property
    def ntotal(self) -> int:
        """FAISS's name for len(index): the number of stored vectors."""
        return len(self)

    @property
    def next_id(self) -> int:
        """The id `add` gives the next vector when no ids are passed (ids are never reused)."""
        return int(self._native.next_id)

    def __len__(self) -> int:
        return len(self._native)

    def __contains__(self, id_: int) -> bool:
        return int(id_) in self._native

    def __repr__(self) -> str:
        return f"Index(dim={self.dim}, dtype={self.dtype!r}, device={self.device!r}, size={len(self)})"

    # ---- changes ----
    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """Adds (n, dim) vectors (float32 / float16 / bfloat16, converted to the index's dtype).

        ids: n distinct new ids >= 0, or None for next_id, next_id + 1, ... Returns the ids given
        (int64 NumPy array). Non-finite values, or values that overflow the dtype, are refused.
        """
        _arrays.wait_for_producer(vectors)  # the core copies device vectors on its own stream
        obj, bf16 = _arrays.export(vectors)
        id_arr = None if ids is None else _arrays.host_int64(ids, "ids")
        return self._native.add(obj, id_arr, bf16_bits=bf16)

    def add_with_ids(self, vectors: Any, ids: Any) -> np.ndarray:
        """FAISS's name for `add(vectors, ids)`."""
        return self.add(vectors, ids)

    def remove_ids(self, ids: Any) -> int:
        """FAISS's name for `remove(ids)`: returns how many were removed."""
        return self.remove(ids)

    def remove(self, ids: Any) -> int:
        """Removes the vectors with these ids (unknown ids are ignored); returns how many."""
        return int(self._native.remove(_arrays.host_int64(ids, "ids")))

    # ---- search ----
    def search(self, queries: Any, k: int, allow: Any = None) -> tuple[Any, Any]:
        """The k best vectors for each query: (scores float32 (nq, k), ids int64 (nq, k)).

        queries: (nq, dim) in the index's dtype, on the index's device; results come back in the
            queries' framework (NumPy in, NumPy out; torch CUDA in, torch CUDA out).
        k: 0 <= k <= MAX_K (65,536; MAX_K_CUDA = 4,096 on CUDA). A k above the number of vectors
            is allowed (the extra slots hold id -1, score -inf) but still bounded, and the results
            of one call, nq x k x 12 bytes, may take at most MAX_RESULT_BYTES (1 GiB): a larger
            request raises ValueError before anything is allocated.
        allow: restricts results to a subset of ids, applied inside the scan: a bool mask indexed
            by id, a uint8 bitmap (numpy.packbits(mask, bitorder="little")), or a list of ids;
            2-D masks / bitmaps give one row per query.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if self._kind == "cuda" and k > MAX_K_CUDA:
            raise ValueError(f"k must be <= {MAX_K_CUDA} on CUDA, got {k}")
        if k > MAX_K:
            raise ValueError(f"k must be <= {MAX_K} (Index.MAX_K), got {k}; the index holds {len(self)} vectors. "
                             "Ask for the results you will read, or page through the rest with `allow`")
        on_cuda = self._kind == "cuda"
        nq = _arrays.n_rows(queries) if getattr(queries, "ndim", 2) >= 1 else 0
        if nq * k * 12 > MAX_RESULT_BYTES:
            fit = max(1, MAX_RESULT_BYTES // (12 * k))
            raise ValueError(f"{nq} queries x k={k} would need {nq * k * 12 / 2**30:.1f} GiB of results, over the "
                             f"{MAX_RESULT_BYTES >> 20} MiB one search may use; search at most {fit} queries per call")
        queries = self._as_query_dtype(queries)
        allow_obj = _arrays.allow_array(allow, queries, on_cuda)
        scores, ids = _arrays.empty_like_results(queries, nq, k)
        q_obj, bf16 = _arrays.export(queries)
        s_obj, _ = _arrays.export(scores)
        i_obj, _ = _arrays.export(ids)
        a_obj = None if allow_obj is None else _arrays.export(allow_obj)[0]
        if on_cuda:
            stream = _arrays.current_stream(queries) if _arrays.kind(queries) in ("torch", "cupy") else 0
            self._native.search(q_obj, k, s_obj, i_obj, a_obj, stream=stream, bf16_bits=bf16)
        else:
            self._native.search(q_obj, k, s_obj, i_obj, a_obj, bf16_bits=bf16)
        return scores, ids

    def _as_query_dtype(self, queries: Any) -> Any:
        """Converts float queries of another dtype to the index's (FAISS takes float32 queries for
        any storage). The conversion is a copy of nq x d values, negligible beside the scan; it is
        done here rather than in the core so the core keeps one dtype per call and no hidden copies."""
        kind = _arrays.kind(queries)
        want = self.dtype
        if getattr(queries, "ndim", 0) != 2 or queries.shape[-1] != self.dim:
            return queries  # a wrong shape is refused by the core, naming what the caller passed
        if kind == "numpy":
            have = queries.dtype.name
            if have == want or have not in ("float16", "float32", "float64", "bfloat16"):
                return queries  # right already, or not floats at all: the core's check words the refusal
            if want == "bfloat16":
                try:
                    import ml_dtypes
                except ImportError:
                    raise TypeError(f"queries are {have} and this index stores bfloat16: install ml_dtypes or pass "
                                    "a torch bfloat16 tensor") from None
                return np.ascontiguousarray(queries, dtype=ml_dtypes.bfloat16)
            return np.ascontiguousarray(queries, dtype=want)
        if kind == "torch":
            import torch

            target = getattr(torch, want)
            if queries.is_floating_point() and queries.dtype != target:
                return queries.to(target).contiguous()
        return queries

    # ---- files ----
    def save(self, path: str | os.PathLike) -> None:
        """Writes the versioned index file atomically: the core writes a unique temporary file
        beside `path` (flushed to disk), which is then renamed onto `path`. Two processes or threads
        saving to one path never mix their bytes: the last rename wins and the file is whole."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot save the index to {path}: the folder {directory} does not exist; "
                                    "create it first")
        # The core itself writes to a fixed "<name>.tmp" before its own rename, which two writers of
        # one path would share; handing it a name of our own makes that temporary unique too.
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=".clvx", dir=directory)
        os.close(fd)
        try:
            self._native.save(tmp)
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, tmp + ".tmp"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "cpu", *, verify: bool = True,
             device_memory: int | None = None, shard_rows: int = 0, workspace_mb: int = 1024) -> "Index":
        """Maps an index file (mmap). verify=True checks its checksum, reading it once.

        A truncated, corrupted or foreign file raises OSError saying what is wrong.
        """
        _C = _native_module()
        kind, dev = _parse_device(device)
        path = os.fspath(path)
        if kind == "cpu":
            native = _C.FlatIndex.load(path, verify=verify)
        else:
            cls._require_cuda(_C)
            native = _C.CudaFlatIndex.load(path, verify=verify, device=dev, shard_rows=int(shard_rows),
                                           max_device_bytes=-1 if device_memory is None else int(device_memory),
                                           workspace_bytes=int(workspace_mb) << 20)
        return cls(native.dim, native.dtype, device, _native=native)

    def ids(self) -> np.ndarray:
        """The stored ids, in storage order (a copy)."""
        return self._native.ids()
