"""clinvla embed end to end: synthetic archives (MIMIC layout and a DICOM tree), a real tiny engine
bundle (ONNX Runtime, built once per session), the store read back with plain pyarrow/pandas;
exactly-once under SIGKILL, refusals, hostile files, and the Ray executor against the local one.
"""
import os
import random
import socket
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clinvla_engine.pipeline.embed import embed_archive
from clinvla_engine.pipeline.store import StoreError, done_keys, synthetic_store
from orthanc_server import free_port, wait_for

STUDIES = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import bundle

    return bundle(str(tmp_path_factory.getbasetemp() / "embed-engines"), "onnxruntime", "cpu")


def _archive(tmp_path_factory, fmt):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.getbasetemp() / f"embed-archive-{fmt}"
    if not out.exists():
        generate_archive(out, STUDIES, seed=3, fmt=fmt, size=64, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def mimic(tmp_path_factory):
    return _archive(tmp_path_factory, "mimic")


@pytest.fixture(scope="session")
def dicom(tmp_path_factory):
    pytest.importorskip("pydicom", reason="pydicom is not installed: pip install 'clinvla-engine[dicom]'")
    return _archive(tmp_path_factory, "dicom")


@pytest.fixture(scope="session")
def local_store(tmp_path_factory, engine_dir, mimic):
    """The mimic archive embedded locally in two runs (--limit 25, then --resume), pooled features."""
    out = tmp_path_factory.getbasetemp() / "embed-store-local"
    first = embed_archive(mimic, engine_dir, out, workers=1, batch_size=8, shard_rows=8, limit=25,
                          local_features="pooled", progress=False)
    second = embed_archive(mimic, engine_dir, out, workers=1, batch_size=8, shard_rows=8, resume=True,
                           local_features="pooled", progress=False)
    return out, first, second


def by_key(table):
    return {r["study_key"]: r for r in table.to_pylist()}


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---- the store of a MIMIC-layout archive ---------------------------------------------------------
def test_store_holds_every_study_once_with_the_engines_embeddings(local_store, engine_dir, mimic):
    from clinvla_engine.data import open_dataset
    from clinvla_engine.runtime import Engine

    out, first, second = local_store
    assert (first["embedded"], first["remaining"]) == (25, STUDIES - 25)
    assert (second["embedded"], second["already_done"], second["failed"]) == (STUDIES - 25, 25, 0)
    table = pq.read_table(out / "shards")  # plain pyarrow, the whole folder as one dataset
    keys = table.column("study_key").to_pylist()
    assert len(keys) == len(set(keys)) == STUDIES
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    rows = by_key(table)

    ds = open_dataset(mimic)
    studies = {s.study_id: s for s in ds}
    assert set(rows) == set(studies)
    order = sorted(studies)
    with Engine.load(engine_dir) as engine:
        ref, ref_regions, ref_mask = engine.embed_studies(
            [studies[k].frontal for k in order], [studies[k].lateral for k in order], return_local=True)
    got = np.array([rows[k]["embedding"] for k in order], np.float32)
    # the store holds float16: the only difference from the engine on the same files is that rounding
    assert np.abs(got - ref).max() < 2e-3 and cos_rows(got, ref).min() > 0.9999
    for i, k in enumerate(order):
        s, r = studies[k], rows[k]
        assert r["views"] == (["frontal", "lateral"] if s.lateral else ["frontal"])
        assert r["frontal_path"] == Path(s.frontal).resolve().relative_to(mimic.resolve()).as_posix()
        assert r["report"] == s.report and r["split"] == s.split
        assert {n: v for n, v in (r["labels"] or [])}.keys() == s.labels.keys()
        assert r["subject_hash"] is None  # no --salt-file: no patient identifier at all
    # pooled local features: 2 views x 2 x 2 cells of the 4 x 4 patch grid, absent lateral zero
    feats = np.array([rows[k]["local_features"] for k in order], np.float32)
    mask = np.array([rows[k]["local_mask"] for k in order])
    assert feats.shape == (STUDIES, 8, 32)
    grid = ref_regions.reshape(STUDIES, 2, 4, 4, 32)
    np.testing.assert_allclose(feats[:, 0], grid[:, 0, :2, :2].mean(axis=(1, 2)), atol=3e-3)
    np.testing.assert_array_equal(mask[:, 4:].all(axis=1), ref_mask[:, 16:].all(axis=1))
    assert not feats[~mask].any()

    import json

    info = json.loads((out / "store.json").read_text())
    assert info["studies"] == STUDIES and info["complete"] and info["local_features"] == "pooled"
    assert pq.read_table(out / "errors.parquet").num_rows == 0


def test_store_reads_with_pandas(local_store):
    pd = pytest.importorskip("pandas", reason="pandas is not installed (optional: the store is plain Parquet)")
    frame = pd.read_parquet(local_store[0] / "shards", columns=["study_key", "embedding", "views"])
    assert len(frame) == STUDIES and frame["study_key"].is_unique
    assert np.stack(frame["embedding"].to_numpy()).shape == (STUDIES, 32)


def test_resume_with_another_engine_is_refused(tmp_path, engine_dir, mimic, capsys):
    other = synthetic_store(tmp_path / "store", 10, embed_dim=32, fingerprint="0" * 64)
    with pytest.raises(StoreError, match="another engine"):
        embed_archive(mimic, engine_dir, other, resume=True, workers=0, progress=False)
    from clinvla_engine.pipeline.cli import main

    rc = main(["embed", str(mimic), "--engine", str(engine_dir), "--out", str(other), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "another engine" in err and "new --out" in err
    # nothing was added to the foreign store
    assert len(done_keys(other)) == 10 and len(list((other / "shards").iterdir())) == 1


def test_existing_store_without_resume_is_refused(local_store, engine_dir, mimic):
    out, _, _ = local_store
    with pytest.raises(StoreError, match="--resume"):
        embed_archive(mimic, engine_dir, out, workers=0, progress=False)


# ---- DICOM tree ----------------------------------------------------------------------------------
def test_dicom_tree_embeds_with_hashed_identifiers_only(tmp_path, engine_dir, dicom):
    import pydicom

    from clinvla_engine.pipeline.phi import hash_identifier, load_salt
    from clinvla_engine.runtime import Engine

    salt_file = tmp_path / "salt"
    out = tmp_path / "store"
    summary = embed_archive(dicom, engine_dir, out, workers=1, batch_size=8, shard_rows=16, salt_file=salt_file,
                            progress=False)
    assert summary["embedded"] == STUDIES and summary["failed"] == 0
    assert (out / "manifest.parquet").is_file()
    rows = by_key(pq.read_table(out / "shards"))
    salt = load_salt(salt_file)
    some = sorted(rows)[:6]
    with Engine.load(engine_dir) as engine:
        ref = engine.embed_studies([dicom / rows[k]["frontal_path"] for k in some],
                                   [dicom / rows[k]["lateral_path"] if rows[k]["lateral_path"] else None
                                    for k in some])
    got = np.array([rows[k]["embedding"] for k in some], np.float32)
    assert cos_rows(got, ref).min() > 0.999
    for key in some:
        ds = pydicom.dcmread(dicom / rows[key]["frontal_path"], stop_before_pixels=True)
        assert key == ds.StudyInstanceUID
        assert rows[key]["subject_hash"] == hash_identifier(ds.PatientID, salt)
        # no raw identifier or name anywhere except inside the archive's own relative paths
        text = " ".join(str(v) for c, v in rows[key].items() if c not in ("frontal_path", "lateral_path", "embedding"))
        for element in ("PatientID", "AccessionNumber", "PatientName", "PatientBirthDate"):
            value = str(getattr(ds, element, "") or "")
            if len(value) >= 4:
                assert value not in text, f"{element} leaked into the store"
    assert str(salt_file) not in (out / "store.json").read_text()


# ---- hostile input -------------------------------------------------------------------------------
def _png_claiming(width, height):
    """A PNG whose header claims width x height with a tiny valid-CRC IHDR and almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_hostile_files_become_error_rows_and_the_run_goes_on(tmp_path, engine_dir, mimic):
    from clinvla_engine.data import open_dataset

    archive = tmp_path / "archive"
    shutil.copytree(mimic, archive)
    studies = list(open_dataset(archive))
    bad = {}
    def spoil(i, data, view="frontal"):
        s = studies[i]
        path = Path(s.frontal if view == "frontal" else s.lateral)
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
        bad[s.study_id] = path
    spoil(0, b"")                                                  # zero bytes
    spoil(1, lambda b: b[: len(b) // 3])                           # truncated JPEG
    spoil(2, b"FINDINGS: this is a report, not an image\n" * 20)   # not an image
    spoil(3, _png_claiming(100_000, 100_000))                      # 10^10 pixels claimed, 100 bytes given
    spoil(4, _png_claiming(4, 4))                                  # too small to be a radiograph
    with_lateral = next(i for i in range(5, len(studies)) if studies[i].lateral)
    spoil(with_lateral, b"\0" * 300, view="lateral")               # one good view, one garbage view
    out = tmp_path / "store"
    summary = embed_archive(archive, engine_dir, out, workers=1, batch_size=8, shard_rows=8, progress=False)
    assert summary["failed"] == len(bad) and summary["embedded"] == STUDIES - len(bad)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert {e["study_key"] for e in errors} == set(bad)
    for e in errors:
        assert e["stage"] == "decode" and e["input"] == str(bad[e["study_key"]]) and e["reason"]
    assert any("MAX_IMAGE_PIXELS" in e["reason"] for e in errors)  # refused before any allocation
    shard_keys = set(pq.read_table(out / "shards", columns=["study_key"]).column(0).to_pylist())
    assert not shard_keys & set(bad) and len(shard_keys) == STUDIES - len(bad)


def test_hostile_dicom_files_become_error_rows(tmp_path, engine_dir, dicom):
    import pydicom

    tree = tmp_path / "tree"
    shutil.copytree(dicom, tree)
    frontals = sorted(tree.rglob("1_frontal.dcm"))
    spoiled = {}

    def spoil(path, edit):
        ds = pydicom.dcmread(path)
        spoiled[ds.StudyInstanceUID] = path
        edit(ds)
        ds.save_as(path)
    spoil(frontals[0], lambda ds: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)))  # huge claim, 8 kB data
    spoil(frontals[1], lambda ds: ds.__delattr__("PixelData"))
    spoil(frontals[2], lambda ds: setattr(ds, "BitsAllocated", 7))
    spoil(frontals[3], lambda ds: setattr(ds, "Modality", "CT"))
    frontals[4].write_bytes(frontals[4].read_bytes()[:400])  # truncated in the header
    frontals[5].write_bytes(b"")
    out = tmp_path / "store"
    summary = embed_archive(tree, engine_dir, out, workers=1, batch_size=8, shard_rows=8, progress=False)
    shard_keys = set(pq.read_table(out / "shards", columns=["study_key"]).column(0).to_pylist())
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    error_inputs = {e["input"] for e in errors}
    for uid, path in spoiled.items():
        assert uid not in shard_keys
        assert path.relative_to(tree).as_posix() in error_inputs or str(path) in error_inputs
    for path in frontals[4:6]:
        assert path.relative_to(tree).as_posix() in error_inputs
    assert summary["embedded"] == len(shard_keys) >= STUDIES - 6


# ---- exactly once under SIGKILL ------------------------------------------------------------------
def _shards(out):
    return sorted((out / "shards").glob("part-*.parquet")) if (out / "shards").is_dir() else []


def _embed_cmd(mimic, engine_dir, out, resume):
    cmd = [sys.executable, "-m", "clinvla_engine.pipeline.cli", "embed", str(mimic), "--engine", str(engine_dir),
           "--out", str(out), "--workers", "1", "--batch-size", "4", "--shard-rows", "4", "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def _kill_runs(mimic, engine_dir, out, kills, seed):
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = 0
    for attempt in range(kills):
        before = len(_shards(out))
        proc = subprocess.Popen(_embed_cmd(mimic, engine_dir, out, attempt > 0 or before > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 120
        # kill after this run has committed something, at a random moment (mid-batch, mid-write, ...)
        while len(_shards(out)) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the embed process and its decode workers
            killed += 1
        proc.wait()
        proc.stderr.close()
    return killed


def _check_exactly_once(out, expected):
    keys = pq.read_table(out / "shards", columns=["study_key"]).column(0).to_pylist() if _shards(out) else []
    assert len(keys) == len(set(keys)), "a study was committed twice"
    errs = pq.read_table(out / "errors.parquet").to_pylist() if (out / "errors.parquet").exists() else []
    assert set(keys) | {e["study_key"] for e in errs if e["study_key"]} == expected, "a study was lost"
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kills", [3])
def test_sigkill_at_random_points_then_resume_gives_every_study_exactly_once(tmp_path, engine_dir, mimic, kills):
    from clinvla_engine.data import open_dataset

    seed = random.randrange(1 << 30)
    print(f"kill seed {seed}")
    out = tmp_path / "store"
    killed = _kill_runs(mimic, engine_dir, out, kills, seed)
    assert killed >= 1, "every run finished before it could be killed: the test checked nothing"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    final = subprocess.run(_embed_cmd(mimic, engine_dir, out, True), env=env, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    _check_exactly_once(out, {s.study_id for s in open_dataset(mimic)})


@pytest.mark.slow
def test_sigkill_many_times(tmp_path, engine_dir, mimic):
    test_sigkill_at_random_points_then_resume_gives_every_study_exactly_once(tmp_path, engine_dir, mimic, 8)


# ---- the Ray executor ----------------------------------------------------------------------------
@pytest.fixture
def ray_head():
    """A Ray head node on loopback, as a hospital starts one (`ray start --head`), in its own process
    session; stopped by its process group's PID. Neither the head nor the Ray driver ever runs inside
    pytest's process: a Ray driver's threads once kept pytest from exiting after the summary."""
    pytest.importorskip("ray", reason="ray is not installed: pip install 'clinvla-engine[distributed]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")
    import tempfile

    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip(f"the ray command is not next to {sys.executable}: pip install 'clinvla-engine[distributed]'")
    temp = tempfile.mkdtemp(prefix="clvray", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
                             "--disable-usage-stats", "--block"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def listening():  # the GCS listens once the head is up
            if head.poll() is not None:
                log.flush()
                pytest.fail(f"ray start --head exited with {head.returncode}: "
                            f"{(Path(temp) / 'head.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for("the Ray head to listen", listening, timeout=90, interval=0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops its node on SIGTERM
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the node is left in its session
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.timeout(300)  # a 2-CPU Ray head on loopback plus the CLI; 60-64 s with the session fixtures here
def test_ray_executor_gives_the_same_rows_as_the_local_one(tmp_path, local_store, engine_dir, mimic, ray_head):
    address, env = ray_head
    local, _, _ = local_store
    env = dict(env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "clinvla_engine.pipeline.cli", "embed", str(mimic), "--engine", str(engine_dir),
           "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address", address, "--workers", "1",
           "--batch-size", "8", "--shard-rows", "16", "--local-features", "pooled", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    a = by_key(pq.read_table(local / "shards"))
    b = by_key(pq.read_table(tmp_path / "ray" / "shards"))
    assert len(b) == STUDIES and a.keys() == b.keys()
    for k in a:
        for column, value in a[k].items():
            if isinstance(value, float) or column == "labels":
                assert str(value) == str(b[k][column]), (k, column)  # NaN labels compare as text
            else:
                assert value == b[k][column], (k, column)


def _children(pid):
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_a_decode_worker_that_dies_is_replaced_and_its_studies_redone(tmp_path, engine_dir, mimic):
    """A worker killed mid-run (as a decoder crash or the OOM killer would) costs no study."""
    import threading

    out = tmp_path / "store"
    killed = []

    def kill_a_worker():
        deadline = time.monotonic() + 60
        while not _shards(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in _children(os.getpid()):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            except OSError:
                continue

    thread = threading.Thread(target=kill_a_worker)
    thread.start()
    summary = embed_archive(mimic, engine_dir, out, workers=1, batch_size=4, shard_rows=4, progress=False)
    thread.join()
    if not killed:
        pytest.skip("the run ended before a worker could be killed")
    assert summary["embedded"] == STUDIES and summary["failed"] == 0
    _check_exactly_once(out, set(pq.read_table(out / "shards", columns=["study_key"]).column(0).to_pylist()))
    assert len(done_keys(out)) == STUDIES
