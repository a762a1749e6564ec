"""Every bench script's rows as pytest-benchmark tests (see conftest.py for how to run and compare)."""
from __future__ import annotations

import statistics

import pytest

from benchmarks.harness import floor_and_ratio


def test_bench(run_key, benchmark, bench_driver):
    name, key = run_key
    driver = bench_driver(name)
    req = driver.next_request(key)
    if req is None:
        if driver.error is not None and not isinstance(driver.error, SystemExit):
            raise driver.error
        pytest.skip(f"{name}: this run of the script did not time {key.variant!r} (it listed it before)")
    fn = req.fn
    if req.case.device.startswith("cuda"):
        import torch

        def fn(f=req.fn):  # pytest-benchmark's clock is the host's: wait for the GPU
            f()
            torch.cuda.synchronize()

    benchmark.group = f"{key.bench}: {key.case}"
    benchmark.extra_info["baseline"] = key.baseline
    try:
        benchmark.pedantic(fn, rounds=max(1, req.repeat), warmup_rounds=req.warmup, iterations=1)
    except BaseException as exc:
        req.error = exc
        req.done.set()
        raise
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable: the harness times it itself
        times_ms = [t * 1e3 for t in stats.stats.data]
        req.times_ms = times_ms
        benchmark.extra_info.update(floor_and_ratio(req.case, statistics.median(times_ms)))
    req.done.set()
