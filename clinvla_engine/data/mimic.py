"""MIMIC-CXR-JPG 2.0.0 (images, metadata, CheXpert labels, split) plus MIMIC-CXR report text files.

Layout (FORMATS.md): root/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv[.gz] and
root/files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg, reports beside the study folders as
s{study}.txt (or under an explicit reports_root). The metadata file is required; labels, split and
reports are used when present and their absence is noted once in ``problems``.

Speed: the three CSVs are read with the csv module into dicts keyed by study id (a 377k-row
metadata file takes about a second); no image is touched unless ``check_files=True``. Reports are
read one file per kept study (they are the text the model needs); ``read_reports=False`` skips them.
"""
from __future__ import annotations

import re
from pathlib import Path

from .archive import ArchiveDataset, finish_dataset
from .io import CsvTable, find_file, normalise_split, read_text_file, with_progress
from .study import DatasetError, Study

FRONTAL_RANK = {"PA": 0, "AP": 1}  # PA preferred over AP
LATERAL_VIEWS = frozenset({"LATERAL", "LL"})
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")


def find_metadata(root: Path) -> Path | None:
    """The mimic-cxr-*-metadata.csv[.gz] in root (highest version; plain .csv before .gz)."""
    hits = list(root.glob("mimic-cxr-*-metadata.csv")) + list(root.glob("mimic-cxr-*-metadata.csv.gz"))
    hits = [p for p in hits if p.is_file()]
    if not hits:
        return None
    return max(hits, key=lambda p: (p.name.split("-metadata")[0], p.suffix != ".gz"))


