"""pytest-benchmark support: ``pytest benchmarks --benchmark-only`` runs the bench scripts' cases.

Each (bench, case, variant) row of a script is one test, timed by pytest-benchmark's ``benchmark``
fixture; the harness's baseline ratio and hardware floor are in its ``extra_info``. Save and compare
runs the pytest-benchmark way::

    pytest benchmarks --benchmark-only --benchmark-autosave          # .benchmarks/<machine>/0001_*.json
    pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Which scripts run: ``CLINVLA_BENCHES=topk,local_align`` (default: all); each runs with the quick
arguments of ``QUICK_ARGS`` below unless ``CLINVLA_BENCH_FULL=1`` (the script's own defaults, the
figures RESULTS.md reports). The scripts' own JSON and Markdown go to a temporary folder, so a
pytest run never overwrites ``benchmarks/results/``; ``python -m benchmarks.<name>`` stays the way
to refresh RESULTS.md.
"""
from __future__ import annotations

import importlib
import os
import tempfile

import pytest

from benchmarks.harness import Driver

# Quick arguments: a few seconds to a minute per script on a 2-core CPU. On a GPU the scripts pick
# their GPU shapes themselves.
QUICK_ARGS = {
    "train_step": ("benchmarks.bench_train_step", ["--presets", "small", "--repeat", "3"]),
    "local_align": ("benchmarks.bench_local_align", ["--quick"]),
    "fusion": ("benchmarks.bench_fusion", ["--presets", "small", "--repeat", "3"]),
    "text_tower": ("benchmarks.bench_text_tower", ["--batch", "8", "--batches", "2", "--repeat", "3"]),
    "topk": ("benchmarks.bench_topk", ["--quick"]),
    "engine": ("benchmarks.bench_engine", ["--preset", "tiny", "--batches", "1", "--repeat", "3"]),
    "archive": ("benchmarks.bench_archive", ["--quick", "--part", "pipeline", "--repeat", "2"]),
    "serve": ("benchmarks.bench_serve", ["--quick"]),
    "search": ("benchmarks.bench_search", ["--quick", "--queries", "20"]),
    "pacs": ("benchmarks.bench_pacs", ["--quick"]),
}


def selected_scripts() -> list[tuple[str, str, list[str]]]:
    wanted = os.environ.get("CLINVLA_BENCHES")
    names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else list(QUICK_ARGS)
    unknown = sorted(set(names) - set(QUICK_ARGS))
    if unknown:
        raise pytest.UsageError(f"CLINVLA_BENCHES names unknown benches {unknown}; known: {sorted(QUICK_ARGS)}")
    full = os.environ.get("CLINVLA_BENCH_FULL") == "1"
    return [(n, QUICK_ARGS[n][0], [] if full else QUICK_ARGS[n][1]) for n in names]


_OUT = tempfile.mkdtemp(prefix="clinvla-bench-")


def pytest_generate_tests(metafunc):
    if "run_key" not in metafunc.fixturenames:
        return
    params = []
    for name, module, argv in selected_scripts():
        main = importlib.import_module(module).main
        for key in Driver.list_runs(main, argv + ["--out", _OUT]):
            params.append(pytest.param((name, key), id=key.test_id))
    metafunc.parametrize("run_key", params)


@pytest.fixture(scope="session")
def bench_driver():
    """One running script at a time: started by its first test, finished when the next starts."""
    current: dict = {}

    def get(name: str) -> Driver:
        if current.get("name") != name:
            if current:
                current.pop("driver").close()
            module, argv = next((m, a) for n, m, a in selected_scripts() if n == name)
            current["name"] = name
            current["driver"] = Driver(importlib.import_module(module).main, argv + ["--out", _OUT]).start()
        return current["driver"]

    yield get
    if current:
        current["driver"].close()
