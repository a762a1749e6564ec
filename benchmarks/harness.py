"""The benchmark harness every ``bench_*.py`` script uses.

One run measures a baseline and the fast paths side by side on the same inputs and reports, per
row: median time with p20/p80, peak extra memory, the speed-up over the case's baseline, and, where
the script gives one, the ratio to a hardware floor (bytes / measured bandwidth or FLOPs / measured
peak). Results go to ``<outdir>/<bench>.json`` plus a Markdown table; ``python -m
benchmarks.harness render`` rebuilds ``benchmarks/RESULTS.md`` from every JSON file.

Usage::

    bench = Bench("local_align", args.out)
    with bench.case("B=96 T=128 M=98 D=128, fwd+bwd", flops=...) as case:
        case.run("loop fp32", loop_fn, baseline=True)
        case.run("kernel bf16", kernel_fn)
    bench.finish()

The same scripts also run under pytest-benchmark (``pytest benchmarks --benchmark-only``): a
``Driver`` runs a script's ``main()`` in a worker thread and hands each ``case.run`` to the pytest
test of that (case, variant), which times it with the ``benchmark`` fixture; the harness's
baseline ratio and hardware floor go into the test's ``extra_info``. See benchmarks/conftest.py.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict:
    """Where the numbers come from: CPU, cores, GPU, library versions."""
    info = {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Row:
    variant: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    peak_mem_mb: float | None
    baseline: bool = False
    speedup: float | None = None  # baseline median / this median
    floor_ratio: float | None = None  # this median / floor (1.0 = at the hardware floor)
    achieved: dict = field(default_factory=dict)  # e.g. {"TFLOP/s": 310.0}
    note: str = ""


@dataclass
class Case:
    name: str
    device: str
    floor_ms: float | None = None
    floor_note: str = ""
    flops: float | None = None
    bytes_moved: float | None = None
    rows: list[Row] = field(default_factory=list)
    _bench: "Bench | None" = None

    def run(
        self,
        variant: str,
        fn: Callable[[], object],
        *,
        baseline: bool = False,
        warmup: int = 2,
        repeat: int | None = None,
        min_time_s: float | None = None,
        note: str = "",
    ) -> Row | None:
        """Times fn() (median of repeats) and records its peak extra memory; errors become a note."""
        bench = self._bench
        repeat = repeat if repeat is not None else bench.repeat
        min_time_s = min_time_s if min_time_s is not None else bench.min_time_s
        driver = Driver.active
        if driver is not None and driver.listing:
            driver.listed.append(RunKey(bench.name, self.name, variant, baseline))
            return None  # scripts already treat None as "this variant did not run"
        try:
            if driver is not None:
                times, peak = driver.handoff(self, variant, fn, baseline, warmup, repeat, min_time_s)
            else:
                times, peak = _measure(fn, self.device, warmup, repeat, min_time_s)
        except Exception as exc:  # a variant that fails (OOM, unsupported) is reported, not fatal
            self._failed(variant, baseline, exc)
            _free(self.device)
            return None
        row = self._row(variant, times, peak, baseline, note)
        _free(self.device)
        return row

    def _failed(self, variant: str, baseline: bool, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(f"  {self.name} | {variant}: FAILED {msg}")
        self.rows.append(Row(variant, float("nan"), float("nan"), float("nan"), 0, None, baseline, note=msg))

    def _row(self, variant: str, times: list[float], peak: float | None, baseline: bool, note: str) -> Row:
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
        row = Row(
            variant=variant,
            median_ms=statistics.median(times),
            p20_ms=q[0],
            p80_ms=q[3],
            repeats=len(times),
            peak_mem_mb=peak,
            baseline=baseline,
            note=note,
        )
        if self.flops:
            row.achieved["TFLOP/s"] = self.flops / (row.median_ms * 1e-3) / 1e12
        if self.bytes_moved:
            row.achieved["GB/s"] = self.bytes_moved / (row.median_ms * 1e-3) / 1e9
        self.rows.append(row)
        print(f"  {self.name} | {variant}: {row.median_ms:.3f} ms (p20 {row.p20_ms:.3f}, p80 {row.p80_ms:.3f})"
              + (f", peak +{peak:.1f} MiB" if peak is not None else ""))
        return row

    def run_interleaved(self, variants: list[tuple[str, Callable[[], object], bool]], *, warmup: int = 2,
                        repeat: int | None = None, per_round: int = 2, rewarm: int = 1,
                        note: str = "") -> list[Row | None]:
        """Times several variants of this case in rounds (variant order rotated each round) instead
        of each in its own block, so that a slow spell of the machine lands on all of them alike
        and their ratios keep their meaning. variants: (name, fn, is_baseline). In each round a
        variant makes `rewarm` untimed calls (its caches and thread pool were the previous
        variant's) and then `per_round` timed ones, until it has `repeat` timings. Peak memory is
        each variant's over its own warm-up calls (taken one variant at a time). CUDA cases, and
        runs under the pytest driver, time each variant in its block (Case.run)."""
        bench = self._bench
        repeat = repeat if repeat is not None else bench.repeat
        if per_round < 1 or rewarm < 0 or repeat < 1:
            raise ValueError(f"per_round and repeat must be >= 1 and rewarm >= 0, got per_round {per_round}, "
                             f"repeat {repeat}, rewarm {rewarm}")
        if Driver.active is not None or self.device.startswith("cuda"):
            return [self.run(v, fn, baseline=b, warmup=warmup, repeat=repeat, note=note) for v, fn, b in variants]
        live, peaks, failed = [], {}, {}
        for variant, fn, baseline in variants:
            sampler = _RssSampler()
            try:
                with sampler:
                    for _ in range(warmup):
                        fn()
            except Exception as exc:  # a variant that fails is reported, the others still run
                failed[variant] = exc
                continue
            peaks[variant] = sampler.peak_mb
            live.append((variant, fn, baseline))
        times: dict[str, list[float]] = {v: [] for v, _, _ in live}
        rounds = -(-repeat // per_round)
        for r in range(rounds):
            k = r % len(live) if live else 0
            for variant, fn, _ in live[k:] + live[:k]:
                if variant in failed:
                    continue
                try:
                    for _ in range(rewarm):
                        fn()
                    for _ in range(min(per_round, repeat - len(times[variant]))):
                        t0 = time.perf_counter()
                        fn()
                        times[variant].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:
                    failed[variant] = exc
        rows: list[Row | None] = []
        for variant, fn, baseline in variants:
            if variant in failed:
                self._failed(variant, baseline, failed[variant])
                rows.append(None)
            else:
                row = self._row(variant, times[variant], peaks[variant], baseline,
                                (note + "; " if note else "") + "interleaved")
                t = sorted(times[variant])  # the timed calls only, not the untimed re-warm ones
                row.achieved["p99 ms"] = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
                rows.append(row)
        return rows

    def finalize(self) -> None:
        base = next((r for r in self.rows if r.baseline and r.median_ms == r.median_ms), None)
        for r in self.rows:
            if base is not None and r.median_ms == r.median_ms and r.median_ms > 0:
                r.speedup = base.median_ms / r.median_ms
            if self.floor_ms and r.median_ms == r.median_ms:
                r.floor_ratio = r.median_ms / self.floor_ms


class Bench:
    active: "Bench | None" = None  # the bench of this process, for run_main's interrupt handling

    def __init__(self, name: str, outdir: str | os.PathLike | None = None, *, repeat: int = 20,
                 min_time_s: float = 0.0, params: dict | None = None):
        Bench.active = self
        self.finished = False
        self.name = name
        self.outdir = Path(outdir) if outdir else RESULTS_DIR
        self.repeat = repeat
        self.min_time_s = min_time_s
        self.params = params or {}
        self.cases: list[Case] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)
        print(f"== bench {name} on {machine().get('gpu') or machine()['cpu']} ==")

    @contextmanager
    def case(self, name: str, *, device: str = "cpu", floor_ms: float | None = None,
             floor_note: str = "", flops: float | None = None, bytes_moved: float | None = None):
        case = Case(name, device, floor_ms, floor_note, flops, bytes_moved, _bench=self)
        try:
            yield case
        finally:
            case.finalize()
            self.cases.append(case)

    def to_dict(self) -> dict:
        cases = []
        for c in self.cases:
            d = {k: v for k, v in asdict(c).items() if k not in ("_bench", "rows")}
            d["rows"] = [asdict(r) for r in c.rows]
            cases.append(d)
        return {
            "bench": self.name,
            "date": self.started.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "params": self.params,
            "cases": cases,
        }

    def finish(self) -> Path:
        """Writes JSON and Markdown, prints the table, returns the JSON path."""
        self.finished = True
        path = self.outdir / f"{self.name}.json"
        if Driver.active is not None and Driver.active.listing:
            return path  # a listing pass timed nothing: never overwrite real results with it
        self.outdir.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        _write_atomic(path, json.dumps(data, indent=2))
        md = render_markdown(data)
        _write_atomic(self.outdir / f"{self.name}.md", md)
        print(md)
        return path


def run_main(main: Callable[[], None]) -> None:
    """Runs a bench script's main(); on Ctrl-C / SIGINT (gpu_suite.sh's per-step time limit sends
    one) the cases measured so far are still written."""
    import sys

    try:
        main()
    except KeyboardInterrupt:
        bench = Bench.active
        if bench is not None and not bench.finished:
            print(f"\ninterrupted: writing the {len(bench.cases)} case(s) measured so far")
            bench.params["interrupted"] = True
            bench.finish()
        sys.exit(130)


def _write_atomic(path: Path, text: str) -> None:
    """Writes to a unique temporary name beside `path`, then renames it into place (files.py)."""
    from clinvla_engine.files import atomic_write_text

    atomic_write_text(path, text)


# ---- pytest-benchmark: the same cases, timed by the `benchmark` fixture --------------------------
@dataclass(frozen=True)
class RunKey:
    """One timed row of a bench script: what a pytest-benchmark test is named after."""
    bench: str
    case: str
    variant: str
    baseline: bool

    @property
    def test_id(self) -> str:
        return f"{self.bench}|{self.case}|{self.variant}"


@dataclass
class Request:
    """A `case.run` waiting in the script's thread until a pytest test has timed it."""
    key: RunKey
    fn: Callable[[], object]
    case: Case
    warmup: int
    repeat: int
    done: threading.Event = field(default_factory=threading.Event)
    times_ms: list | None = None
    error: BaseException | None = None


