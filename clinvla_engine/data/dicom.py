"""A generic DICOM tree as a PACS exports it: CR/DX images and Basic Text SR reports, any folder layout.

The tree is walked once in sorted order; each candidate file's header is read with
stop_before_pixels (an SR has no pixel data, so its whole content tree comes with it). Images are
grouped by StudyInstanceUID; the view comes from ViewPosition, else ViewCodeSequence[0].CodeMeaning.
A text SR of the same study gives the report "FINDINGS: <text>\\nIMPRESSION: <text>". An optional
labels.csv (study_id = StudyInstanceUID, split, CheXpert columns) adds labels and splits.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .archive import ArchiveDataset, finish_dataset
from .io import (
    CsvTable,
    decode_text,
    dicom_refusal,
    is_dicom,
    normalise_split,
    read_dicom_header,
    require_pydicom,
    with_progress,
)
from .study import DatasetError, Study

from .views import classify as _classify, pick_views, rules as _view_rules

# The view rules live once, in data/view_rules.json (shared with the pipeline and the C++ PACS side).
IMAGE_MODALITIES = _view_rules().modalities

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
# Text SR classes whose content is the report; other SRs (e.g. radiation dose) are not reports.
TEXT_SR_CLASSES = frozenset({BASIC_TEXT_SR, "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"})
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# DCM codes: 121070 Findings, 121071 Finding, 121073 Impression.
_FINDINGS_NAMES, _FINDINGS_CODES = frozenset({"findings", "finding"}), frozenset({"121070", "121071"})
_IMPRESSION_NAMES, _IMPRESSION_CODES = frozenset({"impression", "impressions"}), frozenset({"121073"})

# Files with these suffixes are never opened while walking (reports, labels, images of other formats).
_NOT_DICOM_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".txt", ".csv", ".gz", ".json", ".jsonl", ".md", ".xml", ".html", ".zip",
     ".tar", ".py", ".log", ".parquet", ".npy", ".npz", ".pt", ".safetensors"}
)


def walk_files(root: Path) -> Iterator[Path]:
    """Every file below root in a stable (sorted) order, skipping hidden folders and files."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(folder, name)


def _dicom_candidates(root: Path) -> Iterator[Path]:
    for path in walk_files(root):
        if path.suffix.lower() not in _NOT_DICOM_SUFFIXES and is_dicom(path):
            yield path


def first_dicom_file(root: Path) -> Path | None:
    """The first DICOM file of the tree, or None (used for format detection)."""
    return next(_dicom_candidates(root), None)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def view_of(ds: Any) -> tuple[str, str | None]:
    """("frontal" | "lateral" | "other", label) by the shared view rules (data/views.py):
    ViewPosition, else ViewCodeSequence, else PatientOrientation. "other" keeps the raw
    ViewPosition (or None) for the problem message."""
    decision = _classify(ds)
    if decision.view is None:
        return "other", _text(ds, "ViewPosition").upper() or None
    return decision.view, decision.label


def _text_value(item: Any, source: str, notes: list[str]) -> str:
    """A TEXT item's value, whitespace collapsed. NUL characters mean UTF-16 bytes stored in the
    element, which pydicom read one byte per character: the same bytes go to decode_text, the
    decoder every loader uses for report text (DatasetError if they are not text at all)."""
    value = _text(item, "TextValue")
    if "\x00" in value:
        value, note = decode_text(value.encode("latin-1", "replace"), source)
        notes.append(note or f"{source}: SR text held NUL characters")
    return " ".join(value.split())


def _collect_text(
    items: Any, findings: list[str], impression: list[str], other: list[str], source: str, notes: list[str]
) -> None:
    for item in items or ():
        if _text(item, "ValueType").upper() == "TEXT":
            body = _text_value(item, source, notes)
            names = item.get("ConceptNameCodeSequence")
            meaning = _text(names[0], "CodeMeaning").lower() if names else ""
            code = _text(names[0], "CodeValue") if names else ""
            if body:
                if meaning in _FINDINGS_NAMES or code in _FINDINGS_CODES:
                    findings.append(body)
                elif meaning in _IMPRESSION_NAMES or code in _IMPRESSION_CODES:
                    impression.append(body)
                else:
                    other.append(body)
        if "ContentSequence" in item:
            _collect_text(item.ContentSequence, findings, impression, other, source, notes)


def report_from_sr(ds: Any, source: str | Path = "SR", notes: list[str] | None = None) -> str | None:
    """"FINDINGS: ...\\nIMPRESSION: ..." from a text SR's TEXT items (nested containers searched).

    Either line is left out when its section is absent; an SR with TEXT items but neither section
    gives those texts joined; an SR with no text gives None. source names the file in notes (how
    mis-encoded text was read, appended to notes) and in the DatasetError for binary text.
    """
    findings: list[str] = []
    impression: list[str] = []
    other: list[str] = []
    _collect_text(ds.get("ContentSequence"), findings, impression, other, str(source),
                  notes if notes is not None else [])
    lines = []
    if findings:
        lines.append("FINDINGS: " + " ".join(findings))
    if impression:
        lines.append("IMPRESSION: " + " ".join(impression))
    if lines:
        return "\n".join(lines)
    return " ".join(other) or None


class _StudyFiles:
    __slots__ = ("subject", "images", "views", "reports")

    def __init__(self) -> None:
        self.subject: str | None = None
        self.images: list[dict] = []  # pick_views candidates: view, view_label, rows, columns, ...
        self.views: list[str] = []
        self.reports: list[tuple[str, int, Path, str]] = []  # (date+time, order, path, text)


