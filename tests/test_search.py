"""Search an embedded archive: `clinvla index build|update`, `clinvla search`, SearchService.

A real tiny engine bundle (ONNX Runtime), a synthetic MIMIC-layout archive embedded with pooled
local features in two runs (25 studies, then --resume --limit 10), the index built from the first
run and updated from the second. Filters are checked against a brute-force NumPy search over the
store's own embeddings; refusals (another engine, corrupt files, no local features) by message.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from clinvla_engine import backends

pytestmark = pytest.mark.skipif(not backends.extension(), reason=f"{backends.extension().why}")

STUDIES = 40
FIRST, SECOND = 25, 10  # embedded by the first run, then by --resume --limit


def _cli(module_main, argv):
    """Runs a CLI main in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module_main(argv)
    return rc, out.getvalue(), err.getvalue()


def search_cli(argv):
    from clinvla_engine.search.cli import main

    return _cli(main, argv)


def embed_cli(argv):
    from clinvla_engine.pipeline.cli import main

    return _cli(main, argv)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import bundle

    return bundle(str(tmp_path_factory.getbasetemp() / "search-engines"), "onnxruntime", "cpu")


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.getbasetemp() / "search-archive"
    generate_archive(out, STUDIES, seed=5, fmt="mimic", size=64, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def built(tmp_path_factory, engine_dir, archive):
    """The CLI end to end: embed 25, index build, embed --resume --limit 10, index update."""
    root = tmp_path_factory.getbasetemp() / "search"
    store, index = root / "store", root / "index"
    common = ["--engine", str(engine_dir), "--out", str(store), "--workers", "0", "--batch-size", "8",
              "--shard-rows", "8", "--local-features", "pooled", "--no-progress"]
    rc, out, err = embed_cli(["embed", str(archive), *common, "--limit", str(FIRST)])
    assert rc == 0, err
    rc, out, err = search_cli(["index", "build", str(store), "-o", str(index)])
    assert rc == 0, err
    build = json.loads(out)
    first_meta = pq.read_table(index / "metadata.parquet")
    rc, out, err = embed_cli(["embed", str(archive), *common, "--resume", "--limit", str(SECOND)])
    assert rc == 0, err
    rc, out, err = search_cli(["index", "update", str(index), str(store)])
    assert rc == 0, err
    update = json.loads(out)
    return {"store": store, "index": index, "build": build, "update": update, "first_meta": first_meta,
            "engine": engine_dir, "archive": archive}


@pytest.fixture(scope="session")
def service(built):
    from clinvla_engine.search import SearchService

    with SearchService.open(built["index"], built["engine"]) as svc:
        yield svc


@pytest.fixture(scope="session")
def store_rows(built):
    """Row id -> store row (embedding float32, views, labels, split), in the index's row order."""
    meta = pq.read_table(built["index"] / "metadata.parquet")
    table = pq.read_table(built["store"] / "shards")
    by_key = {r["study_key"]: r for r in table.to_pylist()}
    rows = [by_key[k] for k in meta.column("study_key").to_pylist()]
    emb = np.array([r["embedding"] for r in rows], np.float32)
    return rows, emb


# ---- building and updating ------------------------------------------------------------------
def test_build_then_update_adds_only_the_new_studies(built):
    from clinvla_engine.index import Index

    assert built["build"]["studies"] == FIRST and built["build"]["added"] == FIRST
    assert built["build"]["local"]["regions"] == 8  # 2 views x 2 x 2 pooled cells
    assert built["update"] == {**built["update"], "studies": FIRST + SECOND, "added": SECOND, "missing_from_store": 0}
    meta = pq.read_table(built["index"] / "metadata.parquet")
    keys = meta.column("study_key").to_pylist()
    assert len(keys) == len(set(keys)) == FIRST + SECOND
    # the first 25 rows keep their row ids: an update appends, it never renumbers
    assert keys[:FIRST] == built["first_meta"].column("study_key").to_pylist()
    assert meta.column("row_id").to_pylist() == list(range(FIRST + SECOND))
    index = Index.load(built["index"] / "index.clvx")
    np.testing.assert_array_equal(np.sort(index.ids()), np.arange(FIRST + SECOND))
    assert np.load(built["index"] / "local.npy", mmap_mode="r").shape == (FIRST + SECOND, 8, 32)
    manifest = json.loads((built["index"] / "index.json").read_text())
    assert set(manifest["files"]) == {"index.clvx", "metadata.parquet", "local.npy", "local_mask.npy"}
    # a second update finds nothing new and changes nothing
    rc, out, err = search_cli(["index", "update", str(built["index"]), str(built["store"])])
    assert rc == 0 and json.loads(out)["added"] == 0
    assert not [p for p in built["index"].iterdir() if ".tmp-" in p.name]


def test_stored_rows_match_the_store(built, store_rows):
    from clinvla_engine.index import Index

    rows, emb = store_rows
    index = Index.load(built["index"] / "index.clvx")
    np.testing.assert_array_equal(index._native.vectors()[np.argsort(index.ids())], emb.astype(np.float16))
    local = np.load(built["index"] / "local.npy")
    np.testing.assert_array_equal(local, np.array([r["local_features"] for r in rows], np.float16))
    meta = pq.read_table(built["index"] / "metadata.parquet").to_pylist()
    for m, r in zip(meta, rows):
        assert (m["views"], m["frontal_path"], m["report"], m["split"]) == (r["views"], r["frontal_path"],
                                                                           r["report"], r["split"])
        assert m["has_lateral"] == (r["lateral_path"] is not None)


# ---- searching through the CLI ------------------------------------------------------------------
def test_cli_search_by_text_image_and_study(built, service):
    idx, eng = str(built["index"]), str(built["engine"])
    rc, out, err = search_cli(["search", idx, "--engine", eng, "--text", "moderate pulmonary edema", "-k", "5",
                               "--json"])
    assert rc == 0, err
    results = json.loads(out)["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert set(results[0]) == {"study_key", "score", "local_score", "rank", "views", "report", "labels"}
    assert results == service.search_text("moderate pulmonary edema", k=5)

    # image: a study's own frontal + lateral finds that study first (its stored embedding, float16)
    study = service.study(results[2]["study_key"])
    frontal = built["archive"] / study["frontal_path"]
    lateral = built["archive"] / study["lateral_path"] if study["lateral_path"] else None
    argv = ["search", idx, "--engine", eng, "--image", str(frontal), "-k", "3"]
    if lateral:
        argv += ["--lateral", str(lateral)]
    rc, out, err = search_cli(argv + ["--json"])
    assert rc == 0, err
    hits = json.loads(out)["results"]
    assert hits[0]["study_key"] == study["study_key"] and hits[0]["score"] > 0.99

    # image to report: whole reports of the best studies
    rc, out, err = search_cli(argv + ["--reports"])  # the plain listing, whole reports
    assert rc == 0, err
    assert study["report"].splitlines()[0] in out

    # more like this: k results, never the study itself, best first
    rc, out, err = search_cli(["search", idx, "--engine", eng, "--study", study["study_key"], "-k", "7", "--json"])
    assert rc == 0, err
    similar = json.loads(out)["results"]
    assert len(similar) == 7 and study["study_key"] not in {r["study_key"] for r in similar}

    # plain listing, re-ranked
    rc, out, err = search_cli(["search", idx, "--engine", eng, "--text", "left pleural effusion", "--rerank", "10",
                               "-k", "3"])
    assert rc == 0 and out.count(" score ") == 3 and " local " in out


def test_cli_errors_name_the_problem(built):
    idx, eng = str(built["index"]), str(built["engine"])
    cases = [
        (["--text", "  "], "text is empty"),
        (["--text", "edema", "-k", "0"], "k must be between 1 and 1000"),
        (["--text", "edema", "-k", "1001"], "k must be between 1 and 1000"),
        (["--study", "no-such-study"], "unknown study key 'no-such-study'"),
        (["--study", "x", "--rerank", "5"], "--rerank goes with --text"),
        (["--image", str(built["index"] / "index.json")], "the image cannot be used"),
        (["--image", "/nonexistent.png"], "no such file"),
        (["--text", "edema", "--date-from", "2020-01-01"], "no study_date column"),
        (["--text", "edema", "--label", "Nonsense"], "no such label"),
        (["--text", "edema", "--split", "tset"], "no study has that split; known: "),
    ]
    for extra, message in cases:
        rc, out, err = search_cli(["search", idx, "--engine", eng, *extra])
        assert rc == 2 and message in err, (extra, err)
        assert err.startswith("clinvla search: error:")


# ---- two stages ---------------------------------------------------------------------------------
def test_rerank_reorders_and_never_loses_a_candidate(service, built):
    import torch

    from clinvla_engine.rerank import rerank

    queries = ["moderate pulmonary edema", "left pleural effusion", "small apical pneumothorax",
               "enlarged cardiac silhouette", "lingula pneumonia", "no acute cardiopulmonary process"]
    n = 12
    local = np.load(built["index"] / "local.npy").astype(np.float32)
    mask = np.load(built["index"] / "local_mask.npy")
    reordered = 0
    for text in queries:
        plain = service.search_text(text, k=n)
        ranked = service.search_text(text, k=n, rerank=n)
        assert {r["study_key"] for r in plain} == {r["study_key"] for r in ranked}  # a permutation
        by_key = {r["study_key"]: r["score"] for r in plain}
        assert all(r["score"] == by_key[r["study_key"]] for r in ranked)  # score stays the global score
        local_scores = [r["local_score"] for r in ranked]
        assert local_scores == sorted(local_scores, reverse=True)
        reordered += [r["study_key"] for r in plain] != [r["study_key"] for r in ranked]
        # the local scores are rerank's on the stored features, recomputed here independently
        _, words, word_mask = service.engine.embed_texts([text], return_local=True)
        rows = [service.study(r["study_key"])["row_id"] for r in plain]
        s, order = rerank(torch.from_numpy(words), torch.from_numpy(word_mask), torch.from_numpy(local[rows]),
                          torch.from_numpy(mask[rows]), top_k=n)
        np.testing.assert_allclose(local_scores, s[0].numpy(), rtol=1e-5, atol=1e-5)
        # k < N: the first k of the re-ranked N
        assert service.search_text(text, k=4, rerank=n) == [dict(r) for r in ranked[:4]]
    assert reordered >= 1, "local re-ranking never changed the order of any query's top 12"


# ---- filters: exact, against brute force ---------------------------------------------------------
def _brute_force(query, emb, allowed, k):
    q = query.astype(np.float16).astype(np.float32)  # the index scores float16 queries
    s = emb @ q
    rows = np.flatnonzero(allowed)
    order = rows[np.lexsort((rows, -s[rows]))][:k]  # score descending, ties by the smaller row id
    return order, s[order]


@pytest.mark.parametrize("filters", [
    {"has_lateral": True}, {"has_lateral": False}, {"label": "Edema"}, {"split": "train"},
    {"label": ["Pleural Effusion"], "has_lateral": True}, {"label": "Cardiomegaly", "split": "train"},
])
def test_filters_are_exact(service, store_rows, filters):
    rows, emb = store_rows
    allowed = np.ones(len(rows), bool)
    if "has_lateral" in filters:
        allowed &= np.array([(r["lateral_path"] is not None) == filters["has_lateral"] for r in rows])
    if "split" in filters:
        allowed &= np.array([r["split"] == filters["split"] for r in rows])
    labels = filters.get("label", [])
    for name in [labels] if isinstance(labels, str) else labels:
        allowed &= np.array([dict(r["labels"] or []).get(name) == 1.0 for r in rows])
    assert 0 < allowed.sum() < len(rows), "the synthetic archive should make every filter bite"
    text = "moderate pulmonary edema with small effusions"
    query = service.engine.embed_texts([text])[0]
    for k in (3, int(allowed.sum()), 1000):
        got = service.search_text(text, k=k, filters=filters)
        want_rows, want_scores = _brute_force(query, emb, allowed, k)
        assert len(got) == min(k, allowed.sum())  # k results where k exist, never padding
        keys = [rows[i]["study_key"] for i in want_rows]
        assert [r["study_key"] for r in got] == keys
        np.testing.assert_allclose([r["score"] for r in got], want_scores, atol=2e-3)
    # the same filters restrict "more like this" and image search
    key = rows[int(np.flatnonzero(allowed)[0])]["study_key"]
    similar = service.similar(key, k=50, filters=filters)
    assert len(similar) == allowed.sum() - 1
    assert all(allowed[service.study(r["study_key"])["row_id"]] for r in similar)


# ---- the Python API's refusals --------------------------------------------------------------
def test_service_errors(service, built):
    from clinvla_engine.search import BadQuery, NotFound, SearchError

    assert issubclass(NotFound, SearchError) and issubclass(BadQuery, SearchError)
    with pytest.raises(BadQuery, match="text is empty"):
        service.search_text("")
    with pytest.raises(BadQuery, match="k must be an integer"):
        service.search_text("edema", k="5")
    with pytest.raises(BadQuery, match="rerank must be an integer between 0 and 1000"):
        service.search_text("edema", rerank=5000)
    with pytest.raises(NotFound, match="unknown study key 'nope'"):
        service.similar("nope")
    with pytest.raises(NotFound, match="unknown study key"):
        service.thumbnail("nope")
    with pytest.raises(BadQuery, match="image is empty"):
        service.search_image(b"")
    with pytest.raises(BadQuery, match="the image cannot be used"):
        service.search_image(b"\x00" * 128 + b"DICM" + b"\x01" * 64)  # a DICOM preamble and garbage
    with pytest.raises(BadQuery, match="the image cannot be used"):
        service.search_image(b"definitely not an image")
    with pytest.raises(BadQuery, match="unknown filter"):
        service.search_text("edema", filters={"age": 3})
    with pytest.raises(BadQuery, match="has_lateral must be true or false"):
        service.search_text("edema", filters={"has_lateral": "yes"})
    with pytest.raises(BadQuery, match="filter label must be a CheXpert label name"):
        service.search_text("edema", filters={"label": 3})
    with pytest.raises(BadQuery, match="filter split must be a string"):
        service.search_text("edema", filters={"split": 1})
    # the service still answers after every refusal
    assert len(service.search_text("edema", k=2)) == 2


def test_image_bytes_thumbnail_study_health(service, built):
    from PIL import Image

    key = service.search_text("edema", k=1)[0]["study_key"]
    study = service.study(key)
    assert study["study_key"] == key and isinstance(study["labels"], dict) and study["has_local_features"]
    data = (built["archive"] / study["frontal_path"]).read_bytes()  # JPEG bytes, as an upload
    from_bytes = service.search_image(data, k=3)
    assert from_bytes == service.search_image(built["archive"] / study["frontal_path"], k=3)
    png = service.thumbnail(key, size=48)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and max(img.size) == 48
    reports = service.reports_for_image(data, k=2)
    assert len(reports) == 2 and all(r["report"] for r in reports)
    health = service.health()
    assert health["status"] == "ok" and health["studies"] == FIRST + SECOND and health["local_features"] == "pooled"


def test_concurrent_queries_match_serial(service):
    texts = ["edema", "pleural effusion", "pneumothorax", "cardiomegaly", "pneumonia", "fracture"] * 3
    serial = [service.search_text(t, k=5, rerank=10) for t in texts]
    got: list = [None] * len(texts)

    def work(i):
        got[i] = service.search_text(texts[i], k=5, rerank=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == serial


# ---- refusals at open -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def other_engine(tmp_path_factory):
    from clinvla_engine.export.build import build_engine
    from clinvla_engine.export.testing import TEST_BATCH_SIZES, TEST_TEXT_LEN, tiny_checkpoint

    root = tmp_path_factory.getbasetemp() / "search-other-engine"
    ck = tiny_checkpoint(root / "ckpt", seed=1)
    build_engine(ck, root / "engine", backend="onnxruntime", device="cpu", precision="fp32",
                 batch_sizes=TEST_BATCH_SIZES, max_text_len=TEST_TEXT_LEN, parity_studies=4, progress=False,
                 force=True)
    return root / "engine"


def test_another_engine_is_refused(built, other_engine):
    from clinvla_engine.search import SearchService
    from clinvla_engine.search.service import IndexMismatch

    with pytest.raises(IndexMismatch, match="is not the engine the index .* was embedded with"):
        SearchService.open(built["index"], other_engine)
    rc, _, err = search_cli(["search", str(built["index"]), "--engine", str(other_engine), "--text", "edema"])
    assert rc == 2 and "would not match the stored ones" in err


def test_update_from_another_engines_store_is_refused(built, tmp_path):
    from clinvla_engine.pipeline.store import synthetic_store
    from clinvla_engine.search.index_dir import IndexDirError, update_index

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    other = synthetic_store(tmp_path / "other", 5, embed_dim=32, fingerprint="f" * 64)
    with pytest.raises(IndexDirError, match="another engine"):
        update_index(index, other)


@pytest.mark.parametrize("name,damage", [
    ("index.clvx", "flip"), ("metadata.parquet", "flip"), ("local.npy", "flip"), ("local_mask.npy", "truncate"),
    ("metadata.parquet", "delete"), ("index.json", "garbage"),
])
def test_corrupt_files_are_refused_by_name(built, tmp_path, name, damage):
    from clinvla_engine.search import SearchError, SearchService

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    path = index / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-7]))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("{not json")
    with pytest.raises(SearchError, match=str(path).replace(".", r"\.")):
        SearchService.open(index, built["engine"])
    rc, _, err = search_cli(["search", str(index), "--engine", str(built["engine"]), "--text", "edema"])
    assert rc == 2 and str(path) in err


