"""Header-only scan of a DICOM tree into a Parquet manifest, incremental across runs.

``scan_dicom_tree(root, manifest_path, *, workers=None, previous=None, salt=None,
progress=False) -> pyarrow.Table`` walks ``root`` at any depth (hidden entries and files whose
suffix says they are not DICOM, e.g. .txt/.json/.parquet, are skipped), reads every other file's
header with ``stop_before_pixels=True`` in a process pool, and writes one row per file
(``MANIFEST_SCHEMA``) to ``manifest_path`` atomically (unique temporary name, fsync, rename, fsync
of the folder). The table is sorted by path and returned.

Incremental: ``previous`` (a manifest path or Table; default: ``manifest_path`` when it exists)
supplies rows that are reused as they are when the file's size and mtime_ns are unchanged; new and
changed files are read; rows of deleted files are dropped. Nothing is reused when the previous
manifest has another schema version or was hashed with another salt (its ``salt_fingerprint``).
The table's metadata ``clinvla.manifest`` (JSON) holds the schema version, the salt
fingerprint and the run's stats: files, read, reused, dropped, errors, workers, seconds,
files_per_s and read_cpu_s (CPU seconds of the header reads, summed over the workers).

Columns: path (relative to root, '/' separated); study / series / SOP instance UIDs, SOP class
UID; modality; view_position (raw, stripped); view_code ("SCHEME:VALUE" of ViewCodeSequence[0]);
patient_orientation (values joined by '\\'); view, view_rule, view_label (views.classify);
instance_number; photometric_interpretation; transfer_syntax; rows; columns; bits_allocated;
file_size; mtime_ns; patient_id_hash and accession_number_hash (phi.hash_identifier with
``salt``; null without a salt or for a blank value); error (null, or why the file cannot be used:
not DICOM, unreadable header, DICOMDIR, modality other than CR/DX, colour or multi-frame, no
StudyInstanceUID, an impossible size or bit depth). No names, dates or free-text elements are read
into the manifest.

Speed: pydicom's header parse dominates. Measured by ``benchmarks/bench_archive.py --part scan``
on the 2-core build box while other sessions' jobs kept both cores busy (load average 5-8, CPU
pressure 60-70%): 100,000 DX files of 16 x 16 pixels in 1,000 folders cost 0.59 CPU ms per file
on one worker and 0.63 with two (the pool adds about 7%: hand-off, forkserver start, Arrow
batches). In wall-clock time two workers were not faster there (1,290 files/s serial, 970
parallel), most likely because that kernel schedules by session (sched_autogroup_enabled=1): a
scan's processes share one session's slice of a busy machine however many they are.
Instrumented workers never waited for work (0.1 s of gaps in 8 s) but got 40% of a core each. In
two 5,000-file runs at lighter moments two workers ran 1.7x and 1.9x the serial rate. At 0.6 CPU
ms per file a free core reads about 1,600 files/s (inferred). A rescan of the unchanged 100,000
files (walk, stat, reuse, write) took 4.8 s, and 4.8 s with 1% of them touched.

``specific_tags`` was measured slower than a plain ``stop_before_pixels`` read on such headers,
so it is not used. ``workers`` defaults to the CPUs this process may use. Files go to workers in
chunks of ``CHUNK_FILES`` so that process hand-off costs little; under ``PARALLEL_MIN_FILES`` new files
are read in-process, since a pool's start-up would cost more than it saves. Workers start from a
forkserver (preloaded with pydicom), so a script that calls this from its top level needs the
usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..data import io as _io
from ..data.dicom import _NOT_DICOM_SUFFIXES, MEDIA_DIRECTORY
from ..data.io import dicom_refusal, require_pydicom
from ..data.study import DatasetError
from .phi import hash_identifier, salt_fingerprint
from .views import classify, modality_allowed, rules

MANIFEST_VERSION = 1
METADATA_KEY = b"clinvla.manifest"
CHUNK_FILES = 128
# Fewer files than this are read in-process: starting a pool (about 0.7 s for the forkserver and
# its imports, the first time) costs more than reading ~1,500 small headers on one core.
PARALLEL_MIN_FILES = 2048
_MAX_TEXT = 64  # CS/UI elements are at most 64 characters; longer values are cut, never stored whole

MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("study_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("sop_class_uid", pa.string()),
    ("modality", pa.string()),
    ("view_position", pa.string()),
    ("view_code", pa.string()),
    ("patient_orientation", pa.string()),
    ("view", pa.string()),
    ("view_rule", pa.string()),
    ("view_label", pa.string()),
    ("instance_number", pa.int64()),
    ("photometric_interpretation", pa.string()),
    ("transfer_syntax", pa.string()),
    ("rows", pa.int32()),
    ("columns", pa.int32()),
    ("bits_allocated", pa.int32()),
    ("file_size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("patient_id_hash", pa.string()),
    ("accession_number_hash", pa.string()),
    ("error", pa.string()),
])


def _walk(root: Path, skip: set[str]) -> Iterator[tuple[str, int, int]]:
    """(relative posix path, size, mtime_ns) of every candidate file, in sorted order."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() in _NOT_DICOM_SUFFIXES:
                continue
            full = os.path.join(folder, name)
            if full in skip:
                continue
            try:
                info = os.stat(full)
            except OSError:  # a dangling link or a file deleted during the walk
                continue
            yield Path(os.path.relpath(full, root)).as_posix(), info.st_size, info.st_mtime_ns


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:_MAX_TEXT] or None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _view_code(ds: Any) -> str | None:
    try:
        items = ds.get("ViewCodeSequence")
        item = items[0] if items else None
    except Exception:
        return None
    if item is None:
        return None
    scheme, value = _text(item, "CodingSchemeDesignator") or "", _text(item, "CodeValue") or ""
    return f"{scheme}:{value}" if scheme or value else None


