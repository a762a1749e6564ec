"""`clinvla serve` under concurrent clients: requests/s of one server process on loopback.

One server (``python -m clinvla_engine.serve.cli serve``, a bearer token, 127.0.0.1, a free port) is
started once and stopped by PID; each case sends the same fixed batch of requests from 1 client
(the baseline) and from C concurrent clients (threads, one HTTP connection each), so "speed-up"
is the throughput gained by concurrency. Each row's time is the wall time of the whole batch;
"achieved" gives requests/s, and the note the per-request latency p50/p99 of that variant. One
extra row per case calls the SearchService in this process (no HTTP) from one thread: the cost of
the engine itself, so the HTTP overhead is the difference.

Cases: text (k=10), text with re-ranking of 50 (k=10), more like this (k=10), image upload (a
64 px JPEG, k=10). The index holds a synthetic archive embedded with the tiny test engine (ONNX
Runtime on the CPU), so the numbers measure the service, not a real model.

    python benchmarks/bench_serve.py                  # 200 studies, 4 clients x 50 requests per case
    python benchmarks/bench_serve.py --quick          # 40 studies, 2 clients x 10 requests: a smoke test
    python benchmarks/bench_serve.py --index DIR --engine DIR   # an existing index and its engine
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Bench, Driver, run_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _fixtures(cache: Path, studies: int) -> tuple[Path, Path, Path]:
    """(index, engine, archive) in `cache`, built once and reused by later runs."""
    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.pipeline.embed import embed_archive
    from clinvla_engine.search.index_dir import build_index

    engine = cache / "engines" / "onnxruntime-cpu-fp32"
    if not (engine / "manifest.json").is_file():  # bundle() always rebuilds; a minute saved per run
        from clinvla_engine.export.testing import bundle

        engine = bundle(str(cache / "engines"), "onnxruntime", "cpu")
    archive = cache / f"mimic-{studies}"
    if not (archive / "synth_manifest.json").is_file():
        generate_archive(archive, studies, seed=0, fmt="mimic", size=64, progress=False, workers=1)
    index = cache / f"index-{studies}"
    if not (index / "index.json").is_file():
        store = cache / f"store-{studies}"
        embed_archive(archive, engine, store, workers=0, batch_size=32, local_features="pooled", progress=False,
                      resume=store.exists())
        build_index(store, index, force=True)
    return index, engine, archive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`clinvla serve` as a child process, stopped by its PID."""

    def __init__(self, index: Path, engine: Path, workdir: Path):
        import httpx

        self.token = secrets.token_urlsafe(24)
        token_file = workdir / "token"
        token_file.write_text(self.token + "\n")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clinvla_engine.serve.cli", "serve", str(index), "--engine", str(engine),
             "--port", str(self.port), "--token-file", str(token_file), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {workdir / 'server.log'}")
            try:
                if httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer within 120 s; see {workdir / 'server.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()


def _batch(server: Server, send, clients: int, per_client: int, latencies: list) -> None:
    """clients threads, one connection each, per_client requests each; every answer must be 200."""
    import httpx

    errors: list = []

    def work():
        try:
            with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer " + server.token},
                              timeout=60) as http:
                for i in range(per_client):
                    t0 = time.perf_counter()
                    r = send(http, i)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}")
        except BaseException as exc:  # re-raised in the timing thread below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="40 studies, 2 clients x 10 requests: a smoke test")
    ap.add_argument("--studies", type=int, default=200, help="studies in the synthetic archive")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=50, help="requests per client per batch")
    ap.add_argument("--repeat", type=int, default=3, help="batches timed per variant")
    ap.add_argument("--index", default=None, help="an existing index folder (default: a synthetic one)")
    ap.add_argument("--engine", default=None, help="the index's engine bundle (with --index)")
    ap.add_argument("--archive", default=None, help="the index's archive folder, for the image case (with --index)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clinvla-bench-serve"),
                    help="where the synthetic engine, archive and index are kept between runs")
    args = ap.parse_args()
    if args.quick:
        args.studies, args.clients, args.requests, args.repeat = 40, 2, 10, 2
    if bool(args.index) != bool(args.engine):
        ap.error("--index and --engine go together")

    # pytest-benchmark lists the rows first by running main() without timing: no server for that
    listing = Driver.active is not None and Driver.active.listing
    service = server = None
    keys, frontal = ["listing"], b"listing"
    if not listing:
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        if args.index:
            index, engine = Path(args.index), Path(args.engine)
            archive = Path(args.archive) if args.archive else None
        else:
            index, engine, archive = _fixtures(cache, args.studies)

        from clinvla_engine.search import SearchService

        service = SearchService.open(index, engine)
        # study keys and one study's own frontal JPEG: the query material of every case
        keys = [h["study_key"] for h in service.search_text("lungs", k=8)]
        rel = service.study(keys[0]).get("frontal_path")
        frontal = (archive / rel).read_bytes() if archive and rel and (archive / rel).is_file() else None
    texts = ["left pleural effusion", "cardiomegaly with pulmonary edema", "right upper lobe pneumonia",
             "no acute cardiopulmonary process", "small apical pneumothorax"]

    total = args.clients * args.requests
    bench = Bench("serve" if not args.quick else "serve_quick", args.out, repeat=args.repeat,
                  params={"studies": service.health()["studies"] if service else None, "clients": args.clients,
                          "requests_per_batch": total,
                          "engine_backend": service.health().get("engine_backend") if service else None})
    cases = [
        ("text k=10", lambda h, i: h.post("/search/text", json={"text": texts[i % len(texts)], "k": 10}),
         lambda i: service.search_text(texts[i % len(texts)], k=10)),
        ("text k=10, re-rank 50", lambda h, i: h.post("/search/text", json={"text": texts[i % len(texts)], "k": 10,
                                                                            "rerank": 50}),
         lambda i: service.search_text(texts[i % len(texts)], k=10, rerank=50)),
        ("more like this k=10", lambda h, i: h.get(f"/studies/{keys[i % len(keys)]}/similar", params={"k": 10}),
         lambda i: service.similar(keys[i % len(keys)], k=10)),
    ]
    if frontal is not None:
        cases.append(("image upload (64 px JPEG) k=10",
                      lambda h, i: h.post("/search/image", files={"frontal": ("q.jpg", frontal)}, data={"k": "10"}),
                      lambda i: service.search_image(frontal, k=10)))

    if not listing:
        server = Server(index, engine, cache)
    try:
        for name, send, direct in cases:
            with bench.case(f"{name}: {total} requests") as case:
                for clients, baseline in ((1, True), (args.clients, False)):
                    latencies: list[float] = []
                    row = case.run(f"{clients} client{'s' if clients > 1 else ''} over HTTP",
                                   lambda c=clients, lat=latencies: _batch(server, send, c, total // c, lat),
                                   baseline=baseline, warmup=1)
                    if row is not None:
                        row.achieved["req/s"] = total / (row.median_ms / 1e3)
                        q = statistics.quantiles(latencies, n=100, method="inclusive")
                        row.note = f"latency p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms"
                row = case.run("SearchService in process, 1 thread (no HTTP)",
                               lambda: [direct(i) for i in range(total)], warmup=1)
                if row is not None:
                    row.achieved["req/s"] = total / (row.median_ms / 1e3)
    finally:
        if server is not None:
            server.stop()
        if service is not None:
            service.close()
    bench.finish()


if __name__ == "__main__":
    run_main(main)