class Driver:
    """Runs a bench script's main() and hands each of its `case.run` calls to a caller.

    ``Driver.listing(main, argv)`` runs the script without timing anything and returns the
    RunKeys it would time, in order (pytest parametrises its tests with them). ``Driver(main,
    argv).start()`` runs it in a worker thread; each ``case.run`` becomes a Request that
    ``next_request(key)`` returns to the test of that key, which times ``request.fn`` and calls
    ``finish``; the script then builds its row from those times as usual, so the script's own
    JSON, Markdown and ratios are unchanged. Requests no test asks for are timed by the harness
    itself. Because the script waits at each ``case.run``, its closures, memory and device state
    are exactly those of a plain run (nothing is collected ahead and run later).
    """

    active: "Driver | None" = None

    def __init__(self, main: Callable[[], None], argv: list[str]):
        self.main = main
        self.argv = list(argv)
        self.listing = False
        self.listed: list[RunKey] = []
        self._requests: "queue.Queue[Request | None]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.finished = False

    @classmethod
    def list_runs(cls, main: Callable[[], None], argv: list[str]) -> list[RunKey]:
        drv = cls(main, argv)
        drv.listing = True
        with drv._installed():
            main()
        return drv.listed

    def _installed(self):
        drv = self

        @contextmanager
        def cm():
            if Driver.active is not None:
                raise RuntimeError("one bench script at a time: another Driver is active")
            saved = sys.argv
            Driver.active, sys.argv = drv, [drv.main.__module__] + drv.argv
            try:
                yield
            finally:
                Driver.active, sys.argv = None, saved

        return cm()

    def start(self) -> "Driver":
        def work():
            try:
                with self._installed():
                    self.main()
            except BaseException as exc:  # reported to the waiting test, never swallowed
                self.error = exc
            finally:
                self.finished = True
                self._requests.put(None)

        self._thread = threading.Thread(target=work, name=f"bench-{self.main.__module__}", daemon=True)
        self._thread.start()
        return self

    def handoff(self, case: Case, variant: str, fn, baseline: bool, warmup: int, repeat: int,
                min_time_s: float) -> tuple[list[float], float | None]:
        """Called in the script's thread by Case.run: waits until a test has timed fn."""
        req = Request(RunKey(case._bench.name, case.name, variant, baseline), fn, case, warmup, repeat)
        self._requests.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        if req.times_ms is None:  # no test asked for it: timed here, as in a plain run
            return _measure(fn, case.device, warmup, repeat, min_time_s)
        return req.times_ms, None

    def next_request(self, key: RunKey) -> Request | None:
        """The request for `key`; earlier requests no test wants are released to the harness."""
        while True:
            req = self._requests.get()
            if req is None:
                self._requests.put(None)  # stays finished for later callers
                return None
            if req.key == key:
                return req
            req.done.set()  # not asked for by this test: the harness times it

    def close(self, timeout: float = 600.0) -> None:
        """Lets the script run to its end (timing leftovers itself) and re-raises its error."""
        if self._thread is None:
            return
        while not self.finished or not self._requests.empty():
            try:
                req = self._requests.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    break
                continue
            if req is not None:
                req.done.set()
        self._thread.join(timeout)
        if self.error is not None and not isinstance(self.error, SystemExit):
            raise self.error


