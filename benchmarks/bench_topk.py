"""Exact top-k: the ClinVLA core against faiss-cpu, NumPy (CPU) and torch.topk(q @ db.T) (GPU).

CPU part (always): N = 1M, D = 128; 1, 16 and 256 queries; k = 10 and 100; float32 and float16
storage. Baseline: faiss-cpu IndexFlatIP (float32 storage, both cases), plus faiss's own float16
storage (IndexScalarQuantizer QT_fp16) in the float16 case; NumPy: BLAS matmul + argpartition
(float16 storage: 64K-row chunks upcast to float32).
GPU part (when CUDA is available): first the fixed cost of one search (a 1,024-row database, so
the time is launches, the query check and the one stream synchronise, not the scan), then
N = 1M and 4M, D = 128 and 512, 1 / 64 / 1024 queries, k = 10 / 100 / 4096, float16; baseline
torch.topk(q @ db.T, k). Targets (issue 9, item 10): nq = 1024 at >= 4x torch, nq = 1 near the
bandwidth floor; benchmarks/NOTES_topk.md has the predictions these runs check.

Each case prints the bandwidth floor (reading the N x D database once at the measured copy /
read rate) and the arithmetic floor (2 N D nq flops at the measured matmul rate); "x floor" is
measured time / the larger of the two.

    python benchmarks/bench_topk.py                       # CPU part, + GPU part if CUDA works
    python benchmarks/bench_topk.py --part gpu --out benchmarks/results/gpu
    python benchmarks/bench_topk.py --quick               # small sizes, a smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Bench, run_main  # noqa: E402
from clinvla_engine import backends  # noqa: E402


def _adaptive(fn, budget_s: float, lo: int = 3, hi: int = 20) -> tuple[int, int]:
    """(warmup, repeat) so that a variant spends about budget_s seconds."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return (0 if dt > 1.0 else 1), int(max(lo, min(hi, budget_s / max(dt, 1e-6))))


