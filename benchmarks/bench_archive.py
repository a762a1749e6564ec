"""Archive embedding (``clinvla embed``): decode-only, engine-only and end-to-end studies/s side by
side on one synthetic DICOM archive; decode rate per core per codec; the store's resume read at scale.

Cases:
  pipeline   decode-only (worker processes, the default worker count), engine-only (pre-decoded
             pictures through the engine in full batches), end-to-end (embed_archive into a fresh
             store, header manifest warm). Target (issue 12): end-to-end within 20% of the slower
             stage. "x floor" here is end-to-end time / the slower stage's time.
  codecs     one core decoding the archive's frontal images re-encoded in each transfer syntax
             pydicom can write here (uncompressed, deflate, RLE, JPEG-LS, JPEG 2000), images/s.
  scale      (--part scale or all; long: writes a 1M-row store, about a minute on 2 cores)
             reading which studies are done from a store of 1M studies: time and peak extra memory
             of a fresh process. Target: under 10 s, bounded memory.

    python benchmarks/bench_archive.py                   # pipeline + codecs, 200 studies of 512 px
    python benchmarks/bench_archive.py --part all        # + the 1M-row scale case (long)
    python benchmarks/bench_archive.py --engine DIR      # a real engine bundle instead of the tiny one
    python benchmarks/bench_archive.py --quick           # 40 studies of 128 px, a smoke test
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Bench, run_main  # noqa: E402


def _archive(cache: Path, studies: int, size: int) -> Path:
    from clinvla_engine.data.synth import generate_archive

    out = cache / f"dicom-{studies}-{size}"
    if not (out / "synth_manifest.json").is_file():
        generate_archive(out, studies, seed=0, fmt="dicom", size=size, progress=False)
    return out


def _engine(cache: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    from clinvla_engine.export.testing import bundle

    return bundle(str(cache / "engines"), "onnxruntime", "cpu")


def _tasks(archive: Path, store: Path, workers: int):
    from clinvla_engine.pipeline.embed import collect_studies

    errors: list[dict] = []
    tasks, metas = collect_studies(archive, "dicom", store, workers, None, errors)
    return tasks, metas


def run_pipeline(bench: Bench, archive: Path, engine_dir: Path, workers: int, batch: int, repeat: int) -> None:
    from clinvla_engine.pipeline.embed import EngineStage, _decoded_stream, embed_archive
    from clinvla_engine.runtime import Engine

    work = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    try:
        t0 = time.perf_counter()
        tasks, _ = _tasks(archive, work, workers)  # writes work/manifest.parquet: the header scan
        scan_s = time.perf_counter() - t0
        n = len(tasks)
        engine = Engine.load(engine_dir)
        size = engine.image_size
        decoded = [d for d in _decoded_stream(tasks, size, workers) if d[3] is None]
        stage = EngineStage(engine, "none")

        def decode_only():
            for _ in _decoded_stream(tasks, size, workers):
                pass

        def engine_only():
            for i in range(0, len(decoded), batch):
                part = decoded[i:i + batch]
                stage([d[1] for d in part], [d[2] for d in part])

        runs = [0]

        def end_to_end():
            runs[0] += 1
            out = work / f"store-{runs[0]}"
            out.mkdir()
            shutil.copy(work / "manifest.parquet", out / "manifest.parquet")  # warm manifest: scan timed apart
            summary = embed_archive(archive, engine_dir, out, workers=workers, batch_size=batch, progress=False)
            assert summary["embedded"] == n, summary

        name = f"{n} studies, {size} px engine input, workers={workers}, batch={batch}, {engine.info()['backend']}"
        with bench.case(f"embed archive: {name}") as case:
            rows = {}
            for label, fn in (("decode-only", decode_only), ("engine-only", engine_only), ("end-to-end", end_to_end)):
                row = case.run(label, fn, warmup=1, repeat=repeat, baseline=(label == "end-to-end"))
                if row:
                    rows[label] = row
                    row.achieved["studies/s"] = n / (row.median_ms / 1e3)
            if len(rows) == 3:
                slower = max(rows["decode-only"].median_ms, rows["engine-only"].median_ms)
                ratio = rows["end-to-end"].median_ms / slower
                rows["end-to-end"].note = (f"{ratio:.2f}x the slower stage (target <= 1.20); "
                                            f"header scan {n / scan_s:.0f} studies/s apart")
                case.floor_ms, case.floor_note = slower, "the slower of decode-only and engine-only"
        engine.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _codecs():
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
                             JPEGLSLossless, RLELossless)

    return [("uncompressed", ExplicitVRLittleEndian), ("deflate", DeflatedExplicitVRLittleEndian),
            ("RLE lossless", RLELossless), ("JPEG-LS lossless", JPEGLSLossless),
            ("JPEG 2000 lossless", JPEG2000Lossless), ("JPEG 2000", JPEG2000)]


def run_codecs(bench: Bench, archive: Path, size: int, images: int, repeat: int) -> None:
    import pydicom

    from clinvla_engine.pipeline.embed import decode_picture

    frontals = sorted(archive.rglob("1_frontal.dcm"))[:images]
    work = Path(tempfile.mkdtemp(prefix="bench-codecs-"))
    try:
        with bench.case(f"decode one core: {len(frontals)} frontal images -> {size} px") as case:
            for name, uid in _codecs():
                folder = work / name.replace(" ", "_")
                folder.mkdir()
                try:
                    for i, src in enumerate(frontals):
                        ds = pydicom.dcmread(src)
                        if uid.is_compressed:
                            kwargs = {"j2k_cr": [20]} if name == "JPEG 2000" else {}
                            ds.compress(uid, **kwargs)
                        else:
                            ds.file_meta.TransferSyntaxUID = uid
                        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
                except Exception as exc:  # an encoder missing here: say so in the table, go on
                    print(f"  {name}: cannot encode here ({type(exc).__name__}: {exc}); skipped")
                    continue
                files = [str(p) for p in sorted(folder.glob("*.dcm"))]
                row = case.run(name, lambda files=files: [decode_picture(f, size) for f in files], warmup=1,
                               repeat=repeat, baseline=(name == "uncompressed"))
                if row:
                    rate = len(files) / (row.median_ms / 1e3)
                    row.achieved["images/s/core"] = rate
    finally:
        shutil.rmtree(work, ignore_errors=True)


_RESUME_READ = (
    "import sys, time\n"
    "from clinvla_engine.pipeline.store import done_keys\n"
    "def rss(field):\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith(field): return int(line.split()[1]) / 1024\n"
    "base = rss('VmRSS:')\n"
    "t0 = time.perf_counter(); d = done_keys(sys.argv[1])\n"
    "print(len(d), time.perf_counter() - t0, rss('VmHWM:') - base)\n")


def run_scale(bench: Bench, studies: int) -> None:
    from clinvla_engine.pipeline.store import synthetic_store

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        t0 = time.perf_counter()
        store = synthetic_store(work / "store", studies, embed_dim=128, shard_rows=8192)
        write_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in store.rglob("*.parquet")) / 2**20
        extra = []

        def resume_read():  # a fresh process each time: the cold start a --resume pays
            out = subprocess.run([sys.executable, "-c", _RESUME_READ, str(store)], capture_output=True, text=True,
                                 check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
            n, seconds, mib = out.stdout.split()
            assert int(n) == studies
            extra.append((float(seconds), float(mib)))

        with bench.case(f"resume read: store of {studies:,} studies ({size_mb:.0f} MiB, written in {write_s:.0f} s)",
                        floor_ms=10_000.0, floor_note="the 10 s target") as case:
            row = case.run("done_keys in a fresh process (incl. interpreter start)", resume_read, warmup=0, repeat=3)
            if row and extra:
                secs = sorted(s for s, _ in extra)[len(extra) // 2]
                mib = max(m for _, m in extra)
                row.note = f"read {secs:.2f} s, peak extra memory {mib:.0f} MiB (target < 10 s)"
                row.achieved["studies/s"] = studies / secs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    from clinvla_engine.pipeline.embed import default_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["pipeline", "codecs", "scale", "default", "all"], default="default",
                    help="default = pipeline + codecs; all adds the long 1M-row scale case")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="40 studies of 128 px, 100k-row store: a smoke test")
    ap.add_argument("--studies", type=int, default=200, help="studies in the synthetic DICOM archive")
    ap.add_argument("--size", type=int, default=512, help="synthetic image side in pixels")
    ap.add_argument("--engine", default=None, help="engine bundle (default: the tiny ONNX Runtime test bundle)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="decode processes (default cores - 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale-studies", type=int, default=1_000_000)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clinvla-bench-archive"),
                    help="where the synthetic archive and the tiny engine are kept between runs")
    args = ap.parse_args()
    if args.quick:
        args.studies, args.size, args.scale_studies = 40, 128, 100_000
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    bench = Bench("archive" if not args.quick else "archive_quick", args.out, repeat=args.repeat,
                  params={"studies": args.studies, "size": args.size, "workers": args.workers,
                          "batch_size": args.batch_size, "part": args.part, "cores": os.cpu_count()})
    parts = {"default": {"pipeline", "codecs"}, "all": {"pipeline", "codecs", "scale"}}.get(args.part, {args.part})
    archive = _archive(cache, args.studies, args.size) if parts & {"pipeline", "codecs"} else None
    if "pipeline" in parts:
        run_pipeline(bench, archive, _engine(cache, args.engine), args.workers, args.batch_size, args.repeat)
    if "codecs" in parts:
        run_codecs(bench, archive, 64 if args.engine is None else 224, min(args.studies, 50), args.repeat)
    if "scale" in parts:
        run_scale(bench, args.scale_studies)
    bench.finish()


if __name__ == "__main__":
    run_main(main)
