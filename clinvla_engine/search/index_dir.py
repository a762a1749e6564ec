"""The index directory: what `clinvla index build` writes from an embedding store, and its checks.

Layout::

    INDEX_DIR/index.json        format, engine + store fingerprints, counts, dims, SHA-256 of every file
    INDEX_DIR/index.clvx        the `Index` (exact inner-product top-k), id = row id
    INDEX_DIR/metadata.parquet  one row per study, row_id 0..N-1 (METADATA_COLUMNS)
    INDEX_DIR/local.npy         (N, R, E) float16 region features, only when the store has them
    INDEX_DIR/local_mask.npy    (N, R) bool, False for the cells of an absent view

Every file is written under a unique temporary name and renamed into place; index.json is
written last and is the commit point: it names the checksum of each file, so a file that was
changed, truncated or left behind by an interrupted update is refused at open, by name.
Row ids are dense and never reused: the metadata row, the `Index` id and the row of local.npy of
a study are the same number, so a search result needs no lookup table.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..pipeline.store import atomic_write_json, atomic_write_table, shard_paths
from ..files import TMP_MARK, sha256_file

INDEX_FORMAT = "clinvla-index-dir"
INDEX_VERSION = 1
FILES = ("index.clvx", "metadata.parquet", "local.npy", "local_mask.npy")
# Store columns copied into the metadata where the store has them; study_date is not written by
# today's `clinvla embed` but is honoured (and enables the date filter) when a store carries one.
METADATA_COLUMNS = ("study_key", "source_format", "frontal_path", "lateral_path", "views", "view_codes", "split",
                    "report", "labels", "study_date")


class IndexDirError(RuntimeError):
    """An index directory that cannot be built, updated or opened; the message names the file and the fix."""


# ---- small helpers ----------------------------------------------------------------------------
def store_fingerprint(store: str | os.PathLike) -> str:
    """SHA-256 over the committed shards' names, sizes and row counts: changes when studies are added.

    Not a content hash (that would read the whole store): shards are written once and renamed
    into place, so a shard's name and size identify its contents.
    """
    h = hashlib.sha256()
    for p in shard_paths(store):
        h.update(f"{p.name}:{p.stat().st_size}:{pq.ParquetFile(p).metadata.num_rows}\n".encode())
    return h.hexdigest()


def _read_store_info(store: Path) -> dict:
    meta = store / "store.json"
    if not shard_paths(store):
        raise IndexDirError(f"{store}: no committed shards (STORE/shards/part-*.parquet); run `clinvla embed ARCHIVE "
                            f"--engine ENGINE --out {store}` first")
    try:
        return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    except (OSError, ValueError) as exc:
        raise IndexDirError(f"{meta}: unreadable ({exc}); re-run `clinvla embed ... --resume` to rewrite it") from None


def _shard_fingerprint(path: Path) -> str | None:
    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    return meta.get(b"clinvla.engine_fingerprint", b"").decode() or None


def _fixed_to_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A (nested) fixed_size_list column -> a NumPy array of `shape`, without per-row Python objects."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    while pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(shape)


def _atomic_npy(path: Path, shape: tuple[int, ...], dtype) -> tuple[Path, np.memmap]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=".npy", dir=path.parent)
    os.close(fd)
    return Path(tmp), np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)


def _finish_npy(tmp: Path, mm: np.memmap, path: Path) -> None:
    mm.flush()
    del mm
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _metadata_table(table: pa.Table, first_row: int) -> pa.Table:
    n = table.num_rows
    cols: dict[str, Any] = {"row_id": pa.array(np.arange(first_row, first_row + n, dtype=np.int64))}
    for name in METADATA_COLUMNS:
        if name in table.column_names:
            cols[name] = table.column(name)
    lateral = table.column("lateral_path") if "lateral_path" in table.column_names else pa.nulls(n, pa.string())
    cols["has_lateral"] = pc.is_valid(lateral)
    return pa.table(cols)


def _store_columns(path: Path, local: bool) -> list[str]:
    names = pq.ParquetFile(path).schema_arrow.names
    want = [c for c in METADATA_COLUMNS if c in names] + ["embedding"]
    if local:
        want += ["local_features", "local_mask"]
    return want


def _clean_tmp(out: Path) -> None:
    for entry in os.scandir(out):  # leftovers of a killed build or update
        if TMP_MARK in entry.name and entry.is_file():
            os.unlink(entry.path)


# ---- building ---------------------------------------------------------------------------------
def build_index(store: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float16",
                device: str = "cpu", force: bool = False) -> dict:
    """Builds INDEX_DIR `out` from the committed shards of `store`; returns the index.json summary.

    dtype: the index's storage ("float16", half the memory, or "float32"); device: where the
    vectors are added ("cuda" builds through a CUDA index; the file is the same).
    A folder that already holds an index is refused unless force=True (use update_index to add).
    """
    return _write(Path(store).expanduser(), Path(out).expanduser(), dtype=dtype, device=device, update=False,
                  force=force)


def update_index(index_dir: str | os.PathLike, store: str | os.PathLike) -> dict:
    """Adds to INDEX_DIR the studies of `store` that it does not hold yet; returns index.json plus
    "added" and "missing_from_store".

    Studies the index holds but the store no longer has (a deleted shard) are kept and counted as
    missing_from_store: stores are append-only, so this is a user's deliberate deletion, and the
    index cannot tell it from a shard that is only temporarily unreadable. Rebuild (`clinvla index
    build ... --force`) to drop them. A store of another engine is refused.
    """
    return _write(Path(store).expanduser(), Path(index_dir).expanduser(), dtype=None, device="cpu", update=True,
                  force=False)


def _write(store: Path, out: Path, *, dtype: str | None, device: str, update: bool, force: bool) -> dict:
    from ..index import Index

    t0 = time.perf_counter()
    info = _read_store_info(store)
    shards = shard_paths(store)
    fingerprints = {fp for fp in (_shard_fingerprint(p) for p in shards) if fp}
    fingerprints |= {info["engine_fingerprint"]} if info.get("engine_fingerprint") else set()
    if len(fingerprints) > 1:
        raise IndexDirError(f"{store} mixes shards of {len(fingerprints)} engines; an index holds one engine's "
                            "embeddings: re-embed into a new store")
    engine_fp = next(iter(fingerprints), None)
    if engine_fp is None:  # without it a search could not refuse another engine's queries
        raise IndexDirError(f"{store} records no engine fingerprint (neither its shards nor store.json): "
                            "re-embed it with `clinvla embed`")
    first = pq.ParquetFile(shards[0]).schema_arrow
    dim = first.field("embedding").type.list_size
    has_local = "local_features" in first.names
    regions = first.field("local_features").type.list_size if has_local else 0

    if update:
        manifest = read_manifest(out)  # checks the folder is an index
        if manifest["engine_fingerprint"] != engine_fp:
            raise IndexDirError(
                f"{store} was embedded with another engine (fingerprint {str(engine_fp)[:12]}...) than the index "
                f"{out} (fingerprint {manifest['engine_fingerprint'][:12]}...); an index holds one engine's "
                f"embeddings: build a new index with `clinvla index build {store} -o NEW_DIR`")
        if bool(manifest["local"]) != has_local or (has_local and manifest["local"]["regions"] != regions):
            raise IndexDirError(f"{store} stores local features {info.get('local_features')!r} but the index {out} "
                                f"was built from a store with {manifest['local'] or 'none'}; rebuild the index")
        if manifest["dim"] != dim:
            raise IndexDirError(f"{store} holds {dim}-d embeddings, the index {out} {manifest['dim']}-d; rebuild it")
        check_files(out, manifest)
        index = Index.load(out / "index.clvx")
        old_meta = pq.read_table(out / "metadata.parquet")
        dtype = index.dtype
    else:
        if out.exists() and not out.is_dir():
            raise IndexDirError(f"{out} is a file; -o must name a folder (new or empty)")
        if (out / "index.json").exists() and not force:
            raise IndexDirError(f"{out} already holds an index; add new studies with `clinvla index update {out} "
                                f"{store}`, or rebuild with --force")
        out.mkdir(parents=True, exist_ok=True)
        index = Index(dim, dtype, device)
        old_meta = None
    _clean_tmp(out)

    old_n = 0 if old_meta is None else old_meta.num_rows
    done = pa.array([], pa.string()) if old_meta is None else old_meta.column("study_key").combine_chunks()
    # which rows of which shard are new: read the key columns first (cheap), then only those rows
    plan: list[tuple[Path, np.ndarray]] = []
    store_keys = []
    for p in shards:
        keys = pq.read_table(p, columns=["study_key"]).column(0).combine_chunks()
        store_keys.append(keys)
        new = ~pc.is_in(keys, value_set=done).to_numpy(zero_copy_only=False) if len(done) else np.ones(len(keys), bool)
        if new.any():
            plan.append((p, np.flatnonzero(new)))
    all_keys = pa.concat_arrays(store_keys) if store_keys else pa.array([], pa.string())
    if pc.count_distinct(all_keys).as_py() != len(all_keys):
        raise IndexDirError(f"{store} holds a study key more than once; a store written by `clinvla embed` never "
                            "does: re-embed into a new store")
    missing = 0 if old_meta is None else int((~pc.is_in(done, value_set=all_keys).to_numpy(zero_copy_only=False)).sum())
    added = sum(len(rows) for _, rows in plan)
    total = old_n + added

    local_tmp = mask_tmp = None
    if has_local:
        local_tmp, local_mm = _atomic_npy(out / "local.npy", (total, regions, dim), np.float16)
        mask_tmp, mask_mm = _atomic_npy(out / "local_mask.npy", (total, regions), np.bool_)
        if old_n:  # an update copies the old rows once; the new file replaces the old at the end
            old_local = np.load(out / "local.npy", mmap_mode="r")
            old_mask = np.load(out / "local_mask.npy", mmap_mode="r")
            for s in range(0, old_n, 65536):
                e = min(old_n, s + 65536)
                local_mm[s:e] = old_local[s:e]
            mask_mm[:old_n] = old_mask
            del old_local, old_mask
    metas = [old_meta] if old_meta is not None else []
    row = old_n
    try:
        for path, rows in plan:
            table = pq.read_table(path, columns=_store_columns(path, has_local))
            if len(rows) != table.num_rows:
                table = table.take(pa.array(rows))
            n = table.num_rows
            emb = _fixed_to_numpy(table.column("embedding"), (n, dim), np.float16)
            index.add(emb if dtype == "float16" else emb.astype(np.float32), ids=np.arange(row, row + n))
            if has_local:
                local_mm[row:row + n] = _fixed_to_numpy(table.column("local_features"), (n, regions, dim), np.float16)
                mask_mm[row:row + n] = _fixed_to_numpy(table.column("local_mask"), (n, regions), np.bool_)
            metas.append(_metadata_table(table.drop_columns([c for c in ("embedding", "local_features", "local_mask")
                                                             if c in table.column_names]), row))
            row += n
        meta = pa.concat_tables(metas, promote_options="default") if metas else None
        if meta is None:
            raise IndexDirError(f"{store} holds no studies")
        # index.json is the commit point: every other file is in place (checksummed) before it
        index.save(out / "index.clvx")
        atomic_write_table(meta, out / "metadata.parquet", compression="zstd", write_page_checksum=True)
        if has_local:
            _finish_npy(local_tmp, local_mm, out / "local.npy")
            _finish_npy(mask_tmp, mask_mm, out / "local_mask.npy")
            local_tmp = mask_tmp = None
    finally:
        for tmp in (local_tmp, mask_tmp):
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    manifest = write_manifest(out, meta, engine_fp=engine_fp, dim=dim, dtype=dtype, regions=regions, info=info,
                              store=store)
    return {**manifest, "added": added, "missing_from_store": missing, "seconds": round(time.perf_counter() - t0, 3)}


def write_manifest(out: Path, meta: pa.Table, *, engine_fp: str | None, dim: int, dtype: str, regions: int,
                   info: dict, store: Path | None) -> dict:
    """Checksums the files in `out` and writes index.json (the commit point) atomically.

    Public so that a tool writing the other files itself (benchmarks/bench_search.py, a synthetic
    index of a million studies) produces exactly the manifest `build_index` does.
    """
    has_local = regions > 0
    total = meta.num_rows
    names = ["index.clvx", "metadata.parquet"] + (["local.npy", "local_mask.npy"] if has_local else [])
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "engine_fingerprint": engine_fp,
        "engine": info.get("engine"),
        "store": str(store.resolve()) if store else None,
        "store_fingerprint": store_fingerprint(store) if store else None,
        "archive_root": info.get("source"),
        "dim": dim,
        "dtype": dtype,
        "studies": total,
        "with_lateral": int(pc.sum(meta.column("has_lateral")).as_py() or 0),
        "has_reports": "report" in meta.column_names and meta.column("report").null_count < total,
        "has_labels": "labels" in meta.column_names and meta.column("labels").null_count < total,
        "has_dates": "study_date" in meta.column_names,
        "local": {"mode": info.get("local_features"), "regions": regions, "pool_grid": info.get("pool_grid")}
        if has_local else None,
        "files": {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in names},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for stale in set(FILES) - set(names):  # a rebuild from a store without local features
        (out / stale).unlink(missing_ok=True)
    atomic_write_json(manifest, out / "index.json")
    return manifest


# ---- opening ----------------------------------------------------------------------------------
def read_manifest(index_dir: str | os.PathLike) -> dict:
    """index.json of INDEX_DIR, checked for format and version (not the files: see check_files)."""
    path = Path(index_dir) / "index.json"
    if not path.is_file():
        raise IndexDirError(f"{path}: no such file; {index_dir} is not an index folder. Build one with "
                            f"`clinvla index build STORE -o {index_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexDirError(f"{path}: unreadable or not JSON ({exc}); rebuild the index with "
                            "`clinvla index build STORE -o INDEX_DIR --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexDirError(f"{path}: not a ClinVLA index manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                            "rebuild the index with `clinvla index build STORE -o INDEX_DIR --force`")
    if manifest.get("version") != INDEX_VERSION:
        raise IndexDirError(f"{path}: index version {manifest.get('version')} is not {INDEX_VERSION}; rebuild it "
                            "with this version's `clinvla index build`")
    return manifest


def check_files(index_dir: str | os.PathLike, manifest: dict) -> None:
    """Refuses, naming the file, any file of the index that is missing or differs from index.json."""
    for name, entry in manifest["files"].items():
        path = Path(index_dir) / name
        fix = "rebuild the index with `clinvla index build STORE -o INDEX_DIR --force`"
        if not path.is_file():
            raise IndexDirError(f"{path}: missing (index.json lists it); {fix}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexDirError(f"{path}: {size} bytes, index.json says {entry['bytes']}: truncated, replaced or "
                                f"left by an interrupted update; {fix}")
        if sha256_file(path) != entry["sha256"]:
            raise IndexDirError(f"{path}: checksum differs from index.json: the file is corrupt or was changed; {fix}")
