"""The Orthanc plugin (csrc/orthanc, libclinvla_orthanc.so) inside a real Orthanc.

One Orthanc (with the GDCM decoder plugin and ours) serves the module: synthetic DX studies arrive
over REST and DICOM C-STORE, are indexed by the plugin's worker, and are searched by text and by
study; the plugin's embeddings are compared with the Python engine's for the same files from the
same AOTInductor bundle and with `clinvla embed --orthanc` of the same server (cosine >= 0.9999).
Then: bad input (not DICOM, CT, colour, damaged pixel data, a codec Orthanc lacks, a huge image,
compressed frames crafted to crash Orthanc's decoders) is counted and skipped while Orthanc keeps
serving; a
deleted study leaves the index; a restart finds the index intact; a kill -9 in the middle of
indexing loses nothing that was acknowledged; a tampered bundle stops Orthanc or disables the
plugin as ClinVLA.RequireEngine says. The plugin's own index / queue / view-picking checks run
first (clinvla_orthanc_selftest).

Needs `make cpp` (build/cpp/orthanc/libclinvla_orthanc.so; $CLINVLA_CPP_BUILD names another build
folder) and Debian's orthanc + orthanc-gdcm; skips with the reason otherwise. The tiny AOTInductor
bundle is built once per run ($CLINVLA_TEST_AOTI_BUNDLE names a prebuilt one instead).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from orthanc_server import OrthancError, OrthancServer, gdcm_plugin, require_orthanc, wait_for

pytestmark = pytest.mark.orthanc

REPO = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("CLINVLA_CPP_BUILD", REPO / "build" / "cpp"))
PLUGIN = BUILD / "orthanc" / "libclinvla_orthanc.so"
SELFTEST = BUILD / "orthanc" / "clinvla_orthanc_selftest"
MAX_PIXELS = 150 * 150  # the archive's 128 x 128 images pass, the 160 x 160 "huge" one does not
N_STUDIES = 6


def _built(path: Path) -> Path:
    if not path.is_file():
        reason = f"{path} is not built: run `make cpp` (it builds libclinvla and the Orthanc plugin)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def status(server) -> dict:
    r = server.get("/clinvla/status")
    assert r.status_code == 200, r.text
    return r.json()


def indexed_ids(server) -> set[str]:
    r = server.get("/clinvla/studies")
    assert r.status_code == 200, r.text
    return set(r.json()["studies"])


def assert_top_k(hits: list[dict], want: dict[str, float], k: int, tol: float = 1e-4) -> None:
    """hits (plugin: study, score) are the top k of want (Python: study -> score), up to ties within tol."""
    assert len(hits) == min(k, len(want))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        assert abs(h["score"] - want[h["study"]]) < tol, (h, want[h["study"]])
    floor = min(want[h["study"]] for h in hits)
    outside = [s for s in want if s not in {h["study"] for h in hits}]
    assert all(want[s] <= floor + tol for s in outside)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- bad input: DICOM files the plugin must count and skip --------------------------------------
def _variant(src: Path, tag: str, edit) -> bytes:
    """A copy of src as a new study (fresh UIDs) changed by edit(ds); the file's bytes."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.PatientID = f"BAD-{tag}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def bad_files(frontal: Path) -> dict[str, bytes]:
    """kind (as /clinvla/status counts it) -> file bytes."""
    from pydicom.encaps import encapsulate

    def ct(ds):
        ds.Modality = "CT"

    def colour(ds):
        rgb = np.zeros((int(ds.Rows), int(ds.Columns), 3), np.uint8)
        rgb[..., 0] = 200
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        for k in ("WindowCenter", "WindowWidth"):
            if k in ds:
                del ds[k]
        ds.PixelData = rgb.tobytes()

    def corrupt(ds):  # half the pixel data is missing: DCMTK reads the header, no decoder can decode
        ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 2]

    def no_codec(ds):  # MPEG-2 video: neither Orthanc's DCMTK nor the GDCM plugin decodes it
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(400)])
        ds["PixelData"].VR = "OB"

    def huge(ds):
        ds.Rows = ds.Columns = 160
        ds.PixelData = np.full((160, 160), 1000, np.uint16).tobytes()

    return {"not_radiograph": _variant(frontal, "ct", ct), "colour": _variant(frontal, "rgb", colour),
            "corrupt": _variant(frontal, "cut", corrupt),
            "compressed_without_codec": _variant(frontal, "mpeg", no_codec), "huge": _variant(frontal, "big", huge)}


