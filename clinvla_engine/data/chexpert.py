"""CheXpert v1.0 (the -small or full-resolution release): train.csv and valid.csv, one row per image.

A study is one patientXXXXX/studyN folder (study_id "patient00001/study1", subject_id
"patient00001"); train.csv gives split "train", valid.csv "validate". Paths in the CSVs start with
"CheXpert-v1.0-small/" (relative to the folder above the CheXpert folder); the loader resolves them
against the CheXpert folder it found, so a renamed folder still works. CheXpert has no reports.
"""
from __future__ import annotations

from pathlib import Path

from .archive import ArchiveDataset, finish_dataset
from .io import CsvTable, read_header
from .study import DatasetError, Study

CSV_SPLITS = (("train.csv", "train"), ("valid.csv", "validate"))
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral")
FRONTAL_RANK = {"PA": 0, "AP": 1}  # PA preferred over AP; a frontal row with another value ranks last
_OTHER_FRONTAL = 2


def _is_chexpert_csv(path: Path) -> bool:
    if not path.is_file():
        return False
    header = read_header(path)
    return bool(header) and all(c in header for c in REQUIRED_COLUMNS)


def find_chexpert_dir(root: Path) -> Path | None:
    """root itself if it holds a CheXpert train.csv/valid.csv, else its CheXpert-v1.0* subfolder."""
    candidates = [root] + sorted(p for p in root.glob("CheXpert-v1.0*") if p.is_dir())
    for folder in candidates:
        if any(_is_chexpert_csv(folder / name) for name, _ in CSV_SPLITS):
            return folder
    return None


class _StudyRows:
    __slots__ = ("split", "frontals", "lateral")

    def __init__(self, split: str):
        self.split = split
        self.frontals: list[tuple[int, str, Path, str | None, dict]] = []  # (rank, path text, path, view, row info)
        self.lateral: tuple[str, Path] | None = None


def _image_path(folder: Path, rel: str) -> Path:
    # "CheXpert-v1.0-small/train/..." is relative to folder's parent; drop the first component so
    # the path resolves against the folder actually found, whatever it is called.
    head, sep, tail = rel.partition("/")
    if sep and head.lower().startswith("chexpert-v1.0"):
        return folder / tail
    return folder / rel


def _read_csv(
    path: Path, split: str, folder: Path, check_files: bool, studies: dict[str, _StudyRows], problems: list[str]
) -> None:
    table = CsvTable(path, REQUIRED_COLUMNS, problems, fix="it must be a CheXpert train.csv / valid.csv")
    col = table.col
    i_path, i_view = col["Path"], col["Frontal/Lateral"]
    i_appa, i_sex, i_age = col.get("AP/PA"), col.get("Sex"), col.get("Age")
    label_cols = table.label_columns()
    for line, row in table:
        rel = row[i_path].strip().replace("\\", "/")
        parts = rel.split("/")
        if len(parts) < 3 or not parts[-3].startswith("patient") or not parts[-2].startswith("study"):
            table.problem(line, f"Path {rel!r} is not .../patientXXXXX/studyN/<image>; row skipped")
            continue
        kind = row[i_view].strip().lower()
        if kind not in ("frontal", "lateral"):
            table.problem(line, f"Frontal/Lateral {row[i_view]!r} is neither Frontal nor Lateral; row skipped")
            continue
        age_text = row[i_age].strip() if i_age is not None else ""
        try:
            age = int(float(age_text)) if age_text else None
        except ValueError:
            table.problem(line, f"Age {age_text!r} is not a number; row skipped")
            continue
        labels = table.labels(line, row, label_cols)
        if labels is None:
            continue
        image = _image_path(folder, rel)
        if check_files and not image.is_file():
            table.problem(line, f"image {image} does not exist; row skipped")
            continue
        key = f"{parts[-3]}/{parts[-2]}"
        rows = studies.get(key)
        if rows is None:
            rows = studies[key] = _StudyRows(split)
        if kind == "frontal":
            view = row[i_appa].strip().upper() if i_appa is not None else ""
            info = {"labels": labels, "sex": row[i_sex].strip() if i_sex is not None else None, "age": age}
            rows.frontals.append((FRONTAL_RANK.get(view, _OTHER_FRONTAL), rel, image, view or None, info))
        elif rows.lateral is None or rel < rows.lateral[0]:
            rows.lateral = (rel, image)


def load_chexpert(root: str | Path, *, check_files: bool = False, progress: bool = False) -> ArchiveDataset:
    """Read CheXpert's train.csv and valid.csv (root = the CheXpert folder or the folder above it).

    check_files: stat every image and skip rows whose file is missing. progress is accepted for
    symmetry with the other formats (two CSV passes take about a second).
    """
    del progress
    root = Path(root).expanduser()
    folder = find_chexpert_dir(root)
    if folder is None:
        raise DatasetError(
            f"{root}: no CheXpert train.csv or valid.csv (with Path and Frontal/Lateral columns) here or in a "
            "CheXpert-v1.0*/ subfolder; pass the CheXpert-v1.0-small folder or the folder that holds it"
        )
    problems: list[str] = []
    studies_rows: dict[str, _StudyRows] = {}
    for name, split in CSV_SPLITS:
        path = folder / name
        if path.is_file():
            _read_csv(path, split, folder, check_files, studies_rows, problems)
        else:
            problems.append(f"{folder}: no {name}; its split is empty")

    studies: list[Study] = []
    for key, rows in studies_rows.items():
        if not rows.frontals:
            problems.append(f"study {key} ({rows.split}) has no frontal image; skipped")
            continue
        _, _, frontal, view, info = min(rows.frontals, key=lambda f: (f[0], f[1]))
        studies.append(
            Study(
                study_id=key,
                frontal=frontal,
                lateral=rows.lateral[1] if rows.lateral else None,
                report=None,
                labels=info["labels"],
                split=rows.split,
                subject_id=key.split("/")[0],
                source="chexpert",
                meta={"frontal_view": view, "sex": info["sex"], "age": info["age"]},
            )
        )
    return finish_dataset(
        root, "chexpert", studies, problems,
        empty_fix="Check that train.csv / valid.csv list Frontal images.",
    )
