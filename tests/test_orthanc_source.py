"""``clinvla embed --orthanc``: a real Orthanc (one per module) holding a small synthetic DICOM archive
(some files RLE / JPEG 2000 lossless), embedded over REST with basic auth and compared with an embed
of the same files from disk; paging, --resume after SIGKILL, a wrong password, a corrupt instance,
an unreachable server and retries on 5xx.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orthanc_server import free_port, gdcm_plugin, orthanc_fixture

pytestmark = pytest.mark.orthanc

REPO = Path(__file__).resolve().parents[1]
STUDIES = 9
PAGE = 4  # smaller than the archive: several /studies pages

orthanc = orthanc_fixture(plugins=lambda: [gdcm_plugin()], auth=True)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import bundle

    # test_embed.py builds the same tiny bundle here; reuse it when that module ran first
    root = tmp_path_factory.getbasetemp() / "embed-engines"
    built = root / "onnxruntime-cpu-fp32"
    if (built / "manifest.json").is_file():
        return built
    return bundle(str(root), "onnxruntime", "cpu")


def _compress(path: Path, syntax) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)


def _corrupt_study(template: Path, out: Path) -> Path:
    """A one-image study (new UIDs) whose pixel data is cut short: Orthanc stores it, it cannot decode."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "CORRUPT1"
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, orthanc):
    """(archive folder, Orthanc id of the corrupt study, Orthanc id of its instance) after uploading."""
    pytest.importorskip("pydicom", reason="pydicom is not installed: pip install 'clinvla-engine[dicom]'")
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from clinvla_engine.data.synth import generate_archive

    root = tmp_path_factory.mktemp("orthanc-archive")
    archive = root / "archive"
    generate_archive(archive, STUDIES, seed=11, fmt="dicom", size=64, progress=False, workers=1)
    images = sorted(p for p in archive.rglob("*.dcm") if not p.name.endswith("_report.dcm"))
    _compress(images[0], RLELossless)        # a frontal
    _compress(images[1], JPEG2000Lossless)   # its lateral (or the next study's frontal)
    _compress(images[4], RLELossless)
    orthanc.clear()
    # half over REST, half over DICOM C-STORE, as a PACS receives them
    files = sorted(archive.rglob("*.dcm"))
    for f in files[::2]:
        orthanc.upload(f)
    orthanc.c_store(files[1::2])
    corrupt = orthanc.upload(_corrupt_study(images[2], root / "corrupt.dcm"))
    assert len(orthanc.get("/studies", check=True).json()) == STUDIES + 1
    return archive, corrupt["ParentStudy"], corrupt["ID"]


def _embed_args(orthanc, engine_dir, out, *extra):
    return ["embed", "--orthanc", orthanc.url, "--orthanc-user", orthanc.auth[0], "--engine", str(engine_dir),
            "--out", str(out), "--workers", "0", "--batch-size", "4", "--shard-rows", "3",
            "--orthanc-page-size", str(PAGE), "--no-progress", *extra]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, orthanc, pacs, engine_dir):
    """The same PACS embedded from Orthanc (CLI, one decode worker process) and from disk."""
    from clinvla_engine.pipeline.cli import main
    from clinvla_engine.pipeline.embed import embed_archive

    archive = pacs[0]
    root = tmp_path_factory.mktemp("orthanc-stores")
    disk = root / "disk"
    embed_archive(archive, engine_dir, disk, workers=0, batch_size=4, progress=False)
    out = root / "orthanc"
    mp = pytest.MonkeyPatch()
    mp.setenv("CLINVLA_ORTHANC_PASSWORD", orthanc.auth[1])
    try:
        args = _embed_args(orthanc, engine_dir, out)
        args[args.index("--workers") + 1] = "1"  # the client crosses into a spawned worker
        assert main(args) == 0
    finally:
        mp.undo()
    return disk, out


