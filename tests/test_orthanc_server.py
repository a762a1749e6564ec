"""The test launcher for a real Orthanc (tests/orthanc_server.py): start, upload, C-STORE, restart, stop."""
from __future__ import annotations

import os

import pytest
import requests

from orthanc_server import OrthancError, OrthancServer, gdcm_plugin, orthanc_fixture, require_orthanc

pytestmark = pytest.mark.orthanc

orthanc = orthanc_fixture(plugins=lambda: [gdcm_plugin()], auth=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from clinvla_engine.data.synth.generate import generate_archive

    out = tmp_path_factory.mktemp("synth_dicom")
    generate_archive(out, studies=2, seed=3, fmt="dicom", size=32, lateral_fraction=1.0, progress=False)
    files = sorted(out.rglob("*.dcm"))
    images = [f for f in files if not f.name.endswith("_report.dcm")]
    assert len(images) == 4
    return images


def test_start_answers_with_auth_only(orthanc):
    assert orthanc.running and orthanc.pid
    assert orthanc.get("/system", check=True).json()["DicomAet"] == orthanc.aet
    assert requests.get(orthanc.url + "/system", timeout=5).status_code == 401  # no credentials
    assert requests.get(orthanc.url + "/system", auth=(orthanc.auth[0], "wrong"), timeout=5).status_code == 401
    assert "clinvla-test-" in orthanc.get("/system").json()["Name"]


def test_upload_cstore_restart_keeps_storage(orthanc, archive):
    orthanc.clear()
    first = orthanc.upload(archive[0])
    assert first["Status"] == "Success"
    again = orthanc.upload(archive[0].read_bytes())  # bytes work too
    assert again["Status"] == "AlreadyStored" and again["ID"] == first["ID"]
    assert orthanc.c_store(archive[1:3]) == [0, 0]
    instances = set(orthanc.get("/instances", check=True).json())
    assert len(instances) == 3 and first["ID"] in instances
    # the GDCM plugin is loaded and the stored pixels decode (PNG preview)
    preview = orthanc.get(f"/instances/{first['ID']}/preview", check=True)
    assert preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    change = orthanc.wait_for_change("StableStudy", first["ParentStudy"], timeout=20)
    assert change["ResourceType"] == "Study"

    old_pid = orthanc.pid
    orthanc.restart()
    assert orthanc.pid != old_pid
    assert set(orthanc.get("/instances", check=True).json()) == instances
    log = orthanc.log_text()
    assert "Registering plugin 'gdcm'" in log  # the plugin list reached Orthanc
    assert log.count("Orthanc has started") >= 1 and "Orthanc is stopping" in log


def test_kill_then_start_and_stop(tmp_path):
    require_orthanc()
    server = OrthancServer(tmp_path, auth=None)
    try:
        server.start()
        pid = server.pid
        server.kill()
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        server.start()
        assert server.get("/system").status_code == 200  # no auth configured
        assert server.stop() == 0  # graceful shutdown exits 0
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/system", timeout=2)
    finally:
        server.stop()


def test_start_failure_reports_log_tail(tmp_path):
    require_orthanc()
    server = OrthancServer(tmp_path, extra_config={"StorageCompression": "not-a-bool"})
    try:
        with pytest.raises(OrthancError, match="exited with status"):
            server.start(timeout=20)
        assert not server.running
    finally:
        server.stop()
