"""The four format writers (mimic, chexpert, dicom, rsna) and the file claims they write through.

Each writer takes the studies in plan order (`study`) and writes its CSVs at the end (`finish`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import reports
from ..dicom import BASIC_TEXT_SR
from ..study import CHEXPERT_COLUMNS
from .planning import Planned, dicom_uid
from .records import FOV_CM, Anatomy, RenderedStudy
from .render import to_uint8

FILE_LIST = "synth_files.txt"  # every file the generator wrote, so that a re-run never touches others
# SOP classes of the images; the loaders never test for them (they go by Modality), so they live here
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


class ArchiveFiles:
    """Claims every path in FILE_LIST before writing it (a crash leaves no unlisted file)."""

    def __init__(self, root: Path, seed: int, size: int):
        self.root, self.seed, self.size = root, seed, size
        # line-buffered: each claim reaches the file before the claimed file is written, so a run
        # killed mid-write leaves no file the listing misses (a re-run would refuse it as foreign)
        self.listing = open(root / FILE_LIST, "a", encoding="utf-8", buffering=1)
        self.images = 0

    def claim(self, rel: str) -> Path:
        self.listing.write(rel + "\n")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def jpeg(self, rel: str, image: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(to_uint8(image)).save(self.claim(rel), format="JPEG", quality=95)
        self.images += 1

    def csv(self, rel: str, header: Sequence[str], rows: list[list]) -> None:
        with open(self.claim(rel), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    def close(self) -> None:
        self.listing.close()


def _labels_row(labels: dict, columns: Sequence[str]) -> list[str]:
    return [reports.format_label(labels[c]) for c in columns]


_EXAM = {("PA", True): "CHEST (PA AND LAT)", ("PA", False): "CHEST (SINGLE VIEW)",
         ("AP", True): "CHEST (AP AND LAT)", ("AP", False): "CHEST (PORTABLE AP)"}


class _MimicWriter:
    META = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
            "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning")

    def __init__(self, archive: ArchiveFiles):
        self.a, self.meta, self.labels, self.splits = archive, [], [], []

    def study(self, p: Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        sid, study = p.ids["subject_id"], p.ids["study_id"]
        folder = f"files/p{sid[:2]}/p{sid}"
        exam = _EXAM[(p.view_position, r.lateral is not None)]
        views = [(p.ids["dicom_ids"][0], r.frontal, p.view_position,
                  "postero-anterior" if p.view_position == "PA" else "antero-posterior")]
        if r.lateral is not None:
            views.append((p.ids["dicom_ids"][1], r.lateral, "LATERAL", "lateral"))
        for dicom_id, image, position, meaning in views:
            self.a.jpeg(f"{folder}/s{study}/{dicom_id}.jpg", image)
            self.meta.append([dicom_id, sid, study, exam, position, self.a.size, self.a.size, p.date, p.time, exam,
                              meaning, "Recumbent" if p.view_position == "AP" else "Erect"])
            self.splits.append([dicom_id, study, sid, p.split])
        text = reports.mimic_report_text(report, rng, examination=exam, sex=anatomy.sex)
        self.a.claim(f"{folder}/s{study}.txt").write_text(text, encoding="utf-8")
        self.labels.append([sid, study] + _labels_row(report.labels, reports.MIMIC_LABEL_COLUMNS))

    def finish(self) -> None:
        self.a.csv("mimic-cxr-2.0.0-metadata.csv", self.META, self.meta)
        self.a.csv("mimic-cxr-2.0.0-chexpert.csv", ("subject_id", "study_id") + reports.MIMIC_LABEL_COLUMNS,
                   self.labels)
        self.a.csv("mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"), self.splits)


class _ChexpertWriter:
    HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_COLUMNS
    ROOT = "CheXpert-v1.0-small"

    def __init__(self, archive: ArchiveFiles):
        self.a, self.rows = archive, {"train": [], "valid": []}

    def study(self, p: Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        part = "train" if p.split == "train" else "valid"  # test studies go to valid.csv; the truth file has the split
        folder = f"{self.ROOT}/{part}/{p.ids['patient']}/study{p.ids['study_number']}"
        labels = _labels_row(report.labels, CHEXPERT_COLUMNS)
        views = [("view1_frontal.jpg", r.frontal, "Frontal", p.view_position)]
        if r.lateral is not None:
            views.append(("view2_lateral.jpg", r.lateral, "Lateral", ""))
        for name, image, kind, ap_pa in views:
            self.a.jpeg(f"{folder}/{name}", image)
            self.rows[part].append([f"{folder}/{name}", anatomy.sex, anatomy.age, kind, ap_pa] + labels)

    def finish(self) -> None:
        for part, rows in self.rows.items():
            self.a.csv(f"{self.ROOT}/{part}.csv", self.HEADER, rows)


def _dicom_file(sop_class: str, sop_uid: str, implementation_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = implementation_uid
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def _save_dicom(ds, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


_VIEW_CODES = {"PA": ("R-10214", "postero-anterior"), "AP": ("R-10206", "antero-posterior"),
               "LL": ("R-10236", "left lateral")}


class _DicomWriter:
    """A PACS-like export: DX images (12 bits in 16) and a Basic Text SR per study, plus labels.csv."""

    def __init__(self, archive: ArchiveFiles, eight_bit: bool = False):
        self.a, self.eight_bit, self.labels, self.boxes = archive, eight_bit, [], []
        self.implementation = dicom_uid(archive.seed, "implementation")

    def _patient(self, ds, p: Planned, anatomy: Anatomy, patient_id: str, study_uid: str) -> None:
        ds.PatientID, ds.PatientName = patient_id, f"SYNTH^{patient_id[:8]}"
        ds.PatientSex, ds.PatientAge, ds.PatientBirthDate = anatomy.sex[0], f"{anatomy.age:03d}Y", ""
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, p.date, p.time
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = p.ids["accession"], str(p.index + 1), ""
        ds.StudyDescription = _EXAM[(p.view_position, p.has_lateral)]
        ds.Manufacturer = "ClinVLA synthetic (not clinical data)"

    def image(self, rel: str, image: np.ndarray, p: Planned, anatomy: Anatomy, view: str, number: int,
              rng: np.random.Generator, patient_id: str, study_uid: str) -> None:
        seed, key = self.a.seed, p.ids["study_id"]
        ds = _dicom_file(_CR_IMAGE if self.eight_bit else _DX_FOR_PRESENTATION, dicom_uid(seed, key, view, "sop"),
                         self.implementation)
        self._patient(ds, p, anatomy, patient_id, study_uid)
        ds.Modality = "CR" if self.eight_bit else "DX"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = dicom_uid(seed, key, view, "series"), number, 1
        ds.SeriesDescription, ds.BodyPartExamined = f"CHEST {view}", "CHEST"
        ds.ViewPosition = view
        ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]
        code, meaning = _VIEW_CODES[view]
        ds.ViewCodeSequence = [_code(code, "SRT", meaning)]
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = self.a.size
        spacing = f"{FOV_CM * 10 / self.a.size:.4f}"
        ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
        if self.eight_bit:
            pixels = to_uint8(image)
            ds.BitsAllocated = ds.BitsStored = 8
        else:  # 12 bits stored; the window maps them back to the display values
            offset, span = int(rng.integers(150, 700)), int(rng.integers(2600, 3300))
            pixels = np.round(offset + np.clip(image, 0, 1) * span).astype(np.uint16)
            ds.BitsAllocated, ds.BitsStored = 16, 12
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.WindowCenter, ds.WindowWidth = f"{offset + span / 2:.1f}", str(span)
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = pixels.tobytes()
        _save_dicom(ds, self.a.claim(rel))
        self.a.images += 1

    def report(self, rel: str, report: reports.Report, p: Planned, anatomy: Anatomy, study_uid: str) -> None:
        from pydicom.dataset import Dataset

        seed, key = self.a.seed, p.ids["study_id"]
        ds = _dicom_file(BASIC_TEXT_SR, dicom_uid(seed, key, "sr", "sop"), self.implementation)
        self._patient(ds, p, anatomy, p.ids["subject_id"], study_uid)
        ds.Modality, ds.SeriesInstanceUID = "SR", dicom_uid(seed, key, "sr", "series")
        ds.SeriesNumber, ds.InstanceNumber = 99, 1
        ds.ContentDate, ds.ContentTime = p.date, p.time
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
        ds.ReferencedPerformedProcedureStepSequence, ds.PerformedProcedureCodeSequence = [], []
        items = []
        sections = ((report.findings, "121070", "Findings"), (report.impression, "121073", "Impression"))
        for text, code, meaning in sections:
            item = Dataset()
            item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
            item.ConceptNameCodeSequence = [_code(code, "DCM", meaning)]
            items.append(item)
        ds.ContentSequence = items
        _save_dicom(ds, self.a.claim(rel))

    def study(self, p: Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        sid, study_uid = p.ids["subject_id"], p.ids["study_id"]
        folder = f"p{sid}/s{p.ids['accession']}"
        self.image(f"{folder}/1_frontal.dcm", r.frontal, p, anatomy, p.view_position, 1, rng, sid, study_uid)
        if r.lateral is not None:
            self.image(f"{folder}/2_lateral.dcm", r.lateral, p, anatomy, "LL", 2, rng, sid, study_uid)
        self.report(f"{folder}/3_report.dcm", report, p, anatomy, study_uid)
        self.labels.append([study_uid, p.split] + _labels_row(report.labels, CHEXPERT_COLUMNS))

    def finish(self) -> None:
        self.a.csv("labels.csv", ("study_id", "split") + CHEXPERT_COLUMNS, self.labels)


class _RsnaWriter(_DicomWriter):
    """RSNA Pneumonia Detection layout: frontal-only 8-bit images, boxes from the truth."""

    def __init__(self, archive: ArchiveFiles):
        super().__init__(archive, eight_bit=True)
        self.classes = []

    def study(self, p: Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        pid = p.ids["uuid"]
        self.image(f"stage_2_train_images/{pid}.dcm", r.frontal, p, anatomy, p.view_position, 1, rng, pid,
                   dicom_uid(self.a.seed, pid, "study"))
        pneumonia = [f for f in r.findings if f.label == "Pneumonia" and f.visible_frontal]
        if pneumonia:
            kind = "Lung Opacity"
            for x, y, w, h in pneumonia[0].bboxes_frontal:
                self.boxes.append([pid, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", 1])
        else:
            kind = "Normal" if not r.findings else "No Lung Opacity / Not Normal"
            self.boxes.append([pid, "", "", "", "", 0])
        self.classes += [[pid, kind]] * (len(self.boxes) - len(self.classes))

    def finish(self) -> None:
        self.a.csv("stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), self.boxes)
        self.a.csv("stage_2_detailed_class_info.csv", ("patientId", "class"), self.classes)


WRITERS = {"mimic": _MimicWriter, "chexpert": _ChexpertWriter, "dicom": _DicomWriter, "rsna": _RsnaWriter}
