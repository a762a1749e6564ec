"""RSNA Pneumonia Detection Challenge (stage 2): one frontal DICOM per patient, boxes per patient.

stage_2_train_labels.csv has one row per box (Target 1) or one row with blank coordinates (Target 0);
rows are aggregated per patientId into labels {"Pneumonia": Target} and meta {"boxes": [[x, y, w, h],
...], "class": <stage_2_detailed_class_info.csv class or None>}. The image is
stage_2_train_images/{patientId}.dcm; its header is not read here (FORMATS.md fixes the view as
frontal), so loading costs two CSV passes and no file-system calls unless check_files=True.
"""
from __future__ import annotations

import math
from pathlib import Path

from .archive import ArchiveDataset, finish_dataset
from .io import CsvTable
from .study import DatasetError, Study

LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


class _Patient:
    __slots__ = ("target", "boxes", "line")

    def __init__(self, target: int, line: int):
        self.target = target
        self.boxes: list[list[float]] = []
        self.line = line


def _parse_box(cells: list[str]) -> list[float]:
    box = [float(c) for c in cells]
    if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"box {cells} needs finite x, y and positive width, height")
    return box


def load_rsna(root: str | Path, *, check_files: bool = False, progress: bool = False) -> ArchiveDataset:
    """Read the RSNA stage-2 training labels (and detailed classes) into one Study per patient.

    check_files: stat every patient's image and skip patients whose file is missing. progress is
    accepted for symmetry with the other formats (two CSV passes).
    """
    del progress
    root = Path(root).expanduser()
    problems: list[str] = []
    table = CsvTable(
        root / LABELS_FILE, LABEL_COLUMNS, problems,
        fix="pass the folder of the RSNA Pneumonia Detection Challenge stage 2 data",
    )
    i_id = table.col["patientId"]
    i_box = [table.col[c] for c in ("x", "y", "width", "height")]
    i_target = table.col["Target"]
    images = root / IMAGES_DIR
    if not images.is_dir():
        raise DatasetError(f"{images}: image folder not found; unpack stage_2_train_images.zip into {root}")
    patients: dict[str, _Patient] = {}
    for line, row in table:
        pid = row[i_id].strip()
        if not pid:
            table.problem(line, "blank patientId; row skipped")
            continue
        text = row[i_target].strip()
        if text not in ("0", "1"):
            table.problem(line, f"Target {text!r} is not 0 or 1; row skipped")
            continue
        target = int(text)
        cells = [row[i].strip() for i in i_box]
        box = None
        if target == 1:
            try:
                box = _parse_box(cells)
            except ValueError as exc:
                table.problem(line, f"patient {pid}: {exc}; row skipped")
                continue
        elif any(cells):
            table.problem(line, f"patient {pid}: Target 0 with box {cells}; the box is ignored")
        patient = patients.get(pid)
        if patient is None:
            if check_files and not (images / f"{pid}.dcm").is_file():
                table.problem(line, f"image {images / (pid + '.dcm')} does not exist; patient skipped")
                patients[pid] = _Patient(-1, line)  # remembered so its other rows are skipped quietly
                continue
            patient = patients[pid] = _Patient(target, line)
        elif patient.target < 0:
            continue
        elif patient.target != target:
            table.problem(
                line, f"patient {pid}: Target {target} but line {patient.line} says {patient.target}; row skipped"
            )
            continue
        if box is not None:
            patient.boxes.append(box)

    classes: dict[str, str] = {}
    class_path = root / CLASS_FILE
    if class_path.is_file():
        class_table = CsvTable(class_path, ("patientId", "class"), problems)
        i_cid, i_class = class_table.col["patientId"], class_table.col["class"]
        for line, row in class_table:
            pid, name = row[i_cid].strip(), row[i_class].strip()
            if not pid or not name:
                class_table.problem(line, "blank patientId or class; row skipped")
                continue
            seen = classes.setdefault(pid, name)
            if seen != name:
                class_table.problem(line, f"patient {pid}: class {name!r} but earlier {seen!r}; earlier kept")
    else:
        problems.append(f"{root}: no {CLASS_FILE}; meta['class'] is None")

    studies = [
        Study(
            study_id=pid,
            frontal=images / f"{pid}.dcm",
            labels={"Pneumonia": float(patient.target)},
            subject_id=pid,
            source="rsna",
            meta={"boxes": patient.boxes, "class": classes.get(pid)},
        )
        for pid, patient in patients.items()
        if patient.target >= 0
    ]
    return finish_dataset(root, "rsna", studies, problems, empty_fix=f"Check {LABELS_FILE}.")