def _companion(root: Path, prefix: str, kind: str) -> Path | None:
    found = find_file(root, f"{prefix}-{kind}.csv")
    if found is None:  # a different version number than the metadata file
        hits = sorted(root.glob(f"mimic-cxr-*-{kind}.csv")) + sorted(root.glob(f"mimic-cxr-*-{kind}.csv.gz"))
        found = hits[-1] if hits else None
    return found


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
# A section header: a name at the start of a line followed by ':' (MIMIC writes "FINDINGS:",
# "IMPRESSION:", sometimes with spaces before the colon or text on the same line), or one of the
# kept names alone on its line without a colon.
_HEADER = re.compile(
    r"^[ \t]*(?P<name>[A-Za-z][A-Za-z /&()\-]{0,48}?)[ \t]*:"
    r"|^[ \t]*(?P<bare>FINDINGS?|IMPRESSIONS?)[ \t]*$",
    re.MULTILINE,
)
_FINDINGS = frozenset({"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS"})
_IMPRESSION = frozenset({"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"})
# Title lines that precede the sections ("FINAL REPORT", "ADDENDUM", ...); dropped in the fallback.
_TITLE_LINE = re.compile(
    r"^[ \t]*(?:FINAL REPORT|PRELIMINARY REPORT|ADDENDUM(?:[ \t]*#?[ \t]*\d+)?|WET READ VERSION #?\d+)[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)


def _squash(text: str) -> str:
    return " ".join(text.split())


def parse_report(text: str) -> str | None:
    """A MIMIC-CXR report -> "FINDINGS: ...\\nIMPRESSION: ..." (whitespace collapsed per section).

    Either section may be missing (then only the other line is written); with neither, the whole
    text minus its title lines ("FINAL REPORT", "ADDENDUM"), whitespace collapsed. Empty -> None.
    Upper-case "NAME:" at a line start begins a section (and ends the previous one); the kept
    names are also recognised in mixed case ("Findings:").
    """
    headers = []
    for match in _HEADER.finditer(text):
        name = (match.group("name") or match.group("bare") or "").strip()
        upper = " ".join(name.upper().split())
        if name.isupper() or upper in _FINDINGS or upper in _IMPRESSION:
            headers.append((match.start(), match.end(), upper))
    findings: list[str] = []
    impression: list[str] = []
    for i, (_, end, name) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        body = _squash(text[end:stop])
        if not body:
            continue
        if name in _FINDINGS:
            findings.append(body)
        elif name in _IMPRESSION:
            impression.append(body)
    lines = []
    if findings:
        lines.append("FINDINGS: " + " ".join(findings))
    if impression:
        lines.append("IMPRESSION: " + " ".join(impression))
    if lines:
        return "\n".join(lines)
    rest = _squash(_TITLE_LINE.sub(" ", text))
    return rest or None


def _reports_base(root: Path, reports_root: str | Path | None) -> Path:
    if reports_root is None:
        return root / "files"
    base = Path(reports_root).expanduser()
    if not base.is_dir():
        raise DatasetError(
            f"{base}: reports_root is not a folder; pass the folder that holds files/p10/... "
            "(the unpacked mimic-cxr-reports.zip) or the files/ folder itself"
        )
    return base / "files" if (base / "files").is_dir() else base


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------
class _StudyRows:
    __slots__ = ("subject", "frontals", "laterals", "views")

    def __init__(self, subject: str):
        self.subject = subject
        self.frontals: list[tuple[int, str, str]] = []  # (rank, dicom_id, view)
        self.laterals: list[tuple[str, str]] = []  # (dicom_id, view)
        self.views: list[str] = []


def _read_metadata(path: Path, files: str, check_files: bool, problems: list[str]) -> dict[str, _StudyRows]:
    table = CsvTable(path, METADATA_COLUMNS, problems, fix="it must be MIMIC-CXR-JPG's metadata file")
    i_dicom, i_subject, i_study, i_view = (table.col[c] for c in METADATA_COLUMNS)
    studies: dict[str, _StudyRows] = {}
    for line, row in table:
        dicom_id = row[i_dicom].strip()
        subject = row[i_subject].strip()
        study = row[i_study].strip()
        if not dicom_id:
            table.problem(line, "blank dicom_id; row skipped")
            continue
        if not subject.isdigit():
            table.problem(line, f"subject_id {subject!r} is not a number; row skipped")
            continue
        if not study.isdigit():
            table.problem(line, f"study_id {study!r} is not a number; row skipped")
            continue
        rows = studies.get(study)
        if rows is None:
            rows = studies[study] = _StudyRows(subject)
        elif rows.subject != subject:
            table.problem(line, f"study {study} listed under subjects {rows.subject} and {subject}; row skipped")
            continue
        view = row[i_view].strip().upper()
        if check_files:
            image = Path(f"{files}/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg")
            if not image.is_file():
                table.problem(line, f"image {image} does not exist; row skipped")
                continue
        rows.views.append(view or "?")
        rank = FRONTAL_RANK.get(view)
        if rank is not None:
            rows.frontals.append((rank, dicom_id, view))
        elif view in LATERAL_VIEWS:
            rows.laterals.append((dicom_id, view))
    return studies


def _read_labels(path: Path, problems: list[str]) -> dict[str, dict[str, float]]:
    table = CsvTable(path, ("study_id",), problems, fix="it must be MIMIC-CXR-JPG's chexpert label file")
    i_study = table.col["study_id"]
    columns = table.label_columns()
    labels: dict[str, dict[str, float]] = {}
    for line, row in table:
        study = row[i_study].strip()
        if not study.isdigit():
            table.problem(line, f"study_id {study!r} is not a number; row skipped")
            continue
        values = table.labels(line, row, columns)
        if values is None:
            continue
        if study in labels:
            table.problem(line, f"second label row for study {study}; the first one is kept")
            continue
        labels[study] = values
    return labels


def _read_splits(path: Path, problems: list[str]) -> dict[str, str]:
    table = CsvTable(path, ("study_id", "split"), problems, fix="it must be MIMIC-CXR-JPG's split file")
    i_study, i_split = table.col["study_id"], table.col["split"]
    splits: dict[str, str] = {}
    for line, row in table:
        study = row[i_study].strip()
        split = normalise_split(row[i_split])
        if not study.isdigit() or split is None:
            table.problem(line, f"study_id {study!r} / split {row[i_split]!r} unusable; row skipped")
            continue
        seen = splits.setdefault(study, split)
        if seen != split:
            table.problem(line, f"study {study} is in split {seen!r} and {split!r}; {seen!r} kept")
    return splits


def load_mimic(
    root: str | Path,
    *,
    reports_root: str | Path | None = None,
    read_reports: bool = True,
    check_files: bool = False,
    progress: bool = False,
) -> ArchiveDataset:
    """Read a MIMIC-CXR-JPG folder into Study records (study_id and subject_id as in the CSVs).

    reports_root: where the report .txt tree lives if not under root/files (the folder holding
    files/, or files/ itself). check_files: stat every image and skip rows whose file is missing.
    progress: show a bar while the report files are read.
    """
    root = Path(root).expanduser()
    problems: list[str] = []
    metadata = find_metadata(root)
    if metadata is None:
        raise DatasetError(
            f"{root}: no mimic-cxr-*-metadata.csv[.gz] here; pass the MIMIC-CXR-JPG root folder "
            "(the one holding mimic-cxr-2.0.0-metadata.csv.gz and files/)"
        )
    prefix = metadata.name.split("-metadata")[0]
    files = str(root / "files")
    rows_by_study = _read_metadata(metadata, files, check_files, problems)

    labels_path = _companion(root, prefix, "chexpert")
    if labels_path is None:
        problems.append(f"{root}: no {prefix}-chexpert.csv[.gz]; studies have no labels")
        labels: dict[str, dict[str, float]] = {}
    else:
        labels = _read_labels(labels_path, problems)
    split_path = _companion(root, prefix, "split")
    if split_path is None:
        problems.append(f"{root}: no {prefix}-split.csv[.gz]; every study counts as train")
        splits: dict[str, str] = {}
    else:
        splits = _read_splits(split_path, problems)
    reports_base = str(_reports_base(root, reports_root)) if read_reports else ""

    studies: list[Study] = []
    missing_reports: list[str] = []
    steps = with_progress(
        rows_by_study.items(), enabled=progress and read_reports, desc="MIMIC reports", unit="study",
        total=len(rows_by_study),
    )
    for study_id, rows in steps:
        subject = rows.subject
        if not rows.frontals:
            problems.append(
                f"{metadata.name}: study {study_id} (subject {subject}) has no frontal (PA/AP) image among "
                f"views {'/'.join(rows.views) or 'none'}; skipped"
            )
            continue
        study_dir = f"{files}/p{subject[:2]}/p{subject}/s{study_id}"
        _, frontal_id, frontal_view = min(rows.frontals)
        lateral = lateral_view = None
        if rows.laterals:
            lateral_id, lateral_view = min(rows.laterals)
            lateral = Path(f"{study_dir}/{lateral_id}.jpg")
        report = None
        if read_reports:
            report_path = f"{reports_base}/p{subject[:2]}/p{subject}/s{study_id}.txt"
            try:
                text, note = read_text_file(report_path)
            except FileNotFoundError:
                missing_reports.append(report_path)
            except OSError as exc:
                problems.append(f"{report_path}: unreadable report ({exc}); study kept without report")
            except DatasetError as exc:  # binary or oversized: the text cannot be trusted
                problems.append(f"{exc}; study kept without report")
            else:
                if note:
                    problems.append(note)
                report = parse_report(text)
        studies.append(
            Study(
                study_id=study_id,
                frontal=Path(f"{study_dir}/{frontal_id}.jpg"),
                lateral=lateral,
                report=report,
                labels=labels.get(study_id, {}),
                split=splits.get(study_id),
                subject_id=subject,
                source="mimic",
                meta={"frontal_view": frontal_view, "lateral_view": lateral_view, "images": len(rows.views)},
            )
        )
    if missing_reports:
        problems.append(
            f"{len(missing_reports)} of {len(studies)} studies have no report file (first: {missing_reports[0]}); "
            "unpack mimic-cxr-reports.zip into the root or pass reports_root="
        )
    return finish_dataset(
        root, "mimic", studies, problems,
        empty_fix="Check that the metadata file lists PA/AP images (ViewPosition column).",
    )
