"""``embed_archive``: an image archive -> an embedding store (see store.py for the layout).

    from clinvla_engine.pipeline.embed import embed_archive
    summary = embed_archive("archive/", "engine/", "store/", workers=4, batch_size=64, resume=True)

The local executor is three stages joined by bounded queues:

    worker processes (spawn)         main process                 writer thread
    decode + resize to the engine's  engine.embed_studies in      StoreWriter.commit: error part,
    input size, chunk by chunk   ->  full batches            ->   then shard, each fsynced + renamed

Workers send (S, S) float32 pictures in [0, 1] already resized and centre-cropped, so the engine's
own preprocessing (same resize, a no-op at that size, then normalise) gives exactly the embedding
of the original file; only S x S pixels cross the process boundary. The Ray executor
(ray_executor.py) runs the same decode function and the same row builder, so both give the same rows.

One bad study never stops a run: a file that does not decode (or a worker that dies on it) and a
study the engine refuses become rows of errors.parquet (input, stage, reason) and the run goes on.

Sources other than a folder (a PACS over the network: ``orthanc.OrthancSource``) plug in as a
``StudySource``: they list the studies (tasks whose inputs are the source's own names for the
files) and give a picklable ``read(input) -> bytes``; the workers then decode those bytes with the
same ``decode_picture`` as files on disk. A ``SourceUnavailable`` raised by ``read`` (bad
credentials, the server gone) stops the run instead of failing every study that follows; the
committed shards stay and ``--resume`` continues.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .store import (LOCAL_MODES, POOL_GRID, StoreError, StoreWriter, engine_fingerprint, error_row,
                    filter_new, shard_schema)

DEFAULT_SHARD_ROWS = 8192


class SourceUnavailable(RuntimeError):
    """The source itself failed (not one study): stop the run; --resume continues it later."""


class StudySource:
    """A source of studies that are not files under a folder (see the module doc).

    ``collect`` returns (tasks, metas) like ``collect_studies``; ``done`` holds the keys the store
    has committed already, whose details a source may skip fetching. ``reader()`` returns a
    picklable callable mapping a task's frontal/lateral input to the bytes of its DICOM file.
    """

    description = "study source"

    def open(self) -> Any:
        """Check that the source answers (called before the store is opened); raise otherwise."""

    def collect(self, store: Path, workers: int, salt: bytes | None, scan_errors: list[dict],
                progress: bool, done: pa.Array) -> tuple[list["StudyTask"], list["StudyMeta"]]:
        raise NotImplementedError

    def reader(self) -> Callable[[str], bytes]:
        raise NotImplementedError
DECODE_CHUNK = 8  # studies per worker task: amortises inter-process overhead, keeps latency low


def default_workers() -> int:
    # one core stays with the main process, which runs the engine
    return max(1, (os.cpu_count() or 2) - 1)


# ---- studies to embed ------------------------------------------------------------------------
@dataclass
class StudyTask:
    """What a worker needs (picklable, small); the row metadata stays in the main process."""

    key: str
    frontal: str
    lateral: str | None = None


@dataclass
class StudyMeta:
    key: str
    source_format: str
    frontal_path: str
    lateral_path: str | None
    view_codes: list[str]
    subject_hash: str | None = None
    accession_hash: str | None = None
    split: str | None = None
    report: str | None = None
    labels: dict[str, float] = field(default_factory=dict)


def _relative(path: Any, root: Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def _salt(salt_file: str | os.PathLike | None) -> bytes | None:
    if salt_file is None:
        return None  # without a salt no identifier is stored at all, not even hashed
    from .phi import load_salt

    return load_salt(salt_file)


def _hasher(salt: bytes | None) -> Callable[[Any], str | None]:
    if salt is None:
        return lambda value: None
    from .phi import hash_identifier

    return lambda value: hash_identifier(value, salt)


def _dicom_studies(root: Path, store: Path, workers: int, salt: bytes | None, scan_errors: list[dict],
                   progress: bool):
    """A DICOM tree through the header scan (STORE/manifest.parquet; a later run rereads only new
    or changed files) and the shared view rules (views.pick_views)."""
    from .scan import scan_dicom_tree
    from .views import pick_views

    table = scan_dicom_tree(root, store / "manifest.parquet", workers=max(1, workers), salt=salt,
                            progress=progress)
    by_study: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        if (row.get("modality") or "").upper() == "SR":
            continue  # report objects: not images, and their free text is not copied into the store
        if row.get("error"):
            scan_errors.append(error_row(row.get("path"), "scan", row["error"], row.get("study_instance_uid")))
            continue
        by_study.setdefault(row["study_instance_uid"], []).append(row)
    tasks, metas = [], []
    for uid, candidates in by_study.items():
        frontal, lateral = pick_views(candidates)
        if frontal is None:
            views = "/".join(sorted({c.get("view_label") or c.get("view") or "?" for c in candidates}))
            scan_errors.append(error_row(candidates[0].get("path"), "scan",
                                         f"study has no frontal (PA/AP) image (views: {views}); skipped", uid))
            continue
        fpath = str(root / frontal["path"])
        lpath = str(root / lateral["path"]) if lateral is not None else None
        tasks.append(StudyTask(uid, fpath, lpath))
        codes = [frontal.get("view_label") or frontal.get("view_position") or ""]
        if lateral is not None:
            codes.append(lateral.get("view_label") or lateral.get("view_position") or "")
        metas.append(StudyMeta(uid, "dicom", frontal["path"], lateral["path"] if lateral is not None else None, codes,
                               subject_hash=frontal.get("patient_id_hash"),
                               accession_hash=frontal.get("accession_number_hash")))
    return tasks, metas


def collect_studies(source: str | os.PathLike, fmt: str | None, store: Path, workers: int, salt: bytes | None,
                    scan_errors: list[dict], progress: bool = False) -> tuple[list[StudyTask], list[StudyMeta]]:
    """The studies of an archive as worker tasks and row metadata, in archive order."""
    from ..data import detect_format, open_dataset

    root = Path(source).expanduser()
    fmt = (fmt or detect_format(root)).strip().lower()
    if fmt == "dicom":
        return _dicom_studies(root, store, workers, salt, scan_errors, progress)
    hash_id = _hasher(salt)
    dataset = open_dataset(root, fmt)
    for problem in dataset.problems:
        scan_errors.append(error_row(problem.split(": ", 1)[0] if ": " in problem else root, "scan", problem))
    tasks, metas = [], []
    for study in dataset:
        lateral = str(study.lateral) if study.lateral is not None else None
        tasks.append(StudyTask(str(study.study_id), str(study.frontal), lateral))
        codes = [str(study.meta.get("frontal_view") or "")]
        if lateral:
            codes.append(str(study.meta.get("lateral_view") or ""))
        metas.append(StudyMeta(
            key=str(study.study_id), source_format=dataset.format, frontal_path=_relative(study.frontal, root),
            lateral_path=_relative(lateral, root) if lateral else None, view_codes=codes,
            subject_hash=hash_id(study.subject_id), accession_hash=hash_id(study.meta.get("accession_number")),
            split=study.split, report=study.report, labels=dict(study.labels)))
    return tasks, metas


# ---- decoding (runs in worker processes and in Ray tasks) --------------------------------------
_decode_dicom = None


def _worker_init(parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # one decode per core; torch's own threads would oversubscribe

    # A SIGKILLed parent leaves spawn workers blocked on their queue forever: exit when it is gone.
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def decode_picture(path: str | bytes, size: int, name: str | None = None) -> np.ndarray:
    """One file -> (size, size) float32 in [0, 1]: the engine's resize + centre crop, not normalised.

    path: a file, or the bytes of a DICOM file (a PACS download; ``name`` names it in errors).
    """
    global _decode_dicom
    from ..data.io import is_dicom, load_image
    from ..data.transforms import resize_center_crop, to_unit_float

    image = None
    if isinstance(path, (bytes, bytearray, memoryview)):
        from .decode import decode_dicom

        image = decode_dicom(bytes(path), target_size=size, name=name)
        path = name or "<bytes>"
    elif is_dicom(path):
        if _decode_dicom is None:
            try:  # the codec-aware decoder, where that module exists
                from .decode import decode_dicom as fn
            except ImportError:
                fn = False
            _decode_dicom = fn
        if _decode_dicom:
            image = _decode_dicom(path, target_size=size)
    if image is None:
        image = load_image(path)
    try:
        return resize_center_crop(to_unit_float(image), size).numpy()
    except (ValueError, TypeError) as exc:
        from ..data.io import ImageDecodeError

        raise ImageDecodeError(path, str(exc)) from None


def decode_task(task: StudyTask, size: int, read: Callable[[str], bytes] | None = None
                ) -> tuple[str, np.ndarray | None, np.ndarray | None, tuple | None]:
    """(key, frontal, lateral, error) where error is (input, reason) or None.

    read: for a StudySource, maps the task's inputs to file bytes (None: they are file paths).
    """
    from ..data.study import DatasetError

    def picture(name: str) -> np.ndarray:
        return decode_picture(name, size) if read is None else decode_picture(read(name), size, name=name)

    current = task.frontal
    try:
        front = picture(task.frontal)
        lat = None
        if task.lateral is not None:
            current = task.lateral
            lat = picture(task.lateral)
        return task.key, front, lat, None
    except SourceUnavailable:
        raise  # the source, not this study: the run stops
    except DatasetError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return task.key, None, None, (current, reason)
    except MemoryError:
        return task.key, None, None, (current, "out of memory decoding it (header claims more pixels than fit)")
    except Exception as exc:  # a decoder bug on a hostile file concerns that study only
        return task.key, None, None, (current, f"{type(exc).__name__}: {exc}")


def decode_chunk(tasks: Sequence[StudyTask], size: int, read: Callable[[str], bytes] | None = None) -> list:
    return [decode_task(t, size, read) for t in tasks]


# ---- rows ---------------------------------------------------------------------------------------
def local_geometry(engine_info: dict, mode: str) -> tuple[int, int, int]:
    """(views, patches per view side, regions stored per study) for a local-features mode."""
    views = int(engine_info["views"])
    side = int(round(engine_info["patches"] ** 0.5))
    if mode == "none":
        return views, side, 0
    if mode == "pooled":
        g = min(POOL_GRID, side)
        return views, side, views * g * g
    return views, side, views * side * side


def pool_regions(regions: np.ndarray, mask: np.ndarray, views: int, side: int, mode: str):
    """regions (N, V*side*side, E), mask (N, V*side*side) -> stored (N, R, E) float16, (N, R) bool.

    pooled: each view's patch grid averaged to POOL_GRID x POOL_GRID cells (area pooling, the
    grid side divides or nearly divides); an absent view stays zero with mask False.
    """
    if mode == "full":
        return regions.astype(np.float16), mask.astype(bool)
    n, _, e = regions.shape
    g = min(POOL_GRID, side)
    x = regions.reshape(n, views, side, side, e)
    edges = np.linspace(0, side, g + 1).round().astype(int)
    out = np.empty((n, views, g, g, e), np.float32)
    for i in range(g):
        for j in range(g):
            out[:, :, i, j] = x[:, :, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(2, 3))
    vmask = mask.reshape(n, views, side * side).any(axis=2)  # (N, V)
    out *= vmask[:, :, None, None, None]
    return out.reshape(n, views * g * g, e).astype(np.float16), np.repeat(vmask, g * g, axis=1)


def build_rows(metas: Sequence[StudyMeta], has_lateral: Sequence[bool], emb: np.ndarray,
               local: tuple[np.ndarray, np.ndarray] | None, fingerprint: str) -> pa.Table:
    """One shard-schema table for N embedded studies, built column by column from the arrays
    (no per-row Python objects for the features: the writer keeps up with a GPU engine).

    emb: (N, E) float; local: ((N, R, E) float16, (N, R) bool) or None; has_lateral: (N,) bool.
    """
    n = len(metas)
    emb = np.asarray(emb)
    e = emb.shape[1]
    lat = [bool(x) for x in has_lateral]
    cols: dict[str, pa.Array] = {
        "study_key": pa.array([m.key for m in metas], pa.string()),
        "source_format": pa.array([m.source_format for m in metas], pa.string()),
        "frontal_path": pa.array([m.frontal_path for m in metas], pa.string()),
        "lateral_path": pa.array([m.lateral_path if lat[i] else None for i, m in enumerate(metas)], pa.string()),
        "views": pa.array([["frontal", "lateral"] if lat[i] else ["frontal"] for i in range(n)], pa.list_(pa.string())),
        "view_codes": pa.array([m.view_codes[:2] if lat[i] else m.view_codes[:1] for i, m in enumerate(metas)],
                               pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(emb, np.float16).reshape(-1)), e),
    }
    regions = 0
    if local is not None:
        feats, mask = local
        regions = feats.shape[1]
        inner = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats, np.float16).reshape(-1)), e)
        cols["local_features"] = pa.FixedSizeListArray.from_arrays(inner, regions)
        cols["local_mask"] = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(mask, bool).reshape(-1)), regions)
    cols.update({
        "engine_fingerprint": pa.array([fingerprint] * n, pa.string()),
        "subject_hash": pa.array([m.subject_hash for m in metas], pa.string()),
        "accession_hash": pa.array([m.accession_hash for m in metas], pa.string()),
        "split": pa.array([m.split for m in metas], pa.string()),
        "report": pa.array([m.report for m in metas], pa.string()),
        "labels": pa.array([list(m.labels.items()) if m.labels else None for m in metas],
                           pa.map_(pa.string(), pa.float32())),
    })
    return pa.table(cols, schema=shard_schema(e, regions))


# ---- the engine stage ---------------------------------------------------------------------------
class EngineStage:
    """Runs decoded studies through the engine; isolates a study the engine refuses."""

    def __init__(self, engine, mode: str):
        self.engine = engine
        self.mode = mode
        info = {"views": 2 if engine.two_views else 1, "patches": engine.patches}
        self.views, self.side, self.regions = local_geometry(info, mode)

    def __call__(self, fronts: list[np.ndarray], lats: list[np.ndarray | None]):
        """-> (ok indices, emb (K, E), local or None, [(index, reason)] failures)."""
        try:
            return list(range(len(fronts))), *self._run(fronts, lats), []
        except MemoryError:
            raise  # the machine's problem, not the study's: recording it would skip it for good
        except Exception as exc:
            if len(fronts) == 1:  # one study the engine refuses is an error row, never the end of the run
                return [], None, None, [(0, f"{type(exc).__name__}: {exc}")]
        ok, embs, locs, masks, failed = [], [], [], [], []
        for i in range(len(fronts)):  # the batch failed: find the study (or studies) at fault
            try:
                e, loc = self._run([fronts[i]], [lats[i]])
            except Exception as exc:
                failed.append((i, f"{type(exc).__name__}: {exc}"))
                continue
            ok.append(i)
            embs.append(e)
            if loc is not None:
                locs.append(loc[0])
                masks.append(loc[1])
        if not ok:
            # every study of the batch refused one by one: the engine or the machine is at fault
            # (out of memory, a lost device), and recording them as bad would skip them on resume
            raise RuntimeError(f"the engine refused all {len(fronts)} studies of a batch, each on its own "
                               f"(first: {failed[0][1]}); nothing was recorded for them: fix the engine or "
                               "the machine and run again with --resume")
        local = (np.concatenate(locs), np.concatenate(masks)) if locs else None
        return ok, np.concatenate(embs), local, failed

    def _run(self, fronts, lats):
        lateral = lats if self.engine.two_views else None
        if lateral is not None and all(x is None for x in lateral):
            lateral = None
        if self.mode == "none":
            return self.engine.embed_studies(fronts, lateral), None
        emb, regions, mask = self.engine.embed_studies(fronts, lateral, return_local=True)
        return emb, pool_regions(regions, mask, self.views, self.side, self.mode)


# ---- the writer ---------------------------------------------------------------------------------
class BufferedWriter:
    """Collects row tables into shards of shard_rows and commits them on a thread (queue of 2 shards)."""

    def __init__(self, store: StoreWriter, shard_rows: int):
        self.store = store
        self.shard_rows = max(1, shard_rows)
        self.tables: list[pa.Table] = []
        self.pending_rows = 0
        self.errors: list[dict] = []
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="clinvla-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.failure is None:
                try:
                    self.store.commit(*item)
                except BaseException as exc:  # re-raised in the main thread at the next add/close
                    self.failure = exc

    def _check(self) -> None:
        if self.failure is not None:
            raise StoreError(f"writing to {self.store.root} failed: {self.failure}") from self.failure

    def add(self, rows: pa.Table | None, errors: list[dict]) -> None:
        self._check()
        if rows is not None and rows.num_rows:
            self.tables.append(rows)
            self.pending_rows += rows.num_rows
        self.errors.extend(errors)
        if self.pending_rows + len(self.errors) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if self.tables or self.errors:
            rows = pa.concat_tables(self.tables) if self.tables else None
            self.queue.put((rows, self.errors))
            self.tables, self.pending_rows, self.errors = [], 0, []

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self.thread.join()
        self._check()


# ---- the local executor -------------------------------------------------------------------------
def _result(fut, pool: ProcessPoolExecutor):
    """fut.result(), but a dead worker is noticed even when the executor misses it: a worker killed
    in some windows (SIGKILL, the OOM killer) left the future waiting forever (seen in CI, 1 run of 4).
    Pool workers only end at shutdown, so a dead one means the pool is broken."""
    from concurrent.futures import TimeoutError as FutureTimeout

    while True:
        try:
            return fut.result(timeout=2.0)
        except FutureTimeout:
            procs = dict(getattr(pool, "_processes", None) or {})  # private, but the only way to see them
            if any(not p.is_alive() for p in procs.values()):
                raise BrokenProcessPool("a decode worker died without the pool noticing") from None


def _close_pool(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """Shuts the pool down without waiting on its work, then makes sure its workers are gone: a
    worker that does not exit within grace_s (stuck in a decoder, or never told because the pool
    broke) is terminated. A live worker would otherwise hold the interpreter's exit, which joins
    every executor (seen in CI: all tests passed, then the process hung at exit)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # private, as in _result
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()


