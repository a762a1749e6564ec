"""Writers of small archives in each exact on-disk format of FORMATS.md, for the loader tests.

Written from the format descriptions alone (not from the synthetic generator), each ``make_*``
writes a handful of studies covering the cases the loaders must get right (one and two views, PA
beside AP, uncertain and blank labels, MONOCHROME1 and windowed 16-bit DICOM, an SR report) and
returns what a correct loader must produce: {study_id: expected fields}, paths relative to root.
"""
from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
from PIL import Image

NAN = math.nan
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
_SOP_CLASS = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}
CHEXPERT_HEADER = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]
MIMIC_LABEL_HEADER = [
    "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
    "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]
MIMIC_METADATA_HEADER = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def ramp(height: int = 16, width: int = 16, low: int = 30, high: int = 220, seed: int = 0) -> np.ndarray:
    """A smooth uint8 picture (a diagonal ramp plus a per-seed offset) that survives JPEG well."""
    y, x = np.mgrid[0:height, 0:width]
    values = low + (high - low) * (x + y) / (height + width - 2)
    return np.clip(values + 7 * (seed % 5), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, pixels: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """uint8 -> 8-bit grey or RGB PNG; uint16 -> 16-bit grey PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (lambda: gzip.open(path, "wt", newline="", encoding="utf-8")) if gz else (
        lambda: open(path, "w", newline="", encoding="utf-8")
    )
    with opener() as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    return path


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_dataset(path: Path, sop_class: str):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _save(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    study_uid: str,
    patient_id: str = "PAT",
    modality: str = "DX",
    view_position: str | None = None,
    view_code_meaning: str | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
) -> Path:
    """One uncompressed image: pixels (H, W) uint8/uint16 grey, (F, H, W) multi-frame, (H, W, 3) RGB."""
    pixels = np.ascontiguousarray(pixels)
    ds = _file_dataset(path, _SOP_CLASS[modality])
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id
    ds.Modality = modality
    if view_position is not None:
        ds.ViewPosition = view_position
    if view_code_meaning is not None:
        ds.ViewCodeSequence = [_code("VIEW", "99TEST", view_code_meaning)]
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and photometric == "RGB"
    if colour:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (pixels.shape[0], pixels.shape[1]) if colour else pixels.shape[-2:]
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        from pydicom.dataset import Dataset

        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut), 0, 8])  # LUTDescriptor: entries, first value, bits
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.tobytes()
    return _save(ds, path)


def write_text_sr(
    path: Path,
    *,
    study_uid: str,
    patient_id: str = "PAT",
    findings: str | None = None,
    impression: str | None = None,
    nested: bool = False,
    content_date: str = "20240102",
    content_time: str = "101500",
) -> Path:
    """A Basic Text SR whose TEXT items are named "Findings" / "Impression" (DCM 121070 / 121073)."""
    from pydicom.dataset import Dataset

    ds = _file_dataset(path, BASIC_TEXT_SR)
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id
    ds.Modality = "SR"
    ds.ContentDate = content_date
    ds.ContentTime = content_time
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    items = []
    for text, code, meaning in ((findings, "121070", "Findings"), (impression, "121073", "Impression")):
        if text is None:
            continue
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = [_code(code, "DCM", meaning)]
        item.TextValue = text
        items.append(item)
    if nested:  # the texts inside a section container, as some reporting systems write them
        container = Dataset()
        container.RelationshipType = "CONTAINS"
        container.ValueType = "CONTAINER"
        container.ContinuityOfContent = "SEPARATE"
        container.ConceptNameCodeSequence = [_code("121064", "DCM", "Current Procedure Descriptions")]
        container.ContentSequence = items
        items = [container]
    ds.ContentSequence = items
    return _save(ds, path)


# ---------------------------------------------------------------------------------------------
# mimic
# ---------------------------------------------------------------------------------------------
MIMIC_REPORT_FULL = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n \n"
    " INDICATION:  ___F with cough and fever\n \n"
    " COMPARISON:  None.\n \n"
    " FINDINGS: \n \n"
    " The lungs are clear without focal consolidation.  No pleural effusion or\n"
    " pneumothorax.  Heart size is mildly enlarged.\n \n"
    " IMPRESSION: \n \n"
    " Mild cardiomegaly.  No acute process.\n"
)
MIMIC_REPORT_IMPRESSION_ONLY = (
    "                                 FINAL REPORT\n"
    " INDICATION:  Line placement.\n \n"
    " IMPRESSION:    Right IJ line tip in the   low SVC.\n"
    "   No pneumothorax.\n \n"
    " NOTIFICATION:  Discussed with Dr. ___ at 4:15 pm.\n"
)
MIMIC_REPORT_NO_SECTIONS = (
    "                                 FINAL REPORT\n"
    " PORTABLE CHEST OF ___\n \n"
    " Compared to prior study there is no significant interval change.\n"
)

# dicom_id strings in MIMIC's shape: five dash-separated groups of 8 hex digits.
D = {
    "a_pa": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
    "a_lat": "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
    "b_ap": "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",
    "b_pa": "e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c",
    "b_ll": "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714",
    "c_ap": "3b7f5f94-0a3cc6e1-3ae8fa92-5bfc37a0-d3d8c3e0",
    "d_pa2": "fa1b2c3d-00000000-11111111-22222222-33333333",
    "d_pa1": "0b1c2d3e-44444444-55555555-66666666-77777777",
    "d_axial": "1c2d3e4f-88888888-99999999-aaaaaaaa-bbbbbbbb",
    "e_lat": "9d8e7f6a-cccccccc-dddddddd-eeeeeeee-ffffffff",
}


def mimic_image(root: Path, subject: str, study: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"


def mimic_report(root: Path, subject: str, study: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


def make_mimic(root: Path, gz: bool = False, reports_under: Path | None = None) -> dict[str, dict]:
    """Five studies: PA+LATERAL, AP+PA+LL (PA wins), one AP, two PA (dicom_id tie-break) + AP AXIAL,
    and a lateral-only study that must be skipped. Reports go under root/files or reports_under."""
    meta_rows = [
        # dicom_id, subject, study, view
        (D["a_pa"], "10000032", "50414267", "PA"),
        (D["a_lat"], "10000032", "50414267", "LATERAL"),
        (D["b_ap"], "10000032", "53189527", "AP"),
        (D["b_pa"], "10000032", "53189527", "PA"),
        (D["b_ll"], "10000032", "53189527", "LL"),
        (D["c_ap"], "10000764", "57375967", "AP"),
        (D["d_pa2"], "10000764", "58000001", "PA"),
        (D["d_axial"], "10000764", "58000001", "AP AXIAL"),
        (D["d_pa1"], "10000764", "58000001", "PA"),
        (D["e_lat"], "10000898", "50771383", "LATERAL"),
    ]
    rows = [
        [dicom_id, subject, study, "CHEST (PA AND LAT)", view, 16, 16, 21800506, 213014.531, "CHEST (PA AND LAT)",
         "postero-anterior" if view == "PA" else "", "Erect"]
        for dicom_id, subject, study, view in meta_rows
    ]
    suffix = ".csv.gz" if gz else ".csv"
    write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", MIMIC_METADATA_HEADER, rows, gz=gz)
    for i, (dicom_id, subject, study, _) in enumerate(meta_rows):
        write_jpeg(mimic_image(root, subject, study, dicom_id), ramp(seed=i))

    blank14 = [None] * 14
    label_rows = [
        # Atelectasis 1, Cardiomegaly -1 (uncertain), Edema 0 (negated), the rest blank
        ["10000032", "50414267", "1.0", "-1.0", None, "0.0"] + blank14[:10],
        # No Finding 1, Pleural Effusion 0
        ["10000032", "53189527"] + [None] * 8 + ["1.0", "0.0"] + [None] * 4,
        # 57375967: no label row at all
        ["10000764", "58000001", None, None, None, None, None, "1.0"] + [None] * 8,
        ["10000898", "50771383", "1.0"] + [None] * 13,
    ]
    write_csv(root / f"mimic-cxr-2.0.0-chexpert{suffix}", MIMIC_LABEL_HEADER, label_rows, gz=gz)
    split_of = {"50414267": "train", "53189527": "validate", "57375967": "test", "58000001": "train",
                "50771383": "train"}
    write_csv(
        root / f"mimic-cxr-2.0.0-split{suffix}",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, study, subject, split_of[study]] for d, subject, study, _ in meta_rows],
        gz=gz,
    )
    report_root = reports_under or root
    for subject, study, text in (
        ("10000032", "50414267", MIMIC_REPORT_FULL),
        ("10000032", "53189527", MIMIC_REPORT_IMPRESSION_ONLY),
        ("10000764", "57375967", MIMIC_REPORT_NO_SECTIONS),
        ("10000898", "50771383", MIMIC_REPORT_FULL),
        # 58000001: no report file
    ):
        path = mimic_report(report_root, subject, study)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def rel(subject: str, study: str, dicom_id: str | None) -> str | None:
        if dicom_id is None:
            return None
        return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"

    full_labels = {name: NAN for name in MIMIC_LABEL_HEADER[2:]}
    return {
        "50414267": dict(
            subject_id="10000032", frontal=rel("10000032", "50414267", D["a_pa"]),
            lateral=rel("10000032", "50414267", D["a_lat"]),
            report="FINDINGS: The lungs are clear without focal consolidation. No pleural effusion or "
            "pneumothorax. Heart size is mildly enlarged.\nIMPRESSION: Mild cardiomegaly. No acute process.",
            labels={**full_labels, "Atelectasis": 1.0, "Cardiomegaly": -1.0, "Edema": 0.0},
            split="train", frontal_view="PA", lateral_view="LATERAL",
        ),
        "53189527": dict(
            subject_id="10000032", frontal=rel("10000032", "53189527", D["b_pa"]),
            lateral=rel("10000032", "53189527", D["b_ll"]),
            report="IMPRESSION: Right IJ line tip in the low SVC. No pneumothorax.",
            labels={**full_labels, "No Finding": 1.0, "Pleural Effusion": 0.0},
            split="validate", frontal_view="PA", lateral_view="LL",
        ),
        "57375967": dict(
            subject_id="10000764", frontal=rel("10000764", "57375967", D["c_ap"]), lateral=None,
            report="PORTABLE CHEST OF ___ Compared to prior study there is no significant interval change.",
            labels={}, split="test", frontal_view="AP", lateral_view=None,
        ),
        "58000001": dict(
            subject_id="10000764", frontal=rel("10000764", "58000001", D["d_pa1"]), lateral=None,
            report=None, labels={**full_labels, "Fracture": 1.0},
            split="train", frontal_view="PA", lateral_view=None,
        ),
    }


# ---------------------------------------------------------------------------------------------
# chexpert
# ---------------------------------------------------------------------------------------------
def make_chexpert(root: Path, folder: str = "CheXpert-v1.0-small") -> dict[str, dict]:
    """root/folder/{train,valid}.csv + JPEGs: one-view, AP+PA+lateral (PA wins), lateral-only, valid."""
    base = root / folder

    def row(path: str, sex: str, age, view: str, appa, labels: dict) -> list:
        cells = [labels.get(name) for name in CHEXPERT_HEADER[5:]]
        return [f"CheXpert-v1.0-small/{path}", sex, age, view, appa] + cells

    train = [
        row("train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP",
            {"No Finding": "1.0", "Support Devices": "1.0"}),
        row("train/patient00002/study1/view1_frontal.jpg", "Male", 87, "Frontal", "AP",
            {"Cardiomegaly": "-1.0", "Edema": "1.0", "Pleural Effusion": "0.0"}),
        row("train/patient00002/study1/view2_frontal.jpg", "Male", 87, "Frontal", "PA",
            {"Cardiomegaly": "-1.0", "Edema": "1.0", "Pleural Effusion": "0.0"}),
        row("train/patient00002/study1/view3_lateral.jpg", "Male", 87, "Lateral", None,
            {"Cardiomegaly": "-1.0", "Edema": "1.0", "Pleural Effusion": "0.0"}),
        row("train/patient00002/study2/view1_lateral.jpg", "Male", 87, "Lateral", None, {"Fracture": "1.0"}),
    ]
    all_zero = {name: "0.0" for name in CHEXPERT_HEADER[5:]}
    valid = [
        row("valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "PA",
            {**all_zero, "Lung Opacity": "1.0"}),
        row("valid/patient64541/study1/view2_lateral.jpg", "Male", 73, "Lateral", None,
            {**all_zero, "Lung Opacity": "1.0"}),
    ]
    write_csv(base / "train.csv", CHEXPERT_HEADER, train)
    write_csv(base / "valid.csv", CHEXPERT_HEADER, valid)
    for i, r in enumerate(train + valid):
        write_jpeg(base / r[0].split("/", 1)[1], ramp(seed=i))

    blank = {name: NAN for name in CHEXPERT_HEADER[5:]}
    return {
        "patient00001/study1": dict(
            subject_id="patient00001", frontal=f"{folder}/train/patient00001/study1/view1_frontal.jpg",
            lateral=None, report=None, split="train",
            labels={**blank, "No Finding": 1.0, "Support Devices": 1.0},
            meta={"frontal_view": "AP", "sex": "Female", "age": 68},
        ),
        "patient00002/study1": dict(
            subject_id="patient00002", frontal=f"{folder}/train/patient00002/study1/view2_frontal.jpg",
            lateral=f"{folder}/train/patient00002/study1/view3_lateral.jpg", report=None, split="train",
            labels={**blank, "Cardiomegaly": -1.0, "Edema": 1.0, "Pleural Effusion": 0.0},
            meta={"frontal_view": "PA", "sex": "Male", "age": 87},
        ),
        "patient64541/study1": dict(
            subject_id="patient64541", frontal=f"{folder}/valid/patient64541/study1/view1_frontal.jpg",
            lateral=f"{folder}/valid/patient64541/study1/view2_lateral.jpg", report=None, split="validate",
            labels={**{k: 0.0 for k in blank}, "Lung Opacity": 1.0},
            meta={"frontal_view": "PA", "sex": "Male", "age": 73},
        ),
    }


# ---------------------------------------------------------------------------------------------
# rsna
# ---------------------------------------------------------------------------------------------
RSNA_IDS = (
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
    "00436515-870c-4b36-a041-de91049b9ab4",
    "00704310-78a8-4b38-8475-49f4573b2dbb",
)


def make_rsna(root: Path) -> dict[str, dict]:
    """Three patients: Target 0, Target 1 with two boxes, Target 1 with one box; 8-bit DICOMs."""
    normal, two_boxes, one_box = RSNA_IDS
    write_csv(
        root / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        [
            [normal, None, None, None, None, 0],
            [two_boxes, "264.0", "152.0", "213.0", "379.0", 1],
            [two_boxes, "562.0", "152.0", "256.0", "453.0", 1],
            [one_box, "323.0", "577.0", "160.0", "104.0", 1],
        ],
    )
    write_csv(
        root / "stage_2_detailed_class_info.csv",
        ["patientId", "class"],
        [[normal, "No Lung Opacity / Not Normal"], [two_boxes, "Lung Opacity"], [two_boxes, "Lung Opacity"],
         [one_box, "Lung Opacity"]],
    )
    for i, pid in enumerate(RSNA_IDS):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", ramp(seed=i), study_uid=f"1.2.3.{i}",
                    patient_id=pid, modality="CR", view_position="PA" if i != 1 else "AP")
    return {
        normal: dict(labels={"Pneumonia": 0.0}, meta={"boxes": [], "class": "No Lung Opacity / Not Normal"}),
        two_boxes: dict(labels={"Pneumonia": 1.0},
                        meta={"boxes": [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]],
                              "class": "Lung Opacity"}),
        one_box: dict(labels={"Pneumonia": 1.0}, meta={"boxes": [[323.0, 577.0, 160.0, 104.0]],
                                                          "class": "Lung Opacity"}),
    }


# ---------------------------------------------------------------------------------------------
# dicom tree
# ---------------------------------------------------------------------------------------------
UID_A = "1.2.826.0.1.3680043.8.498.10001"  # PA + lateral (by ViewCodeSequence, file without extension) + SR
UID_B = "1.2.826.0.1.3680043.8.498.10002"  # windowed 16-bit AP + MONOCHROME1 PA + SR (impression only)
UID_C = "1.2.826.0.1.3680043.8.498.10003"  # one AP from ViewCodeSequence, 16-bit, no window, no report
UID_D = "1.2.826.0.1.3680043.8.498.10004"  # lateral only: skipped
UID_UNKNOWN = "1.2.826.0.1.3680043.8.498.99999"  # only in labels.csv

WINDOW = (2000.0, 3000.0)  # center, width, in rescaled units
RESCALE = (2.0, -1000.0)  # slope, intercept


def stored_12bit(height: int = 16, width: int = 16) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return (x * 250 + y * 20).astype(np.uint16)  # 0 .. 4050, inside 12 bits


def make_dicom_tree(root: Path) -> dict[str, dict]:
    a = root / "PAT001" / "study_a"
    write_dicom(a / "frontal.dcm", ramp(seed=1), study_uid=UID_A, patient_id="PAT001", view_position="PA")
    # no .dcm extension, a UID-like name (its "suffix" is ".7"): found by the DICM marker
    write_dicom(a / "1.2.840.113619.2.55.7", ramp(seed=2), study_uid=UID_A, patient_id="PAT001",
                view_code_meaning="left lateral")
    write_text_sr(a / "report.dcm", study_uid=UID_A, patient_id="PAT001",
                  findings="Heart size is normal.\n  Lungs are clear.", impression="No acute disease.", nested=True)

    b = root / "PAT002" / "study_b"
    write_dicom(b / "ap16.dcm", stored_12bit(), study_uid=UID_B, patient_id="PAT002", modality="CR",
                view_position="AP", bits_stored=12, window=WINDOW, rescale=RESCALE)
    write_dicom(b / "pa_mono1.dcm", ramp(seed=3), study_uid=UID_B, patient_id="PAT002", view_position="PA",
                photometric="MONOCHROME1")
    write_text_sr(b / "sr_old.dcm", study_uid=UID_B, patient_id="PAT002", impression="Preliminary read.",
                  content_date="20240101")
    write_text_sr(b / "sr_new.dcm", study_uid=UID_B, patient_id="PAT002", impression="Small left effusion.",
                  content_date="20240105")

    c = root / "PAT003"
    write_dicom(c / "img.dcm", stored_12bit(), study_uid=UID_C, patient_id="PAT003",
                view_code_meaning="antero-posterior", bits_stored=12)
    write_dicom(c / "decubitus.dcm", ramp(seed=4), study_uid=UID_C, patient_id="PAT003", view_position="LLD")

    write_dicom(root / "PAT004" / "lat.dcm", ramp(seed=5), study_uid=UID_D, patient_id="PAT004",
                view_position="LATERAL")
    write_dicom(root / "PAT005" / "ct.dcm", ramp(seed=6), study_uid="1.2.3.555", patient_id="PAT005",
                modality="CT")
    (root / "notes.txt").write_text("exported from PACS\n")
    write_jpeg(root / "PAT001" / "thumbnail.jpg", ramp())

    header = ["study_id", "split", "Cardiomegaly", "Edema", "Pneumonia"]
    write_csv(root / "labels.csv", header, [
        [UID_A, "validate", "1.0", "-1.0", None],
        [UID_B, "test", "0.0", None, "1.0"],
        [UID_UNKNOWN, "train", "1.0", None, None],
    ])
    return {
        UID_A: dict(
            subject_id="PAT001", frontal="PAT001/study_a/frontal.dcm", lateral="PAT001/study_a/1.2.840.113619.2.55.7",
            report="FINDINGS: Heart size is normal. Lungs are clear.\nIMPRESSION: No acute disease.",
            labels={"Cardiomegaly": 1.0, "Edema": -1.0, "Pneumonia": NAN}, split="validate",
            frontal_view="PA", lateral_view="LL",
        ),
        UID_B: dict(
            subject_id="PAT002", frontal="PAT002/study_b/pa_mono1.dcm", lateral=None,
            report="IMPRESSION: Small left effusion.",
            labels={"Cardiomegaly": 0.0, "Edema": NAN, "Pneumonia": 1.0}, split="test",
            frontal_view="PA", lateral_view=None,
        ),
        UID_C: dict(
            subject_id="PAT003", frontal="PAT003/img.dcm", lateral=None, report=None, labels={}, split=None,
            frontal_view="AP", lateral_view=None,
        ),
    }
