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


def _toy_script(tmp_path, calls):
    """A bench script whose closures bind late: a collect-now, run-later design would time the
    wrong variant; the Driver pauses the script at each case.run, so each fn sees its own n."""
    def main():
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("--out")
        args = ap.parse_args()
        bench = Bench("toy", args.out, repeat=3)
        with bench.case("sleeps", floor_ms=1.0) as case:
            for n in (1, 2, 3):
                case.run(f"v{n}", lambda: calls.append(n), baseline=n == 1, warmup=0)
        bench.finish()

    return main


def test_driver_lists_the_rows_without_running_them(tmp_path):
    calls = []
    keys = harness.Driver.list_runs(_toy_script(tmp_path, calls), ["--out", str(tmp_path)])
    assert [(k.case, k.variant, k.baseline) for k in keys] == [
        ("sleeps", "v1", True), ("sleeps", "v2", False), ("sleeps", "v3", False)]
    assert calls == []  # listing times nothing
    assert not (tmp_path / "toy.json").exists()  # and nothing written over real results


def test_driver_hands_each_row_to_its_caller_with_the_script_paused(tmp_path):
    calls = []
    main = _toy_script(tmp_path, calls)
    keys = harness.Driver.list_runs(main, ["--out", str(tmp_path)])
    drv = harness.Driver(main, ["--out", str(tmp_path)]).start()
    req = drv.next_request(keys[0])
    req.fn()
    assert calls == [1]
    req.times_ms = [4.0, 5.0, 6.0]
    req.done.set()
    # keys[1] is not asked for: the harness times it itself; keys[2] is handed over
    req = drv.next_request(keys[2])
    assert calls[-1] == 2 and len(calls) >= 2  # v2 was timed by the harness, with its own n
    calls.clear()
    req.fn()
    assert calls == [3]
    info = harness.floor_and_ratio(req.case, 2.5)
    assert info["baseline_variant"] == "v1" and info["speedup_vs_baseline"] == pytest.approx(5.0 / 2.5)
    assert info["x_floor"] == pytest.approx(2.5)
    req.times_ms = [2.0, 2.5, 3.0]
    req.done.set()
    drv.close()
    rows = {r["variant"]: r for r in json.loads((tmp_path / "toy.json").read_text())["cases"][0]["rows"]}
    assert rows["v1"]["median_ms"] == 5.0 and rows["v3"]["median_ms"] == 2.5
    assert rows["v3"]["speedup"] == pytest.approx(2.0)


def test_driver_reports_a_failure_of_the_test_as_the_rows_note(tmp_path):
    calls = []
    main = _toy_script(tmp_path, calls)
    keys = harness.Driver.list_runs(main, ["--out", str(tmp_path)])
    drv = harness.Driver(main, ["--out", str(tmp_path)]).start()
    req = drv.next_request(keys[0])
    req.error = RuntimeError("out of memory at v1")
    req.done.set()
    drv.close()
    rows = {r["variant"]: r for r in json.loads((tmp_path / "toy.json").read_text())["cases"][0]["rows"]}
    assert "out of memory at v1" in rows["v1"]["note"] and rows["v1"]["median_ms"] != rows["v1"]["median_ms"]


