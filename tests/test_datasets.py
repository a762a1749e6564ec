"""Dataset loaders (mimic, chexpert, rsna, dicom), format detection and image decoding.

Each format gets a small archive written in its exact layout by tests/fixtures_formats.py; the
loader must return exactly the expected Study records, report bad rows with their line numbers,
and refuse missing or unreadable inputs with a DatasetError that names the path.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import fixtures_formats as fx
from clinvla_engine.data.formats import FORMATS, ArchiveDataset, detect_format, open_dataset
from clinvla_engine.data.io import is_dicom, load_image
from clinvla_engine.data.mimic import parse_report
from clinvla_engine.data.study import DatasetError, Study

pydicom = pytest.importorskip("pydicom")

JPEG_TOL = 4.0 / 255  # quality-95 JPEG of a smooth ramp stays within a few grey levels


def _same_labels(got: dict, want: dict) -> bool:
    def canon(d: dict) -> dict:
        return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    return canon(got) == canon(want)


def _rel(path: Path | None, root: Path) -> str | None:
    return None if path is None else Path(path).relative_to(root).as_posix()


def _check_studies(ds: ArchiveDataset, root: Path, expected: dict[str, dict], source: str) -> None:
    assert [s.study_id for s in ds] == list(expected), "studies (in file order)"
    for study in ds:
        want = expected[study.study_id]
        assert isinstance(study, Study) and study.source == source
        for key in ("subject_id", "report", "split"):
            if key in want:
                assert getattr(study, key) == want[key], (study.study_id, key)
        if "frontal" in want:
            assert _rel(study.frontal, root) == want["frontal"], study.study_id
            assert _rel(study.lateral, root) == want["lateral"], study.study_id
        assert _same_labels(study.labels, want["labels"]), (study.study_id, study.labels)
        for key in ("frontal_view", "lateral_view"):
            if key in want:
                assert study.meta[key] == want[key], (study.study_id, key)
        for key, value in want.get("meta", {}).items():
            assert study.meta[key] == value, (study.study_id, key)


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------
def test_load_image_jpeg_png(tmp_path):
    grey = fx.ramp(24, 20)
    out = load_image(fx.write_jpeg(tmp_path / "a.jpg", grey))
    assert out.dtype == np.float32 and out.shape == (24, 20)
    assert np.abs(out - grey / 255.0).max() <= JPEG_TOL

    rgb = np.stack([grey, grey, grey], axis=-1)  # grey stored as RGB: converted back to grey
    out = load_image(fx.write_jpeg(tmp_path / "rgb.jpg", rgb))
    assert out.shape == (24, 20) and np.abs(out - grey / 255.0).max() <= JPEG_TOL

    deep = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 130)  # 16-bit PNG, lossless
    out = load_image(fx.write_png(tmp_path / "deep.png", deep))
    np.testing.assert_allclose(out, deep / 65535.0, atol=1e-6)
    out = load_image(fx.write_png(tmp_path / "grey.png", grey))
    np.testing.assert_allclose(out, grey / 255.0, atol=1e-6)


def test_load_image_dicom_display_pipeline(tmp_path):
    pixels = fx.ramp(seed=2)
    plain = fx.write_dicom(tmp_path / "plain.dcm", pixels, study_uid="1.2.3")
    np.testing.assert_allclose(load_image(plain), pixels / 255.0, atol=1e-6)

    mono1 = fx.write_dicom(tmp_path / "m1.dcm", pixels, study_uid="1.2.3", photometric="MONOCHROME1")
    np.testing.assert_allclose(load_image(mono1), 1.0 - pixels / 255.0, atol=1e-6)

    # 12 bits stored in 16, rescaled, then windowed: DICOM PS3.3 C.11.2.1.2.1 (LINEAR)
    stored = fx.stored_12bit()
    windowed = fx.write_dicom(tmp_path / "w.dcm", stored, study_uid="1.2.3", bits_stored=12,
                              window=fx.WINDOW, rescale=fx.RESCALE)
    slope, intercept = fx.RESCALE
    center, width = fx.WINDOW
    value = stored * slope + intercept
    want = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    want[value <= center - 0.5 - (width - 1) / 2] = 0.0
    want[value > center - 0.5 + (width - 1) / 2] = 1.0
    got = load_image(windowed)
    assert got.dtype == np.float32 and got.shape == stored.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.min() == 0.0 and got.max() == 1.0 and 0.0 < np.median(got) < 1.0  # the window clips both ends

    # no window: the stored bit range (0 .. 4095) maps to [0, 1], whatever the rescale
    for name, rescale in (("raw.dcm", None), ("rescaled.dcm", fx.RESCALE)):
        path = fx.write_dicom(tmp_path / name, stored, study_uid="1.2.3", bits_stored=12, rescale=rescale)
        np.testing.assert_allclose(load_image(path), stored / 4095.0, atol=1e-6)

    lut = (255 - np.arange(256)).astype(np.uint16)  # an inverting VOI LUT wins over the window
    path = fx.write_dicom(tmp_path / "lut.dcm", pixels, study_uid="1.2.3", voi_lut=lut, window=(10.0, 5.0))
    np.testing.assert_allclose(load_image(path), (255 - pixels) / 255.0, atol=1e-6)


def test_load_image_refuses_multiframe_and_colour(tmp_path):
    frames = np.stack([fx.ramp(), fx.ramp(seed=1)])
    path = fx.write_dicom(tmp_path / "cine.dcm", frames, study_uid="1.2.3")
    with pytest.raises(DatasetError, match=r"cine\.dcm.*multi-frame.*2 frames"):
        load_image(path)
    rgb = np.stack([fx.ramp()] * 3, axis=-1)
    path = fx.write_dicom(tmp_path / "rgb.dcm", rgb, study_uid="1.2.3", photometric="RGB")
    with pytest.raises(DatasetError, match=r"rgb\.dcm.*colour DICOM.*RGB"):
        load_image(path)


def test_load_image_bad_files_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(DatasetError, match="is a folder"):
        load_image(tmp_path)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DatasetError, match=r"junk\.jpg: not a readable image"):
        load_image(junk)
    whole = fx.write_jpeg(tmp_path / "whole.jpg", fx.ramp(64, 64)).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(cut)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 200)
    with pytest.raises(DatasetError, match=r"fake\.dcm: not a DICOM"):
        load_image(fake)
    whole = fx.write_dicom(tmp_path / "whole.dcm", fx.ramp(64, 64), study_uid="1.2.3").read_bytes()
    (tmp_path / "short.dcm").write_bytes(whole[:-1000])
    with pytest.raises(DatasetError, match=r"short\.dcm: .*(truncated|decode)"):
        load_image(tmp_path / "short.dcm")
    bad_window = fx.write_dicom(tmp_path / "win.dcm", fx.ramp(), study_uid="1.2.3", window=(100.0, 0.0))
    with pytest.raises(DatasetError, match=r"win\.dcm: invalid rescale / VOI LUT / window"):
        load_image(bad_window)
    report = fx.write_text_sr(tmp_path / "sr.dcm", study_uid="1.2.3", impression="x")
    with pytest.raises(DatasetError, match=r"sr\.dcm: DICOM file has no pixel data \(Modality SR\)"):
        load_image(report)


def test_is_dicom(tmp_path):
    bare = fx.write_dicom(tmp_path / "1.2.840.5", fx.ramp(), study_uid="1.2.3")
    assert is_dicom(bare)
    assert is_dicom(tmp_path / "not_there.DCM")  # by extension
    assert not is_dicom(fx.write_jpeg(tmp_path / "a.jpg", fx.ramp()))
    assert not is_dicom(tmp_path / "not_there")


# ---------------------------------------------------------------------------------------------
# mimic
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["csv", "csv.gz"])
def test_mimic(tmp_path, gz):
    expected = fx.make_mimic(tmp_path, gz=gz)
    assert detect_format(tmp_path) == "mimic"
    ds = open_dataset(tmp_path)
    assert ds.format == "mimic" and ds.root == tmp_path and len(ds) == 4
    _check_studies(ds, tmp_path, expected, "mimic")
    assert [s.study_id for s in ds.split("train")] == ["50414267", "58000001"]
    assert [s.study_id for s in ds.split("validate")] == ["53189527"]
    assert [s.study_id for s in ds.split("val")] == ["53189527"]
    assert [s.study_id for s in ds.split("test")] == ["57375967"]
    joined = "\n".join(ds.problems)
    assert "study 50771383 (subject 10000898) has no frontal" in joined
    assert "1 of 4 studies have no report file" in joined and "s58000001.txt" in joined
    frontal = load_image(ds[0].frontal)
    assert frontal.shape == (16, 16) and np.abs(frontal - fx.ramp(seed=0) / 255.0).max() <= JPEG_TOL


def test_mimic_reports_root_and_no_reports(tmp_path):
    root, reports = tmp_path / "jpg", tmp_path / "mimic-cxr-reports"
    expected = fx.make_mimic(root, reports_under=reports)
    ds = open_dataset(root, reports_root=reports)
    assert [s.report for s in ds] == [expected[s.study_id]["report"] for s in ds]
    ds = open_dataset(root, reports_root=reports / "files")  # the files/ folder itself also works
    assert ds[0].report == expected["50414267"]["report"]
    ds = open_dataset(root)  # reports not under root: studies kept, one note
    assert all(s.report is None for s in ds)
    assert any("4 of 4 studies have no report file" in p for p in ds.problems)
    ds = open_dataset(root, read_reports=False)
    assert all(s.report is None for s in ds) and not any("report" in p for p in ds.problems)
    with pytest.raises(DatasetError, match="nowhere.*reports_root is not a folder"):
        open_dataset(root, reports_root=tmp_path / "nowhere")


def test_mimic_check_files(tmp_path):
    fx.make_mimic(tmp_path)
    fx.mimic_image(tmp_path, "10000032", "53189527", fx.D["b_pa"]).unlink()
    assert open_dataset(tmp_path)[1].meta["frontal_view"] == "PA"  # not checked unless asked
    ds = open_dataset(tmp_path, check_files=True)
    study = ds[1]
    assert study.study_id == "53189527" and study.meta["frontal_view"] == "AP"  # falls back to AP
    assert study.frontal.name == f"{fx.D['b_ap']}.jpg"
    assert any(p.startswith("mimic-cxr-2.0.0-metadata.csv line 5: image ") and "does not exist" in p
               for p in ds.problems)


def test_mimic_bad_rows_are_reported_and_skipped(tmp_path, caplog):
    fx.make_mimic(tmp_path)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    lines = meta.read_text().splitlines()
    lines.insert(3, ",10000032,50414267,X,PA,1,1,1,1,X,,")  # line 4: blank dicom_id
    lines.insert(5, "abc,1000x032,50414267,X,PA,1,1,1,1,X,,")  # line 6: subject not a number
    lines.insert(7, "short,row")  # line 8: too few fields
    meta.write_text("\n".join(lines) + "\n")
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    rows = labels.read_text().splitlines()
    rows[1] = rows[1].replace("-1.0", "maybe")  # line 2: unparsable label (study 50414267)
    rows[2] = rows[2].replace(",1.0,", ",2.0,", 1)  # line 3: out of range (study 53189527)
    labels.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="clinvla_engine.data"):
        ds = open_dataset(tmp_path)
    assert [s.study_id for s in ds] == ["50414267", "53189527", "57375967", "58000001"]
    assert ds[0].labels == {} and ds[1].labels == {}  # their label rows were skipped
    problems = ds.problems
    assert "mimic-cxr-2.0.0-metadata.csv line 4: blank dicom_id; row skipped" in problems
    assert "mimic-cxr-2.0.0-metadata.csv line 6: subject_id '1000x032' is not a number; row skipped" in problems
    assert "mimic-cxr-2.0.0-metadata.csv line 8: 2 fields where the header has 12; row skipped" in problems
    assert any(p.startswith("mimic-cxr-2.0.0-chexpert.csv line 2: column 'Cardiomegaly'") for p in problems)
    assert any(p.startswith("mimic-cxr-2.0.0-chexpert.csv line 3: column 'No Finding'") for p in problems)
    summary = [r.getMessage() for r in caplog.records if "problems" in r.getMessage()]
    assert len(summary) == 1 and f"{len(problems)} problems" in summary[0] and "line 4" in summary[0]


def test_report_parsing_variants():
    assert parse_report(fx.MIMIC_REPORT_FULL).startswith("FINDINGS: The lungs are clear")
    assert parse_report("FINDINGS:   a\n b\n\nIMPRESSION : c") == "FINDINGS: a b\nIMPRESSION: c"
    assert parse_report(" Findings: a\n\n Impression:\n b\n") == "FINDINGS: a\nIMPRESSION: b"
    assert parse_report(" FINDINGS\n a\n IMPRESSION:\n") == "FINDINGS: a"  # empty impression dropped
    assert parse_report(" WET READ: ___ 4:52 AM\n no ptx\n FINDINGS: clear\n") == "FINDINGS: clear"
    assert parse_report("FINAL REPORT\n ADDENDUM\n heart ok") == "heart ok"
    assert parse_report("   \n FINAL REPORT \n") is None


# ---------------------------------------------------------------------------------------------
# chexpert
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "folder"])
def test_chexpert(tmp_path, where):
    expected = fx.make_chexpert(tmp_path)
    root = tmp_path if where == "parent" else tmp_path / "CheXpert-v1.0-small"
    assert detect_format(root) == "chexpert"
    ds = open_dataset(root)
    assert ds.format == "chexpert" and len(ds) == 3
    _check_studies(ds, tmp_path, expected, "chexpert")
    assert [s.study_id for s in ds.split("validate")] == ["patient64541/study1"]
    assert [s.study_id for s in ds.split("train")] == ["patient00001/study1", "patient00002/study1"]
    assert ds.problems == ["study patient00002/study2 (train) has no frontal image; skipped"]
    image = load_image(ds[1].frontal)
    assert np.abs(image - fx.ramp(seed=2) / 255.0).max() <= JPEG_TOL


def test_chexpert_bad_rows_and_check_files(tmp_path):
    fx.make_chexpert(tmp_path)
    train = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    lines = train.read_text().splitlines()
    lines[3] = lines[3].replace(",87,", ",eighty,")  # line 4: patient00002 view2 (the PA) bad age
    lines.append("CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg,Male,50,Sideways,,")
    train.write_text("\n".join(lines) + "\n")
    ds = open_dataset(tmp_path, "chexpert", check_files=True)
    assert ds[1].study_id == "patient00002/study1" and ds[1].meta["frontal_view"] == "AP"
    assert "train.csv line 4: Age 'eighty' is not a number; row skipped" in ds.problems
    assert "train.csv line 7: 6 fields where the header has 19; row skipped" in ds.problems
    (tmp_path / "CheXpert-v1.0-small" / "valid" / "patient64541" / "study1" / "view1_frontal.jpg").unlink()
    ds = open_dataset(tmp_path, check_files=True)
    assert [s.study_id for s in ds] == ["patient00001/study1", "patient00002/study1"]
    assert any(p.startswith("valid.csv line 2: image ") and "does not exist" in p for p in ds.problems)
    assert "study patient64541/study1 (validate) has no frontal image; skipped" in ds.problems


# ---------------------------------------------------------------------------------------------
# rsna
# ---------------------------------------------------------------------------------------------
def test_rsna(tmp_path):
    expected = fx.make_rsna(tmp_path)
    assert detect_format(tmp_path) == "rsna"
    ds = open_dataset(tmp_path)
    assert ds.format == "rsna" and [s.study_id for s in ds] == list(expected) and ds.problems == []
    for study in ds:
        want = expected[study.study_id]
        assert study.frontal == tmp_path / "stage_2_train_images" / f"{study.study_id}.dcm"
        assert study.lateral is None and study.report is None and study.split is None
        assert study.subject_id == study.study_id and study.source == "rsna"
        assert study.labels == want["labels"] and study.meta == want["meta"]
    assert len(ds.split("train")) == 3  # no split info counts as train
    np.testing.assert_allclose(load_image(ds[1].frontal), fx.ramp(seed=1) / 255.0, atol=1e-6)


def test_rsna_bad_rows(tmp_path):
    fx.make_rsna(tmp_path)
    labels = tmp_path / "stage_2_train_labels.csv"
    text = labels.read_text()
    text += "11111111-2222-3333-4444-555555555555,1.0,2.0,x3,4.0,1\n"  # line 6: bad width
    text += "11111111-2222-3333-4444-555555555556,,,,,yes\n"  # line 7: bad Target
    text += f"{fx.RSNA_IDS[1]},,,,,0\n"  # line 8: Target 0 for a Target 1 patient
    labels.write_text(text)
    ds = open_dataset(tmp_path, check_files=True)
    assert len(ds) == 3
    assert any(p.startswith("stage_2_train_labels.csv line 6: patient 11111111") for p in ds.problems)
    assert "stage_2_train_labels.csv line 7: Target 'yes' is not 0 or 1; row skipped" in ds.problems
    assert any(p.startswith("stage_2_train_labels.csv line 8: patient 00436515") and "line 3" in p
               for p in ds.problems)
    (tmp_path / "stage_2_train_images" / f"{fx.RSNA_IDS[0]}.dcm").unlink()
    ds = open_dataset(tmp_path, check_files=True)
    assert [s.study_id for s in ds] == list(fx.RSNA_IDS[1:])


# ---------------------------------------------------------------------------------------------
# dicom tree
# ---------------------------------------------------------------------------------------------
def test_dicom_tree(tmp_path):
    expected = fx.make_dicom_tree(tmp_path)
    assert detect_format(tmp_path) == "dicom"
    ds = open_dataset(tmp_path)
    assert ds.format == "dicom"
    _check_studies(ds, tmp_path, expected, "dicom")
    assert [s.study_id for s in ds.split("train")] == [fx.UID_C]  # no labels.csv row -> train
    assert {p for p in ds.problems} == {
        f"study {fx.UID_D}: no frontal (PA/AP) image (views LATERAL); skipped",
        f"{tmp_path}: 1 file(s) with modality CT ignored (not chest X-ray images or reports)",
        f"labels.csv line 4: study {fx.UID_UNKNOWN} is not in the DICOM tree; row unused",
    }
    assert ds[1].meta["report_file"] == tmp_path / "PAT002" / "study_b" / "sr_new.dcm"  # the latest SR
    np.testing.assert_allclose(load_image(ds[0].frontal), fx.ramp(seed=1) / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(ds[0].lateral), fx.ramp(seed=2) / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(ds[1].frontal), 1.0 - fx.ramp(seed=3) / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(ds[2].frontal), fx.stored_12bit() / 4095.0, atol=1e-6)


def test_dicom_tree_bad_files(tmp_path):
    fx.make_dicom_tree(tmp_path)
    fx.write_dicom(tmp_path / "PAT001" / "study_a" / "cine.dcm", np.stack([fx.ramp()] * 2),
                   study_uid=fx.UID_A, view_position="PA")
    (tmp_path / "PAT001" / "broken.dcm").write_bytes(b"not dicom")
    ds = open_dataset(tmp_path, labels_csv=tmp_path / "labels.csv")
    assert len(ds) == 3 and ds[0].frontal.name == "frontal.dcm"
    assert any("cine.dcm: multi-frame DICOM (2 frames)" in p for p in ds.problems)
    assert any("broken.dcm: not a DICOM Part 10 file" in p for p in ds.problems)
    with pytest.raises(DatasetError, match=r"nope\.csv: labels_csv not found"):
        open_dataset(tmp_path, labels_csv=tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------
# detection, refusals, the dataset object
# ---------------------------------------------------------------------------------------------
def test_detection_refusals(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    fx.write_jpeg(tmp_path / "img" / "a.jpg", fx.ramp())
    with pytest.raises(DatasetError, match="unknown dataset format") as err:
        detect_format(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "readme.txt" in message
    for looked_for in ("mimic-cxr-*-metadata.csv", "Frontal/Lateral", "stage_2_train_labels.csv", "DICOM"):
        assert looked_for in message
    with pytest.raises(DatasetError, match=r"nothing_here: no such folder"):
        open_dataset(tmp_path / "nothing_here")
    with pytest.raises(DatasetError, match=r"readme\.txt: is a file"):
        open_dataset(tmp_path / "readme.txt")
    with pytest.raises(DatasetError, match="unknown dataset format 'parquet'.*mimic, chexpert, rsna, dicom"):
        open_dataset(tmp_path, "parquet")
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv: required file not found"):
        open_dataset(tmp_path, "rsna")
    with pytest.raises(DatasetError, match="no mimic-cxr-.*-metadata"):
        open_dataset(tmp_path, "mimic")
    with pytest.raises(DatasetError, match="no CheXpert train.csv"):
        open_dataset(tmp_path, "chexpert")
    with pytest.raises(DatasetError, match="no DICOM files"):
        open_dataset(tmp_path, "dicom")
    assert FORMATS == ("mimic", "chexpert", "rsna", "dicom")


def test_wrong_columns_and_empty_datasets(tmp_path):
    fx.make_mimic(tmp_path)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    good = meta.read_text()
    meta.write_text(good.replace("ViewPosition", "View", 1))
    with pytest.raises(DatasetError, match=r"metadata\.csv: missing column\(s\) 'ViewPosition'; found dicom_id"):
        open_dataset(tmp_path)
    lateral_only = [line for line in good.splitlines() if "LATERAL" in line or line.startswith("dicom_id")]
    meta.write_text("\n".join(lateral_only) + "\n")
    with pytest.raises(DatasetError, match="no usable mimic studies found.*has no frontal"):
        open_dataset(tmp_path)
    meta.write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot read a CSV header"):
        open_dataset(tmp_path)

    rsna = tmp_path / "rsna"
    fx.make_rsna(rsna)
    shutil.rmtree(rsna / "stage_2_train_images")
    with pytest.raises(DatasetError, match=r"stage_2_train_images: image folder not found"):
        open_dataset(rsna)


def test_truncated_gzip_csv(tmp_path):
    fx.make_mimic(tmp_path, gz=True)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz"
    data = meta.read_bytes()
    meta.write_bytes(data[: len(data) - 12])  # cut the gzip trailer and some data
    with pytest.raises(DatasetError, match=r"metadata\.csv\.gz: file is truncated or corrupt"):
        open_dataset(tmp_path)


def test_archive_dataset_protocol(tmp_path):
    fx.make_chexpert(tmp_path)
    ds = open_dataset(tmp_path)
    assert len(ds) == 3 and list(ds) == ds.studies
    assert ds[0] is ds.studies[0] and ds[-1].study_id == "patient64541/study1" and len(ds[:2]) == 2
    assert ds.split_names() == ["train", "validate"] and ds.split("test") == []
    assert "studies=3" in repr(ds) and "Study(" not in repr(ds)


def test_options_are_checked_per_format(tmp_path, capsys):
    fx.make_chexpert(tmp_path)
    with pytest.raises(TypeError, match="reports_root do not apply to the chexpert format; it takes check_files"):
        open_dataset(tmp_path, reports_root=tmp_path)
    assert len(open_dataset(tmp_path, progress=True, check_files=True)) == 3  # accepted by every format