def test_orthanc_store_equals_the_disk_store(stores, pacs):
    from clinvla_engine.pipeline.store import read_errors, read_store

    disk, out = stores
    archive, corrupt_study, corrupt_instance = pacs
    d_rows = {r["study_key"]: r for r in read_store(disk).to_pylist()}
    o_rows = {r["study_key"]: r for r in read_store(out).to_pylist()}
    assert len(d_rows) == STUDIES and len(o_rows) == STUDIES
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    uid_of_study = {r["orthanc_study"]: r["study_instance_uid"] for r in manifest}
    sop_of_instance = {r["path"]: r["sop_instance_uid"] for r in manifest}
    disk_sop = {r["path"]: r["sop_instance_uid"] for r in pq.read_table(disk / "manifest.parquet").to_pylist()}
    assert set(o_rows) <= set(uid_of_study)
    assert {uid_of_study[k] for k in o_rows} == set(d_rows)
    laterals = 0
    for key, row in o_rows.items():
        ref = d_rows[uid_of_study[key]]
        assert row["source_format"] == "orthanc"
        a, b = np.asarray(row["embedding"], np.float32), np.asarray(ref["embedding"], np.float32)
        assert np.isfinite(a).all() and np.abs(a - b).max() <= 1e-6, key
        assert row["views"] == ref["views"] and row["view_codes"] == ref["view_codes"]
        # the same instances were picked: compare their SOPInstanceUIDs
        assert sop_of_instance[row["frontal_path"]] == disk_sop[ref["frontal_path"]]
        if ref["lateral_path"] is not None:
            laterals += 1
            assert sop_of_instance[row["lateral_path"]] == disk_sop[ref["lateral_path"]]
        else:
            assert row["lateral_path"] is None
    assert laterals >= 2  # the comparison covered two-view studies
    # the corrupt instance is one error row (decode stage, named by its Orthanc path); nothing else failed
    errors = [e for e in read_errors(out).to_pylist() if e["stage"] != "scan"]
    assert [(e["study_key"], e["stage"], e["input"]) for e in errors] == [
        (corrupt_study, "decode", f"instances/{corrupt_instance}")]
    assert "pixel data" in errors[0]["reason"]
    summary = json.loads((out / "store.json").read_text())
    assert summary["source"].startswith("orthanc http://127.0.0.1:") and summary["complete"]
    assert summary["studies"] == STUDIES and summary["failed_studies"] == 1


def test_paging_lists_every_study_once(orthanc, pacs):
    from clinvla_engine.pipeline.orthanc import OrthancSource

    expected = orthanc.get("/studies", check=True).json()
    for page in (1, PAGE, 1000):
        source = OrthancSource(orthanc.url, *orthanc.auth, page_size=page)
        ids = source.study_ids()
        assert ids == expected and len(ids) == STUDIES + 1


def test_resume_after_sigkill_gives_every_study_once(tmp_path, orthanc, pacs, engine_dir, stores):
    from clinvla_engine.pipeline.cli import main
    from clinvla_engine.pipeline.store import read_errors, read_store

    out = tmp_path / "store"
    env = dict(os.environ, CLINVLA_ORTHANC_PASSWORD=orthanc.auth[1],
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "clinvla_engine.pipeline.cli", *_embed_args(orthanc, engine_dir, out)]
    cmd[cmd.index("--batch-size") + 1] = "1"
    cmd[cmd.index("--shard-rows") + 1] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "shards").glob("part-*.parquet")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run committed nothing within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    first = {r["study_key"] for r in read_store(out, ["study_key"]).to_pylist()}
    assert 0 < len(first) < STUDIES

    mp = pytest.MonkeyPatch()
    mp.setenv("CLINVLA_ORTHANC_PASSWORD", orthanc.auth[1])
    try:
        assert main(_embed_args(orthanc, engine_dir, out, "--resume")) == 0
    finally:
        mp.undo()
    keys = read_store(out, ["study_key"]).column(0).to_pylist()
    assert len(keys) == len(set(keys)) == STUDIES and first <= set(keys)
    full = {r["study_key"] for r in read_store(stores[1], ["study_key"]).to_pylist()}
    assert set(keys) == full
    failed = [e["study_key"] for e in read_errors(out).to_pylist() if e["stage"] != "scan"]
    assert failed == [pacs[1]]
    # StudyInstanceUID of every stored study survives the resume in the manifest
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert set(keys) <= {r["orthanc_study"] for r in manifest if r["study_instance_uid"]}
    assert not list(out.rglob(".tmp-*"))