def _decoded_stream(tasks: list[StudyTask], size: int, workers: int,
                    read: Callable[[str], bytes] | None = None) -> Iterator[tuple]:
    """Decoded studies in task order; at most 4 chunks per worker in flight (bounded memory)."""
    chunks = [tasks[i:i + DECODE_CHUNK] for i in range(0, len(tasks), DECODE_CHUNK)]
    if workers <= 0:
        for chunk in chunks:
            yield from decode_chunk(chunk, size, read)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch/ORT threads exist is unsafe

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(os.getpid(),))

    pool = new_pool()
    crashes = 0  # single-study tasks in a row that broke their pool
    pending = deque(chunks)
    inflight: deque = deque()
    try:
        while pending or inflight:
            while pending and len(inflight) < 4 * workers:
                chunk = pending.popleft()
                inflight.append((chunk, pool.submit(decode_chunk, chunk, size, read)))
            chunk, fut = inflight.popleft()
            try:
                decoded = _result(fut, pool)
            except BrokenProcessPool:
                decoded = None
            if decoded is not None:
                yield from decoded
                continue
            # A worker died (a decoder crashed on some file, or the OOM killer): every in-flight chunk
            # is lost. Redo them one chunk at a time on a fresh pool, and a chunk that breaks that pool
            # too study by study, so the study that kills a worker is found and logged, never retried
            # forever, while the innocent ones cost a few pool restarts only.
            _close_pool(pool)
            lost = [chunk] + [c for c, _ in inflight]
            inflight.clear()
            pool = new_pool()
            for redo in lost:
                try:
                    decoded = _result(pool.submit(decode_chunk, redo, size, read), pool)
                except BrokenProcessPool:
                    decoded = []
                    _close_pool(pool)
                    pool = new_pool()
                    for task in redo:
                        try:
                            decoded += _result(pool.submit(decode_chunk, [task], size, read), pool)
                            crashes = 0
                        except BrokenProcessPool:
                            crashes += 1
                            if crashes >= 5:  # not a bad file: workers that cannot live at all
                                raise RuntimeError(
                                    "decode worker processes died on 5 studies in a row: they cannot start or "
                                    "the machine is out of memory. Run with --workers 0 to decode in the main "
                                    "process and see the error") from None
                            decoded.append((task.key, None, None, (task.frontal, "the decoder crashed its worker "
                                                                   "process on this study (corrupt or hostile file)")))
                            _close_pool(pool)
                            pool = new_pool()
                yield from decoded
    finally:
        _close_pool(pool)