def _header_problem(ds: Any, row: dict) -> str | None:
    """Why this file can never give an image, judged from its header; None if it may."""
    if row["sop_class_uid"] == MEDIA_DIRECTORY:
        return "DICOMDIR (media directory), not an image"
    if not modality_allowed(ds):
        allowed = "/".join(sorted(rules().modalities))
        return f"Modality {row['modality'] or 'blank'} is not a chest radiograph ({allowed} only)"
    refusal = dicom_refusal(ds)
    if refusal:
        return refusal
    if not row["study_instance_uid"]:
        return "no StudyInstanceUID; the image cannot be grouped into a study"
    rows, columns = row["rows"] or 0, row["columns"] or 0
    if rows <= 0 or columns <= 0:
        return f"Rows x Columns is {rows} x {columns}; not an image"
    if rows * columns > _io.MAX_IMAGE_PIXELS:
        return (f"image claims {columns} x {rows} pixels, over the limit of {_io.MAX_IMAGE_PIXELS:,}; raise "
                "clinvla_engine.data.io.MAX_IMAGE_PIXELS if it is genuine")
    if row["bits_allocated"] not in (8, 16):
        return f"BitsAllocated {row['bits_allocated']} is not 8 or 16"
    return None


def scan_file(root: str, rel: str, size: int, mtime_ns: int, salt: bytes | None) -> dict:
    """One manifest row for root/rel (never raises for a bad file: the reason goes to "error")."""
    pydicom = require_pydicom()
    from pydicom.errors import InvalidDicomError

    row: dict[str, Any] = dict.fromkeys(MANIFEST_SCHEMA.names)
    row.update(path=rel, file_size=size, mtime_ns=mtime_ns)
    if size == 0:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd values are judged below, not warned about per file
            ds = pydicom.dcmread(os.path.join(root, rel), stop_before_pixels=True)
    except InvalidDicomError:
        row["error"] = "not a DICOM Part 10 file (no 'DICM' marker at byte 128)"
        return row
    except Exception as exc:  # truncated or corrupt header: pydicom raises many kinds
        row["error"] = f"unreadable DICOM header ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        return row
    return header_row(ds, path=rel, file_size=size, mtime_ns=mtime_ns, salt=salt)


