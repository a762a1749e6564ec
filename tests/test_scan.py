"""scan_dicom_tree: header-only manifest, incremental rescans, errors as rows, no PHI; and phi.py."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from clinvla_engine.data.study import DatasetError  # noqa: E402
from clinvla_engine.pipeline.phi import SaltError, hash_identifier, load_salt, salt_fingerprint  # noqa: E402
from clinvla_engine.pipeline import scan as scan_module  # noqa: E402
from clinvla_engine.pipeline.scan import MANIFEST_SCHEMA, manifest_info, scan_dicom_tree  # noqa: E402

SALT = b"0123456789abcdef0123456789abcdef"
NAME, BIRTH = "DOE^JANE", "19450317"


def write_image(path: Path, *, study: str, patient: str = "MRN-0042", accession: str = "ACC-77",
                modality: str = "DX", view: str | None = "PA", code: tuple[str, str] | None = None,
                orientation: list[str] | None = None, instance: int = 1, shape=(16, 12)) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.AccessionNumber = patient, accession
    ds.PatientName, ds.PatientBirthDate = NAME, BIRTH  # PHI that must never reach the manifest
    ds.StudyDescription = "CHEST 2 VIEWS free text"
    ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    if code is not None:
        item = Dataset()
        item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = code[0], code[1], "view"
        ds.ViewCodeSequence = Sequence([item])
    if orientation is not None:
        ds.PatientOrientation = orientation
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(shape[0] * shape[1], dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    s1, s2 = generate_uid(), generate_uid()
    write_image(root / "p1" / "s1" / "pa.dcm", study=s1, view="PA")
    write_image(root / "p1" / "s1" / "lat.dcm", study=s1, view="", code=("SCT", "399067008"), instance=2)
    write_image(root / "p2" / "s2" / "deep" / "er" / "IM0001", study=s2, view=None, orientation=["R", "F"],
                patient="MRN-0099", accession="")  # no suffix: found by its DICM marker
    write_image(root / "p2" / "s2" / "ct.dcm", study=s2, modality="CT")
    (root / "p2" / "s2" / "empty.dcm").write_bytes(b"")
    (root / "p2" / "README").write_text("exported by PACS\n")  # no suffix, not DICOM: an error row
    (root / "p2" / "notes.txt").write_text("skipped by suffix\n")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "x.dcm", study=s2)
    good = (root / "p1" / "s1" / "pa.dcm").read_bytes()
    (root / "p2" / "cut.dcm").write_bytes(good[:300])  # cut inside the header
    return root


def rows_by_path(table) -> dict[str, dict]:
    return {row["path"]: row for row in table.to_pylist()}


def test_scan_rows_errors_and_no_phi(tree, tmp_path):
    manifest = tmp_path / "store" / "manifest.parquet"
    table = scan_dicom_tree(tree, manifest, workers=2, salt=SALT)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    rows = rows_by_path(table)
    assert sorted(rows) == ["p1/s1/lat.dcm", "p1/s1/pa.dcm", "p2/README", "p2/cut.dcm", "p2/s2/ct.dcm",
                            "p2/s2/deep/er/IM0001", "p2/s2/empty.dcm"]
    pa_row, lat, deep = rows["p1/s1/pa.dcm"], rows["p1/s1/lat.dcm"], rows["p2/s2/deep/er/IM0001"]
    assert (pa_row["view"], pa_row["view_rule"], pa_row["view_label"]) == ("frontal", "view_position", "PA")
    assert (lat["view"], lat["view_rule"], lat["view_code"]) == ("lateral", "view_code", "SCT:399067008")
    assert (deep["view"], deep["view_rule"], deep["patient_orientation"]) == ("frontal", "patient_orientation", "R\\F")
    assert pa_row["error"] is None and (pa_row["rows"], pa_row["columns"], pa_row["bits_allocated"]) == (16, 12, 16)
    assert pa_row["transfer_syntax"] == str(ExplicitVRLittleEndian) and pa_row["instance_number"] == 1
    assert pa_row["file_size"] == (tree / "p1/s1/pa.dcm").stat().st_size
    assert "Modality CT" in rows["p2/s2/ct.dcm"]["error"]
    assert "empty" in rows["p2/s2/empty.dcm"]["error"]
    assert "not a DICOM" in rows["p2/README"]["error"]
    assert rows["p2/cut.dcm"]["error"]  # cut inside the header: unreadable or missing attributes
    # identifiers only as salted hashes; no names, birth dates or free text anywhere in the file
    assert pa_row["patient_id_hash"] == hash_identifier("MRN-0042", SALT) != "MRN-0042"
    assert pa_row["accession_number_hash"] == hash_identifier("ACC-77", SALT)
    assert deep["accession_number_hash"] is None and deep["patient_id_hash"] != pa_row["patient_id_hash"]
    blob = manifest.read_bytes()
    for secret in (b"MRN-0042", b"ACC-77", NAME.encode(), BIRTH.encode(), b"free text", SALT):
        assert secret not in blob
    assert [p.name for p in manifest.parent.iterdir()] == ["manifest.parquet"]  # no temporary left behind
    info = manifest_info(pq.read_table(manifest))
    assert info["stats"]["read"] == 7 and info["stats"]["reused"] == 0
    assert info["salt_fingerprint"] == salt_fingerprint(SALT)


def test_rescan_reads_only_new_and_changed_files_and_drops_deleted(tree, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    first = scan_dicom_tree(tree, manifest, workers=1, salt=SALT)
    again = scan_dicom_tree(tree, manifest, workers=1, salt=SALT)  # previous defaults to the manifest
    assert manifest_info(again)["stats"] | {"seconds": 0, "files_per_s": 0} == {
        "files": 7, "read": 0, "reused": 7, "dropped": 0, "errors": 4, "workers": 1, "seconds": 0, "files_per_s": 0,
        "read_cpu_s": 0}  # nothing read, so no CPU spent reading
    assert again.replace_schema_metadata(None).equals(first.replace_schema_metadata(None))

    study = first.to_pylist()[0]["study_instance_uid"] or generate_uid()
    write_image(tree / "p3" / "new.dcm", study=study, view="AP")  # added
    changed = tree / "p1" / "s1" / "lat.dcm"
    write_image(changed, study=study, view="LL", shape=(20, 12))  # rewritten: size changes
    touched = tree / "p1" / "s1" / "pa.dcm"
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 10_000_000))  # same size, new mtime
    (tree / "p2" / "s2" / "ct.dcm").unlink()  # deleted
    third = scan_dicom_tree(tree, manifest, workers=1, salt=SALT, previous=manifest)
    stats = manifest_info(third)["stats"]
    assert (stats["files"], stats["read"], stats["reused"], stats["dropped"]) == (7, 3, 4, 1)
    rows = rows_by_path(third)
    assert "p2/s2/ct.dcm" not in rows and rows["p3/new.dcm"]["view_label"] == "AP"
    assert (rows["p1/s1/lat.dcm"]["view_label"], rows["p1/s1/lat.dcm"]["rows"]) == ("LL", 20)
    assert rows["p1/s1/pa.dcm"]["mtime_ns"] == touched.stat().st_mtime_ns

    other_salt = scan_dicom_tree(tree, manifest, workers=1, salt=b"another salt of 16+ bytes")
    assert manifest_info(other_salt)["stats"]["read"] == 7  # hashes from another salt are never mixed

    manifest.write_bytes(b"PAR1 not really parquet")  # a damaged manifest costs a rescan, not the run
    with pytest.warns(UserWarning, match="unreadable"):
        repaired = scan_dicom_tree(tree, manifest, workers=1, salt=SALT)
    assert manifest_info(repaired)["stats"]["read"] == 7 and pq.read_table(manifest).num_rows == 7


def test_parallel_scan_matches_serial_and_reports_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_module, "PARALLEL_MIN_FILES", 100)  # use the pool on a small tree
    root = tmp_path / "many"
    studies = [generate_uid() for _ in range(100)]
    for i, study in enumerate(studies):
        write_image(root / f"{i % 7}" / f"{i}_pa.dcm", study=study, view="PA")
        write_image(root / f"{i % 7}" / f"{i}_lat.dcm", study=study, view="LATERAL", instance=2)
    serial = scan_dicom_tree(root, tmp_path / "serial.parquet", workers=1, salt=SALT)
    start = time.perf_counter()
    parallel = scan_dicom_tree(root, tmp_path / "parallel.parquet", workers=2, salt=SALT)
    elapsed = time.perf_counter() - start
    assert parallel.num_rows == 200 and parallel.replace_schema_metadata(None).equals(serial.replace_schema_metadata(None))
    s, p = manifest_info(serial)["stats"], manifest_info(parallel)["stats"]
    assert (s["workers"], p["workers"]) == (1, 2)  # the pool really ran
    assert s["read_cpu_s"] > 0 and p["read_cpu_s"] > 0  # the workers' CPU time comes back with their rows
    print(f"\nheader scan of 200 files: serial {s['files_per_s']} files/s, "
          f"2 workers {p['files_per_s']} files/s ({elapsed:.2f} s with pool start-up)")


def test_scan_refuses_a_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_dicom_tree(tmp_path / "nope", tmp_path / "m.parquet")


def test_salt_file_created_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "salt"
    salt = load_salt(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(salt) == 64
    assert load_salt(path) == salt  # the same salt on every later run
    assert hash_identifier(" MRN-1 ", salt) == hash_identifier("MRN-1", salt) != hash_identifier("MRN-1", SALT)
    assert len(hash_identifier("MRN-1", salt)) == 32 and hash_identifier("  ", salt) is None
    assert hash_identifier(None, salt) is None


def test_salt_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(SaltError, match="not found"):
        load_salt(tmp_path / "absent", create=False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(SaltError, match="fewer than 16"):
        load_salt(short)
    with pytest.raises(SaltError, match="is a folder"):
        load_salt(tmp_path)
    loose = tmp_path / "loose"
    loose.write_text("x" * 40)
    loose.chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        load_salt(loose)
    if os.geteuid() != 0:  # root reads any file, so an unreadable salt cannot be staged as root
        locked = tmp_path / "locked"
        locked.write_text("y" * 40)
        locked.chmod(0)
        with pytest.raises(SaltError, match="cannot read"):
            load_salt(locked)
    with pytest.raises(SaltError):
        hash_identifier("MRN-1", b"short")
