"""The embedding store that ``clinvla embed`` writes: Parquet shards, an error table, a summary.

Layout::

    STORE/store.json                  schema version, engine fingerprint, options, counts
    STORE/shards/part-NNNNN.parquet   one row per embedded study (SHARD_FIELDS below)
    STORE/errors/part-NNNNN.parquet   the studies of the same commit that failed (input, stage, reason)
    STORE/errors/scan.parquet         problems met while reading the archive (rewritten each run)
    STORE/errors.parquet              all of the above in one table, rebuilt at the end of a run

Exactly once: a commit writes its error part, then its shard, each to a unique temporary name in
the same folder, fsynced, then renamed into place (and the folder fsynced), so a killed run leaves
either a whole file or a ``.tmp-`` file that the next run deletes. The committed files are the
truth: ``--resume`` reads only their ``study_key`` columns (``done_keys``) and skips those studies,
whether they were embedded or failed. store.json is a summary, rewritten atomically; nothing is
decided from its counts.

No PHI: the rows hold the study key of the source (MIMIC/CheXpert study id, DICOM
StudyInstanceUID), paths relative to the archive root, and patient ids / accession numbers only as
salted hashes (``clinvla_engine.pipeline.phi``; the salt stays in the user's file).
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..files import fsync_dir

SCHEMA_VERSION = 1
STORE_FORMAT = "clinvla-embedding-store"
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
TMP_MARK = ".tmp-"
LOCK_NAME = ".writer.lock"
LOCAL_MODES = ("none", "pooled", "full")
POOL_GRID = 2  # pooled local features: each view's patch grid averaged down to POOL_GRID x POOL_GRID

ERROR_SCHEMA = pa.schema([
    ("input", pa.string()),       # the file (or study) that failed
    ("stage", pa.string()),       # scan | decode | embed
    ("reason", pa.string()),      # what is wrong and, where known, the fix
    ("study_key", pa.string()),   # null for archive-level problems (stage scan)
])


class StoreError(RuntimeError):
    """A store that cannot be written or resumed; the message names the folder and the fix."""


def engine_fingerprint(manifest: dict) -> str:
    """SHA-256 over what decides an engine's outputs: backend, precision, dims and every file's hash.

    Two bundles with the same weights but another backend get different fingerprints on purpose:
    their embeddings differ in the last bits, and a store must not mix them silently.
    """
    import hashlib

    core = {
        "backend": manifest.get("backend"),
        "precision": manifest.get("precision"),
        "embed_dim": manifest.get("config", {}).get("embed_dim"),
        "files": {name: entry.get("sha256") for name, entry in sorted(manifest.get("files", {}).items())},
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def shard_schema(embed_dim: int, local_regions: int = 0) -> pa.Schema:
    """The Arrow schema of a shard; local_regions = 0 when no local features are stored."""
    fields = [
        pa.field("study_key", pa.string(), nullable=False),
        pa.field("source_format", pa.string()),
        pa.field("frontal_path", pa.string()),         # relative to the archive root
        pa.field("lateral_path", pa.string()),         # null: no lateral view used
        pa.field("views", pa.list_(pa.string())),      # ["frontal"] or ["frontal", "lateral"]
        pa.field("view_codes", pa.list_(pa.string())),  # ViewPosition (PA, AP, LL, ...) where known
        pa.field("embedding", pa.list_(pa.float16(), embed_dim)),  # L2-normalised, (E,)
    ]
    if local_regions:
        fields += [
            pa.field("local_features", pa.list_(pa.list_(pa.float16(), embed_dim), local_regions)),  # (R, E)
            pa.field("local_mask", pa.list_(pa.bool_(), local_regions)),  # (R,) False: absent view
        ]
    fields += [
        pa.field("engine_fingerprint", pa.string()),
        pa.field("subject_hash", pa.string()),    # salted hash of the patient id; null without --salt-file
        pa.field("accession_hash", pa.string()),  # salted hash of the accession number where the source has one
        pa.field("split", pa.string()),
        pa.field("report", pa.string()),
        pa.field("labels", pa.map_(pa.string(), pa.float32())),  # CheXpert name -> 1 / 0 / -1 / NaN
    ]
    return pa.schema(fields)


def atomic_write_table(table: pa.Table, path: Path, **options: Any) -> None:
    """Writes a Parquet file under a unique temporary name, fsyncs it, renames it into place."""
    tmp = path.with_name(f"{TMP_MARK}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, **options)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f"{TMP_MARK}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _parts(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    out = []
    for entry in os.scandir(folder):
        m = SHARD_RE.match(entry.name)
        if m:
            out.append((int(m.group(1)), Path(entry.path)))
    return sorted(out)


def shard_paths(store: str | os.PathLike) -> list[Path]:
    return [p for _, p in _parts(Path(store) / "shards")]


def _read_keys(path: Path, want_fingerprint: str | None) -> tuple[pa.Array, str | None]:
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    fp = meta.get(b"clinvla.engine_fingerprint", b"").decode() or None
    if want_fingerprint is not None and fp is not None and fp != want_fingerprint:
        return pa.array([], pa.string()), fp
    return pf.read(columns=["study_key"]).column(0).combine_chunks(), fp


def done_keys(store: str | os.PathLike, *, fingerprint: str | None = None, threads: int = 8) -> pa.Array:
    """The study keys already committed (embedded or failed), as one Arrow string array.

    Reads only the ``study_key`` column of each committed shard and error part (a footer and one
    column chunk per file), in threads; memory is that column, about 30 bytes a study. Use
    ``pyarrow.compute.is_in(keys, value_set=done)`` to filter, never a Python set of millions.
    With fingerprint given, a shard written by another engine raises StoreError.
    """
    root = Path(store)
    files = [p for _, p in _parts(root / "shards")] + [p for _, p in _parts(root / "errors")]
    if not files:
        return pa.array([], pa.string())
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda p: _read_keys(p, fingerprint), files))
    for path, (_, fp) in zip(files, results):
        if fingerprint is not None and fp is not None and fp != fingerprint:
            raise StoreError(
                f"{path} was written by another engine (fingerprint {fp[:12]}...) than the one given "
                f"({fingerprint[:12]}...): a store holds one engine's embeddings. Resume with the engine "
                "that started this store, or write to a new --out folder")
    arrays = [a for a, _ in results if len(a)]
    if not arrays:
        return pa.array([], pa.string())
    return pa.concat_arrays(arrays)


def read_store(store: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed shards as one table (plain pyarrow; DuckDB/pandas read the same files)."""
    paths = shard_paths(store)
    if not paths:
        raise StoreError(f"{store}: no committed shards (STORE/shards/part-*.parquet); run clinvla embed first")
    return pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in paths])