def test_wrong_password_is_a_clear_error(tmp_path, orthanc, engine_dir, capsys, monkeypatch):
    from clinvla_engine.pipeline.cli import main

    monkeypatch.setenv("MY_PACS_PASSWORD", orthanc.auth[1] + "-wrong")
    out = tmp_path / "store"
    assert main(_embed_args(orthanc, engine_dir, out, "--orthanc-password-env", "MY_PACS_PASSWORD")) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and repr(orthanc.auth[0]) in err and "--orthanc-user" in err
    assert orthanc.auth[1] not in err
    assert not out.exists()  # refused before any store was created


def test_password_options_are_checked(tmp_path, orthanc, engine_dir, capsys, monkeypatch):
    from clinvla_engine.pipeline.cli import main

    monkeypatch.delenv("CLINVLA_ORTHANC_PASSWORD", raising=False)
    out = tmp_path / "store"
    assert main(_embed_args(orthanc, engine_dir, out)) == 2
    assert "CLINVLA_ORTHANC_PASSWORD" in capsys.readouterr().err
    secret = tmp_path / "pw"
    secret.write_text("")
    assert main(_embed_args(orthanc, engine_dir, out, "--orthanc-password-file", str(secret))) == 2
    assert "first line is empty" in capsys.readouterr().err
    no_user = [a for a in _embed_args(orthanc, engine_dir, out) if a not in ("--orthanc-user", orthanc.auth[0])]
    assert main(no_user) == 2  # Orthanc asks for a login
    assert "asks for a login" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), "--orthanc", orthanc.url, "--engine", str(engine_dir),
                 "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert not out.exists()


def test_unreachable_orthanc_stops_with_the_url(tmp_path):
    from clinvla_engine.pipeline.orthanc import OrthancError, OrthancSource

    url = f"http://127.0.0.1:{free_port()}"
    source = OrthancSource(url, retries=2, backoff=0.01)
    with pytest.raises(OrthancError, match=f"cannot reach Orthanc at {url}.*2 tries"):
        source.open()


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `fails` requests of each path, then a canned body (404 for /instances/gone/file)."""

    fails = 2
    seen: dict = {}

    def do_GET(self):
        n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if self.path == "/instances/gone/file":
            code, body = 404, b"{}"
        elif self.path == "/instances/broken/file" or n <= self.fails:
            code, body = 503, b"busy"
        else:
            code, body = 200, (b'{"ApiVersion": 16}' if self.path == "/system" else b"DICM-bytes")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_5xx_is_retried_and_a_bad_instance_is_that_studys_error():
    from clinvla_engine.data.io import ImageDecodeError
    from clinvla_engine.pipeline.orthanc import OrthancSource

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        source = OrthancSource(f"http://127.0.0.1:{server.server_address[1]}", retries=3, backoff=0.01)
        assert source.open()["ApiVersion"] == 16  # two 503s, then the answer
        read = source.reader()
        assert read("instances/ok") == b"DICM-bytes"
        with pytest.raises(ImageDecodeError, match="HTTP 404"):
            read("instances/gone")
        with pytest.raises(ImageDecodeError, match="HTTP 503 .* after 3 tries"):
            read("instances/broken")
        assert _Flaky.seen["/instances/broken/file"] == 3
    finally:
        server.shutdown()
        server.server_close()
