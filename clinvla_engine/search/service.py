"""`SearchService`: one engine and one index answering text, image and "more like this" queries.

    service = SearchService.open("index/", "engine/")
    service.search_text("small left pleural effusion", k=10, rerank=100)   # two-stage
    service.similar("s50414267", k=10, filters={"has_lateral": True})
    service.reports_for_image("cxr.dcm", k=5)

Two stages: the exact global top-N over every (allowed) study, then, with rerank=N, local
word-to-region re-ranking of those N with the region features stored at embedding time
(clinvla_engine.rerank). Filters become the index's allow-list, so a filtered search is as exact as
an unfiltered one and returns k results wherever k studies pass the filter.

Thread safety: the engine is thread-safe (see runtime/engine.py), the index is read-only here (its
search releases the GIL and shares nothing between calls), metadata and local features are
read-only arrays; the only mutable state (filter masks, the vector copy for `similar`, counters) is
guarded by a lock. One service serves every request; nothing is reloaded per request.
"""
from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .index_dir import IndexDirError, check_files, read_manifest

MAX_K = 1000          # results one query may ask for (the server's limit too)
MAX_RERANK = 1000     # candidates one query may re-rank (200 take ~10 ms on a CPU with pooled features)
SNIPPET_CHARS = 240   # report text in a result; study() gives the whole report
MAX_IMAGE_BYTES = 64 << 20
LOCAL_TAU = (4.0, 5.0, 10.0)  # rerank's defaults; engine manifests do not record the trained taus yet


class SearchError(Exception):
    """A query or an index that cannot be served; the message names the input and the fix."""


class NotFound(SearchError):
    """An unknown study key, or a study whose source image is not reachable (HTTP 404)."""


class BadQuery(SearchError):
    """An empty text, k out of range, a bad image, a filter the index cannot apply (HTTP 400/422)."""


class IndexMismatch(SearchError):
    """The index and the engine (or the index's own files) do not belong together; raised at open."""


@dataclass(frozen=True)
class Filters:
    """What a query may return. All given conditions must hold."""

    has_lateral: bool | None = None
    label: tuple[str, ...] = ()          # CheXpert names whose value must be 1 (positive)
    split: str | None = None
    date_from: str | None = None         # ISO dates, inclusive; only where the store has study dates
    date_to: str | None = None

    @classmethod
    def parse(cls, filters: "Filters | dict | None") -> "Filters":
        if filters is None or isinstance(filters, Filters):
            return filters or cls()
        if not isinstance(filters, dict):
            raise BadQuery(f"filters must be a dict (has_lateral, label, split, date_from, date_to), got "
                           f"{type(filters).__name__}")
        unknown = set(filters) - {"has_lateral", "label", "split", "date_from", "date_to"}
        if unknown:
            raise BadQuery(f"unknown filter(s) {sorted(unknown)}; known: has_lateral, label, split, date_from, date_to")
        label = filters.get("label") or ()
        label = (label,) if isinstance(label, str) else label
        if not isinstance(label, (list, tuple)) or not all(isinstance(x, str) and x for x in label):
            raise BadQuery(f"filter label must be a CheXpert label name or a list of names, got {label!r}")
        label = tuple(label)
        for name in ("split", "date_from", "date_to"):
            value = filters.get(name)
            if value is not None and not isinstance(value, str):
                raise BadQuery(f"filter {name} must be a string"
                               + (" (an ISO date, e.g. 2019-05-31)" if name != "split" else "") + f", got {value!r}")
        has_lateral = filters.get("has_lateral")
        if has_lateral is not None and not isinstance(has_lateral, bool):
            raise BadQuery(f"filter has_lateral must be true or false, got {has_lateral!r}")
        return cls(has_lateral, label, filters.get("split") or None, filters.get("date_from") or None,
                   filters.get("date_to") or None)

    def empty(self) -> bool:
        return self == Filters()


def _labels_dict(value: Any) -> dict:
    if not value:
        return {}
    items = value.items() if isinstance(value, dict) else value
    # NaN (not mentioned) is dropped: JSON has no NaN, and "not mentioned" is what absence says
    return {str(k): float(v) for k, v in items if v is not None and v == v}