def read_errors(store: str | os.PathLike) -> pa.Table:
    """Every error row of the store (the parts, so it is complete even after a killed run)."""
    root = Path(store)
    files = [p for _, p in _parts(root / "errors")]
    if (root / "errors" / "scan.parquet").is_file():
        files.append(root / "errors" / "scan.parquet")
    if not files:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p).cast(ERROR_SCHEMA) for p in files])


class StoreWriter:
    """Opens (or resumes) a store and commits shards; one writer per store at a time.

    ``commit(rows, errors)`` is the unit of exactly-once: the error part first, then the shard,
    both under the same number. A study is in exactly one committed file once commit returns.
    """

    def __init__(self, root: str | os.PathLike, *, fingerprint: str, embed_dim: int, local_mode: str = "none",
                 local_regions: int = 0, resume: bool = False, info: dict | None = None):
        if local_mode not in LOCAL_MODES:
            raise ValueError(f"local_features must be one of {', '.join(LOCAL_MODES)}, got {local_mode!r}")
        self.root = Path(root).expanduser()
        self.fingerprint = fingerprint
        self.embed_dim = embed_dim
        self.local_mode = local_mode
        self.local_regions = local_regions if local_mode != "none" else 0
        self.schema = shard_schema(embed_dim, self.local_regions).with_metadata({
            "clinvla.schema_version": str(SCHEMA_VERSION),
            "clinvla.engine_fingerprint": fingerprint,
            "clinvla.local_features": local_mode,
        })
        self.info = dict(info or {})
        try:
            self._open(resume)
        except BaseException:
            self.close()  # a refused open must not keep the store locked
            raise

    # ---- opening ---------------------------------------------------------------------------
    def _open(self, resume: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file; --out must be a folder (new, or a store to --resume)")
        self._lock(root)
        meta_path = root / "store.json"
        existing = meta_path.is_file() or bool(_parts(root / "shards")) or bool(_parts(root / "errors"))
        if existing and not resume:
            raise StoreError(f"{root} already holds an embedding store; pass --resume to continue it, "
                             "or choose a new --out folder")
        # a first run killed before its first commit leaves only these: still an (empty) store
        ours = {"manifest.parquet", "shards", "errors", LOCK_NAME}
        if root.exists() and not existing and any(p.name not in ours and not p.name.startswith(TMP_MARK)
                                                  for p in root.iterdir()):
            raise StoreError(f"{root} is not empty and is not an embedding store; choose an empty or new --out folder")
        for sub in ("shards", "errors"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for folder in (root, root / "shards", root / "errors"):
            for entry in os.scandir(folder):  # leftovers of a killed run (shards, store.json, errors.parquet)
                if entry.name.startswith(TMP_MARK) and entry.is_file():
                    os.unlink(entry.path)
        self.previous: dict = {}
        if meta_path.is_file():
            try:
                self.previous = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"{meta_path}: unreadable ({exc}); it is a summary only: delete it and "
                                 "--resume again (the shards are the truth)") from None
            old = self.previous.get("engine_fingerprint")
            if old and old != self.fingerprint:
                raise StoreError(
                    f"{root} was embedded with another engine (fingerprint {old[:12]}..., "
                    f"{self.previous.get('engine', '?')}) than {self.info.get('engine', 'the one given')} "
                    f"(fingerprint {self.fingerprint[:12]}...); refusing to mix two engines' embeddings. "
                    "Resume with the original engine, or write to a new --out folder")
            if self.previous.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise StoreError(f"{root}: store schema version {self.previous.get('schema_version')} is not "
                                 f"{SCHEMA_VERSION}; re-embed into a new --out folder")
            old_mode = self.previous.get("local_features")
            if old_mode and old_mode != self.local_mode:
                raise StoreError(f"{root} stores local features {old_mode!r}, this run asks for "
                                 f"{self.local_mode!r}; resume with --local-features {old_mode}")
        numbers = [n for n, _ in _parts(root / "shards")] + [n for n, _ in _parts(root / "errors")]
        self.next_part = max(numbers, default=-1) + 1
        self.write_summary(running=True)

    def done(self) -> pa.Array:
        return done_keys(self.root, fingerprint=self.fingerprint)

    # ---- committing ------------------------------------------------------------------------
    def commit(self, rows: pa.Table | list[dict] | None, errors: list[dict]) -> None:
        """rows: a table of shard_schema columns (embed.build_rows) or a list of row dicts."""
        if isinstance(rows, list):
            rows = pa.Table.from_pylist(rows, schema=self.schema) if rows else None
        if (rows is None or rows.num_rows == 0) and not errors:
            return
        n = self.next_part
        self.next_part += 1
        name = f"part-{n:05d}.parquet"
        if errors:
            table = pa.Table.from_pylist(errors, schema=ERROR_SCHEMA).replace_schema_metadata(
                {"clinvla.engine_fingerprint": self.fingerprint})
            atomic_write_table(table, self.root / "errors" / name)
        if rows is not None and rows.num_rows:
            if rows.schema.remove_metadata() != self.schema.remove_metadata():
                raise StoreError(f"rows for {self.root} do not match the store's schema:\n{rows.schema}\n"
                                 f"expected:\n{self.schema}")
            table = rows.replace_schema_metadata(self.schema.metadata)
            # page checksums: a shard corrupted on disk later fails to read instead of giving wrong numbers
            atomic_write_table(table, self.root / "shards" / name, compression="zstd",
                               write_page_checksum=True, use_dictionary=["engine_fingerprint", "source_format",
                                                                         "split"])

    def write_scan_errors(self, errors: list[dict]) -> None:
        """Archive-level problems of this run; replaces the previous run's (they are re-found each run)."""
        path = self.root / "errors" / "scan.parquet"
        if errors:
            atomic_write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), path)
        elif path.exists():
            path.unlink()

    def counts(self) -> dict:
        studies = sum(pq.ParquetFile(p).metadata.num_rows for _, p in _parts(self.root / "shards"))
        failed = sum(pq.ParquetFile(p).metadata.num_rows for _, p in _parts(self.root / "errors"))
        return {"studies": studies, "failed_studies": failed, "shards": len(_parts(self.root / "shards"))}

    def write_summary(self, *, running: bool, extra: dict | None = None) -> dict:
        data = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "engine_fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
            "local_features": self.local_mode,
            "local_regions": self.local_regions,
            "pool_grid": POOL_GRID if self.local_mode == "pooled" else None,
            "complete": not running,
            **{k: v for k, v in self.info.items()},
            **self.counts(),
        }
        if extra:
            data.update(extra)
        atomic_write_json(data, self.root / "store.json")
        return data

    def finish(self, extra: dict | None = None) -> dict:
        """Rebuilds STORE/errors.parquet from the parts and marks the summary complete."""
        atomic_write_table(read_errors(self.root), self.root / "errors.parquet")
        summary = self.write_summary(running=False, extra=extra)
        self.close()
        return summary

    def _lock(self, root: Path) -> None:
        """One writer per store: two runs would number their shards alike and overwrite each other's.
        The lock is the kernel's (flock), so a killed writer releases it with its process."""
        import fcntl

        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(root / LOCK_NAME, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise StoreError(f"{root} is being written by another `clinvla embed` (it holds {root / LOCK_NAME}); "
                             "wait for it to finish, then --resume") from None

    def close(self) -> None:
        """Releases the store for another writer (finish() does it; so does the process's end)."""
        lock = getattr(self, "_lock_file", None)
        if lock is not None:
            lock.close()  # closing the file releases the flock
            self._lock_file = None


def filter_new(keys: Sequence[str], done: pa.Array) -> np.ndarray:
    """Indices of `keys` not in `done`, vectorised (a million keys in well under a second)."""
    if len(done) == 0:
        return np.arange(len(keys))
    mask = pc.is_in(pa.array(keys, pa.string()), value_set=done)
    return np.flatnonzero(~mask.to_numpy(zero_copy_only=False))


def error_row(input: Any, stage: str, reason: str, study_key: str | None = None) -> dict:
    return {"input": str(input), "stage": stage, "reason": str(reason), "study_key": study_key}


def synthetic_store(root: str | os.PathLike, studies: int, *, embed_dim: int = 128, shard_rows: int = 8192,
                    fingerprint: str = "0" * 64, seed: int = 0) -> Path:
    """A store of `studies` random rows (benchmarks and tests of the resume read at scale).

    Written with the real StoreWriter, so it has exactly the layout and metadata of a real store.
    """
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, fingerprint=fingerprint, embed_dim=embed_dim, info={"engine": "synthetic"})
    list_type = pa.list_(pa.float16(), embed_dim)
    for start in range(0, studies, shard_rows):
        n = min(shard_rows, studies - start)
        emb = rng.standard_normal((n, embed_dim), dtype=np.float32).astype(np.float16)
        keys = pa.array([f"s{start + i:09d}" for i in range(n)], pa.string())
        cols = {
            "study_key": keys,
            "source_format": pa.array(["synthetic"] * n),
            "frontal_path": pa.array([f"files/s{start + i:09d}/frontal.jpg" for i in range(n)]),
            "lateral_path": pa.nulls(n, pa.string()),
            "views": pa.array([["frontal"]] * n, pa.list_(pa.string())),
            "view_codes": pa.array([["PA"]] * n, pa.list_(pa.string())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), type=list_type),
            "engine_fingerprint": pa.array([fingerprint] * n),
            "subject_hash": pa.nulls(n, pa.string()),
            "accession_hash": pa.nulls(n, pa.string()),
            "split": pa.nulls(n, pa.string()),
            "report": pa.nulls(n, pa.string()),
            "labels": pa.nulls(n, pa.map_(pa.string(), pa.float32())),
        }
        table = pa.table(cols, schema=writer.schema)
        name = f"part-{writer.next_part:05d}.parquet"
        writer.next_part += 1
        atomic_write_table(table, writer.root / "shards" / name, compression="zstd", write_page_checksum=True)
    writer.finish()
    return writer.root