def _read_labels(path: Path, problems: list[str]) -> dict[str, tuple[str | None, dict[str, float], int]]:
    table = CsvTable(path, ("study_id",), problems, fix="labels.csv needs a study_id column (the StudyInstanceUID)")
    i_study, i_split = table.col["study_id"], table.col.get("split")
    columns = table.label_columns()
    rows: dict[str, tuple[str | None, dict[str, float], int]] = {}
    for line, row in table:
        study = row[i_study].strip()
        if not study:
            table.problem(line, "blank study_id; row skipped")
            continue
        labels = table.labels(line, row, columns)
        if labels is None:
            continue
        if study in rows:
            table.problem(line, f"second row for study {study}; the first one is kept")
            continue
        rows[study] = (normalise_split(row[i_split]) if i_split is not None else None, labels, line)
    return rows


def load_dicom_tree(
    root: str | Path,
    *,
    labels_csv: str | Path | None = None,
    check_files: bool = False,
    progress: bool = False,
) -> ArchiveDataset:
    """Walk a DICOM tree once into Study records (study_id = StudyInstanceUID, subject_id = PatientID).

    labels_csv defaults to root/labels.csv when present. check_files is accepted for symmetry with
    the other formats; every file here was found on disk, so there is nothing more to check.
    progress: show a bar (files read, rate) during the walk.
    """
    del check_files  # files come from the walk itself
    require_pydicom()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; pass the root of the DICOM tree")
    problems: list[str] = []
    by_uid: dict[str, _StudyFiles] = {}
    skipped: Counter[str] = Counter()
    seen_files = 0
    files = with_progress(_dicom_candidates(root), enabled=progress, desc="DICOM headers", unit="file")
    for order, path in enumerate(files):
        seen_files += 1
        try:
            ds = read_dicom_header(path)
        except DatasetError as exc:
            problems.append(f"{exc}; file skipped")
            continue
        sop_class = _text(ds, "SOPClassUID")
        if sop_class == MEDIA_DIRECTORY or path.name.upper() == "DICOMDIR":
            continue
        modality = _text(ds, "Modality").upper()
        if modality == "SR" and sop_class not in TEXT_SR_CLASSES:
            skipped[f"SR {sop_class or 'without SOPClassUID'}"] += 1
            continue
        if modality not in IMAGE_MODALITIES and modality != "SR":
            skipped[modality or "no Modality"] += 1
            continue
        uid = _text(ds, "StudyInstanceUID")
        if not uid:
            problems.append(f"{path}: no StudyInstanceUID; file skipped")
            continue
        entry = by_uid.get(uid)
        if entry is None:
            entry = by_uid[uid] = _StudyFiles()
        if modality == "SR":
            try:
                text = report_from_sr(ds, path, problems)
            except DatasetError as exc:  # binary bytes in a text element
                problems.append(f"{exc}; SR ignored")
                continue
            if text is None:
                problems.append(f"{path}: SR without TEXT content; ignored")
            else:
                stamp = _text(ds, "ContentDate") + _text(ds, "ContentTime")
                entry.reports.append((stamp, order, path, text))
            continue
        refusal = dicom_refusal(ds)
        if refusal:
            problems.append(f"{path}: {refusal}; file skipped")
            continue
        entry.subject = entry.subject or (_text(ds, "PatientID") or None)
        kind, view = view_of(ds)
        entry.views.append(view or "?")
        if kind in ("frontal", "lateral"):
            entry.images.append({"view": kind, "view_label": view, "rows": ds.get("Rows"),
                                 "columns": ds.get("Columns"), "instance_number": ds.get("InstanceNumber"),
                                 "path": path.relative_to(root).as_posix(), "file": path})
    if seen_files == 0:
        raise DatasetError(f"{root}: no DICOM files in this tree (.dcm, or files with 'DICM' at byte 128)")
    for what, count in sorted(skipped.items()):
        problems.append(f"{root}: {count} file(s) with modality {what} ignored (not chest X-ray images or reports)")

    labels_path = Path(labels_csv).expanduser() if labels_csv is not None else root / "labels.csv"
    if labels_csv is not None and not labels_path.is_file():
        raise DatasetError(f"{labels_path}: labels_csv not found; pass an existing CSV or leave it out")
    label_rows = _read_labels(labels_path, problems) if labels_path.is_file() else {}

    studies: list[Study] = []
    for uid, entry in by_uid.items():
        frontal_row, lateral_row = pick_views(entry.images)
        if frontal_row is None:
            what = f"views {'/'.join(entry.views)}" if entry.views else "a report only"
            problems.append(f"study {uid}: no frontal (PA/AP) image ({what}); skipped")
            continue
        frontal, frontal_view = frontal_row["file"], frontal_row["view_label"]
        lateral = lateral_row["file"] if lateral_row else None
        lateral_view = lateral_row["view_label"] if lateral_row else None
        report = report_file = None
        if entry.reports:
            # the latest report (ContentDate + ContentTime), the first file found on a tie
            _, _, report_file, report = max(entry.reports, key=lambda r: (r[0], -r[1]))
        split, labels, _ = label_rows.get(uid, (None, {}, 0))
        studies.append(
            Study(
                study_id=uid,
                frontal=frontal,
                lateral=lateral,
                report=report,
                labels=labels,
                split=split,
                subject_id=entry.subject,
                source="dicom",
                meta={
                    "frontal_view": frontal_view,
                    "lateral_view": lateral_view,
                    "images": len(entry.views),
                    "report_file": report_file,
                },
            )
        )
    known = set(by_uid)
    for uid, (_, _, line) in label_rows.items():
        if uid not in known:
            problems.append(f"{labels_path.name} line {line}: study {uid} is not in the DICOM tree; row unused")
    return finish_dataset(
        root, "dicom", studies, problems,
        empty_fix="Check that the tree holds CR/DX images with ViewPosition PA or AP.",
    )
