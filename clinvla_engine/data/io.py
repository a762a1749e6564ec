"""Image decoding and the tolerant CSV reading that every dataset loader shares.

``load_image(path)`` turns a JPEG, PNG or DICOM file into a float32 (H, W) array in [0, 1], grey,
with the display conventions a radiologist would see (rescale, VOI LUT / window, MONOCHROME1
inverted). ``CsvTable`` reads a dataset's CSV file row by row, checks its header once, and turns
a malformed row into a problem string ("file line N: what is wrong") instead of an exception, so
that one bad row in a 377k-row file costs one row, not the whole load.
"""
from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np

from .study import DatasetError

T = TypeVar("T")

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
_PYDICOM_FIX = "install pydicom (pip install 'clinvla-engine[dicom]' or pip install pydicom)"


# ---------------------------------------------------------------------------------------------
# DICOM helpers
# ---------------------------------------------------------------------------------------------
def is_dicom(path: str | Path) -> bool:
    """True for a .dcm/.dicom file, or any file with the DICOM Part 10 "DICM" marker at byte 128.

    Never raises: an unreadable file is simply not DICOM here (load_image reports why).
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return has_dicm_preamble(path)


def has_dicm_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def require_pydicom() -> Any:
    """Import pydicom or say how to get it (it is the optional ``dicom`` extra)."""
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is installed in dev environments
        raise DatasetError(f"reading DICOM needs pydicom, which is not installed: {_PYDICOM_FIX}") from exc
    return pydicom


def _pixel_processing() -> tuple[Any, Any]:
    """(apply_modality_lut, apply_voi_lut) from pydicom 3 or, failing that, pydicom 2.x."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def read_dicom_header(path: Path) -> Any:
    """The DICOM dataset without its pixel data; DatasetError naming the path if unreadable."""
    pydicom = require_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except InvalidDicomError as exc:
        raise DatasetError(f"{path}: not a DICOM Part 10 file (no 'DICM' marker at byte 128): {exc}") from None
    except Exception as exc:  # truncated or corrupt header: pydicom raises many kinds
        raise DatasetError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})") from None


def dicom_refusal(ds: Any) -> str | None:
    """Why this image dataset cannot be loaded as one grey picture, or None if it can."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames) is not supported; export one frame per file"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (
            f"colour DICOM (PhotometricInterpretation {photometric}, SamplesPerPixel {samples}) is not "
            "supported; chest X-rays must be MONOCHROME1 or MONOCHROME2"
        )
    return None


def _load_dicom(path: Path) -> np.ndarray:
    pydicom = require_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DatasetError(f"{path}: not a DICOM Part 10 file (no 'DICM' marker at byte 128): {exc}") from None
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from None
    refusal = dicom_refusal(ds)
    if refusal:
        raise DatasetError(f"{path}: {refusal}")
    if "PixelData" not in ds:
        modality = ds.get("Modality", "?")
        raise DatasetError(f"{path}: DICOM file has no pixel data (Modality {modality}); it is not an image")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        fix = (
            "; compressed DICOM needs a decoder plugin: pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg (or python-gdcm)"
            if getattr(syntax, "is_compressed", False)
            else "; the file may be truncated"
        )
        raise DatasetError(f"{path}: cannot decode the pixel data (transfer syntax {name}): {exc}{fix}") from None
    if stored.ndim != 2:
        raise DatasetError(f"{path}: expected one 2-D grey frame, got pixel array of shape {stored.shape}")
    try:
        return dicom_to_unit(stored, ds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise DatasetError(f"{path}: invalid rescale / VOI LUT / window attributes ({exc})") from None


def dicom_to_unit(stored: np.ndarray, ds: Any) -> np.ndarray:
    """Stored pixel values -> displayed grey in [0, 1] (modality LUT, VOI, MONOCHROME1 inversion).

    Normalisation: with a VOI LUT the output spans the LUT's declared bit depth; with a window the
    output spans pydicom's windowing output range, which is found by probing the same function
    with values far below and above the window (so it matches whatever range pydicom uses); with
    neither, the modality output of the full stored bit range (0..2^BitsStored-1, or the signed
    range) maps to [0, 1].
    """
    apply_modality_lut, apply_voi_lut = _pixel_processing()
    values = apply_modality_lut(stored, ds)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        shown = apply_voi_lut(values, ds, prefer_lut=True)
        bits = int(voi_seq[0].LUTDescriptor[2])
        low, high = 0.0, float(2**bits - 1)
    elif has_window:
        shown = apply_voi_lut(values, ds, prefer_lut=False)
        with np.errstate(over="ignore", under="ignore"):
            probe = apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), ds, prefer_lut=False)
        low, high = float(probe[0]), float(probe[1])
    else:
        bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8) or 8)
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            bounds = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
        else:
            bounds = np.array([0, 2**bits - 1], dtype=np.int64)
        shown = values
        probe = np.asarray(apply_modality_lut(bounds, ds), dtype=np.float64)
        low, high = float(probe[0]), float(probe[1])
    if high == low:
        raise ValueError(f"degenerate display range [{low}, {high}]")
    unit = (np.asarray(shown, dtype=np.float64) - low) / (high - low)
    unit = np.clip(unit, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: the lowest value is displayed white
    return unit.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Raster images
# ---------------------------------------------------------------------------------------------
_PIL_16BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _load_raster(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, with its name
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.float32) / 255.0
            if mode in _PIL_16BIT_MODES or mode == "I":
                # 16-bit grey PNG/TIFF (Pillow opens it as I;16, older versions as I)
                values = np.asarray(img).astype(np.float32)
                return np.clip(values / 65535.0, 0.0, 1.0)
            if mode == "F":
                values = np.asarray(img, dtype=np.float32)
                low, high = float(values.min()), float(values.max())
                return (values - low) / (high - low) if high > low else np.zeros_like(values)
            grey = img.convert("L")  # RGB, RGBA, P, LA, 1, CMYK...: ITU-R 601 luma
            return np.asarray(grey, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a readable image (neither DICOM nor a format PIL can open)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated image ({exc})") from None


def load_image(path: str | Path) -> np.ndarray:
    """Decode a JPEG, PNG or DICOM chest X-ray into float32 (H, W) grey in [0, 1].

    Raises DatasetError naming the path and what is wrong (missing, not an image, corrupt,
    multi-frame or colour DICOM, compressed DICOM without a decoder).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, not an image file")
    if is_dicom(path):
        image = _load_dicom(path)
    else:
        image = _load_raster(path)
    return np.ascontiguousarray(image, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# CSV reading with per-row problems
# ---------------------------------------------------------------------------------------------
def find_file(folder: Path, name: str) -> Path | None:
    """folder/name, or folder/name.gz, whichever exists (plain first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def open_text(path: Path) -> TextIO:
    """Open a .csv or .csv.gz for csv reading (UTF-8 with or without BOM; bad bytes replaced)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def read_header(path: Path) -> list[str] | None:
    """The CSV's column names, or None when the file cannot be read as CSV."""
    try:
        with open_text(path) as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeError):
        return None


