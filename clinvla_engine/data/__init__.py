"""Datasets: the Study record, format detection and loaders, image decoding, the synthetic archive."""
from .formats import FORMATS, ArchiveDataset, detect_format, open_dataset
from .io import ImageDecodeError, is_dicom, load_image
from .study import CHEXPERT_COLUMNS, CLASSES, CLASSES_5X200, CLASSES_8X200, DatasetError, Study

__all__ = [
    "ArchiveDataset",
    "CHEXPERT_COLUMNS",
    "CLASSES",
    "CLASSES_5X200",
    "CLASSES_8X200",
    "DatasetError",
    "FORMATS",
    "ImageDecodeError",
    "Study",
    "detect_format",
    "is_dicom",
    "load_image",
    "open_dataset",
]
