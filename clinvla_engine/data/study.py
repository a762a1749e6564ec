"""The record every dataset loader yields, and the label vocabulary shared by all formats."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The 14 CheXpert observations, in the column order of CheXpert's train.csv.
CHEXPERT_COLUMNS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# The nine classes the retrieval protocols (CheXpert 5x200 and 8x200) use; the synthetic archive
# draws its findings from these.
CLASSES = (
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
    "Fracture",
)
CLASSES_5X200 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CLASSES_8X200 = (
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Edema",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
    "Fracture",
)

ImageRef = Path  # a file path; images are decoded lazily by clinvla_engine.data.io.load_image


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the path and what is wrong."""


@dataclass
class Study:
    """One imaging study: a frontal view, an optional lateral view, the report, the labels.

    labels maps CheXpert column names to 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or NaN
    (blank / not mentioned), as the CheXpert and MIMIC-CXR label files write them.
    """

    study_id: str
    frontal: ImageRef
    lateral: ImageRef | None = None
    report: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    split: str | None = None  # "train", "validate" or "test" where the dataset says
    subject_id: str | None = None
    source: str = ""  # format name: mimic, chexpert, rsna, dicom
    meta: dict[str, Any] = field(default_factory=dict)

    def positive(self, name: str) -> bool:
        value = self.labels.get(name, math.nan)
        return value == 1.0