def floor_and_ratio(case: Case, median_ms: float) -> dict:
    """The harness's ratios for one timing, as pytest-benchmark extra_info."""
    info: dict = {"case": case.name}
    base = next((r for r in case.rows if r.baseline and r.median_ms == r.median_ms), None)
    if base is not None and median_ms > 0:
        info["baseline_variant"] = base.variant
        info["speedup_vs_baseline"] = base.median_ms / median_ms
    if case.floor_ms:
        info["floor_ms"] = case.floor_ms
        info["x_floor"] = median_ms / case.floor_ms
        if case.floor_note:
            info["floor_note"] = case.floor_note
    if case.flops:
        info["TFLOP/s"] = case.flops / (median_ms * 1e-3) / 1e12
    if case.bytes_moved:
        info["GB/s"] = case.bytes_moved / (median_ms * 1e-3) / 1e9
    return info


def render_markdown(data: dict) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"{m.get('cpu')} ({m.get('cores')} cores)"
    lines = [
        f"### {data['bench']}",
        "",
        f"{data['date']} on {where}; torch {m.get('torch', '?')}"
        + (f", triton {m['triton']}" if m.get("triton") else ""),
        "",
        "| case | variant | median ms | p20-p80 ms | peak extra MiB | speed-up vs baseline | x floor | achieved |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in data["cases"]:
        for r in c["rows"]:
            if r["median_ms"] != r["median_ms"]:
                lines.append(f"| {c['name']} | {r['variant']} | failed | | | | | {r['note']} |")
                continue
            ach = ", ".join(f"{v:.3g} {k}" for k, v in r["achieved"].items())
            if r.get("note"):
                ach = f"{ach}; {r['note']}" if ach else r["note"]
            peak = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
            speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            floor = "" if r["floor_ratio"] is None else f"{r['floor_ratio']:.2f}"
            base = " (baseline)" if r["baseline"] else ""
            lines.append(
                f"| {c['name']} | {r['variant']}{base} | {r['median_ms']:.3f} | "
                f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {peak} | {speed} | {floor} | {ach} |"
            )
        if c.get("floor_ms"):
            lines.append(f"| {c['name']} | floor | {c['floor_ms']:.3f} | | | | 1.00 | {c.get('floor_note', '')} |")
    return "\n".join(lines) + "\n"


def _measure(fn, device: str, warmup: int, repeat: int, min_time_s: float) -> tuple[list[float], float | None]:
    if device.startswith("cuda"):
        import torch

        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        start_all = time.perf_counter()
        while len(times) < repeat or time.perf_counter() - start_all < min_time_s:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return times, peak
    # CPU: the sampler starts before the warm-up, because memory the allocator keeps after the
    # first call would otherwise hide every later call's peak
    sampler = _RssSampler()
    times = []
    with sampler:
        for _ in range(warmup):
            fn()
        start_all = time.perf_counter()
        while len(times) < repeat or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, sampler.peak_mb


class _RssSampler:
    """Peak resident-memory growth of this process while timing (CPU runs), sampled every 2 ms."""

    def __init__(self):
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def _rss(self) -> int | None:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def __enter__(self):
        self._base = self._rss()
        self._peak = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.002):
            rss = self._rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc):
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(0.0, (self._peak - self._base) / 2**20)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def render_results(results_dirs: list[Path], out: Path = RESULTS_MD) -> None:
    """Rebuilds RESULTS.md from every bench JSON under the given folders (newest file per bench)."""
    files = {}
    for d in results_dirs:
        for p in sorted(Path(d).glob("*.json")):
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if "bench" in data and "cases" in data:
                key = (data["bench"], data["machine"].get("gpu") or data["machine"].get("cpu"))
                files[key] = data
    parts = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.harness render` from the JSON files in "
        "`benchmarks/results/` (CPU) and `benchmarks/results/gpu/` (GPU suite). Every figure comes from "
        "one run of the named script; speed-ups compare rows of the same case in that run.",
        "",
    ]
    if not any(data["machine"].get("gpu") for data in files.values()):
        parts += ["**No GPU results yet.** Every table below was measured on a CPU; the GPU paths (fused "
                  "kernels, CUDA top-k, GPU engines) are measured by `tools/gpu_suite.sh`, which has not run "
                  "on a GPU for this repository so far.", ""]
    for (_, _), data in sorted(files.items()):
        parts.append(render_markdown(data))
    _write_atomic(out, "\n".join(parts))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description="benchmark harness utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="rebuild benchmarks/RESULTS.md from the JSON results")
    r.add_argument("dirs", nargs="*", type=Path, default=[RESULTS_DIR, RESULTS_DIR / "gpu"])
    args = ap.parse_args()
    if args.cmd == "render":
        render_results(args.dirs)


if __name__ == "__main__":
    main()