class _FakeTime:
    """A clock that only the measured functions move (no real timing in the test)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):  # anything else the harness needs from `time`
        return getattr(time, name)


def _spell_machine(clock, slow_calls: int):
    """Functions of known cost (ms) on a machine whose first `slow_calls` timed calls, across all
    variants, run 3x slower: a slow spell."""
    calls = {"n": 0}

    def make(cost_ms):
        def fn():
            factor = 3.0 if calls["n"] < slow_calls else 1.0
            calls["n"] += 1
            clock.now += cost_ms * factor / 1e3
        return fn
    return make, calls


def test_interleaved_variants_share_a_slow_spell_where_blocks_do_not(tmp_path, monkeypatch):
    clock = _FakeTime()
    monkeypatch.setattr(harness, "time", clock)
    bench = Bench("spell", tmp_path, repeat=10)
    # blocks: the baseline's whole block falls in the spell, so the 2x engine looks 6x faster
    make, calls = _spell_machine(clock, slow_calls=10)
    with bench.case("blocks") as case:
        case.run("eager", make(2.0), baseline=True, warmup=0)
        case.run("engine", make(1.0), warmup=0)
    assert case.rows[1].speedup == pytest.approx(6.0)
    # interleaved: the spell covers the first rounds of both, and the ratio stays 2x
    make, calls = _spell_machine(clock, slow_calls=10)
    with bench.case("interleaved") as case:
        rows = case.run_interleaved([("eager", make(2.0), True), ("engine", make(1.0), False)], warmup=0,
                                    per_round=1, rewarm=0)
    assert [r.repeats for r in rows] == [10, 10] and calls["n"] == 20
    assert case.rows[1].speedup == pytest.approx(2.0)
    assert all(r.note == "interleaved" for r in rows)


def test_interleaved_rounds_rotate_and_a_failing_variant_is_a_row(tmp_path, monkeypatch):
    clock = _FakeTime()
    monkeypatch.setattr(harness, "time", clock)
    bench = Bench("rotate", tmp_path, repeat=4)
    order = []

    def named(name):
        def fn():
            order.append(name)
            clock.now += 1e-3
        return fn

    def broken():
        raise RuntimeError("engine refused this input")

    with bench.case("c") as case:
        rows = case.run_interleaved([("a", named("a"), True), ("bad", broken, False), ("b", named("b"), False)],
                                    warmup=1, per_round=1, rewarm=0)
    assert order[:2] == ["a", "b"]  # warm-ups, one variant at a time
    assert order[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each round starts one later
    assert rows[1] is None and [r.variant for r in case.rows] == ["a", "bad", "b"]
    bad = case.rows[1]
    assert bad.median_ms != bad.median_ms and "RuntimeError: engine refused this input" in bad.note
    assert case.rows[2].speedup == pytest.approx(1.0)
    # blocks of per_round timed calls, each after `rewarm` untimed ones; the last round is cut to
    # what `repeat` still needs
    order.clear()
    with bench.case("d") as case:
        rows = case.run_interleaved([("a", named("a"), True), ("b", named("b"), False)], warmup=0, repeat=3,
                                    per_round=2, rewarm=1)
    assert order == ["a"] * 3 + ["b"] * 3 + ["b"] * 2 + ["a"] * 2
    assert [r.repeats for r in rows] == [3, 3]
    assert rows[0].achieved["p99 ms"] == pytest.approx(1.0)  # of the timed calls
    for bad_args in ({"per_round": 0}, {"repeat": 0}, {"rewarm": -1}):
        with pytest.raises(ValueError, match="per_round and repeat must be >= 1 and rewarm >= 0"):
            case.run_interleaved([("a", named("a"), True)], **bad_args)


def test_engine_ceilings_come_from_the_eager_row_and_the_matmul_peaks():
    from benchmarks.bench_engine import ceilings
    from benchmarks.harness import Case, Row

    case = Case("image b8", "cpu", floor_ms=10.0)
    assert ceilings(case, 1e11, 2e11) == ""  # no eager row measured: nothing to say
    case.rows.append(Row("pytorch eager fp32 (baseline)", 15.0, 14.0, 16.0, 10, None, baseline=True))
    # eager at 1.5x the fp32 floor: an fp32 engine at the floor is 1.5x; bf16 at twice the rate, 3x
    assert ceilings(case, 1e11, 2e11) == ("; eager at 1.50x the floor: at most 1.50x over eager in fp32, 3.00x in "
                                          "bf16 (measured bf16 matmul peak 0.20 TFLOP/s)")
    assert ceilings(case, 1e11, None).endswith("at most 1.50x over eager in fp32")
    failed = Case("text b8", "cpu", floor_ms=10.0)
    failed.rows.append(Row("pytorch eager fp32 (baseline)", float("nan"), float("nan"), float("nan"), 0, None,
                           baseline=True))
    assert ceilings(failed, 1e11, 2e11) == ""