def test_index_without_local_features(engine_dir, tmp_path):
    """A store embedded with --local-features none (written with the real StoreWriter, this engine's
    fingerprint): search works, --rerank explains why it cannot and how to fix it."""
    from clinvla_engine.pipeline.store import engine_fingerprint, synthetic_store
    from clinvla_engine.runtime import read_manifest
    from clinvla_engine.search import BadQuery, NotFound, SearchService
    from clinvla_engine.search.index_dir import build_index

    fp = engine_fingerprint(read_manifest(engine_dir)[1])
    store = synthetic_store(tmp_path / "store", 30, embed_dim=32, fingerprint=fp, shard_rows=8)
    summary = build_index(store, tmp_path / "index", dtype="float32")
    assert summary["local"] is None and not (tmp_path / "index" / "local.npy").exists()
    with SearchService.open(tmp_path / "index", engine_dir) as svc:
        assert len(svc.search_text("edema", k=30)) == 30
        with pytest.raises(BadQuery, match=r"--local-features none.*--local-features pooled"):
            svc.search_text("edema", rerank=10)
        with pytest.raises(BadQuery, match="no labels"):
            svc.search_text("edema", filters={"label": "Edema"})
        with pytest.raises(BadQuery, match="no split column"):
            svc.search_text("edema", filters={"split": "train"})
        with pytest.raises(BadQuery, match="holds no report texts"):
            svc.reports_for_image(np.zeros((64, 64), np.float32))
        with pytest.raises(NotFound, match="does not record its source image or archive root"):
            svc.thumbnail("s000000003")
        assert len(svc.similar("s000000003", k=5)) == 5


def test_update_keeps_studies_missing_from_the_store(built, tmp_path):
    """A deleted shard: the update reports its studies as missing_from_store and keeps them searchable."""
    from clinvla_engine.search import SearchService
    from clinvla_engine.search.index_dir import update_index

    store, index = tmp_path / "store", tmp_path / "index"
    shutil.copytree(built["store"], store)
    shutil.copytree(built["index"], index)
    first = sorted((store / "shards").glob("part-*.parquet"))[0]
    gone = pq.read_table(first, columns=["study_key"]).column(0).to_pylist()
    first.unlink()
    summary = update_index(index, store)
    assert (summary["added"], summary["missing_from_store"], summary["studies"]) == (0, len(gone), FIRST + SECOND)
    with SearchService.open(index, built["engine"]) as svc:
        assert svc.study(gone[0])["study_key"] == gone[0]
