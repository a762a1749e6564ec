"""The Orthanc plugin (libclinvla_orthanc.so) on the CPU: studies indexed per second, and the
latency of its text search, beside the Python pipeline on the same Orthanc and the same bundle.

One Orthanc (loopback, with the GDCM decoder plugin and ours) holds N synthetic DX studies
(`generate_archive(fmt="dicom")`, frontal + lateral for most). Cases:

  * index N studies: the plugin re-indexes all of them (POST /clinvla/reindex, timed until its
    queue is empty): REST listing, view rules, decode in Orthanc, display conversion, embedding
    in libclinvla and an fsynced log record per study; baseline: the Python pipeline,
    `embed_archive(OrthancSource(...))` (what `clinvla embed --orthanc URL` runs), over Orthanc's
    REST API with its decode workers, into a fresh store. Studies/s is in each row's note.
  * GET /clinvla/search?q=...&k=10 over the N indexed studies (HTTP round trip included; text
    encoding in libclinvla, exact top-k, main tags of the hits from Orthanc); baseline: the
    Python engine's embed_texts plus a NumPy exact top-10 over the same vectors (no HTTP).
    p50 is the harness's median; p99 comes from a run of --queries distinct texts (row note).

The engine is the tiny AOTInductor bundle the tests build (or --engine DIR, any AOTI bundle):
the timings are the plumbing's (decode, REST, I/O) plus that model's forward pass.

    python benchmarks/bench_pacs.py                # 48 studies
    python benchmarks/bench_pacs.py --studies 200
    python benchmarks/bench_pacs.py --quick        # 12 studies: a smoke test
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc launcher the tests use

from benchmarks.bench_search import TEXTS  # noqa: E402
from benchmarks.harness import Bench, machine, run_main  # noqa: E402

PLUGIN = Path(os.environ.get("CLINVLA_CPP_BUILD", REPO / "build" / "cpp")) / "orthanc" / "libclinvla_orthanc.so"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=48, help="studies stored in Orthanc (default 48)")
    ap.add_argument("--size", type=int, default=256, help="image side of the synthetic studies (default 256)")
    ap.add_argument("--queries", type=int, default=100, help="distinct queries for p99 (default 100)")
    ap.add_argument("--engine", default=None, help="AOTInductor engine bundle (default: the tests' tiny bundle)")
    ap.add_argument("--workers", type=int, default=1, help="plugin WorkerThreads (default 1)")
    ap.add_argument("--work", default=os.environ.get("CLINVLA_BENCH_WORK", "/tmp/clinvla-bench-pacs"),
                    help="scratch folder (archive, engine, Orthanc storage)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="12 studies, few repeats: a smoke test")
    args = ap.parse_args()

    from orthanc_server import OrthancServer, gdcm_plugin, orthanc_binary, wait_for as wait

    if orthanc_binary() is None or gdcm_plugin() is None:
        sys.exit("Orthanc and its GDCM plugin are needed: install Debian's orthanc and orthanc-gdcm (make setup)")
    if not PLUGIN.is_file():
        sys.exit(f"{PLUGIN} is not built: run `make cpp`")
    n = 12 if args.quick else args.studies
    repeat, queries = (2, 20) if args.quick else (3, args.queries)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.runtime import Engine

    if args.engine:
        engine_dir = Path(args.engine)
    else:
        from clinvla_engine.export.testing import bundle

        print("building (or reusing) the tiny AOTInductor bundle ...")
        engine_dir = bundle(str(work / "engines"), "aoti", "cpu")
    archive = work / f"archive-{n}-{args.size}"
    if not (archive / "labels.csv").is_file():
        shutil.rmtree(archive, ignore_errors=True)
        generate_archive(archive, studies=n, seed=7, fmt="dicom", size=args.size, progress=False)
    files = sorted(archive.rglob("*.dcm"))

    orthanc_dir = work / "orthanc"
    shutil.rmtree(orthanc_dir, ignore_errors=True)
    server = OrthancServer(orthanc_dir, plugins=[gdcm_plugin(), str(PLUGIN)], auth=True, verbose=False,
                           extra_config={"ClinVLA": {"EngineDirectory": str(engine_dir),
                                                     "IndexDirectory": str(orthanc_dir / "clinvla-index"),
                                                     "WorkerThreads": args.workers, "Device": "cpu"}})
    server.start(timeout=120)
    try:
        for f in files:
            server.upload(f)

        def status():
            return server.get("/clinvla/status", check=True).json()

        wait("the first indexing of every study", lambda: status()["indexed"] == n, timeout=60 + 5 * n, interval=0.2)
        bench = Bench("pacs" if not args.quick else "pacs_quick", args.out,
                      params={"studies": n, "image_size": args.size, "engine": engine_dir.name,
                              "plugin_workers": args.workers, "cpu": machine()["cpu"]})

        # ---- indexing -----------------------------------------------------------------------
        from clinvla_engine.pipeline.embed import embed_archive
        from clinvla_engine.pipeline.orthanc import OrthancSource

        def python_embed():
            store = work / "python-store"
            shutil.rmtree(store, ignore_errors=True)
            src = OrthancSource(server.url, server.auth[0], server.auth[1])
            summary = embed_archive(src, engine_dir, store, progress=False)
            if summary["embedded"] != n or summary["failed"]:
                raise RuntimeError(f"the Python pipeline embedded {summary['embedded']} of {n} studies: {summary}")

        def plugin_reindex():
            before = status()["indexed_since_start"]
            server.post("/clinvla/reindex", check=True)
            wait("the re-index", lambda: (lambda s: s["indexed_since_start"] >= before + n
                                          and s["queue"] == 0 and s["in_progress"] == 0)(status()),
                 timeout=60 + 5 * n)

        with bench.case(f"index {n} studies from Orthanc (decode + embed + persist), CPU", device="cpu") as case:
            base = case.run("Python: embed_archive(OrthancSource) over REST (`clinvla embed --orthanc`)",
                            python_embed, baseline=True, warmup=0, repeat=repeat)
            ours = case.run("libclinvla_orthanc.so: POST /clinvla/reindex until the queue is empty",
                            plugin_reindex, warmup=0, repeat=repeat)
            for row in (base, ours):
                if row is not None:
                    row.note = (row.note + " " if row.note else "") + f"{n / (row.median_ms / 1000):.1f} studies/s"
        assert status()["errors"] == {}, status()["errors"]

        # ---- search -------------------------------------------------------------------------
        engine = Engine.load(engine_dir)
        vectors = np.stack([np.asarray(server.get(f"/clinvla/studies/{s}", check=True).json()["vector"], np.float32)
                            for s in server.get("/clinvla/studies", check=True).json()["studies"]])

        def http_search(text):
            r = server.get("/clinvla/search", params={"q": text, "k": 10}, check=True)
            return r.json()

        def python_search(text):
            q = engine.embed_texts([text])[0]
            scores = vectors @ q
            return np.argsort(-scores, kind="stable")[:10]

        distinct = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(queries)]

        def p99(fn):
            times = []
            for t in distinct:
                t0 = time.perf_counter()
                fn(t)
                times.append((time.perf_counter() - t0) * 1000)
            return statistics.quantiles(times, n=100, method="inclusive")[98]

        with bench.case(f"text search, k=10 over {n} studies, CPU", device="cpu") as case:
            base = case.run("Python: Engine.embed_texts + NumPy exact top-10 (in process, no HTTP)",
                            lambda: python_search(TEXTS[0]), baseline=True, repeat=20 * repeat)
            if base is not None:
                base.note = f"p99 {p99(python_search):.1f} ms over {queries} distinct queries"
            ours = case.run("GET /clinvla/search (HTTP round trip, main tags of the hits)",
                            lambda: http_search(TEXTS[0]), repeat=20 * repeat)
            if ours is not None:
                ours.note = f"p99 {p99(http_search):.1f} ms over {queries} distinct queries"
        engine.close()
        bench.finish()
    finally:
        server.stop()


if __name__ == "__main__":
    run_main(main)
