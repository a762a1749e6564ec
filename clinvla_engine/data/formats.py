"""Open an image archive in any supported on-disk format: detection, dispatch, the dataset object.

Detection looks, in this order, for (see FORMATS.md for the layouts):

    mimic     mimic-cxr-*-metadata.csv or .csv.gz in the folder
    chexpert  train.csv / valid.csv with Path and Frontal/Lateral columns, in the folder or in a
              CheXpert-v1.0* subfolder
    rsna      stage_2_train_labels.csv in the folder
    dicom     any DICOM file in the tree (.dcm/.dicom, or the "DICM" marker at byte 128)

The loaders themselves live in one module per format and are imported only when used, so that
opening a MIMIC folder never imports pydicom.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import normalise_split
from .study import DatasetError, Study

logger = logging.getLogger("clinvla_engine.data")

FORMATS = ("mimic", "chexpert", "rsna", "dicom")

# format name -> (module, loader function); the loaders all take (root, **options).
_LOADERS = {
    "mimic": ("mimic", "load_mimic"),
    "chexpert": ("chexpert", "load_chexpert"),
    "rsna": ("rsna", "load_rsna"),
    "dicom": ("dicom", "load_dicom_tree"),
}

_PROBLEMS_SHOWN = 3


@dataclass
class ArchiveDataset:
    """The studies of one archive, in file order, and the problems met while reading it.

    problems are human-readable strings, one per skipped row / file / study (with the file name
    and line number where there is one), plus a few whole-file notes.
    """

    root: Path
    format: str
    studies: list[Study] = field(repr=False)
    problems: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self) -> Iterator[Study]:
        return iter(self.studies)

    def __getitem__(self, index: int | slice) -> Any:
        return self.studies[index]

    def __repr__(self) -> str:
        return (
            f"ArchiveDataset(format={self.format!r}, root={str(self.root)!r}, "
            f"studies={len(self.studies)}, problems={len(self.problems)})"
        )

    def split(self, name: str) -> list[Study]:
        """The studies of one split ("train", "validate", "test"; "val"/"valid" also work).

        Studies with no split information count as "train".
        """
        wanted = normalise_split(name)
        return [s for s in self.studies if (s.split or "train") == wanted]

    def split_names(self) -> list[str]:
        """The splits present, in first-seen order (no split info -> "train")."""
        return list(dict.fromkeys(s.split or "train" for s in self.studies))


def finish_dataset(
    root: Path, fmt: str, studies: list[Study], problems: list[str], *, empty_fix: str
) -> ArchiveDataset:
    """Log the one-line summary, refuse an empty dataset, wrap the studies."""
    root = Path(root)
    if problems:
        shown = "; ".join(problems[:_PROBLEMS_SHOWN])
        more = f" (+{len(problems) - _PROBLEMS_SHOWN} more)" if len(problems) > _PROBLEMS_SHOWN else ""
        logger.warning(
            "%s dataset %s: %d studies loaded, %d problems: %s%s",
            fmt, root, len(studies), len(problems), shown, more,
        )
    else:
        logger.info("%s dataset %s: %d studies loaded", fmt, root, len(studies))
    if not studies:
        detail = f" {len(problems)} problems, first: {'; '.join(problems[:_PROBLEMS_SHOWN])}." if problems else ""
        raise DatasetError(f"{root}: no usable {fmt} studies found.{detail} {empty_fix}".rstrip())
    return ArchiveDataset(root=root, format=fmt, studies=studies, problems=problems)


def _check_folder(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass the root folder of the dataset")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file; pass the folder that holds the dataset ({root.parent})")
    return root


def detect_format(path: str | Path) -> str:
    """The name of the format whose layout the folder has (see the module docstring)."""
    root = _check_folder(path)
    from . import chexpert, dicom, mimic, rsna

    if mimic.find_metadata(root) is not None:
        return "mimic"
    if chexpert.find_chexpert_dir(root) is not None:
        return "chexpert"
    if (root / rsna.LABELS_FILE).is_file():
        return "rsna"
    if dicom.first_dicom_file(root) is not None:
        return "dicom"
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "(empty folder)"
    raise DatasetError(
        f"{root}: unknown dataset format. Looked for mimic-cxr-*-metadata.csv[.gz] (MIMIC-CXR-JPG), "
        "train.csv/valid.csv with Path and Frontal/Lateral columns here or in CheXpert-v1.0*/ (CheXpert), "
        f"{rsna.LABELS_FILE} (RSNA pneumonia), and DICOM files anywhere below (DICOM tree); found: "
        f"{listing}. Pass the dataset's root folder, or fmt= one of {', '.join(FORMATS)}"
    )


def open_dataset(path: str | Path, fmt: str | None = None, **options: Any) -> ArchiveDataset:
    """Read an archive folder into an ArchiveDataset, detecting its format unless fmt is given.

    options go to the format's loader: check_files (all formats: stat every referenced image and
    report missing ones), progress (all: a tqdm bar where loading touches many files),
    reports_root and read_reports (mimic), labels_csv (dicom). An option the format does not
    take raises TypeError naming the ones it does.
    """
    root = _check_folder(path)
    if fmt is None:
        fmt = detect_format(root)
    name = fmt.strip().lower()
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset format {fmt!r} for {root}; known formats: {', '.join(FORMATS)}")
    module_name, function_name = _LOADERS[name]
    loader = getattr(importlib.import_module(f"{__package__}.{module_name}"), function_name)
    accepted = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"option(s) {', '.join(unknown)} do not apply to the {name} format; it takes {', '.join(accepted)}"
        )
    return loader(root, **options)

