"""Image decoding and the tolerant CSV reading that every dataset loader shares.

``load_image(path)`` turns a JPEG, PNG or DICOM file into a float32 (H, W) array in [0, 1], grey,
with the display conventions a radiologist would see (rescale, VOI LUT / window, MONOCHROME1
inverted). Any file it cannot turn into an image raises ``ImageDecodeError`` (path and reason), the
one exception a training or evaluation loop catches to skip a study; the image size is checked
against ``MAX_IMAGE_PIXELS`` from the header, before any pixel is decoded, so memory stays bounded
whatever a file claims. ``read_text_file`` / ``decode_text`` read report text in UTF-8, or say how
a UTF-16 or Windows-1252 file was read, or refuse a binary one.

``CsvTable`` reads a dataset's CSV file row by row, checks its header once, and turns a malformed
row into a problem string ("file line N: what is wrong") instead of an exception, so that one bad
row in a 377k-row file costs one row, not the whole load.
"""
from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np

from .study import CHEXPERT_COLUMNS, DatasetError

T = TypeVar("T")

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
_PYDICOM_FIX = "install pydicom (pip install 'clinvla-engine[dicom]' or pip install pydicom)"

# The largest image load_image decodes, in pixels: 50 M is over twice the largest chest X-ray
# detectors (about 4300 x 4300); decoding it takes about 200 MB as float32. Checked against the
# header before decoding, so a file that claims 60000 x 60000 costs nothing. Raise it (this module
# attribute) for genuinely larger images.
MAX_IMAGE_PIXELS = 50_000_000


