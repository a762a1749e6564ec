"""Open an image archive in any supported on-disk format: detection, dispatch, the dataset object.

Detection looks, in this order, for (see FORMATS.md for the layouts):

    mimic     mimic-cxr-*-metadata.csv or .csv.gz in the folder
    chexpert  train.csv / valid.csv with Path and Frontal/Lateral columns, in the folder or in a
              CheXpert-v1.0* subfolder
    rsna      stage_2_train_labels.csv in the folder
    dicom     any DICOM file in the tree (.dcm/.dicom, or the "DICM" marker at byte 128)

The loaders live in one module per format; none of them imports pydicom until it reads a DICOM
file, so opening a MIMIC folder never imports it. ArchiveDataset and finish_dataset live in
archive.py (below the loaders) and are re-exported here.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

# The loaders import ArchiveDataset and finish_dataset from .archive, never from here: this module
# sits above them (it dispatches to them), so the imports run one way only.
from . import chexpert, dicom, mimic, rsna
from .archive import FORMATS, ArchiveDataset, check_complete, finish_dataset
from .study import DatasetError

__all__ = ["FORMATS", "ArchiveDataset", "detect_format", "finish_dataset", "open_dataset"]

# format name -> loader function; the loaders all take (root, **options).
_LOADERS = {
    "mimic": mimic.load_mimic,
    "chexpert": chexpert.load_chexpert,
    "rsna": rsna.load_rsna,
    "dicom": dicom.load_dicom_tree,
}


def _check_folder(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; pass the root folder of the dataset")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file; pass the folder that holds the dataset ({root.parent})")
    check_complete(root)  # before detection: a stopped generator may not have written the CSVs yet
    return root


def detect_format(path: str | Path) -> str:
    """The name of the format whose layout the folder has (see the module docstring)."""
    root = _check_folder(path)
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
    loader = _LOADERS[name]
    accepted = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"option(s) {', '.join(unknown)} do not apply to the {name} format; it takes {', '.join(accepted)}"
        )
    return loader(root, **options)

