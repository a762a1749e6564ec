"""The benchmark harness: ratios within one run, failures kept as rows, partial results on
interruption, and RESULTS.md saying when no GPU figure exists."""
from __future__ import annotations

import json
import time

import pytest

from benchmarks import harness
from benchmarks.harness import Bench, render_results, run_main


def _sleep(ms: float):
    return lambda: time.sleep(ms / 1e3)


def test_rows_of_one_case_are_compared_with_its_baseline(tmp_path):
    bench = Bench("unit", tmp_path, repeat=3)
    with bench.case("case a", floor_ms=1.0) as case:
        case.run("slow", _sleep(8), baseline=True, warmup=0)
        case.run("fast", _sleep(2), warmup=0)
        case.run("broken", lambda: 1 / 0, warmup=0)
    data = json.loads(bench.finish().read_text())
    rows = {r["variant"]: r for r in data["cases"][0]["rows"]}
    assert rows["slow"]["speedup"] == pytest.approx(1.0)
    assert rows["fast"]["speedup"] > 2.0  # 8 ms vs 2 ms sleeps; generous for a loaded machine
    assert rows["fast"]["p20_ms"] <= rows["fast"]["median_ms"] <= rows["fast"]["p80_ms"]
    assert rows["slow"]["floor_ratio"] == pytest.approx(rows["slow"]["median_ms"] / 1.0)
    assert rows["broken"]["median_ms"] != rows["broken"]["median_ms"]  # NaN: failed, reported
    assert "ZeroDivisionError" in rows["broken"]["note"]
    md = (tmp_path / "unit.md").read_text()
    assert "| case a | broken | failed |" in md and "(baseline)" in md


def test_an_interrupted_run_keeps_the_cases_measured_so_far(tmp_path):
    def main():
        bench = Bench("interrupted", tmp_path, repeat=2)
        with bench.case("done") as case:
            case.run("only", _sleep(1), baseline=True, warmup=0)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 130
    data = json.loads((tmp_path / "interrupted.json").read_text())
    assert data["params"]["interrupted"] is True
    assert [c["name"] for c in data["cases"]] == ["done"]


def _one_row_bench(outdir) -> None:
    bench = Bench("unit", outdir, repeat=2)
    with bench.case("c") as case:
        case.run("v", _sleep(1), baseline=True, warmup=0)
    bench.finish()


def test_results_md_says_when_there_is_no_gpu_figure(tmp_path, monkeypatch):
    cpu_dir, gpu_dir, out = tmp_path / "cpu", tmp_path / "gpu", tmp_path / "RESULTS.md"
    _one_row_bench(cpu_dir)
    render_results([cpu_dir, gpu_dir], out)
    text = out.read_text()
    assert "No GPU results yet" in text and "### unit" in text

    monkeypatch.setattr(harness, "machine", lambda: {"cpu": "x", "cores": 1, "gpu": "NVIDIA H200", "torch": "2.11"})
    _one_row_bench(gpu_dir)
    render_results([cpu_dir, gpu_dir], out)
    text = out.read_text()
    assert "No GPU results yet" not in text
    assert text.count("### unit") == 2 and "on NVIDIA H200" in text