def header_row(ds: Any, *, path: str, file_size: int | None, mtime_ns: int | None = None,
               salt: bytes | None = None, transfer_syntax: str | None = None) -> dict:
    """One manifest row from a header already read: a pydicom Dataset, or a mapping of DICOM
    keyword -> value such as Orthanc's ``/instances/{id}/tags?simplify`` (multiple values as one
    backslash-joined string, sequences as lists of such mappings). Both give the same row, so a
    PACS source applies exactly the view rules and refusals of a DICOM tree on disk.
    transfer_syntax: for a header without file meta information (a mapping)."""
    row: dict[str, Any] = dict.fromkeys(MANIFEST_SCHEMA.names)
    row.update(path=path, file_size=file_size, mtime_ns=mtime_ns)
    meta = getattr(ds, "file_meta", None)
    decision = classify(ds)
    row.update(
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else None),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        view_code=_view_code(ds),
        patient_orientation=_text(ds, "PatientOrientation"),
        view=decision.view,
        view_rule=decision.rule,
        view_label=decision.label,
        instance_number=_int(ds, "InstanceNumber"),
        photometric_interpretation=_text(ds, "PhotometricInterpretation"),
        transfer_syntax=_text(meta, "TransferSyntaxUID") if meta else transfer_syntax,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
    )
    if salt is not None:
        row["patient_id_hash"] = hash_identifier(_text(ds, "PatientID"), salt)
        row["accession_number_hash"] = hash_identifier(_text(ds, "AccessionNumber"), salt)
    for key in ("rows", "columns", "bits_allocated"):  # out of int32 range: a broken header, not a number
        if row[key] is not None and not -(2**31) <= row[key] < 2**31:
            row[key] = None
    row["error"] = _header_problem(ds, row)
    return row


def _scan_chunk(root: str, files: list[tuple[str, int, int]], salt: bytes | None) -> tuple[pa.RecordBatch, float]:
    """The rows of one chunk as one Arrow record batch, and the CPU seconds it took to make them.

    The batch is built in the worker, so a chunk crosses the process boundary as a few column
    buffers instead of one pickled 23-key dict per file, and the parent, which shares the cores
    with the workers, neither unpickles nor converts per-file dicts (nor holds them all at once:
    about 1.8 KB of Python objects per file). The CPU time goes into the stats because on a shared
    machine wall-clock files/s says more about the neighbours than about the scan."""
    cpu = time.process_time()
    batch = pa.RecordBatch.from_pylist([scan_file(root, rel, size, mtime, salt) for rel, size, mtime in files],
                                       schema=MANIFEST_SCHEMA)
    return batch, time.process_time() - cpu


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _read_previous(previous: Any, manifest_path: Path) -> pa.Table | None:
    if isinstance(previous, pa.Table):
        return previous
    source = Path(previous) if previous is not None else manifest_path
    if not source.is_file():
        if previous is not None:
            raise DatasetError(f"{source}: previous manifest not found; pass an existing manifest or leave "
                               "previous out")
        return None
    try:
        return pq.read_table(source)
    except Exception as exc:  # a damaged manifest costs a full rescan, not the run
        warnings.warn(f"{source}: previous manifest unreadable ({exc}); every file is read again", stacklevel=3)
        return None


