"""Exact top-k search (csrc/ core through clinvla_engine.index.Index) against references.

The oracle is a float64 NumPy brute force over the *stored* values (after rounding to the index
dtype), ordered by (score desc, id asc). Scores must agree within the float32-accumulation
tolerance below; ids must agree exactly wherever the reference has no near-tie, and exactly
everywhere for integer-valued data (exact scores, so ties are real and broken by the smaller id).
faiss-cpu's IndexFlatIP is the second reference. GPU tests (marked `gpu`) compare the CUDA path
with torch.topk and with the CPU path.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from clinvla_engine import backends

pytestmark = pytest.mark.skipif(not backends.extension(), reason=f"{backends.extension().why}")

if backends.extension():
    from clinvla_engine import _C
    from clinvla_engine.index import Index

# dtype -> (atol, rtol) of a float32-accumulated score vs the float64 reference of the same stored values.
TOL = {"float32": (3e-4, 1e-5), "float16": (3e-4, 1e-5), "bfloat16": (3e-4, 1e-5)}
TOL_GPU = (2e-3, 1e-4)
NP_DTYPE = {"float32": np.float32, "float16": np.float16}
ISAS = ["generic", "avx2", "avx512"]


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to the index dtype, as float64 (what the index really holds)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, np.float32)).bfloat16().double().numpy()
    return x.astype(NP_DTYPE[dtype]).astype(np.float64)


def as_queries(q: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.ascontiguousarray(q, np.float32)).bfloat16()
    return q.astype(NP_DTYPE[dtype])


def to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x.get()


def reference(db64: np.ndarray, ids: np.ndarray, q64: np.ndarray, k: int, allow_ids=None):
    """(scores, ids) (nq, k) by brute force, -inf / -1 padding, optional allowed-id set."""
    nq = q64.shape[0]
    scores = q64 @ db64.T if db64.size else np.zeros((nq, 0))
    out_s = np.full((nq, k), -np.inf)
    out_i = np.full((nq, k), -1, np.int64)
    keep = np.ones(len(ids), bool) if allow_ids is None else np.isin(ids, allow_ids)
    for r in range(nq):
        s, i = scores[r][keep], ids[keep]
        order = np.lexsort((i, -s))[:k]
        out_s[r, : len(order)] = s[order]
        out_i[r, : len(order)] = i[order]
    return out_s, out_i


def assert_topk(scores, ids, ref_s, ref_i, dtype: str, exact: bool = False, tol=None):
    scores, ids = to_numpy(scores), to_numpy(ids)
    assert scores.shape == ref_s.shape and ids.shape == ref_i.shape
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    atol, rtol = tol or TOL[dtype]
    missing = ref_i < 0
    np.testing.assert_array_equal(ids[missing], -1)
    assert np.all(np.isneginf(scores[missing]))
    np.testing.assert_allclose(scores[~missing], ref_s[~missing], atol=atol, rtol=rtol)
    if exact:
        np.testing.assert_array_equal(ids, ref_i)
        return
    # ids must match wherever the reference order is unambiguous at that position
    finite = np.where(missing, -1e30, ref_s)
    tol = atol + rtol * np.abs(finite)
    gap_prev = np.full(ref_s.shape, np.inf)
    gap_next = np.full(ref_s.shape, np.inf)
    gap_prev[:, 1:] = finite[:, :-1] - finite[:, 1:]
    gap_next[:, :-1] = finite[:, :-1] - finite[:, 1:]
    clear = (gap_prev > 2 * tol) & (gap_next > 2 * tol) & ~missing
    np.testing.assert_array_equal(ids[clear], ref_i[clear])
    # and every returned id must really have (about) the returned score: no wrong vectors
    filled = np.where(missing, -np.float32(3e38), scores)
    assert np.all(np.diff(filled, axis=1) <= 0), "scores not sorted"


def build(db: np.ndarray, dtype: str, ids=None) -> Index:
    index = Index(db.shape[1], dtype=dtype)
    index.add(db.astype(np.float32), ids=ids)
    return index


@pytest.fixture(params=ISAS)
def isa(request):
    try:
        _C.set_cpu_isa(request.param)
    except Exception as exc:  # a CPU without AVX2 / AVX-512
        pytest.skip(str(exc))
    yield request.param
    _C.set_cpu_isa(_best_isa())


def _best_isa() -> str:
    for name in ("avx512", "avx2", "generic"):
        try:
            _C.set_cpu_isa(name)
            return name
        except Exception:
            continue
    return "generic"


# shapes: (N, D, nq, k) with odd sizes, one row, k > N, k = 1, D = 1
SHAPES = [
    (1000, 128, 1, 10),
    (997, 97, 3, 1),
    (513, 33, 5, 16),
    (700, 128, 17, 100),
    (300, 1, 7, 5),
    (64, 3, 40, 80),   # k > N
    (1, 8, 2, 3),
    (2500, 16, 33, 10),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-D{d}-q{q}-k{k}" for n, d, q, k in SHAPES])
def test_matches_numpy_bruteforce(isa, dtype, shape):
    n, d, nq, k = shape
    rng = np.random.default_rng(n * 7 + d)
    db = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    index = build(db, dtype)
    scores, ids = index.search(as_queries(q, dtype), k)
    ref_s, ref_i = reference(stored(db, dtype), np.arange(n), stored(q, dtype), k)
    assert_topk(scores, ids, ref_s, ref_i, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("nq", [1, 3, 6, 16, 40])
def test_duplicates_and_ties_exact(isa, dtype, nq):
    """Integer data: exact scores, many equal ones; ties must go to the smaller id."""
    rng = np.random.default_rng(nq)
    base = rng.integers(-2, 3, size=(60, 24)).astype(np.float32)
    db = np.concatenate([base, base, base[:7], np.zeros((5, 24), np.float32)])  # duplicates, zero rows
    ids = rng.permutation(10_000)[: len(db)]  # scattered ids so "smaller id" is not "earlier row"
    q = rng.integers(-2, 3, size=(nq, 24)).astype(np.float32)
    index = build(db, dtype, ids=ids)
    for k in (1, 9, 130, 200):
        scores, got = index.search(as_queries(q, dtype), k)
        ref_s, ref_i = reference(db.astype(np.float64), ids, q.astype(np.float64), k)
        assert_topk(scores, got, ref_s, ref_i, dtype, exact=True)


def test_matches_faiss_indexflatip():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    n, d = 4000, 64
    db = rng.standard_normal((n, d)).astype(np.float32)
    index = build(db, "float32")
    ref = faiss.IndexFlatIP(d)
    ref.add(db)
    for nq, k in [(1, 1), (5, 10), (32, 100), (3, 5000)]:
        q = rng.standard_normal((nq, d)).astype(np.float32)
        fs, fi = ref.search(q, k)
        scores, ids = index.search(q, k)
        # faiss pads with -1 and -inf / -3.4e38 depending on the version: compare the filled part
        filled = fi >= 0
        assert np.array_equal(filled, ids >= 0)
        np.testing.assert_allclose(scores[filled], fs[filled], atol=1e-4, rtol=1e-5)
        ref64 = reference(db.astype(np.float64), np.arange(n), q.astype(np.float64), k)
        assert_topk(scores, ids, *ref64, "float32")
        same = (ids == fi).mean()
        assert same > 0.995, f"only {same:.3%} of ids equal faiss's"


def test_faiss_ties_agree():
    faiss = pytest.importorskip("faiss")
    db = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # 5 copies of each basis vector
    ref = faiss.IndexFlatIP(4)
    ref.add(db)
    q = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], np.float32)
    fs, fi = ref.search(q, 7)
    scores, ids = build(db, "float32").search(q, 7)
    np.testing.assert_array_equal(ids[:, :5], [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    np.testing.assert_allclose(scores, fs)
    assert set(ids[0, 5:]) <= set(range(5, 20)) and set(fi[0, :5]) == set(range(5))


def test_empty_index_and_zero_queries():
    index = Index(16, "float16")
    q = np.ones((3, 16), np.float16)
    scores, ids = index.search(q, 4)
    assert ids.shape == (3, 4) and np.all(ids == -1) and np.all(np.isneginf(scores))
    index.add(np.ones((2, 16), np.float32))
    scores, ids = index.search(np.zeros((0, 16), np.float16), 5)
    assert scores.shape == (0, 5) and ids.shape == (0, 5)
    scores, ids = index.search(q, 0)
    assert scores.shape == (3, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_queries_refused(bad):
    index = build(np.ones((10, 8), np.float32), "float32")
    q = np.ones((4, 8), np.float32)
    q[2, 5] = bad
    with pytest.raises(ValueError, match=r"finite.*query 2.*dimension 5"):
        index.search(q, 3)


def test_wrong_shape_dtype_device_messages():
    index = Index(128, "float16")
    index.add(np.ones((3, 128), np.float32))
    with pytest.raises(ValueError, match=r"queries must be \(n, 128\) float16 on cpu, got \(4, 64\) float32 on cpu"):
        index.search(np.ones((4, 64), np.float32), 2)
    # FAISS's convention: a float32 query into a float16 index is converted, not refused
    s32, i32 = index.search(np.ones((4, 128), np.float32), 2)
    s16, i16 = index.search(np.ones((4, 128), np.float16), 2)
    np.testing.assert_array_equal(i32, i16)
    np.testing.assert_array_equal(s32, s16)
    with pytest.raises(ValueError, match=r"got \(128,\) float16"):
        index.search(np.ones(128, np.float16), 2)
    with pytest.raises(ValueError, match=r"not contiguous"):
        index.search(np.ones((128, 4), np.float16).T, 2)
    with pytest.raises(ValueError, match=r"k must be >= 0"):
        index.search(np.ones((1, 128), np.float16), -1)
    with pytest.raises(ValueError, match=r"vectors must be \(n, 128\) float32, float16 or bfloat16"):
        index.add(np.ones((2, 127), np.float32))
    with pytest.raises(ValueError, match=r"float64"):
        index.add(np.ones((2, 128), np.float64))


def test_torch_inputs_and_outputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    db = rng.standard_normal((500, 32)).astype(np.float32)
    index = build(db, "bfloat16")
    q = torch.from_numpy(rng.standard_normal((6, 32)).astype(np.float32)).bfloat16()
    scores, ids = index.search(q, 7)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and ids.dtype == torch.int64
    ref = reference(stored(db, "bfloat16"), np.arange(500), q.double().numpy(), 7)
    assert_topk(scores, ids, *ref, "bfloat16")
    q.requires_grad_(False)
    index2 = Index(32, "float32")
    index2.add(torch.from_numpy(db).requires_grad_(True))  # detached internally
    assert len(index2) == 500


@pytest.mark.parametrize("form", ["bool", "packed", "ids", "per_query"])
def test_allow_list_inside_scan(form):
    rng = np.random.default_rng(2)
    n, d, nq, k = 3000, 20, 4, 25
    db = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.arange(n) * 3 + 1  # sparse ids
    q = rng.standard_normal((nq, d)).astype(np.float32)
    index = build(db, "float32", ids=ids)
    allowed = rng.choice(ids, size=40, replace=False)  # fewer than n, more than k
    mask = np.zeros(ids.max() + 1, bool)
    mask[allowed] = True
    allow = {"bool": mask, "packed": np.packbits(mask, bitorder="little"), "ids": allowed.tolist(),
             "per_query": np.stack([mask] * nq)}[form]
    scores, got = index.search(q, k, allow=allow)
    ref = reference(db.astype(np.float64), ids, q.astype(np.float64), k, allow_ids=allowed)
    assert_topk(scores, got, *ref, "float32")
    # fewer allowed than k: the rest is padding, never a disallowed id
    scores, got = index.search(q, k, allow=allowed[:3].tolist())
    assert np.all(np.isin(got[:, :3], allowed[:3])) and np.all(got[:, 3:] == -1)


def test_per_query_allow_differs():
    db = np.eye(6, dtype=np.float32)
    index = build(db, "float32")
    q = np.ones((2, 6), np.float32)
    mask = np.zeros((2, 6), bool)
    mask[0, [1, 2]] = True
    mask[1, [4]] = True
    _, ids = index.search(q, 3, allow=mask)
    np.testing.assert_array_equal(ids, [[1, 2, -1], [4, -1, -1]])


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(3)
    db = rng.standard_normal((20_000, 40)).astype(np.float32)
    index = build(db, "float16")
    q = rng.standard_normal((9, 40)).astype(np.float16)
    out = []
    for threads in (1, 2, 3):
        s = np.empty((9, 50), np.float32)
        i = np.empty((9, 50), np.int64)
        index._native.search(q, 50, s, i, None, threads=threads)
        out.append((s, i))
    for s, i in out[1:]:
        np.testing.assert_array_equal(s, out[0][0])
        np.testing.assert_array_equal(i, out[0][1])


def test_searches_run_concurrently_without_the_gil():
    rng = np.random.default_rng(4)
    index = build(rng.standard_normal((20_000, 64)).astype(np.float32), "float16")
    q = rng.standard_normal((8, 64)).astype(np.float16)
    expect = index.search(q, 10)
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(index.search(q, 10))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    for s, i in results:
        np.testing.assert_array_equal(i, expect[1])


def test_outputs_poisoned_then_fully_written():
    rng = np.random.default_rng(6)
    index = build(rng.standard_normal((50, 8)).astype(np.float32), "float32")
    q = rng.standard_normal((3, 8)).astype(np.float32)
    s = np.full((3, 60), 12345.0, np.float32)
    i = np.full((3, 60), 777, np.int64)
    index._native.search(q, 60, s, i, None)
    assert not np.any(s == 12345.0) and not np.any(i == 777)
    assert np.all(i[:, 50:] == -1) and np.all(np.isneginf(s[:, 50:]))


# ---------------------------------------------------------------- GPU (tools/gpu_suite.sh)

def _cuda_ready() -> bool:
    return bool(backends.extension()) and bool(_C.build_info().get("cuda")) and _C.cuda_device_count() > 0


gpu = pytest.mark.skipif(not (backends.extension() and _cuda_ready()), reason="needs the CUDA build and a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("n,d,nq,k", [(100_000, 128, 1, 10), (50_000, 512, 64, 100), (30_000, 128, 300, 4096),
                                       (999, 97, 17, 10), (70_001, 8, 5, 1000), (10, 16, 3, 20)])
def test_cuda_matches_torch_topk(dtype, n, d, nq, k):
    import torch

    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    g = torch.Generator(device="cuda").manual_seed(n + d)
    db = torch.randn(n, d, device="cuda", generator=g).to(tdt)
    q = torch.randn(nq, d, device="cuda", generator=g).to(tdt)
    index = Index(d, dtype, device="cuda")
    index.add(db)
    scores, ids = index.search(q, k)
    assert scores.is_cuda and ids.is_cuda and scores.shape == (nq, k)
    ref = (q.double() @ db.double().T)
    kk = min(k, n)
    ref_s, ref_rows = torch.topk(ref, kk, dim=1)
    ref_s_np = np.full((nq, k), -np.inf)
    ref_i_np = np.full((nq, k), -1, np.int64)
    ref_s_np[:, :kk] = ref_s.cpu().numpy()
    ref_i_np[:, :kk] = ref_rows.cpu().numpy()
    # tensor-core accumulation order differs from the CPU's: allow for D up to 512 terms
    assert_topk(scores, ids, ref_s_np, ref_i_np, dtype, tol=TOL_GPU)


@pytest.mark.gpu
@gpu
def test_cuda_ties_allow_and_sharding_match_cpu():
    import torch

    rng = np.random.default_rng(9)
    base = rng.integers(-2, 3, size=(3000, 64)).astype(np.float32)
    db = np.concatenate([base] * 4)  # every vector 4 times: exact ties everywhere
    ids = rng.permutation(100_000)[: len(db)]
    q = rng.integers(-2, 3, size=(70, 64)).astype(np.float32)
    cpu = Index(64, "float16")
    cpu.add(db, ids=ids)
    # tiny shards and a tiny device budget: most shards are streamed through the staging buffer
    gpu_index = Index(64, "float16", device="cuda", shard_rows=1000, device_memory=3 * 1000 * (64 * 2 + 8),
                      workspace_mb=64)
    gpu_index.add(db, ids=ids)
    qg = torch.from_numpy(q).half().cuda()
    for k in (1, 10, 257, 4096):
        s_cpu, i_cpu = cpu.search(q.astype(np.float16), k)
        s_gpu, i_gpu = gpu_index.search(qg, k)
        np.testing.assert_array_equal(i_gpu.cpu().numpy(), i_cpu)
        np.testing.assert_array_equal(s_gpu.cpu().numpy(), s_cpu)
    allowed = ids[::7]
    s_cpu, i_cpu = cpu.search(q.astype(np.float16), 50, allow=allowed)
    s_gpu, i_gpu = gpu_index.search(qg, 50, allow=allowed)
    np.testing.assert_array_equal(i_gpu.cpu().numpy(), i_cpu)
    gpu_index.remove(ids[:500])
    cpu.remove(ids[:500])
    extra = rng.standard_normal((10, 64)).astype(np.float32)
    gpu_index.add(extra, ids=np.arange(200_000, 200_010))
    cpu.add(extra, ids=np.arange(200_000, 200_010))
    s_gpu, i_gpu = gpu_index.search(qg, 300)
    s_cpu, i_cpu = cpu.search(q.astype(np.float16), 300)
    np.testing.assert_array_equal(i_gpu.cpu().numpy(), i_cpu)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,d", [("float16", 128), ("bfloat16", 256), ("float16", 97)])
def test_cuda_resident_scan_matches_cpu(dtype, d):
    # More than 64 queries (4 blocks, the last of 8) and a filtered round of over 4 x 132 tiles: the
    # resident scan shape runs (D = 97: the unaligned, element-wise loads). Integer data make every
    # score exact, so ids and scores must equal the CPU's, ties broken by the smaller id.
    import torch

    rng = np.random.default_rng(d)
    db = rng.integers(-3, 4, size=(150_000, d)).astype(np.float32)
    q = rng.integers(-3, 4, size=(200, d)).astype(np.float32)
    cpu = Index(d, dtype)
    cpu.add(db)
    gpu_index = Index(d, dtype, device="cuda")
    gpu_index.add(db)
    qt = torch.from_numpy(q).to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    for k in (10, 1000):
        s_cpu, i_cpu = cpu.search(as_queries(q, dtype), k)
        s_gpu, i_gpu = gpu_index.search(qt.cuda(), k)
        np.testing.assert_array_equal(i_gpu.cpu().numpy(), to_numpy(i_cpu))
        np.testing.assert_array_equal(s_gpu.cpu().numpy(), to_numpy(s_cpu))


@pytest.mark.gpu
@gpu
def test_cuda_resident_and_grid_scans_agree_bitwise(monkeypatch):
    # Both scan shapes run the same tensor-core products in the same order, so on random data too
    # (near-ties everywhere, unlike the integer tests) scores and ids must be identical.
    import torch

    g = torch.Generator(device="cuda").manual_seed(3)
    db = torch.randn(150_000, 128, device="cuda", generator=g).half()
    q = torch.randn(200, 128, device="cuda", generator=g).half()
    auto = Index(128, "float16", device="cuda")
    monkeypatch.setenv("CLINVLA_CUDA_SCAN", "grid")
    grid = Index(128, "float16", device="cuda")
    monkeypatch.setenv("CLINVLA_CUDA_SCAN", "sideways")
    with pytest.raises(ValueError, match="CLINVLA_CUDA_SCAN must be 'auto' or 'grid', got 'sideways'"):
        Index(128, "float16", device="cuda")
    monkeypatch.delenv("CLINVLA_CUDA_SCAN")
    auto.add(db)
    grid.add(db)
    for k in (1, 64, 4096):
        s_a, i_a = auto.search(q, k)
        s_g, i_g = grid.search(q, k)
        assert torch.equal(i_a, i_g) and torch.equal(s_a, s_g)


@pytest.mark.gpu
@gpu
def test_cuda_overflowing_round_is_redone_exactly():
    # Rows sorted by score: every row of a filtered round beats the running k-th best. With 512
    # queries a 64 MiB workspace leaves 16,384 candidate slots per query, so the optimistic round
    # of ~92K rows overflows; the search must see the flag at its end and redo with rounds that fit.
    import torch

    rng = np.random.default_rng(5)
    d = 64
    q0 = rng.integers(-2, 3, size=d).astype(np.float32)
    db = rng.integers(-2, 3, size=(100_000, d)).astype(np.float32)
    db = db[np.argsort(db @ q0, kind="stable")]
    q = np.repeat(q0[None], 512, 0)
    cpu = Index(d, "float16")
    cpu.add(db)
    gpu_index = Index(d, "float16", device="cuda", workspace_mb=64)
    gpu_index.add(db)
    s_cpu, i_cpu = cpu.search(q.astype(np.float16), 100)
    s_gpu, i_gpu = gpu_index.search(torch.from_numpy(q).half().cuda(), 100)
    np.testing.assert_array_equal(i_gpu.cpu().numpy(), i_cpu)
    np.testing.assert_array_equal(s_gpu.cpu().numpy(), s_cpu)


@pytest.mark.gpu
@gpu
def test_cuda_current_stream_nan_and_errors(tmp_path):
    import torch

    index = Index(32, "float16", device="cuda")
    index.add(torch.randn(5000, 32, device="cuda").half())
    q = torch.randn(8, 32, device="cuda").half()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        s1, i1 = index.search(q, 10)
    side.synchronize()
    s2, i2 = index.search(q, 10)
    assert torch.equal(i1, i2)
    bad = q.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"finite.*query 3"):
        index.search(bad, 5)
    with pytest.raises(ValueError, match=r"queries must be \(n, 32\) float16 on cuda:0, got \(8, 32\) float16 on cpu"):
        index.search(q.cpu(), 5)
    s32, i32 = index.search(q.float(), 5)  # converted to the index dtype, as on the CPU
    assert torch.equal(i32, index.search(q, 5)[1])
    with pytest.raises(ValueError, match=r"k must be <= 4096"):
        index.search(q, 5000)
    index.save(tmp_path / "g.clvx")
    again = Index.load(tmp_path / "g.clvx", device="cuda")
    s3, i3 = again.search(q, 10)
    assert torch.equal(i3, i2)


@pytest.mark.gpu
@gpu
def test_cuda_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(11)
    db = rng.standard_normal((20_000, 64)).astype(np.float16)
    q = rng.standard_normal((12, 64)).astype(np.float16)
    index = Index(64, "float16", device="cuda")
    index.add(cupy.asarray(db))
    scores, ids = index.search(cupy.asarray(q), 20)
    assert isinstance(ids, cupy.ndarray)
    ref = reference(db.astype(np.float64), np.arange(20_000), q.astype(np.float64), 20)
    assert_topk(scores, ids, *ref, "float16", tol=TOL_GPU)