class ImageDecodeError(DatasetError):
    """One image file that cannot be decoded: missing, not an image, corrupt, truncated, too large,
    or a DICOM that is not one grey frame. ``path`` and ``reason`` say which and why.

    It concerns that file only, so a loop over many studies may skip the study and go on; a
    problem with the environment (pydicom not installed) is a plain DatasetError instead.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # DataLoader workers pickle the exception back to the main process
        return (type(self), (self.path, self.reason))


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            path,
            f"image claims {width} x {height} pixels ({width * height:,}), over the limit of "
            f"{MAX_IMAGE_PIXELS:,}; not decoded. If the image is genuine, raise "
            "clinvla_engine.data.io.MAX_IMAGE_PIXELS",
        )


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
        # large elements (the pixel data) stay on disk until used: the size check below comes first
        ds = pydicom.dcmread(path, defer_size="1 MB")
    except InvalidDicomError as exc:
        raise ImageDecodeError(path, f"not a DICOM Part 10 file (no 'DICM' marker at byte 128): {exc}") from None
    except Exception as exc:  # truncated or corrupt: pydicom raises many kinds
        raise ImageDecodeError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from None
    refusal = dicom_refusal(ds)
    if refusal:
        raise ImageDecodeError(path, refusal)
    if "PixelData" not in ds:
        modality = ds.get("Modality", "?")
        raise ImageDecodeError(path, f"DICOM file has no pixel data (Modality {modality}); it is not an image")
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(path, f"invalid Rows / Columns in the DICOM header ({exc})") from None
    _check_pixels(path, columns, rows)
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
        raise ImageDecodeError(path, f"cannot decode the pixel data (transfer syntax {name}): {exc}{fix}") from None
    if stored.ndim != 2:
        raise ImageDecodeError(path, f"expected one 2-D grey frame, got pixel array of shape {stored.shape}")
    try:
        return dicom_to_unit(stored, ds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ImageDecodeError(path, f"invalid rescale / VOI LUT / window attributes ({exc})") from None


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
        with Image.open(path) as img:  # reads the header only
            _check_pixels(path, *img.size)
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
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a readable image (neither DICOM nor a format PIL can open)") from None
    except Image.DecompressionBombError as exc:  # PIL's own check, at twice its limit, fires in open()
        raise ImageDecodeError(
            path, f"image too large to decode ({exc}); not decoded. If the image is genuine, raise "
            "clinvla_engine.data.io.MAX_IMAGE_PIXELS and PIL.Image.MAX_IMAGE_PIXELS"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None
    except Exception as exc:  # Pillow's decoders raise many other kinds on malformed input
        raise ImageDecodeError(path, f"undecodable image ({type(exc).__name__}: {exc})") from None


def load_image(path: str | Path) -> np.ndarray:
    """Decode a JPEG, PNG or DICOM chest X-ray into float32 (H, W) grey in [0, 1].

    Raises ImageDecodeError (a DatasetError) naming the path and what is wrong: missing, a
    folder, empty, not an image, corrupt or truncated, larger than MAX_IMAGE_PIXELS, multi-frame
    or colour DICOM, compressed DICOM without a decoder. DatasetError alone means the environment
    cannot read DICOM at all (pydicom missing).
    """
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(path, "no such file")
    if path.is_dir():
        raise ImageDecodeError(path, "is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file (0 bytes); the copy or download was probably cut short")
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read the file ({exc})") from None
    if is_dicom(path):
        image = _load_dicom(path)
    else:
        image = _load_raster(path)
    return np.ascontiguousarray(image, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Text: reports (and the encoding sniffing CSV reading shares)
# ---------------------------------------------------------------------------------------------
# Byte-order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32", "UTF-32"),
    (b"\x00\x00\xfe\xff", "utf-32", "UTF-32"),
    (b"\xef\xbb\xbf", "utf-8-sig", None),  # UTF-8 with a BOM is plain UTF-8: no note
    (b"\xff\xfe", "utf-16", "UTF-16"),
    (b"\xfe\xff", "utf-16", "UTF-16"),
)
MAX_REPORT_BYTES = 1 << 20  # a radiology report is a few kB; anything over 1 MiB is not one
_REPORT_FIX = "save it as UTF-8 text"


def sniff_bom(head: bytes) -> tuple[str, str | None] | None:
    """(Python codec, name for a note or None) for text that starts with a byte-order mark."""
    for bom, codec, name in _BOMS:
        if head.startswith(bom):
            return codec, name
    return None


def decode_text(data: bytes, path: str | Path) -> tuple[str, str | None]:
    """The bytes of a text file -> (text, note); note is None for UTF-8, else how it was read.

    UTF-8 (with or without BOM) is read as is. A UTF-16 or UTF-32 byte-order mark is obeyed. NUL
    bytes without a mark are UTF-16 when they fall on every other byte (text in UTF-16 without a
    BOM) and otherwise mean a binary file: refused with DatasetError naming the path. Bytes that are
    not valid UTF-8 are read as Windows-1252 (cp1252; the five bytes it leaves undefined as
    Latin-1), where such reports come from; the note says so, since a wrong guess misreads a few
    accented characters, not the structure of the report.
    """
    path = Path(path)
    marked = sniff_bom(data[:4])
    if marked is not None:
        codec, name = marked
        try:
            text = data.decode(codec)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: starts with a {name or 'UTF-8'} byte-order mark but is not valid "
                               f"{name or 'UTF-8'} ({exc}); {_REPORT_FIX}") from None
        return text, (None if name is None else f"{path}: text is {name} (byte-order mark); decoded as {name}")
    if b"\x00" in data:
        even, odd = data[0::2].count(0), data[1::2].count(0)
        pairs = max(1, len(data) // 2)
        codec = "utf-16-le" if odd > 0.3 * pairs and even == 0 else "utf-16-be" if even > 0.3 * pairs and odd == 0 \
            else None
        if codec == "utf-16-le" and len(data) % 2:
            data += b"\x00"  # the high byte of the last character, dropped as padding (DICOM, C strings)
        if codec is not None:
            try:
                return data.decode(codec), f"{path}: text is UTF-16 without a byte-order mark; decoded as {codec}"
            except UnicodeDecodeError:
                pass
        raise DatasetError(f"{path}: holds NUL bytes, so it is binary, not report text; {_REPORT_FIX}")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start} (0x{data[exc.start]:02x})"
    try:
        text, codec = data.decode("cp1252"), "Windows-1252 (cp1252)"
    except UnicodeDecodeError:
        text, codec = data.decode("latin-1"), "Latin-1"
    return text, f"{path}: text is not UTF-8 (first bad {where}); decoded as {codec}; {_REPORT_FIX}"


def read_text_file(path: str | Path) -> tuple[str, str | None]:
    """Read a report file with decode_text: (text, note), with \\r\\n and \\r turned into \\n as
    open() in text mode does (section headers are matched at line ends). DatasetError for a file
    too large to be a report or one that is binary; OSError (FileNotFoundError included) passes
    through."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_REPORT_BYTES + 1)
    if len(data) > MAX_REPORT_BYTES:
        raise DatasetError(f"{path}: over {MAX_REPORT_BYTES:,} bytes, too large to be a report; not read")
    text, note = decode_text(data, path)
    return text.replace("\r\n", "\n").replace("\r", "\n"), note


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
    """Open a .csv or .csv.gz for csv reading: UTF-8 (with or without BOM; bad bytes replaced, as
    the cells that matter are ASCII ids and labels), or UTF-16/32 where a byte-order mark says so.
    A file whose start holds NUL bytes without a mark is refused (DatasetError): it is binary or
    BOM-less UTF-16, and read as UTF-8 its header would silently not match."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except (OSError, EOFError, zlib.error):
        head = b""  # damaged or short: the reading below reports it where it is found, as before
    marked = sniff_bom(head[:4])
    if marked is None and b"\x00" in head:
        raise DatasetError(f"{path}: holds NUL bytes (binary, or UTF-16 without a byte-order mark); save it as "
                           "UTF-8 CSV")
    encoding = marked[0] if marked else "utf-8-sig"
    return opener(path, "rt", encoding=encoding, errors="replace", newline="")


def read_header(path: Path) -> list[str] | None:
    """The CSV's column names, or None when the file cannot be read as CSV."""
    try:
        with open_text(path) as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeError, DatasetError):
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

    def label_columns(self) -> list[tuple[str, int]]:
        """(CheXpert column, index) for every CheXpert observation this file has a column for."""
        return [(name, self.col[name]) for name in CHEXPERT_COLUMNS if name in self.col]

    def labels(self, line: int, row: list[str], columns: Sequence[tuple[str, int]]) -> dict[str, float] | None:
        """The row's label cells (see parse_label), or None after recording a problem for the first
        cell that is not 1, 0, -1 or blank (the caller skips the row)."""
        values: dict[str, float] = {}
        for name, index in columns:
            try:
                values[name] = parse_label(row[index])
            except ValueError as exc:
                self.problem(line, f"column {name!r}: {exc}; row skipped")
                return None
        return values

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