def numpy_topk(q32: np.ndarray, db: np.ndarray, k: int, chunk: int = 65536):
    """NumPy's best: BLAS scores, argpartition, sort of the k; float16 storage upcast per chunk."""
    nq = q32.shape[0]
    if db.dtype == np.float32:
        s = q32 @ db.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    for c0 in range(0, db.shape[0], chunk):
        s = q32 @ db[c0:c0 + chunk].astype(np.float32).T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_i = np.concatenate([best_i, part + c0], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def cpu_floors(n: int, d: int) -> tuple[float, float]:
    """(read GB/s with all threads, float32 GEMM GFLOP/s) measured here with torch."""
    import torch

    x = torch.empty(n * d // 4 * 4, dtype=torch.float32).uniform_()
    x.sum()
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        t.append(time.perf_counter() - t0)
    bw = x.numel() * 4 / min(t) / 1e9
    a = torch.randn(2048, 2048)
    a @ a
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        t.append(time.perf_counter() - t0)
    return bw, 2 * 2048**3 / min(t) / 1e9


def run_cpu(bench: Bench, quick: bool, budget: float) -> None:
    from clinvla_engine.index import Index

    try:
        import faiss
    except ImportError:
        faiss = None
    n, d = (100_000, 128) if quick else (1_000_000, 128)
    rng = np.random.default_rng(0)
    db32 = rng.standard_normal((n, d), dtype=np.float32)
    bw, gemm = cpu_floors(n, d)
    print(f"  floors: read {bw:.1f} GB/s (torch sum, {os.cpu_count()} cores), float32 GEMM {gemm:.0f} GFLOP/s (torch)")
    flat = None
    if faiss is not None:
        flat = faiss.IndexFlatIP(d)  # the baseline, float32 storage, for both cases
        flat.add(db32)
    for storage in ("float32", "float16"):
        db = db32 if storage == "float32" else db32.astype(np.float16)
        index = Index(d, storage)
        index.add(db)
        sq = None
        if faiss is not None and storage == "float16":  # faiss's own float16 storage
            sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            sq.train(db.astype(np.float32))
            sq.add(db.astype(np.float32))
        db_bytes = db.nbytes
        for nq in (1, 16, 256):
            q32 = rng.standard_normal((nq, d), dtype=np.float32)
            q = q32 if storage == "float32" else q32.astype(np.float16)
            for k in (10, 100):
                flops = 2.0 * n * d * nq
                floor_ms = max(db_bytes / (bw * 1e9), flops / (gemm * 1e9)) * 1e3
                name = f"cpu N={n} D={d} {storage} nq={nq} k={k}"
                with bench.case(name, device="cpu", floor_ms=floor_ms, flops=flops, bytes_moved=db_bytes,
                                floor_note=f"max(read {db_bytes / 2**20:.0f} MiB at {bw:.1f} GB/s, "
                                           f"{flops / 1e9:.1f} GFLOP at {gemm:.0f} GFLOP/s)") as case:
                    times = {}
                    if flat is not None:
                        fn = lambda: flat.search(q32, k)  # noqa: E731
                        w, r = _adaptive(fn, budget)
                        row = case.run("faiss IndexFlatIP (float32)", fn, baseline=True, warmup=w, repeat=r)
                        times["faiss"] = row.median_ms if row else None
                    if sq is not None:
                        fn = lambda: sq.search(q32, k)  # noqa: E731
                        w, r = _adaptive(fn, budget)
                        row = case.run("faiss IndexScalarQuantizer QT_fp16", fn, warmup=w, repeat=r)
                        times["faiss_sq"] = row.median_ms if row else None
                    fn = lambda: numpy_topk(q32, db, k)  # noqa: E731
                    w, r = _adaptive(fn, budget)
                    row = case.run("numpy BLAS + argpartition", fn, baseline=flat is None, warmup=w, repeat=r)
                    times["numpy"] = row.median_ms if row else None
                    fn = lambda: index.search(q, k)  # noqa: E731
                    w, r = _adaptive(fn, budget)
                    from clinvla_engine import _C

                    row = case.run(f"clinvla cpu ({_C.cpu_isa()})", fn, warmup=w, repeat=r)
                    if row:
                        parts = [f"{times[key] / row.median_ms:.1f}x vs {label}"
                                 for key, label in (("faiss", "faiss flat"), ("faiss_sq", "faiss SQfp16"),
                                                    ("numpy", "numpy")) if times.get(key)]
                        row.note = ", ".join(parts)
                    # spot check: the same ids as NumPy's where scores are not tied
                    s, i = index.search(q, k)
                    ns, ni = numpy_topk(q32 if storage == "float32" else q.astype(np.float32), db, k)
                    agree = float((i == ni).mean())
                    if agree < 0.99:
                        print(f"  WARNING: only {agree:.1%} of ids agree with NumPy in {name}")


def gpu_floors(torch) -> tuple[float, float]:
    """(device copy GB/s counting read + write, fp16 matmul TFLOP/s) measured on this GPU."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        y.copy_(x)
    ev[1].record()
    ev[1].synchronize()
    copy = 2 * x.numel() * 10 / (ev[0].elapsed_time(ev[1]) * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    a @ a
    torch.cuda.synchronize()
    ev[0].record()
    for _ in range(10):
        a @ a
    ev[1].record()
    ev[1].synchronize()
    mm = 2 * 8192**3 * 10 / (ev[0].elapsed_time(ev[1]) * 1e-3) / 1e12
    del x, y, a
    torch.cuda.empty_cache()
    return copy, mm


def sync_floor_ms(torch) -> float:
    """Median host time of one tiny kernel launch + stream synchronise: the least a synchronous
    search can cost, whatever it computes."""
    x = torch.zeros(1, device="cuda")
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        x.add_(1)
        torch.cuda.current_stream().synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def run_gpu_fixed_cost(bench: Bench, torch) -> None:
    """Per-search fixed cost: a database so small that the scan is negligible.

    k = 0 runs only the query check and the synchronise; N = 1,024 adds the dense round and its
    select (one round: 1,024 rows <= L0). The floor is one launch + synchronise measured here.
    """
    from clinvla_engine.index import Index

    floor = sync_floor_ms(torch)
    print(f"  fixed-cost floor: one launch + synchronise {floor * 1e3:.1f} us")
    g = torch.Generator(device="cuda").manual_seed(1)
    n, d = 1024, 128
    db = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float16)
    index = Index(d, "float16", device="cuda")
    index.add(db)
    for nq, k in ((1, 0), (1, 10), (64, 10), (1024, 10), (1, 100)):
        q = torch.randn(nq, d, device="cuda", generator=g, dtype=torch.float16)
        if k:
            index.search(q, k)  # upload and workspace before timing
        name = f"cuda fixed cost N={n} D={d} fp16 nq={nq} k={k}"
        with bench.case(name, device="cuda", floor_ms=floor,
                        floor_note=f"one tiny kernel launch + stream synchronise ({floor * 1e3:.1f} us)") as case:
            if k:
                case.run("torch.topk(q @ db.T)", lambda: torch.topk(q @ db.T, k, dim=1), baseline=True,
                         repeat=200)
            else:
                case.run("torch q @ db.T (no top-k)", lambda: q @ db.T, baseline=True, repeat=200)
            row = case.run("clinvla cuda", lambda: index.search(q, k), repeat=200)
            if row:
                row.note = f"{row.median_ms * 1e3:.1f} us per search, {row.median_ms / floor:.1f}x launch+sync floor"
    del db, index
    torch.cuda.empty_cache()


def run_gpu(bench: Bench, quick: bool) -> None:
    import torch

    from clinvla_engine.index import Index

    run_gpu_fixed_cost(bench, torch)
    copy_gbs, mm_tflops = gpu_floors(torch)
    print(f"  floors: copy {copy_gbs:.0f} GB/s (read + write), fp16 matmul {mm_tflops:.0f} TFLOP/s (torch)")
    sizes = [(100_000, 128)] if quick else [(1 << 20, 128), (1 << 20, 512), (1 << 22, 128), (1 << 22, 512)]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, d in sizes:
        db = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float16)
        index = Index(d, "float16", device="cuda")
        index.add(db)
        # A/B: the same search with the resident scan shape off (it runs for nq > 64, D <= 256).
        grid_index = None
        if d <= 256:
            os.environ["CLINVLA_CUDA_SCAN"] = "grid"
            try:
                grid_index = Index(d, "float16", device="cuda")
            finally:
                os.environ.pop("CLINVLA_CUDA_SCAN", None)
            grid_index.add(db)
        for nq in (1, 64, 1024):
            q = torch.randn(nq, d, device="cuda", generator=g, dtype=torch.float16)
            index.search(q, 10)  # uploads the index and sizes the workspace before timing
            ab = grid_index is not None and nq > 64
            if ab:
                grid_index.search(q, 10)
            for k in (10, 100, 4096):
                bytes_db = 2 * n * d
                flops = 2.0 * n * d * nq
                bw_ms = bytes_db / (copy_gbs * 1e9) * 1e3
                ar_ms = flops / (mm_tflops * 1e12) * 1e3
                name = f"cuda N={n} D={d} fp16 nq={nq} k={k}"
                with bench.case(name, device="cuda", floor_ms=max(bw_ms, ar_ms), flops=flops, bytes_moved=bytes_db,
                                floor_note=f"bandwidth floor {bw_ms:.3f} ms ({bytes_db / 2**30:.2f} GiB at "
                                           f"{copy_gbs:.0f} GB/s), arithmetic floor {ar_ms:.3f} ms") as case:
                    base = case.run("torch.topk(q @ db.T)", lambda: torch.topk(q @ db.T, k, dim=1), baseline=True)
                    row = case.run("clinvla cuda", lambda: index.search(q, k))
                    if row:
                        row.note = f"{row.median_ms / bw_ms:.2f}x bandwidth floor, {row.median_ms / ar_ms:.2f}x arithmetic floor"
                        if base:
                            target = " (target >= 4x)" if nq == 1024 else ""
                            row.note += f", {base.median_ms / row.median_ms:.1f}x vs torch{target}"
                    if ab:
                        grow = case.run("clinvla cuda, grid scan only (CLINVLA_CUDA_SCAN=grid)",
                                        lambda: grid_index.search(q, k))
                        if grow and row:
                            grow.note = f"resident scan is {grow.median_ms / row.median_ms:.2f}x faster"
                s, i = index.search(q, min(k, 100))
                rs, ri = torch.topk((q.float() @ db.float().T), min(k, 100), dim=1)
                agree = (i == ri).float().mean().item()
                if agree < 0.98:
                    print(f"  WARNING: only {agree:.1%} of ids agree with torch.topk in {name}")
                if ab:  # both shapes run the same MMAs in the same order: results must be identical
                    gs, gi = grid_index.search(q, min(k, 100))
                    if not (torch.equal(gi, i) and torch.equal(gs, s)):
                        print(f"  WARNING: resident and grid scans differ in {name}")
        del db, index, grid_index
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cpu", "gpu", "all"], default="all",
                    help="cpu, gpu or all (all runs the GPU part only where CUDA is available)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds per CPU variant (sets the repeats)")
    args = ap.parse_args()
    backends.require(backends.extension(), "bench_topk")
    bench = Bench("topk" if not args.quick else "topk_quick", args.out,
                  params={"part": args.part, "quick": args.quick})
    if args.part in ("cpu", "all"):
        run_cpu(bench, args.quick, args.budget)
    if args.part in ("gpu", "all"):
        from clinvla_engine import _C

        if backends.cuda() and _C.build_info().get("cuda"):
            run_gpu(bench, args.quick)
        elif args.part == "gpu":
            raise SystemExit(f"GPU part needs CUDA: {backends.cuda().why}; extension cuda={_C.build_info().get('cuda')}")
        else:
            print("  (GPU part skipped: " + (backends.cuda().why if not backends.cuda() else "extension built without CUDA") + ")")
    bench.finish()


if __name__ == "__main__":
    run_main(main)