# ---- the plugin's index directory, read independently of the plugin (durability oracle) ---------
def studies_on_disk(index_dir: Path) -> set[str]:
    """Study ids in IndexDirectory: studies.ids then its generation's log, replayed up to the first
    incomplete record (what a restart would load; the plugin also checks each record's CRC-32C)."""
    studies: dict[str, int] = {}
    generation = 0
    ids = index_dir / "studies.ids"
    if ids.exists():
        data = ids.read_bytes()
        assert data[:8] == b"CLVIDS01"
        _version, dim, generation, _next_id, count = struct.unpack_from("<IIQqq", data, 8)
        pos = 8 + 32
        (n,) = struct.unpack_from("<H", data, pos)
        pos += 2 + n
        for _ in range(count):
            (sid,) = struct.unpack_from("<q", data, pos)
            pos += 8
            names = []
            for _k in range(3):
                (n,) = struct.unpack_from("<H", data, pos)
                names.append(data[pos + 2:pos + 2 + n].decode())
                pos += 2 + n
            pos += 4 * dim
            studies[names[0]] = sid
    log = (index_dir / f"log-{generation}.bin").read_bytes()
    assert log[:8] == b"CLVLOG01"
    (dim,) = struct.unpack_from("<I", log, 12)
    pos = 32
    while pos + 8 <= len(log):
        length, _crc = struct.unpack_from("<II", log, pos)
        if length == 0 or pos + 8 + length > len(log):
            break
        payload = log[pos + 8:pos + 8 + length]
        kind, sid, n = struct.unpack_from("<BqH", payload, 0)
        study = payload[11:11 + n].decode()
        if kind == 1:
            studies[study] = sid
        else:
            studies.pop(study, None)
        pos += 8 + length
    return set(studies)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("CLINVLA_TEST_AOTI_BUNDLE")  # any AOTI bundle: skips the build (minutes on 2 cores)
    if prebuilt:
        return Path(prebuilt)
    for name in ("onnx", "onnxscript"):  # the bundle builder exports through ONNX first
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import bundle

    return bundle(str(tmp_path_factory.getbasetemp() / "engines"), "aoti", "cpu")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[dict]:
    """N_STUDIES synthetic DX studies: [{"folder", "files", "frontal", "lateral"}] (Python's pick)."""
    import pydicom

    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.data.views import pick_views

    out = tmp_path_factory.mktemp("synth_dicom")
    generate_archive(out, studies=N_STUDIES + 4, seed=11, fmt="dicom", size=128, lateral_fraction=0.7, progress=False)
    studies = []
    for folder in sorted({p.parent for p in out.rglob("*.dcm")}):
        files = sorted(folder.glob("*.dcm"))
        images = [p for p in files if not p.name.endswith("_report.dcm")]
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in images]
        for h, p in zip(headers, images):
            h.filename = str(p)
        frontal, lateral = pick_views(headers)
        studies.append({"folder": folder, "files": files, "uid": str(headers[0].StudyInstanceUID),
                        "frontal": Path(frontal.filename), "lateral": Path(lateral.filename) if lateral else None,
                        "frontal_sop": str(frontal.SOPInstanceUID),
                        "lateral_sop": str(lateral.SOPInstanceUID) if lateral else None})
    assert len(studies) == N_STUDIES + 4 and any(s["lateral"] is None for s in studies)
    return studies