def _run_local(tasks, metas_by_key, engine, stage: EngineStage, writer: BufferedWriter, *, workers: int,
               batch_size: int, fingerprint: str, bar, read: Callable[[str], bytes] | None = None
               ) -> tuple[int, int]:
    embedded = failed = 0
    batch: list[tuple] = []

    def run_batch() -> None:
        nonlocal embedded, failed
        keys = [b[0] for b in batch]
        fronts = [b[1] for b in batch]
        lats = [b[2] for b in batch]
        ok, emb, local, bad = stage(fronts, lats)
        errors = [error_row(metas_by_key[keys[i]].frontal_path, "embed", reason, keys[i]) for i, reason in bad]
        rows = None
        if ok:
            rows = build_rows([metas_by_key[keys[i]] for i in ok], [lats[i] is not None for i in ok], emb, local,
                              fingerprint)
        writer.add(rows, errors)
        embedded += len(ok)
        failed += len(errors)
        bar.update(len(batch))
        bar.set_postfix(errors=failed, refresh=False)
        batch.clear()

    size = engine.image_size
    for key, front, lat, err in _decoded_stream(tasks, size, workers, read):
        if err is not None:
            writer.add(None, [error_row(err[0], "decode", err[1], key)])
            failed += 1
            bar.update(1)
            bar.set_postfix(errors=failed, refresh=False)
            continue
        batch.append((key, front, lat))
        if len(batch) >= batch_size:
            run_batch()
    if batch:
        run_batch()
    return embedded, failed