class CsvTable:
    """One CSV file: the header is checked on construction, rows are yielded as (line, fields).

    ``col[name]`` is the column index. Rows with the wrong number of fields, and lines the csv
    module cannot parse, become problem strings in ``problems`` and are skipped. Blank lines are
    skipped silently. ``line`` is the physical line number where the row ends (header = line 1).
    """

    def __init__(self, path: Path, required: Sequence[str], problems: list[str], *, fix: str = ""):
        self.path = Path(path)
        self.problems = problems
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: required file not found{'; ' + fix if fix else ''}")
        header = read_header(self.path)
        if not header:
            raise DatasetError(f"{self.path}: cannot read a CSV header (empty, binary or corrupt file)")
        self.columns = header
        self.col = {name: i for i, name in reversed(list(enumerate(header)))}  # first wins on duplicates
        missing = [name for name in required if name not in self.col]
        if missing:
            raise DatasetError(
                f"{self.path}: missing column(s) {', '.join(repr(m) for m in missing)}; found "
                f"{', '.join(header)}. Expected at least: {', '.join(required)}"
                + (f"; {fix}" if fix else "")
            )

    def problem(self, line: int, message: str) -> None:
        self.problems.append(f"{self.path.name} line {line}: {message}")

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        width = len(self.columns)
        try:
            with open_text(self.path) as f:
                reader = csv.reader(f)
                try:
                    next(reader)  # header, checked in __init__
                except StopIteration:
                    return
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        self.problem(reader.line_num, f"unparsable CSV ({exc}); row skipped")
                        continue
                    if len(row) == width:
                        yield reader.line_num, row
                    elif not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    else:
                        self.problem(
                            reader.line_num, f"{len(row)} fields where the header has {width}; row skipped"
                        )
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{self.path}: file is truncated or corrupt ({exc}); re-download it") from None


_NAN = float("nan")
# The cells CheXpert and MIMIC actually write, looked up before any float parsing (millions of cells).
_LABEL_CELLS = {"": _NAN, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "1": 1.0, "0": 0.0, "-1": -1.0}


def parse_label(text: str) -> float:
    """A CheXpert label cell -> 1.0, 0.0, -1.0, or NaN for blank; ValueError for anything else."""
    value = _LABEL_CELLS.get(text)
    if value is not None:
        return value
    text = text.strip()
    if not text:
        return _NAN
    value = float(text)
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label {text!r} is not one of 1, 0, -1 or blank")
    return value


SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validate": "validate",
    "validation": "validate",
    "valid": "validate",
    "val": "validate",
    "test": "test",
    "testing": "test",
}


def normalise_split(text: str | None) -> str | None:
    """"val"/"valid"/"validation" -> "validate" and so on; blank -> None; others kept lower-cased."""
    if text is None:
        return None
    text = text.strip().lower()
    if not text:
        return None
    return SPLIT_ALIASES.get(text, text)


def with_progress(items: Iterable[T], *, enabled: bool, desc: str, unit: str, total: int | None = None) -> Iterable[T]:
    """items, wrapped in a tqdm bar (count and rate) when enabled and tqdm is importable."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc=desc, unit=unit, total=total)