class SearchService:
    """See the module docstring. Build with `SearchService.open`."""

    def __init__(self, index_dir: Path, manifest: dict, index, metadata: pa.Table, local, local_mask, engine,
                 archive_root: Path | None):
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index
        self.metadata = metadata
        self.local = local            # (N, R, E) float16 memmap or None
        self.local_mask = local_mask  # (N, R) bool memmap or None
        self.engine = engine
        self.archive_root = archive_root
        self.n = metadata.num_rows
        self._key_to_row = {k: i for i, k in enumerate(metadata.column("study_key").to_pylist())}
        self._lock = threading.Lock()
        self._masks: dict[Filters, np.ndarray] = {}
        self._vectors: np.ndarray | None = None
        self._queries = 0
        self._started = time.time()

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, device: str = "cpu",
             verify: bool = True, archive_root: str | os.PathLike | None = None) -> "SearchService":
        """Opens INDEX_DIR with the engine bundle ENGINE_DIR.

        Refuses (IndexMismatch, naming the file) an index file that is missing, corrupt or differs
        from index.json, and an engine whose fingerprint is not the one the index was embedded
        with. verify=False skips the SHA-256 of the files (seconds for millions of studies).
        archive_root: where the source images are (default: the archive the store was embedded
        from), for thumbnails.
        """
        from ..index import Index
        from ..pipeline.store import engine_fingerprint
        from ..runtime import Engine, read_manifest as read_engine_manifest

        index_dir = Path(index_dir).expanduser()
        try:
            manifest = read_manifest(index_dir)
            if verify:
                check_files(index_dir, manifest)
        except IndexDirError as exc:
            raise IndexMismatch(str(exc)) from None
        _, engine_manifest = read_engine_manifest(engine_dir)
        fp = engine_fingerprint(engine_manifest)
        if manifest.get("engine_fingerprint") and fp != manifest["engine_fingerprint"]:
            raise IndexMismatch(
                f"engine {engine_dir} (fingerprint {fp[:12]}...) is not the engine the index {index_dir} was embedded "
                f"with ({manifest['engine_fingerprint'][:12]}..., {manifest.get('engine')}): its query embeddings "
                "would not match the stored ones. Use that engine, or re-embed the archive with this one and "
                "rebuild the index")
        try:
            index = Index.load(index_dir / "index.clvx", device=device, verify=verify)
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexMismatch(f"{index_dir / 'index.clvx'}: cannot be opened ({exc}); rebuild the index") from None
        try:
            # one chunk per column: take() of 10 rows from a multi-chunk 1M-row table costs ~20 ms, from one ~0.1 ms
            metadata = pq.read_table(index_dir / "metadata.parquet").combine_chunks()
        except (OSError, pa.ArrowException) as exc:
            raise IndexMismatch(f"{index_dir / 'metadata.parquet'}: cannot be read ({exc}); rebuild the index") from None
        if metadata.num_rows != len(index) or metadata.num_rows != manifest["studies"]:
            raise IndexMismatch(f"{index_dir / 'metadata.parquet'}: {metadata.num_rows} rows but the index holds "
                                f"{len(index)} and index.json says {manifest['studies']}; rebuild the index")
        local = mask = None
        if manifest.get("local"):
            try:
                local = np.load(index_dir / "local.npy", mmap_mode="r")
                mask = np.load(index_dir / "local_mask.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise IndexMismatch(f"{index_dir / 'local.npy'}: cannot be mapped ({exc}); rebuild the index") from None
            if local.shape[0] != metadata.num_rows or mask.shape != local.shape[:2]:
                raise IndexMismatch(f"{index_dir / 'local.npy'}: shape {local.shape} does not match "
                                    f"{metadata.num_rows} studies; rebuild the index")
        engine = Engine.load(engine_dir, device=device)  # a bundle compiled for another device says so
        if engine.embed_dim != manifest["dim"]:
            raise IndexMismatch(f"engine {engine_dir} makes {engine.embed_dim}-d embeddings, the index {manifest['dim']}-d")
        root = archive_root or manifest.get("archive_root")
        return cls(index_dir, manifest, index, metadata, local, mask, engine, Path(root) if root else None)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "SearchService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checks -----------------------------------------------------------------------------
    @staticmethod
    def _check_k(k: Any, name: str = "k", limit: int = MAX_K) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise BadQuery(f"{name} must be an integer, got {k!r}")
        if not 1 <= int(k) <= limit:
            raise BadQuery(f"{name} must be between 1 and {limit}, got {k}")
        return int(k)

    def _row(self, study_key: Any) -> int:
        if not isinstance(study_key, str) or not study_key:
            raise BadQuery(f"study_key must be a non-empty string, got {study_key!r}")
        row = self._key_to_row.get(study_key)
        if row is None:
            raise NotFound(f"unknown study key {study_key!r}: the index {self.index_dir} does not hold it "
                           f"({self.n} studies); check the key, or `clinvla index update` after embedding it")
        return row

    def _allow(self, filters: Filters) -> np.ndarray | None:
        """The bool mask (by row id) of the studies a filter lets through; None: everything."""
        if filters.empty():
            return None
        with self._lock:
            cached = self._masks.get(filters)
        if cached is not None:
            return cached
        meta = self.metadata
        mask = np.ones(self.n, bool)
        if filters.has_lateral is not None:
            lat = meta.column("has_lateral").to_numpy(zero_copy_only=False).astype(bool)
            mask &= lat if filters.has_lateral else ~lat
        if filters.split is not None:
            if "split" not in meta.column_names or meta.column("split").null_count == self.n:
                raise BadQuery(f"filter split={filters.split!r}: this index has no split column (the archive "
                               "did not say); drop the filter")
            hit = pc.fill_null(pc.equal(meta.column("split"), filters.split), False).to_numpy(zero_copy_only=False)
            if not hit.any():  # a typo would otherwise look like "no results"
                known = sorted(v for v in pc.unique(meta.column("split")).to_pylist() if v)
                raise BadQuery(f"filter split={filters.split!r}: no study has that split; known: {', '.join(known)}")
            mask &= hit
        for name in filters.label:
            if not self.manifest.get("has_labels"):
                raise BadQuery(f"filter label={name!r}: this index has no labels (the archive has no CheXpert "
                               "labels); drop the filter")
            value = pc.map_lookup(meta.column("labels"), pa.scalar(name, pa.string()), "first")  # null: absent
            hit = pc.fill_null(pc.equal(value, 1.0), False).to_numpy(zero_copy_only=False)
            if not hit.any() and name not in self._label_names():
                raise BadQuery(f"filter label={name!r}: no such label; known: {', '.join(sorted(self._label_names()))}")
            mask &= hit
        if filters.date_from or filters.date_to:
            if not self.manifest.get("has_dates"):
                raise BadQuery("date filters need study dates, and this index has none (the store written by "
                               "`clinvla embed` holds no study_date column); drop date_from/date_to")
            dates = pc.cast(meta.column("study_date"), pa.string())
            if filters.date_from:
                mask &= pc.fill_null(pc.greater_equal(dates, filters.date_from), False).to_numpy(zero_copy_only=False)
            if filters.date_to:
                mask &= pc.fill_null(pc.less_equal(dates, filters.date_to), False).to_numpy(zero_copy_only=False)
        with self._lock:
            if len(self._masks) > 64:  # a few filter combinations recur; do not grow without bound
                self._masks.clear()
            self._masks[filters] = mask
        return mask

    def _label_names(self) -> set[str]:
        labels = self.metadata.column("labels").combine_chunks()  # a MapArray: .keys is every row's names
        return set(pc.unique(labels.keys).to_pylist())

    # ---- the two stages ---------------------------------------------------------------------
    def _global(self, query: np.ndarray, k: int, allow: np.ndarray | None, exclude: int | None = None):
        """Exact top-k ids and scores over the allowed rows (minus `exclude`), -1 padding dropped."""
        if exclude is not None:
            allow = np.ones(self.n, bool) if allow is None else allow.copy()
            allow[exclude] = False
        scores, ids = self.index.search(np.asarray(query, np.float32).reshape(1, -1), min(k, max(self.n, 1)),
                                        allow=allow)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def _rerank(self, words: np.ndarray, word_mask: np.ndarray, ids: np.ndarray):
        """Local scores of the candidates `ids`, and their order (best first)."""
        import torch

        from ..rerank import rerank

        order = np.argsort(ids)  # memmap reads in file order; the result is put back afterwards
        rows = ids[order]
        regions = torch.from_numpy(np.asarray(self.local[rows], np.float32))
        region_mask = torch.from_numpy(np.asarray(self.local_mask[rows], bool))
        scores, idx = rerank(torch.from_numpy(words), torch.from_numpy(word_mask), regions, region_mask,
                             top_k=len(rows), tau=LOCAL_TAU)
        # rerank breaks ties by candidate index; map back through `order` so ties follow row ids
        return scores[0].numpy(), order[idx[0].numpy()]

    def _results(self, ids: np.ndarray, scores: np.ndarray, local: np.ndarray | None = None,
                 full_report: bool = False) -> list[dict]:
        meta = self.metadata
        rows = meta.take(pa.array(ids.astype(np.int64))).to_pylist() if len(ids) else []
        out = []
        for rank, (row, score) in enumerate(zip(rows, scores), 1):
            report = row.get("report")
            if report and not full_report and len(report) > SNIPPET_CHARS:
                report = report[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."
            out.append({
                "study_key": row["study_key"],
                "score": float(score),
                "local_score": None if local is None else float(local[rank - 1]),
                "rank": rank,
                "views": list(row.get("views") or []),
                "report": report,
                "labels": _labels_dict(row.get("labels")),
            })
        with self._lock:
            self._queries += 1
        return out

    # ---- queries ----------------------------------------------------------------------------
    def search_text(self, text: str, k: int = 10, rerank: int = 0, filters: "dict | Filters | None" = None) -> list[dict]:
        """The k studies that best match a report-like text, best first.

        rerank=N: re-order the global top N by local word-to-region similarity and return the first
        k (an N below k re-ranks k); score stays the global score, local_score is the re-ranking
        score. The k results are always among the global top max(N, k): re-ranking only reorders.
        """
        if not isinstance(text, str) or not text.strip():
            raise BadQuery("text is empty: give a finding or a report sentence, e.g. 'left pleural effusion'")
        k = self._check_k(k)
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or not 0 <= rerank <= MAX_RERANK:
            raise BadQuery(f"rerank must be an integer between 0 and {MAX_RERANK}, got {rerank!r}")
        if rerank and self.local is None:
            raise BadQuery(f"rerank={rerank} needs stored local region features, and the index {self.index_dir} has "
                           "none: its store was embedded with --local-features none. Re-embed with "
                           "`clinvla embed ARCHIVE --engine ENGINE --out NEW_STORE --local-features pooled`, rebuild "
                           "the index from it, or search with rerank=0")
        allow = self._allow(Filters.parse(filters))
        try:
            if rerank:
                emb, words, word_mask = self.engine.embed_texts([text], return_local=True)
            else:
                emb = self.engine.embed_texts([text])
        except ValueError as exc:
            raise BadQuery(f"text cannot be encoded: {exc}") from None
        scores, ids = self._global(emb[0], max(k, rerank), allow)
        if not rerank or len(ids) == 0:
            return self._results(ids[:k], scores[:k])
        local, order = self._rerank(words[:1], word_mask[:1], ids)
        order = order[:k]
        return self._results(ids[order], scores[order], local[:k])

    def _embed_image(self, frontal: Any, lateral: Any) -> np.ndarray:
        from ..data.io import DatasetError

        tmp: list[str] = []
        try:
            f = self._image_input(frontal, "frontal", tmp)
            lat = None if lateral is None else self._image_input(lateral, "lateral", tmp)
            if lat is not None and not self.engine.two_views:
                raise BadQuery("this engine's model takes the frontal view only: send no lateral image")
            return self.engine.embed_studies([f], None if lat is None else [lat])[0]
        except (DatasetError, ValueError, TypeError) as exc:
            raise BadQuery(f"the image cannot be used: {exc}. Send a DICOM, PNG or JPEG chest X-ray") from None
        finally:
            for p in tmp:
                os.unlink(p)

    @staticmethod
    def _image_input(item: Any, what: str, tmp: list[str]) -> Any:
        """Bytes become a temporary file (the decoders read files: DICOM sniffing needs byte 128)."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
            if not data:
                raise BadQuery(f"{what} image is empty (0 bytes)")
            if len(data) > MAX_IMAGE_BYTES:
                raise BadQuery(f"{what} image is {len(data) >> 20} MiB, over the {MAX_IMAGE_BYTES >> 20} MiB limit")
            suffix = ".dcm" if data[128:132] == b"DICM" else ""
            fd, path = tempfile.mkstemp(prefix="clinvla-query-", suffix=suffix)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            tmp.append(path)
            return path
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise BadQuery(f"{what} image {item}: no such file")
            return os.fspath(item)
        if hasattr(item, "shape"):
            return item
        raise BadQuery(f"{what} must be a file path, image bytes or a pixel array, got {type(item).__name__}")

    def search_image(self, frontal: Any, lateral: Any = None, k: int = 10,
                     filters: "dict | Filters | None" = None) -> list[dict]:
        """The k studies most like an image query (frontal, optionally lateral), best first."""
        k = self._check_k(k)
        allow = self._allow(Filters.parse(filters))
        emb = self._embed_image(frontal, lateral)
        scores, ids = self._global(emb, k, allow)
        return self._results(ids, scores)

    def similar(self, study_key: str, k: int = 10, filters: "dict | Filters | None" = None) -> list[dict]:
        """More like this: the k studies nearest to a stored study's embedding, the study itself excluded."""
        row = self._row(study_key)
        k = self._check_k(k)
        allow = self._allow(Filters.parse(filters))
        scores, ids = self._global(self._vector(row), k, allow, exclude=row)
        return self._results(ids, scores)

    def _vector(self, row: int) -> np.ndarray:
        with self._lock:
            if self._vectors is None:
                # one host copy of the vectors, by row id (the core hands out copies, not views)
                vectors, ids = self.index._native.vectors(), self.index.ids()
                by_row = np.empty_like(vectors)
                by_row[ids] = vectors
                self._vectors = by_row
        return self._vectors[row].astype(np.float32)

    def reports_for_image(self, frontal: Any, lateral: Any = None, k: int = 5) -> list[dict]:
        """Image to report: the whole reports of the k studies most like the image (studies without one skipped)."""
        k = self._check_k(k)
        if not self.manifest.get("has_reports"):
            raise BadQuery(f"the index {self.index_dir} holds no report texts (the archive had none)")
        emb = self._embed_image(frontal, lateral)
        mask = pc.is_valid(self.metadata.column("report")).to_numpy(zero_copy_only=False)
        scores, ids = self._global(emb, k, mask)
        return self._results(ids, scores, full_report=True)

    def study(self, study_key: str) -> dict:
        """Everything the index knows about one study: keys, paths, views, split, labels, the whole report."""
        row = self._row(study_key)
        data = self.metadata.slice(row, 1).to_pylist()[0]
        data["labels"] = _labels_dict(data.get("labels"))
        data["has_local_features"] = self.local is not None
        return data

    def thumbnail(self, study_key: str, size: int = 256) -> bytes:
        """The study's frontal image as PNG bytes, its longer side `size` pixels (16..1024)."""
        from PIL import Image

        from ..data.io import DatasetError, load_image

        row = self._row(study_key)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
            raise BadQuery(f"size must be an integer between 16 and 1024, got {size!r}")
        rel = self.metadata.column("frontal_path")[row].as_py()
        if not rel or self.archive_root is None:
            raise NotFound(f"study {study_key}: the index does not record its source image or archive root; "
                           "open the service with archive_root=")
        path = self.archive_root / rel
        try:
            pixels = load_image(path)
        except DatasetError as exc:
            raise NotFound(f"study {study_key}: its source image cannot be read ({exc}); is the archive still at "
                           f"{self.archive_root}? Pass archive_root= (--archive-root) where it is now") from None
        img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
        img.thumbnail((int(size), int(size)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def health(self) -> dict:
        m = self.manifest
        with self._lock:
            queries = self._queries
        return {
            "status": "ok",
            "index": self.index_dir.name,  # the name only: a client has no business with server paths
            "studies": self.n,
            "dim": m["dim"],
            "dtype": m["dtype"],
            "with_lateral": m.get("with_lateral"),
            "local_features": (m.get("local") or {}).get("mode"),
            "reports": bool(m.get("has_reports")),
            "labels": bool(m.get("has_labels")),
            "dates": bool(m.get("has_dates")),
            "engine_fingerprint": m.get("engine_fingerprint"),
            "engine_backend": self.engine.manifest.get("backend"),
            "device": str(self.engine.device),
            "max_k": MAX_K,
            "max_rerank": MAX_RERANK,
            "queries_served": queries,
            "uptime_s": round(time.time() - self._started, 1),
        }
