"""clinvla_engine.pipeline.store: layout, atomic commits, the resume read, refusals, pooling.

No engine here (test_embed.py runs a real one); rows are written with the real StoreWriter.
"""
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clinvla_engine.pipeline.embed import StudyMeta, build_rows, pool_regions
from clinvla_engine.pipeline.store import (ERROR_SCHEMA, StoreError, StoreWriter, done_keys, error_row,
                                           filter_new, read_errors, read_store, shard_schema, synthetic_store)

FP_A = "a" * 64
FP_B = "b" * 64


def meta(key, labels=None):
    return StudyMeta(key, "mimic", f"files/{key}/f.jpg", f"files/{key}/l.jpg", ["PA", "LL"], split="train",
                     report="FINDINGS: clear.", labels=labels or {"Edema": 1.0, "Fracture": float("nan")})


def rows_for(keys, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(keys), dim)).astype(np.float32)
    return build_rows([meta(k) for k in keys], [i % 2 == 0 for i in range(len(keys))], emb, None, FP_A), emb


def test_commit_is_readable_with_plain_pyarrow_and_typed(tmp_path):
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    rows, emb = rows_for(["k1", "k2", "k3"])
    w.commit(rows, [error_row("files/k4/f.jpg", "decode", "empty file", "k4")])
    w.finish()
    table = pq.read_table(tmp_path / "s" / "shards" / "part-00000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 16)
    assert table.column("study_key").to_pylist() == ["k1", "k2", "k3"]
    got = np.array(table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(got, emb.astype(np.float16).astype(np.float32))
    first = table.slice(0, 1).to_pylist()[0]
    assert first["views"] == ["frontal", "lateral"] and first["view_codes"] == ["PA", "LL"]
    second = table.slice(1, 1).to_pylist()[0]
    assert second["views"] == ["frontal"] and second["lateral_path"] is None  # no lateral: no lateral path
    assert dict(first["labels"])["Edema"] == 1.0 and np.isnan(dict(first["labels"])["Fracture"])
    assert table.schema.metadata[b"clinvla.engine_fingerprint"] == FP_A.encode()
    errors = pq.read_table(tmp_path / "s" / "errors.parquet")
    assert errors.schema == ERROR_SCHEMA
    assert errors.to_pylist() == [{"input": "files/k4/f.jpg", "stage": "decode", "reason": "empty file",
                                   "study_key": "k4"}]
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["studies"] == 3 and info["failed_studies"] == 1 and info["complete"] is True
    assert info["engine_fingerprint"] == FP_A and info["schema_version"] == 1
    assert sorted(done_keys(tmp_path / "s").to_pylist()) == ["k1", "k2", "k3", "k4"]
    assert not [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]


def test_open_refuses_existing_store_without_resume_and_foreign_folders(tmp_path):
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    w.commit(rows_for(["k1"])[0], [])
    with pytest.raises(StoreError, match="--resume"):
        StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and is not an embedding store"):
        StoreWriter(tmp_path / "other", fingerprint=FP_A, embed_dim=16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter(tmp_path / "file", fingerprint=FP_A, embed_dim=16)


def test_resume_with_another_engine_is_refused_by_summary_and_by_shards(tmp_path):
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    w.commit(rows_for(["k1"])[0], [])
    w.close()
    with pytest.raises(StoreError, match="another engine"):
        StoreWriter(tmp_path / "s", fingerprint=FP_B, embed_dim=16, resume=True)
    # store.json is only a summary: with it gone, the shards' own metadata still refuses the mix
    (tmp_path / "s" / "store.json").unlink()
    w2 = StoreWriter(tmp_path / "s", fingerprint=FP_B, embed_dim=16, resume=True)
    with pytest.raises(StoreError, match="another engine"):
        w2.done()
    w2.close()
    with pytest.raises(StoreError, match="--local-features none"):
        StoreWriter(tmp_path / "s", fingerprint=FP_B, embed_dim=16, resume=True, local_mode="pooled",
                    local_regions=8)


def test_uncommitted_temp_files_are_never_read_and_are_removed_on_resume(tmp_path):
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    w.commit(rows_for(["k1", "k2"])[0], [])
    # what a kill between write and rename leaves behind: a complete-looking Parquet file, temp-named
    table = rows_for(["k3"])[0].replace_schema_metadata(w.schema.metadata)
    pq.write_table(table, tmp_path / "s" / "shards" / ".tmp-part-00001.parquet.123.abcd")
    assert sorted(done_keys(tmp_path / "s").to_pylist()) == ["k1", "k2"]
    assert read_store(tmp_path / "s").num_rows == 2
    w.close()  # the killed writer's lock went with its process
    (tmp_path / "s" / ".tmp-errors.parquet.123.abcd").write_bytes(b"PAR1")  # killed while finishing
    w2 = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16, resume=True)
    assert not list((tmp_path / "s").rglob(".tmp-*"))
    assert w2.next_part == 1
    w2.commit(rows_for(["k3"])[0], [error_row("x", "decode", "bad", "k4")])
    assert (tmp_path / "s" / "shards" / "part-00001.parquet").is_file()
    assert (tmp_path / "s" / "errors" / "part-00001.parquet").is_file()
    assert sorted(done_keys(tmp_path / "s").to_pylist()) == ["k1", "k2", "k3", "k4"]


def test_a_first_run_killed_before_its_first_commit_resumes(tmp_path):
    root = tmp_path / "s"
    (root / "shards").mkdir(parents=True)
    (root / ".tmp-store.json.99.abcd").write_text("{")  # killed while writing the first summary
    w = StoreWriter(root, fingerprint=FP_A, embed_dim=16, resume=True)
    assert w.next_part == 0 and not list(root.glob(".tmp-*"))


def test_scan_errors_are_replaced_each_run_and_joined_at_finish(tmp_path):
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    w.write_scan_errors([error_row("a.dcm", "scan", "no StudyInstanceUID")])
    w.write_scan_errors([error_row("b.dcm", "scan", "not DICOM")])
    w.commit([], [error_row("c.jpg", "decode", "truncated", "k9")])
    w.finish()
    got = pq.read_table(tmp_path / "s" / "errors.parquet").to_pylist()
    assert sorted(r["input"] for r in got) == ["b.dcm", "c.jpg"]
    assert read_errors(tmp_path / "s").num_rows == 2
    # archive-level problems are not studies: the resume read does not count them as done
    assert done_keys(tmp_path / "s").to_pylist() == ["k9"]


def test_filter_new_matches_a_python_set():
    rng = np.random.default_rng(3)
    keys = [f"s{i}" for i in rng.permutation(5000)]
    done = pa.array([f"s{i}" for i in range(0, 5000, 3)] + ["not-in-archive"])
    expect = [i for i, k in enumerate(keys) if k not in set(done.to_pylist())]
    assert filter_new(keys, done).tolist() == expect
    assert filter_new(keys, pa.array([], pa.string())).tolist() == list(range(5000))


@pytest.mark.parametrize("views,side", [(2, 4), (1, 4), (2, 3), (2, 14)])
def test_pooled_regions_are_cell_means_and_absent_views_zero(views, side):
    rng = np.random.default_rng(side)
    n, e = 3, 8
    regions = rng.standard_normal((n, views * side * side, e)).astype(np.float32)
    mask = np.ones((n, views * side * side), bool)
    if views == 2:
        mask[1, side * side:] = False  # study 1 has no lateral
    feats, fmask = pool_regions(regions, mask, views, side, "pooled")
    g = min(2, side)
    assert feats.shape == (n, views * g * g, e) and feats.dtype == np.float16
    grid = regions.reshape(n, views, side, side, e)
    edges = np.linspace(0, side, g + 1).round().astype(int)
    cell = grid[2, 0, edges[1]:edges[2], edges[0]:edges[1]].mean(axis=(0, 1))  # view 0, row 1, col 0
    np.testing.assert_allclose(feats[2, g], cell, atol=2e-3)
    if views == 2:
        assert not fmask[1, g * g:].any() and fmask[1, :g * g].all()
        assert not feats[1, g * g:].any()
    full, fullmask = pool_regions(regions, mask, views, side, "full")
    assert full.shape == regions.shape and (fullmask == mask).all()


def test_shard_schema_with_local_features():
    s = shard_schema(32, 8)
    assert s.field("local_features").type == pa.list_(pa.list_(pa.float16(), 32), 8)
    assert s.field("local_mask").type == pa.list_(pa.bool_(), 8)
    assert "local_features" not in shard_schema(32).names


def test_resume_read_of_100k_rows_is_fast(tmp_path):
    store = synthetic_store(tmp_path / "big", 100_000, embed_dim=128, shard_rows=16384)
    t0 = time.perf_counter()
    done = done_keys(store, fingerprint="0" * 64)
    seconds = time.perf_counter() - t0
    assert len(done) == 100_000 and len(set(done.slice(0, 1000).to_pylist())) == 1000
    assert seconds < 4.0, f"reading 100k study keys took {seconds:.2f} s"


def _peak_extra_mib_script() -> str:
    # peak RSS growth of a fresh process reading the keys: the import cost is not the reader's
    return (
        "import sys, time\n"
        "from clinvla_engine.pipeline.store import done_keys\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field): return int(line.split()[1]) / 1024\n"
        "base = rss('VmRSS:')\n"
        "t0 = time.perf_counter(); d = done_keys(sys.argv[1], fingerprint='0' * 64)\n"
        "print(len(d), time.perf_counter() - t0, rss('VmHWM:') - base)\n")


@pytest.mark.slow
def test_resume_read_of_one_million_rows_under_10_s_with_bounded_memory(tmp_path):
    store = synthetic_store(tmp_path / "big", 1_000_000, embed_dim=128, shard_rows=8192)
    out = subprocess.run([sys.executable, "-c", _peak_extra_mib_script(), str(store)], capture_output=True,
                         text=True, check=True)
    n, seconds, extra_mib = out.stdout.split()
    assert int(n) == 1_000_000
    assert float(seconds) < 10.0, f"resume read of 1M studies took {float(seconds):.1f} s"
    # only the key column is read: far below the 244 MiB of the 1M x 128 float16 embeddings
    assert float(extra_mib) < 160, f"resume read grew the process by {float(extra_mib):.0f} MiB"


def test_one_writer_per_store(tmp_path):
    # two writers would number their shards alike and overwrite each other's studies
    w = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16)
    with pytest.raises(StoreError, match="being written by another"):
        StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16, resume=True)
    w.commit(rows_for(["k1"])[0], [])
    w.finish()
    again = StoreWriter(tmp_path / "s", fingerprint=FP_A, embed_dim=16, resume=True)  # released by finish
    assert again.done().to_pylist() == ["k1"]
    again.close()
