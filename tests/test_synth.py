"""The synthetic archive generator: formats, determinism, 3-D consistency of the views, reports.

Archives here are tiny (12-16 studies at 64-96 px) so that the whole file runs in seconds.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinvla_engine.data import reports, synth
from clinvla_engine.data.study import CHEXPERT_COLUMNS, CLASSES

# Column lists copied from FORMATS.md (not from the generator), so a drift in either shows here.
MIMIC_METADATA = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
                  "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                  "PatientOrientationCodeSequence_CodeMeaning").split(",")
MIMIC_CHEXPERT = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                  "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
                  "Support Devices").split(",")
MIMIC_SPLIT = ["dicom_id", "study_id", "subject_id", "split"]
CHEXPERT = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
            "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
            "Fracture,Support Devices").split(",")
RSNA_LABELS = ["patientId", "x", "y", "width", "height", "Target"]
RSNA_CLASSES = ["patientId", "class"]
TRUTH_KEYS = {"study_id", "subject_id", "split", "has_lateral", "findings"}
FINDING_KEYS = {"label", "side", "zone", "site", "severity", "visible_frontal", "visible_lateral", "lateral_needed",
                "frontal_favoured", "bbox_frontal", "bbox_lateral"}
NEGATION = re.compile(r"\b(no|not|without|normal)\b", re.IGNORECASE)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def truth(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "synth_truth.jsonl").read_text().splitlines()]


def make(tmp_path: Path, fmt: str, name: str | None = None, **kw) -> tuple[Path, dict]:
    root = tmp_path / (name or fmt)
    args = dict(studies=14, seed=7, fmt=fmt, size=64, progress=False)
    args.update(kw)
    return root, synth.generate_archive(root, **args)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> tuple[Path, dict]:
    return make(tmp_path_factory.mktemp("synth"), "mimic", studies=16)


# ---- formats -----------------------------------------------------------------------------------
def test_mimic_layout(mimic):
    root, summary = mimic
    header, meta = read_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    assert header == MIMIC_METADATA
    header, labels = read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    assert header == MIMIC_CHEXPERT
    header, splits = read_csv(root / "mimic-cxr-2.0.0-split.csv")
    assert header == MIMIC_SPLIT
    assert len(labels) == 16 == summary["studies"] and len(meta) == len(splits) == summary["images"]
    for row in meta:
        sid, study = row["subject_id"], row["study_id"]
        assert re.fullmatch(r"1\d{7}", sid) and re.fullmatch(r"5\d{7}", study)
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", row["dicom_id"])
        assert row["ViewPosition"] in ("PA", "AP", "LATERAL") and row["Rows"] == row["Columns"] == "64"
        image = root / f"files/p{sid[:2]}/p{sid}/s{study}/{row['dicom_id']}.jpg"
        assert np.asarray(Image.open(image)).shape == (64, 64)
        report = (root / f"files/p{sid[:2]}/p{sid}/s{study}.txt").read_text()
        assert report.startswith("                                 FINAL REPORT\n EXAMINATION:  CHEST")
        assert "\n FINDINGS: \n \n" in report and "\n IMPRESSION: \n \n" in report
    for row in labels:
        assert all(row[c] in ("", "1.0", "0.0", "-1.0") for c in MIMIC_CHEXPERT[2:])
    split_of: dict[str, set] = {}
    for row in splits:
        assert row["split"] in ("train", "validate", "test")
        split_of.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values()), "a patient's studies must stay in one split"
    records = truth(root)
    assert len(records) == 16 and all(TRUTH_KEYS <= set(r) for r in records)
    assert all(FINDING_KEYS <= set(f) for r in records for f in r["findings"])
    manifest = json.loads((root / "synth_manifest.json").read_text())
    assert {k: manifest[k] for k in ("generator", "seed", "studies", "format", "size")} == {
        "generator": "clinvla synth", "seed": 7, "studies": 16, "format": "mimic", "size": 64}
    assert "version" in manifest and manifest["complete"] is True


def test_chexpert_layout(tmp_path):
    root, _ = make(tmp_path, "chexpert")
    base = root / "CheXpert-v1.0-small"
    header_t, train = read_csv(base / "train.csv")
    header_v, valid = read_csv(base / "valid.csv")
    assert header_t == header_v == CHEXPERT
    for row in train + valid:
        assert row["Path"].startswith("CheXpert-v1.0-small/") and (root / row["Path"]).is_file()
        assert row["Frontal/Lateral"] in ("Frontal", "Lateral") and row["Sex"] in ("Male", "Female")
        assert row["AP/PA"] in (("PA", "AP") if row["Frontal/Lateral"] == "Frontal" else ("",))
    by_split = {r["study_id"]: r["split"] for r in truth(root)}
    valid_studies = {"/".join(r["Path"].split("/")[2:4]) for r in valid}
    assert valid_studies == {s for s, split in by_split.items() if split != "train"}  # test studies sit in valid.csv


def test_dicom_layout_reads_back_and_matches_the_jpegs(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import ExplicitVRLittleEndian

    root, summary = make(tmp_path, "dicom", studies=12)
    header, labels = read_csv(root / "labels.csv")
    assert header == ["study_id", "split", *CHEXPERT_COLUMNS] and len(labels) == 12
    studies: dict[str, dict] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        entry = studies.setdefault(ds.StudyInstanceUID, {"images": {}, "sr": None})
        if ds.Modality == "SR":
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
            names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in ds.ContentSequence]
            assert names == ["Findings", "Impression"]
            entry["sr"] = ds
            continue
        assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored) == (16, 12) and ds.ViewPosition in ("PA", "AP", "LL")
        pixels = ds.pixel_array
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint16 and pixels.max() < 4096
        low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
        entry["images"][ds.ViewPosition] = (pixels - low) / float(ds.WindowWidth)
    assert set(studies) == {r["study_id"] for r in labels} == {r["study_id"] for r in truth(root)}
    assert all(e["sr"] is not None and len(e["images"]) >= 1 for e in studies.values())
    assert sum(len(e["images"]) for e in studies.values()) == summary["images"]

    # same seed in another format: the same studies; the window maps the 12-bit values to the JPEG's
    mimic_root, _ = make(tmp_path, "mimic", studies=12)
    _, meta = read_csv(mimic_root / "mimic-cxr-2.0.0-metadata.csv")
    def jpeg(r: dict) -> np.ndarray:
        sid = r["subject_id"]
        path = mimic_root / f"files/p{sid[:2]}/p{sid}/s{r['study_id']}/{r['dicom_id']}.jpg"
        return np.asarray(Image.open(path), dtype=np.float64) / 255

    frontal_jpegs = [jpeg(r) for r in meta if r["ViewPosition"] in ("PA", "AP")]
    frontal_dicoms = [e["images"].get("PA", e["images"].get("AP")) for e in studies.values()]
    errors = [min(np.abs(d - j).mean() for j in frontal_jpegs) for d in frontal_dicoms]
    assert max(errors) < 0.01, errors


def test_rsna_layout(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    root, summary = make(tmp_path, "rsna", studies=16)
    header, boxes = read_csv(root / "stage_2_train_labels.csv")
    assert header == RSNA_LABELS
    header, classes = read_csv(root / "stage_2_detailed_class_info.csv")
    assert header == RSNA_CLASSES and len(classes) == len(boxes)
    records = {r["study_id"]: r for r in truth(root)}
    assert len(records) == 16 and summary["images"] == 16 and not any(r["has_lateral"] for r in records.values())
    for row, cls in zip(boxes, classes):
        pid = row["patientId"]
        assert cls["patientId"] == pid and re.fullmatch(r"[0-9a-f-]{36}", pid)
        labels = {f["label"] for f in records[pid]["findings"]}
        if row["Target"] == "1":
            assert cls["class"] == "Lung Opacity" and "Pneumonia" in labels
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
        else:
            assert row["x"] == row["width"] == ""
            assert cls["class"] == ("Normal" if not labels else "No Lung Opacity / Not Normal")
        ds = pydicom.dcmread(root / "stage_2_train_images" / f"{pid}.dcm")
        assert ds.PatientID == pid and ds.BitsStored == 8 and ds.ViewPosition in ("PA", "AP")
        assert ds.pixel_array.dtype == np.uint8 and ds.pixel_array.shape == (64, 64)
    assert any(r["Target"] == "1" for r in boxes)


# ---- determinism and folder safety ----------------------------------------------------------------
def test_same_seed_same_archive(tmp_path, mimic):
    root, _ = mimic
    again, _ = make(tmp_path, "mimic", name="again", studies=16)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".jpg":
            assert np.array_equal(np.asarray(Image.open(root / rel)), np.asarray(Image.open(again / rel))), rel
        elif rel.name != "synth_manifest.json":  # the manifest records the time taken
            assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other, _ = make(tmp_path, "mimic", name="other", studies=16, seed=8)
    assert (other / "mimic-cxr-2.0.0-chexpert.csv").read_bytes() != (root / "mimic-cxr-2.0.0-chexpert.csv").read_bytes()


def test_rendering_processes_do_not_change_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.generate, "PARALLEL_MIN_STUDIES", 1)  # the workers import the module afresh
    one, s1 = make(tmp_path, "mimic", name="one", studies=20, workers=1)
    two, s2 = make(tmp_path, "mimic", name="two", studies=20, workers=2)
    assert (s1["workers"], s2["workers"]) == (1, 2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "synth_manifest.json":  # the manifest records the time taken and the workers
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(folder))):
        synth.generate_archive(folder, studies=2, seed=0, size=32, progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_replaces_its_own_archive_but_not_added_files(tmp_path):
    root, _ = make(tmp_path, "mimic", name="arch", studies=6, size=32)
    make(tmp_path, "chexpert", name="arch", studies=3, size=32)  # a previous synthetic archive is replaced
    fresh, _ = make(tmp_path, "chexpert", name="fresh", studies=3, size=32)
    listing = lambda folder: sorted(p.relative_to(folder) for p in folder.rglob("*"))  # noqa: E731
    assert listing(root) == listing(fresh)
    (root / "CheXpert-v1.0-small" / "mine.csv").write_text("x")
    with pytest.raises(FileExistsError, match="mine.csv"):
        make(tmp_path, "chexpert", name="arch", studies=3, size=32)
    assert (root / "CheXpert-v1.0-small" / "mine.csv").read_text() == "x"
    assert (root / "CheXpert-v1.0-small" / "train.csv").is_file()  # nothing was removed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"studies": 0}, r"studies=0.*at least one"),
        ({"fmt": "png"}, r"fmt='png'.*mimic, chexpert, rsna, dicom"),
        ({"size": 16}, r"size=16.*at least 32"),
        ({"lateral_fraction": 1.5}, r"lateral_fraction=1.5"),
        ({"split_fractions": (0.5, 0.6, 0.1)}, r"split_fractions=.*sum"),
        ({"workers": 0}, r"workers must be a whole number >= 1, got 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    args = dict(studies=2, seed=0, size=32, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        synth.generate_archive(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


# ---- the two views are projections of one 3-D body --------------------------------------------------
def _bright_run(profile_before: np.ndarray, profile_after: np.ndarray) -> tuple[int, int]:
    """Pixels above a threshold halfway between lung and mediastinum, along one row, before/after."""
    body = profile_before[profile_before > 0.05]
    threshold = 0.5 * (np.percentile(body, 10) + np.percentile(profile_before, 90))
    return int((profile_before > threshold).sum()), int((profile_after > threshold).sum())


@pytest.mark.parametrize("seed", [0, 3])
def test_cardiomegaly_widens_the_frontal_and_deepens_the_lateral_heart(seed):
    anatomy = synth.sample_anatomy(np.random.default_rng(seed))
    normal = synth.render_study(anatomy, [], size=96, rng=seed, noise=False)
    big = synth.render_study(anatomy, [synth.Finding("Cardiomegaly", severity="severe", detail=seed)], size=96,
                             rng=seed, noise=False)
    for view in ("frontal", "lateral"):
        before, after = getattr(normal, view), getattr(big, view)
        row = int(np.argmax(np.abs(after - before).sum(axis=1)))  # the row the heart changed most
        assert 0.45 * 96 < row < 0.85 * 96, f"{view}: the heart is in the lower middle of the chest"
        width_before, width_after = _bright_run(before[row], after[row])
        assert width_after >= 1.25 * width_before, (view, width_before, width_after)
    f = big.findings[0]
    assert f.visible_frontal and f.visible_lateral and f.bbox_frontal is not None


def test_a_small_effusion_shows_on_the_lateral_not_the_frontal():
    for seed in (1, 4):
        anatomy = synth.sample_anatomy(np.random.default_rng(seed))
        dry = synth.render_study(anatomy, [], size=96, rng=seed, noise=False)
        wet = synth.render_study(anatomy, [synth.Finding("Pleural Effusion", "right", "lower", "small", detail=seed)],
                                 size=96, rng=seed, noise=False)
        frontal, lateral = np.abs(wet.frontal - dry.frontal), np.abs(wet.lateral - dry.lateral)
        assert lateral.max() > 2.5 * frontal.max(), (seed, lateral.max(), frontal.max())
        row, col = np.unravel_index(np.argmax(lateral), lateral.shape)
        assert row > 0.6 * 96 and col > 0.5 * 96, "the fluid lies in the posterior (right) costophrenic sulcus"
        f = wet.findings[0]
        assert (f.visible_frontal, f.visible_lateral, f.bbox_frontal) == (False, True, None)
        x, y, w, h = f.bbox_lateral
        assert x <= col < x + w and y <= row < y + h, "the lateral box holds the fluid"


def test_views_differ_and_the_same_rng_renders_the_same_study():
    anatomy = synth.sample_anatomy(np.random.default_rng(2))
    findings = synth.sample_findings(np.random.default_rng(2), ["Pneumonia"])
    a = synth.render_study(anatomy, findings, size=64, rng=5)
    b = synth.render_study(anatomy, findings, size=64, rng=5)
    assert np.array_equal(a.frontal, b.frontal) and np.array_equal(a.lateral, b.lateral)
    assert a.frontal.dtype == np.float32 and 0.0 <= a.frontal.min() and a.frontal.max() <= 1.0
    assert np.abs(a.frontal - a.lateral).mean() > 0.05
    assert synth.render_study(anatomy, findings, size=64, rng=5, lateral=False).lateral is None


# ---- findings, reports and labels ---------------------------------------------------------------
def test_class_mix_is_stratified():
    plan = synth.planning.plan_studies(400, seed=0, fmt="mimic", lateral_fraction=0.85, fractions=(0.8, 0.1, 0.1))
    singles = [p.labels[0] for p in plan if len(p.labels) == 1]
    counts = [singles.count(c) for c in CLASSES[1:]]
    assert sum(not p.labels for p in plan) == 80 and max(counts) - min(counts) <= 1 and len(singles) == 220
    assert {p.split for p in plan} == {"train", "validate", "test"}
    assert abs(sum(p.has_lateral for p in plan) / 400 - 0.85) < 0.06


def test_labels_follow_the_report_sentences():
    # The value a sentence gives is checked against the sentence's own words (a hedge, a negation)
    # and each label against the findings that were drawn; labels_from_mentions is never the oracle.
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        findings = synth.sample_findings(rng)
        report = reports.write_report(findings, rng)
        for m in report.mentions:
            assert m.text in (report.findings if m.section == "findings" else report.impression)
            hedged = any(cue in m.text.lower() for cue in reports.UNCERTAIN_CUES)
            for column, value in m.values:
                seen.add(value)
                assert report.labels[column] == value, (column, m.text)
                assert hedged == (value == reports.UNCERTAIN), m.text
                assert bool(NEGATION.search(m.text)) == (value == reports.NEGATIVE), m.text
        present = {f.label for f in findings}
        for c in CLASSES[1:]:
            assert (report.labels[c] in (1.0, -1.0)) == (c in present), (c, report.text())
        flagged = any(report.labels[c] in (1.0, -1.0) for c in CLASSES[1:])
        assert report.labels["No Finding"] == 1.0 if not flagged else math.isnan(report.labels["No Finding"])
    assert seen == {1.0, 0.0, -1.0}


# Written by hand from FORMATS.md and the report conventions: a drawn finding is 1.0, or -1.0 when
# its sentences hedge; a finding that was not drawn is never 1.0 or -1.0; "No Finding" is 1.0 only
# for a study with nothing drawn; the observations the generator never draws stay blank or 0.0.
NEVER_DRAWN = ("Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other", "Support Devices")


@pytest.mark.parametrize("planted, noun", [
    (synth.Finding("Pneumothorax", "left", "upper", "large", detail=3), "pneumothorax"),
    (synth.Finding("Cardiomegaly", None, None, "severe", detail=4), "cardiomegaly|cardiac|heart"),
    (synth.Finding("Pleural Effusion", "right", "lower", "large", detail=5), "effusion"),
])
def test_a_planted_finding_gets_its_label(planted, noun):
    anatomy = synth.sample_anatomy(np.random.default_rng(11))
    rendered = synth.render_study(anatomy, [planted], size=64, rng=11)
    assert rendered.findings[0].visible_frontal, "a large/severe finding shows on the frontal view"
    hedges = 0
    for seed in range(40):
        report = reports.write_report(rendered.findings, np.random.default_rng(seed))
        text = report.text().lower()
        sentences = [x for x in re.split(r"(?<=\.)\s+|\n", text) if re.search(noun, x)]
        assert sentences and not any(NEGATION.search(x) for x in sentences), text
        hedged = any(cue in x for x in sentences for cue in reports.UNCERTAIN_CUES)
        hedges += hedged
        expected = {c: (-1.0 if hedged else 1.0) if c == planted.label else "blank or 0.0" for c in CHEXPERT_COLUMNS}
        expected["No Finding"] = "blank"
        for column, want in expected.items():
            got = report.labels[column]
            if want == "blank":
                assert math.isnan(got), (column, got, text)
            elif want == "blank or 0.0":
                assert math.isnan(got) or got == 0.0, (column, got, text)
            else:
                assert got == want, (column, got, text)
    assert hedges < 40, "a large or severe finding is mostly described without a hedge"


def test_label_file_marks_exactly_the_drawn_findings(mimic):
    root, _ = mimic
    _, rows = read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    drawn = {r["study_id"]: {f["label"] for f in r["findings"]} for r in truth(root)}
    assert sorted(drawn) == sorted(r["study_id"] for r in rows)
    assert any(drawn.values()) and not all(drawn.values()), "the archive has normal and abnormal studies"
    for row in rows:
        present = drawn[row["study_id"]]
        sid = row["subject_id"]
        text = (root / f"files/p{sid[:2]}/p{sid}/s{row['study_id']}.txt").read_text().lower()
        for c in CLASSES[1:]:
            assert (row[c] in ("1.0", "-1.0")) == (c in present), (row["study_id"], c, row[c], present)
            if row[c] == "-1.0":
                assert any(cue in text for cue in reports.UNCERTAIN_CUES), (c, text)
        assert row["No Finding"] == ("" if present else "1.0"), (row["study_id"], present)
        assert all(row[c] in ("", "0.0") for c in NEVER_DRAWN), row


def test_label_files_follow_the_report_files(mimic):
    root, _ = mimic
    _, labels = read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    nouns = {"Pneumothorax": "pneumothorax", "Pleural Effusion": "effusion", "Consolidation": "consolidation",
             "Cardiomegaly": "heart", "Edema": "edema", "Fracture": "fracture"}
    checked = 0
    for row in labels:
        sid = row["subject_id"]
        text = " ".join((root / f"files/p{sid[:2]}/p{sid}/s{row['study_id']}.txt").read_text().split())
        sentences = re.split(r"(?<=\.) ", text.split("FINDINGS:")[1])
        for column, noun in nouns.items():
            about = [s for s in sentences if noun in s.lower() or column.lower() in s.lower()]
            if row[column] == "0.0":
                assert about and all(NEGATION.search(s) for s in about), (column, text)
                checked += 1
            elif row[column] == "":
                assert not any(column.lower() in s.lower() for s in about), (column, text)
    assert checked > 0


def test_sample_findings_draws_what_is_asked():
    rng = np.random.default_rng(1)
    assert synth.sample_findings(rng, ["No Finding"]) == []
    f = synth.sample_findings(rng, ["Fracture", "Pneumothorax"])
    assert [x.label for x in f] == ["Pneumothorax", "Fracture"] and f[1].rib is not None
    without_lateral = [x for _ in range(40) for x in synth.sample_findings(rng, ["Pleural Effusion"], lateral=False)]
    assert all(x.severity != "small" for x in without_lateral)
    with pytest.raises(ValueError, match="Pneumonitis"):
        synth.sample_findings(rng, ["Pneumonitis"])


# ---- findings a reader needs the lateral for; frontal-favoured ones ----------------------------------
@pytest.mark.parametrize("size", [128, 64])
@pytest.mark.parametrize("label, side, severity, site", [
    ("Pleural Effusion", "left", "small", "posterior sulcus"),
    ("Consolidation", "left", "moderate", "retrocardiac"),
    ("Atelectasis", "left", "mild", "retrocardiac"),
    ("Consolidation", "right", "small", "posterior basal"),
    ("Atelectasis", "right", "moderate", "posterior basal"),
    ("Consolidation", "right", "moderate", "retrosternal"),
])
def test_lateral_sites_show_on_the_lateral_only(size, label, side, severity, site):
    # measured with noise off: the lateral change is large and the frontal one below the visibility
    # threshold, for several patients; the lateral box holds the largest change
    for seed in (21, 22, 23):
        anatomy = synth.sample_anatomy(np.random.default_rng(seed))
        f = synth.Finding(label, side, "lower", severity, detail=seed, site=site)
        dry = synth.render_study(anatomy, [], size=size, rng=seed, noise=False)
        wet = synth.render_study(anatomy, [f], size=size, rng=seed, noise=False)
        frontal, lateral = np.abs(wet.frontal - dry.frontal), np.abs(wet.lateral - dry.lateral)
        assert lateral.max() > 1.5 * frontal.max() and lateral.max() > 0.1, (seed, lateral.max(), frontal.max())
        assert frontal.max() < synth.VISIBILITY["default"][0], (seed, frontal.max())
        got = wet.findings[0]
        assert got.lateral_needed and got.bbox_frontal is None, got
        row, col = np.unravel_index(np.argmax(lateral), lateral.shape)
        x, y, w, h = got.bbox_lateral
        assert x <= col < x + w and y <= row < y + h
        assert got.truth()["lateral_needed"] is True and got.truth()["bbox_lateral"] == list(got.bbox_lateral)


def test_the_same_opacity_elsewhere_is_not_lateral_needed():
    anatomy = synth.sample_anatomy(np.random.default_rng(5))
    f = synth.Finding("Consolidation", "right", "lower", "moderate", detail=5)
    got = synth.render_study(anatomy, [f], size=128, rng=5, noise=False).findings[0]
    assert got.visible_frontal and not got.lateral_needed and got.bbox_frontal is not None


def test_fracture_and_small_pneumothorax_are_frontal_favoured():
    anatomy = synth.sample_anatomy(np.random.default_rng(8))
    found = synth.render_study(anatomy, [synth.Finding("Pneumothorax", "right", "upper", "small", detail=8, site="apical"),
                                         synth.Finding("Fracture", "left", "middle", "severe", rib=7, detail=8,
                                                       site="posterior")], size=128, rng=8).findings
    assert [f.frontal_favoured for f in found] == [True, True]
    assert all(f.bbox_lateral is None and f.bbox_frontal is not None for f in found)


def test_lateral_needed_share_and_no_sites_without_a_lateral():
    plan = synth.planning.plan_studies(3000, seed=3, fmt="mimic", lateral_fraction=0.85, fractions=(0.8, 0.1, 0.1))
    with_site = positive = 0
    for p in plan:
        found = synth.sample_findings(np.random.default_rng([3, 2, p.index]), list(p.labels), lateral=p.has_lateral)
        sited = any(f.site in synth.records.LATERAL_SITES for f in found)
        if not p.has_lateral:
            assert not sited and all(f.severity != "small" or f.label != "Pleural Effusion" for f in found)
        elif found:
            positive += 1
            with_site += sited
    assert 0.25 <= with_site / positive <= 0.38, with_site / positive


def test_probe_mix_and_forced_sites():
    plan = synth.planning.plan_studies(200, seed=4, fmt="mimic", lateral_fraction=1.0, fractions=(0.8, 0.1, 0.1),
                                       mix="probe")
    labels = [p.labels for p in plan]
    assert sum(not lb for lb in labels) == 60 and all(len(lb) <= 1 for lb in labels) and all(p.lateral_site for p in plan)
    assert sum(lb[:1] in (("Consolidation",), ("Atelectasis",), ("Pleural Effusion",)) for lb in labels) == 80
    assert sum(lb[:1] in (("Fracture",), ("Pneumothorax",)) for lb in labels) == 40
    default = synth.planning.plan_studies(200, seed=4, fmt="mimic", lateral_fraction=1.0, fractions=(0.8, 0.1, 0.1))
    assert [p.split for p in default] == [p.split for p in plan] and not any(p.lateral_site for p in default)
    for k in range(30):
        asked = ["Consolidation", "Atelectasis", "Pleural Effusion", "Fracture"]
        free = synth.sample_findings(np.random.default_rng([k]), asked)
        forced = synth.sample_findings(np.random.default_rng([k]), asked, lateral_site=True)
        assert all(f.site in synth.records.LATERAL_SITES for f in forced[:3] if f.label != "Fracture"), forced
        assert [f.label for f in free] == [f.label for f in forced]
        assert all(f.severity == "small" for f in forced if f.label == "Pleural Effusion")
        assert not any(f.site in synth.records.LATERAL_SITES
                       for f in synth.sample_findings(np.random.default_rng([k]), asked, lateral=False, lateral_site=True))
    with pytest.raises(ValueError, match="mix='odd'"):
        synth.generate_archive("/nonexistent/x", 2, seed=0, size=32, mix="odd", progress=False)


def test_archive_truth_records_lateral_needed_and_boxes(mimic):
    root, _ = mimic
    manifest = json.loads((root / "synth_manifest.json").read_text())
    assert manifest["version"] == synth.SYNTH_VERSION == "2.1"
    for r in truth(root):
        for f in r["findings"]:
            sited = f["site"] in synth.records.LATERAL_SITES
            assert f["lateral_needed"] == (sited and f["visible_lateral"] and not f["visible_frontal"]), f
            assert (f["bbox_lateral"] is not None) == f["visible_lateral"], f
            assert (f["bbox_frontal"] is not None) == f["visible_frontal"], f
            for box in (f["bbox_frontal"], f["bbox_lateral"]):
                if box:
                    x, y, w, h = box
                    assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            if not r["has_lateral"]:
                assert not sited and not f["lateral_needed"] and f["bbox_lateral"] is None


# ---- report words follow the truth; negation and length ----------------------------------------
SIZE_WORDS = {"small": ("small", "trace", "tiny"), "moderate": ("moderate", "moderately"),
              "large": ("large", "sizable"), "mild": ("mild", "mildly"), "severe": ("severe", "severely")}
SITE_WORDS = {"retrocardiac": "retrocardiac", "posterior basal": "posterior basal", "retrosternal": "retrosternal",
              "posterior sulcus": "posterior", "apical": "apical", "posterior": "posterior"}
ZONE_WORDS = {"upper": ("upper", "apex"), "middle": ("middle", "mid", "lingula"), "lower": ("lower", "base", "basilar")}


def _reports(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        lateral = rng.random() < 0.85
        findings = synth.sample_findings(rng, lateral=lateral)
        yield findings, reports.write_report(findings, rng, has_lateral=lateral)


def test_positive_sentences_carry_side_zone_site_and_size_words():
    checked = 0
    for findings, report in _reports(400):
        for f in findings:
            sentences = [m.text.lower() for m in report.mentions if (f.label, reports.POSITIVE) in m.values]
            for text in sentences:
                words = set(re.findall(r"[a-z]+", text))
                if f.side in ("left", "right"):
                    assert f.side in words and {"left", "right"} - {f.side} - words, (f, text)
                elif f.side == "bilateral" and f.label != "Edema":  # edema is bilateral by nature
                    assert words & {"bilateral", "bibasilar", "both", "multifocal"}, (f, text)
                if f.label == "Fracture":
                    assert re.search(rf"\b{f.rib}(st|nd|rd|th) posterior rib\b", text), (f, text)
                    kind = {"mild": "nondisplaced", "moderate": "minimally displaced", "severe": "displaced"}
                    assert kind[f.severity] in text and (f.severity == "mild") == ("nondisplaced" in text), (f, text)
                else:
                    assert words & set(SIZE_WORDS[f.severity]), (f, text)
                if f.site in SITE_WORDS:
                    assert SITE_WORDS[f.site] in text, (f, text)
                elif f.zone and f.label in ("Consolidation", "Pneumonia") and f.side != "bilateral":
                    assert words & set(ZONE_WORDS[f.zone]), (f, text)
                checked += 1
    assert checked > 500


def test_negation_is_a_minority_and_hedges_remain():
    words = {"Atelectasis": "atelectasis", "Consolidation": "consolidation", "Edema": "edema",
             "Pleural Effusion": "effusion", "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax",
             "Fracture": "fracture"}
    named = negated = hedged = n = 0
    for _, report in _reports(600, seed=1):
        n += 1
        text = report.text().lower()
        hedged += any(v == reports.UNCERTAIN for v in report.labels.values())
        for column, word in words.items():
            if word in text:
                named += 1
                negated += report.labels[column] == reports.NEGATIVE
    assert 0.25 <= negated / named <= 0.40, negated / named
    assert 0.04 <= hedged / n <= 0.2, hedged / n


def test_reports_fit_the_token_limit():
    from clinvla_engine.data.dataset import report_text
    from clinvla_engine.model.text import Tokenizer

    vocab = (Path(synth.__file__).parents[2] / "assets" / "minilm_vocab.txt").read_text()
    tokenizer = Tokenizer(vocab, True, 512)
    lengths = np.array([len(tokenizer._tok.encode(report_text(r.text())).ids) for _, r in _reports(500, seed=2)])
    assert (lengths <= 96).mean() >= 0.99, np.percentile(lengths, (50, 90, 99, 100))