# ---- the entry point ----------------------------------------------------------------------------
def embed_archive(source: str | os.PathLike | StudySource, engine_dir: str | os.PathLike, out: str | os.PathLike, *,
                  fmt: str | None = None, workers: int | None = None, batch_size: int = 64,
                  executor: str = "local", local_features: str = "none", resume: bool = False,
                  limit: int | None = None, salt_file: str | os.PathLike | None = None, progress: bool = True,
                  shard_rows: int = DEFAULT_SHARD_ROWS, ray_address: str | None = None) -> dict:
    """Embeds every study of an archive into the store at `out`; returns a summary dict.

    source: an archive folder any loader reads (mimic, chexpert, rsna, dicom; fmt detects unless
    given), or a StudySource (e.g. orthanc.OrthancSource: a PACS over its REST API; local executor).
    workers: decode processes (default cores - 1; 0 decodes in this process). batch_size:
    studies per engine call. executor: "local" or "ray". local_features: "none", "pooled"
    (POOL_GRID x POOL_GRID cells per view) or "full" (every patch). resume: continue a store,
    skipping the studies its committed files hold. limit: at most this many new studies this run.
    salt_file: hash patient ids / accession numbers with this salt (without it none are stored).
    shard_rows: studies per committed shard (smaller = less lost to a kill, more files).
    """
    from tqdm import tqdm

    from ..runtime import read_manifest

    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if local_features not in LOCAL_MODES:
        raise ValueError(f"local_features must be one of {', '.join(LOCAL_MODES)}, got {local_features!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    workers = default_workers() if workers is None else int(workers)
    from_source = isinstance(source, StudySource)
    if from_source and executor != "local":
        raise ValueError(f"{source.description} is read with the local executor only, got executor={executor!r}")
    if from_source:
        source.open()  # bad credentials or a wrong URL fail here, before any store is created
    t0 = time.perf_counter()
    engine_dir = Path(engine_dir).expanduser()
    _, manifest = read_manifest(engine_dir)
    fingerprint = engine_fingerprint(manifest)
    cfg = manifest["config"]
    patches = int(manifest.get("patches", (int(cfg["vision"]["image_size"]) // int(cfg["vision"]["patch_size"])) ** 2))
    geometry = {"views": int(cfg["vision"]["num_views"]), "patches": patches}
    views, side, regions = local_geometry(geometry, local_features)
    out = Path(out).expanduser()
    if not from_source:
        source = Path(source).expanduser()
    store = StoreWriter(out, fingerprint=fingerprint, embed_dim=int(cfg["embed_dim"]), local_mode=local_features,
                        local_regions=regions, resume=resume,
                        info={"engine": str(engine_dir),
                              "source": source.description if from_source else str(source),
                              "engine_backend": manifest.get("backend"), "engine_precision": manifest.get("precision")})

    scan_errors: list[dict] = []
    if from_source:
        tasks, metas = source.collect(out, workers, _salt(salt_file), scan_errors, progress, store.done())
    else:
        tasks, metas = collect_studies(source, fmt, out, workers, _salt(salt_file), scan_errors, progress)
    store.write_scan_errors(scan_errors)
    # one row per study key: a key seen twice in the source is an error, not a silent overwrite
    seen: set[str] = set()
    unique = []
    dup_errors = []
    for t, m in zip(tasks, metas):
        if t.key in seen:
            dup_errors.append(error_row(t.frontal, "scan", f"study key {t.key} appears twice in the archive; "
                                        "the first one is embedded", None))
            continue
        seen.add(t.key)
        unique.append((t, m))
    if dup_errors:
        store.write_scan_errors(scan_errors + dup_errors)
    del seen
    done = store.done()
    keep = filter_new([t.key for t, _ in unique], done)
    todo = [unique[i] for i in keep]
    if limit is not None:
        todo = todo[:limit]
    tasks = [t for t, _ in todo]
    if geometry["views"] == 1:  # a frontal-only engine: laterals are neither decoded nor listed as used
        tasks = [StudyTask(t.key, t.frontal, None) for t in tasks]
    metas_by_key = {m.key: m for _, m in todo}
    # a shard's rows are held as Python objects until written: cap a shard near 256 MiB of features
    row_bytes = 2 * int(cfg["embed_dim"]) * (1 + regions) + 512
    shard_rows = max(1, min(shard_rows, (256 << 20) // row_bytes))

    embedded = failed = 0
    bar = tqdm(total=len(tasks), unit="study", desc="embed", disable=not progress, smoothing=0.1)
    writer = BufferedWriter(store, shard_rows)
    try:
        if tasks and executor == "local":
            from ..runtime import Engine

            # the engine shares the machine with the decode workers: give it the cores they leave
            engine = Engine.load(engine_dir, threads=max(1, (os.cpu_count() or 2) - workers))
            try:
                stage = EngineStage(engine, local_features)
                embedded, failed = _run_local(tasks, metas_by_key, engine, stage, writer, workers=workers,
                                              batch_size=batch_size, fingerprint=fingerprint, bar=bar,
                                              read=source.reader() if from_source else None)
            finally:
                engine.close()
        elif tasks:
            from .ray_executor import run_ray

            embedded, failed = run_ray(tasks, metas_by_key, engine_dir, writer, workers=workers,
                                       batch_size=batch_size, local_features=local_features,
                                       fingerprint=fingerprint, bar=bar, address=ray_address)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    run = {"last_run": {"executor": executor, "workers": workers, "batch_size": batch_size,
                        "embedded": embedded, "failed": failed, "seconds": round(seconds, 3)}}
    summary = store.finish(run)
    summary.update({
        "store": str(out),
        "archive_studies": len(unique),
        "already_done": len(unique) - len(keep),
        "embedded": embedded,
        "failed": failed,
        "scan_problems": len(scan_errors) + len(dup_errors),
        "seconds": round(seconds, 3),
        "studies_per_s": round((embedded + failed) / seconds, 2) if seconds > 0 else None,
        "remaining": len(keep) - len(tasks),
    })
    return summary