def manifest_info(table: pa.Table) -> dict:
    """The JSON stored in a manifest's metadata (schema_version, salt_fingerprint, stats); {} if none."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _reusable(prev: pa.Table | None, fingerprint: str | None) -> dict[str, tuple[int, int, int]]:
    """path -> (size, mtime_ns, row index) of previous rows that may be reused."""
    if prev is None:
        return {}
    info = manifest_info(prev)
    if info.get("schema_version") != MANIFEST_VERSION or info.get("salt_fingerprint") != fingerprint:
        return {}
    if not set(MANIFEST_SCHEMA.names) <= set(prev.column_names):
        return {}
    paths = prev.column("path").to_pylist()
    sizes = prev.column("file_size").to_pylist()
    mtimes = prev.column("mtime_ns").to_pylist()
    return {p: (s, m, i) for i, (p, s, m) in enumerate(zip(paths, sizes, mtimes))}


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a unique temporary name, fsync it, rename it into place and
    fsync the folder: a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def scan_dicom_tree(
    root: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    workers: int | None = None,
    previous: str | os.PathLike | pa.Table | None = None,
    salt: bytes | None = None,
    progress: bool = False,
) -> pa.Table:
    """Scan root's DICOM headers into manifest_path (Parquet) and return the table (module doc)."""
    start = time.perf_counter()
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"{root_path}: no such folder; pass the root of the DICOM tree")
    manifest = Path(manifest_path).expanduser()
    fingerprint = salt_fingerprint(salt) if salt is not None else None
    prev_table = _read_previous(previous, manifest)
    reusable = _reusable(prev_table, fingerprint)

    files = list(_walk(root_path, {os.path.abspath(manifest)}))
    keep: list[int] = []
    todo: list[tuple[str, int, int]] = []
    for rel, size, mtime in files:
        known = reusable.get(rel)
        if known is not None and known[0] == size and known[1] == mtime:
            keep.append(known[2])
        else:
            todo.append((rel, size, mtime))

    batches: list[pa.RecordBatch] = []
    read_cpu_s = 0.0
    chunks = [todo[i:i + CHUNK_FILES] for i in range(0, len(todo), CHUNK_FILES)]
    workers = _default_workers() if workers is None else max(1, int(workers))
    bar = _progress_bar(progress, len(todo))
    serial = workers == 1 or len(todo) < PARALLEL_MIN_FILES
    if serial:
        for chunk in chunks:
            batch, cpu = _scan_chunk(str(root_path), chunk, salt)
            batches.append(batch)
            read_cpu_s += cpu
            bar.update(len(chunk))
    else:
        # forkserver: workers start from a clean process, not a fork of a caller that may hold
        # threads (pyarrow, torch) whose locks a fork would copy in a locked state.
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        if os.name == "posix":
            # the server imports these once and each worker forks from it ready (about 0.05 s per
            # pool after the first instead of about 1 s of imports per worker)
            context.set_forkserver_preload([__name__, "pydicom", "pydicom.filereader", "pydicom.dataset"])
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
            for batch, cpu in pool.map(_scan_chunk, [str(root_path)] * len(chunks), chunks, [salt] * len(chunks)):
                batches.append(batch)
                read_cpu_s += cpu
                bar.update(batch.num_rows)
    bar.close()

    fresh = pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA)
    if keep:
        fresh = pa.concat_tables([prev_table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).take(keep), fresh])
    table = fresh.sort_by("path") if fresh.num_rows else fresh
    seconds = time.perf_counter() - start
    stats = {
        "files": len(files),
        "read": len(todo),
        "reused": len(keep),
        "dropped": len(set(reusable) - {rel for rel, _, _ in files}),
        "errors": table.num_rows - table.column("error").null_count,
        "workers": 1 if serial else min(workers, len(chunks)),
        "seconds": round(seconds, 3),
        "files_per_s": round(len(todo) / seconds, 1) if todo and seconds > 0 else None,
        "read_cpu_s": round(read_cpu_s, 3),  # CPU time of the header reads, summed over workers
    }
    info = {"schema_version": MANIFEST_VERSION, "salt_fingerprint": fingerprint, "stats": stats}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})
    write_table_atomic(table, manifest)
    return table


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc="DICOM headers", unit="file")