@pytest.fixture(scope="module")
def python_engine(engine_dir):
    from clinvla_engine.runtime import Engine

    e = Engine.load(engine_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def expected(python_engine, archive) -> dict[str, np.ndarray]:
    """StudyInstanceUID -> the Python engine's embedding of the same files."""
    embs = python_engine.embed_studies([str(s["frontal"]) for s in archive],
                                       [str(s["lateral"]) if s["lateral"] else None for s in archive])
    return {s["uid"]: e for s, e in zip(archive, embs)}


def plugin_config(engine: Path, index: Path, **over) -> dict:
    cfg = {"EngineDirectory": str(engine), "IndexDirectory": str(index), "WorkerThreads": 1, "Device": "cpu",
           "RequireEngine": True, "SnapshotEvery": 4, "MaxPixels": MAX_PIXELS}
    cfg.update(over)
    return {"ClinVLA": cfg, "OrthancExplorerEnabled": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine_dir):
    require_orthanc(need_gdcm=True)
    plugin = _built(PLUGIN)
    tmp = tmp_path_factory.mktemp("orthanc_plugin")
    tmpdir = tmp / "tmpdir"  # Orthanc's own $TMPDIR, where libtorch extracts the engine's packages
    tmpdir.mkdir()
    srv = OrthancServer(tmp, plugins=[gdcm_plugin(), str(plugin)],
                        extra_config=plugin_config(engine_dir, tmp / "clinvla-index"), auth=True,
                        env={"TMPDIR": str(tmpdir)})
    srv.index_dir = tmp / "clinvla-index"
    srv.tmpdir = tmpdir
    try:
        srv.start(timeout=60)
        yield srv
    finally:
        srv.stop()


def orthanc_study_of(server, uid: str) -> str:
    found = server.post("/tools/lookup", data=uid, check=True).json()
    ids = [f["ID"] for f in found if f["Type"] == "Study"]
    assert len(ids) == 1, found
    return ids[0]


# ---- tests ---------------------------------------------------------------------------------------
def test_selftest_of_index_queue_and_view_picking(tmp_path):
    out = subprocess.run([str(_built(SELFTEST)), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("all passed")


def test_studies_over_rest_and_c_store_are_indexed_like_python(server, archive, expected):
    first, second = archive[:N_STUDIES // 2], archive[N_STUDIES // 2:N_STUDIES]
    for s in first:
        for f in s["files"]:
            server.upload(f)
    server.c_store([f for s in second for f in s["files"]])
    ids = {s["uid"]: orthanc_study_of(server, s["uid"]) for s in archive[:N_STUDIES]}
    wait_for("every study indexed", lambda: set(ids.values()) <= indexed_ids(server), timeout=90)
    st = status(server)
    assert st["enabled"] and st["indexed"] == N_STUDIES and st["errors"] == {}, st
    assert st["ignored_instances"].get("SR", 0) >= N_STUDIES  # the report objects, not errors
    assert st["engine"]["dim"] == len(next(iter(expected.values())))
    for s in archive[:N_STUDIES]:
        got = server.get(f"/clinvla/studies/{ids[s['uid']]}", check=True).json()
        assert cosine(got["vector"], expected[s["uid"]]) >= 0.9999, s["folder"]
        # the same views as Python picked
        frontal = server.get(f"/instances/{got['frontal_instance']}/simplified-tags", check=True).json()
        assert frontal["SOPInstanceUID"] == s["frontal_sop"]
        if s["lateral"] is None:
            assert got["lateral_instance"] is None
        else:
            lateral = server.get(f"/instances/{got['lateral_instance']}/simplified-tags", check=True).json()
            assert lateral["SOPInstanceUID"] == s["lateral_sop"]
    server.ids = ids


def test_clinvla_embed_over_rest_gives_the_plugins_embeddings(server, engine_dir, tmp_path):
    """The same PACS embedded from outside (`clinvla embed --orthanc`): same studies, views, vectors."""
    from clinvla_engine.pipeline.embed import embed_archive
    from clinvla_engine.pipeline.orthanc import OrthancSource
    from clinvla_engine.pipeline.store import read_store

    out = tmp_path / "store"
    summary = embed_archive(OrthancSource(server.url, *server.auth), engine_dir, out, workers=0, progress=False)
    assert summary["embedded"] == N_STUDIES and not summary["failed"], summary
    rows = {r["study_key"]: r for r in read_store(out).to_pylist()}
    assert set(rows) == set(server.ids.values())
    for study, row in rows.items():
        got = server.get(f"/clinvla/studies/{study}", check=True).json()
        assert cosine(row["embedding"], got["vector"]) >= 0.9999  # the store keeps float16
        assert row["frontal_path"] == f"instances/{got['frontal_instance']}"
        assert row["lateral_path"] == (f"instances/{got['lateral_instance']}" if got["lateral_instance"] else None)


def test_search_by_text_and_by_study_rank_like_python(server, archive, expected, python_engine):
    ids = server.ids
    uid_of = {v: k for k, v in ids.items()}
    query = "small right pleural effusion"
    r = server.get("/clinvla/search", params={"q": query, "k": 4}, check=True).json()
    assert r["query"] == query  # requests sends the spaces as '+'
    assert server.get("/clinvla/search?q=small%20right%20pleural%20effusion&k=4", check=True).json() == r
    text = python_engine.embed_texts([query])[0]
    assert_top_k(r["results"], {ids[u]: float(text @ expected[u]) for u in ids}, 4)
    for hit in r["results"]:
        assert hit["tags"]["StudyInstanceUID"] == uid_of[hit["study"]] and hit["tags"]["PatientID"]
        assert hit["frontal_instance"]
    # by study: that study's stored vector, itself left out
    probe = ids[archive[0]["uid"]]
    r = server.get(f"/clinvla/studies/{probe}/similar", params={"k": 50}, check=True).json()
    assert probe not in {h["study"] for h in r["results"]}
    query_vec = expected[archive[0]["uid"]]
    assert_top_k(r["results"], {ids[u]: float(query_vec @ expected[u]) for u in ids if ids[u] != probe}, 50)
    # bad parameters: 400 with a message that says what to send
    for params, needle in [({}, "q is missing"), ({"q": "  "}, "q is missing"), ({"q": "x", "k": "0"}, "k must be"),
                           ({"q": "x", "k": "ten"}, "k must be"), ({"q": "x", "top": "3"}, "unknown query parameter 'top'")]:
        bad = server.get("/clinvla/search", params=params)
        assert bad.status_code == 400 and needle in bad.json()["error"], (params, bad.text)
    # a broken %-escape, sent as is (requests would re-quote it to %25ZZ)
    import base64
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    token = base64.b64encode(f"{server.auth[0]}:{server.auth[1]}".encode()).decode()
    conn.request("GET", "/clinvla/search?q=effusion%ZZ", headers={"Authorization": f"Basic {token}"})
    raw = conn.getresponse()
    assert raw.status == 400 and "malformed percent-encoding" in json.loads(raw.read())["error"]
    conn.close()
    assert server.get("/clinvla/studies/not-a-study/similar").status_code == 404
    assert "no study" in server.get("/clinvla/studies/not-a-study/similar").json()["error"]
    assert server.post("/clinvla/search", data=b"").status_code == 405
    page = server.get("/clinvla/ui", check=True)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "/preview" in page.text and "explorer.html#study?uuid=" in page.text and "search?q=" in page.text
    assert server.get("/app/explorer.html").status_code == 200  # where the page's links go


def test_bad_input_is_counted_and_skipped_while_orthanc_serves(server, archive):
    before = status(server)
    r = server.post("/instances", data=b"this is not a DICOM file", headers={"Content-Type": "application/dicom"})
    assert r.status_code == 400  # Orthanc refuses it; the plugin never sees it
    files = bad_files(archive[0]["frontal"])
    from pydicom.encaps import encapsulate

    def crashing_rle(ds):  # zeros for a header: crashes Orthanc's decoder unless the plugin checks it first
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"
        ds.PixelData = encapsulate([bytes(364)])
        ds["PixelData"].VR = "OB"

    def crashing_jpeg(ds):  # SOF with precision 0: an assertion in GDCM's JPEG codec aborts Orthanc
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc0\x00\x0b\x00\x00\x80\x00\x80\x01\x01\x11\x00" + bytes(300)])
        ds["PixelData"].VR = "OB"

    extra = [_variant(archive[0]["frontal"], "rle", crashing_rle), _variant(archive[0]["frontal"], "jpg", crashing_jpeg)]
    studies = [server.upload(data)["ParentStudy"] for data in list(files.values()) + extra]
    for kind in files:
        wait_for(f"a '{kind}' error in /clinvla/status",
                 lambda: status(server)["errors"].get(kind, 0) > before["errors"].get(kind, 0), timeout=60)
    wait_for("both crafted compressed frames refused",
             lambda: status(server)["errors"].get("corrupt", 0) >= before["errors"].get("corrupt", 0) + 3, timeout=60)
    st = status(server)
    assert st["indexed"] == before["indexed"]  # nothing of it entered the index
    assert not set(studies) & indexed_ids(server)
    kinds = {e["kind"] for e in st["last_errors"]}
    assert set(files) <= kinds
    assert server.get("/system", check=True).json()["Name"] and server.running
    assert "ClinVLA" in server.log_text() and "skipped (huge)" in server.log_text()
    for s in studies:
        server.delete(f"/studies/{s}", check=True)


def test_deleted_study_leaves_the_index(server, archive):
    victim = server.ids[archive[1]["uid"]]
    assert victim in indexed_ids(server)
    server.delete(f"/studies/{victim}", check=True)
    wait_for("the deleted study removed", lambda: victim not in indexed_ids(server), timeout=30)
    assert server.get(f"/clinvla/studies/{victim}").status_code == 404
    r = server.get("/clinvla/search", params={"q": "cardiomegaly", "k": 100}, check=True).json()
    assert victim not in {h["study"] for h in r["results"]} and len(r["results"]) == N_STUDIES - 1


def test_restart_finds_the_index_intact(server):
    before = {s: server.get(f"/clinvla/studies/{s}", check=True).json()["vector"] for s in indexed_ids(server)}
    server.restart(timeout=60)
    st = status(server)
    assert st["indexed"] == len(before) and st["index"]["dropped_tail_bytes"] == 0
    for s, vec in before.items():
        assert server.get(f"/clinvla/studies/{s}", check=True).json()["vector"] == vec
    assert "ready: engine" in server.log_text()


def test_kill_9_mid_indexing_loses_nothing_acknowledged(server, archive):
    new = archive[N_STUDIES:]
    for s in new:
        for f in s["files"]:
            server.upload(f)
    base = len(indexed_ids(server))
    acknowledged = wait_for("the plugin indexing the new studies",
                            lambda: (lambda ids: ids if len(ids) > base else None)(indexed_ids(server)),
                            timeout=60, interval=0.02)
    server.kill()
    assert acknowledged <= studies_on_disk(server.index_dir)
    server.start(timeout=60)
    assert acknowledged <= indexed_ids(server)  # at once: loaded from disk, not re-indexed
    want = {orthanc_study_of(server, s["uid"]) for s in new}
    wait_for("the studies not indexed before the kill indexed after the start-up scan",
             lambda: want <= indexed_ids(server), timeout=90)
    assert status(server)["errors"] == {}


def test_no_package_extraction_folder_outlives_the_engines_load(server):
    """libtorch extracts each .pt2 into $TMPDIR/aotinductor_* and removes it only when the engine is
    destroyed, which an Orthanc killed with SIGKILL never does: two folders (image, text) leaked per
    kill. libclinvla removes them once the CPU engine is loaded. Runs after the kill -9 test, so it
    covers the killed Orthanc's load and the running one's."""
    wait_for("the plugin's engine loaded", lambda: "ready: engine" in server.log_text(), timeout=60)
    assert server.running and server.tmpdir.is_dir()
    assert sorted(p.name for p in server.tmpdir.glob("aotinductor_*")) == []
    # the packages were extracted there (so the check above can fail): Orthanc still maps their
    # shared objects, which read as deleted
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    extracted = {line.split()[-2] for line in maps.splitlines()
                 if f"{server.tmpdir}/aotinductor_" in line and line.endswith("(deleted)")}
    assert len(extracted) >= 2, maps[-2000:]  # the image and the text package


@pytest.mark.parametrize("require", [True, False])
def test_a_tampered_bundle_stops_orthanc_or_disables_the_plugin(tmp_path, engine_dir, require):
    require_orthanc()
    plugin = _built(PLUGIN)
    bad = tmp_path / "engine"
    shutil.copytree(engine_dir, bad)
    config = bad / "config.json"
    config.write_bytes(config.read_bytes().replace(b"}", b" }", 1))  # one byte more: its SHA-256 differs
    srv = OrthancServer(tmp_path / "orthanc", plugins=[str(plugin)],
                        extra_config=plugin_config(bad, tmp_path / "index", RequireEngine=require), auth=True)
    try:
        if require:
            with pytest.raises(OrthancError, match="exited"):
                srv.start(timeout=60)
            log = srv.log_text()
            assert "ClinVLA: cannot load the engine bundle" in log and "RequireEngine is true" in log
        else:
            srv.start(timeout=60)
            st = status(srv)
            assert st["enabled"] is False and "cannot load the engine bundle" in st["disabled_reason"]
            r = srv.get("/clinvla/search", params={"q": "effusion"})
            assert r.status_code == 503 and "disabled" in r.json()["error"]
            assert srv.get("/system", check=True).status_code == 200  # Orthanc serves without it
            assert "the ClinVLA plugin is DISABLED" in srv.log_text()
    finally:
        srv.stop()
