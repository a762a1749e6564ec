"""Decode one DICOM chest X-ray, of any transfer syntax an archive holds, to float32 grey in [0, 1].

``decode_dicom(path_bytes_or_dataset, *, target_size=None) -> np.ndarray`` (H, W) float32 in [0, 1]
(a file on disk and the same file's bytes, e.g. downloaded from a PACS, go through the same code):
stored values -> modality LUT (Rescale Slope/Intercept or LUT) -> VOI LUT, else the first
window, else the full stored range -> MONOCHROME1 inverted (``data.io.dicom_to_unit``, the same
display rules as ``load_image``). Signed pixels are read as signed by the decoders.

Transfer syntaxes and who decodes them (pydicom picks the first available plugin):

| transfer syntax                                   | decoder                                   |
| ------------------------------------------------- | ----------------------------------------- |
| implicit / explicit VR little endian, big endian, deflated | pydicom (no extra)              |
| RLE lossless                                      | pydicom, pylibjpeg-rle, gdcm              |
| JPEG baseline (8-bit), extended (12-bit)          | pylibjpeg-libjpeg (gdcm, Pillow: 8-bit only) |
| JPEG lossless (process 14, SV1)                   | pylibjpeg-libjpeg, gdcm                   |
| JPEG-LS lossless / near-lossless                  | pyjpegls, pylibjpeg-libjpeg, gdcm         |
| JPEG 2000 lossless / lossy (and HTJ2K)            | pylibjpeg-openjpeg, gdcm, Pillow          |

All codecs come with ``pip install 'clinvla-engine[dicom]'``; a file whose codec is missing raises
``ImageDecodeError`` naming that extra and the transfer syntax.

JPEG 2000 at a reduced resolution: with ``target_size`` set, a JPEG 2000 frame whose shorter side
is at least twice target_size is decoded at wavelet level r (Pillow's OpenJPEG ``reduce``), the
largest r that keeps the shorter side >= target_size and that the codestream's decomposition
levels allow. The low-pass band is a proper anti-aliased downsample, and decoding it skips most
of the work (about 4^r fewer samples). Other syntaxes always decode at full size; the caller
resizes (``data.transforms.preprocess``).

Hostile input never costs more memory than MAX_IMAGE_PIXELS allows: before any pixel is
decoded the header is checked (Modality CR/DX, one grey frame, BitsAllocated 8 or 16, BitsStored
<= BitsAllocated, Rows x Columns within ``data.io.MAX_IMAGE_PIXELS``), the pixel data's declared
length against the file size, native pixel data against Rows x Columns x BitsAllocated, and
compressed pixel data against ``MAX_COMPRESSION_RATIO``. Every refusal is an ``ImageDecodeError``
(path, reason).
"""
from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from ..data import io as _io
from ..data.io import ImageDecodeError, dicom_refusal, dicom_to_unit, require_pydicom
from ..data.study import DatasetError
from .views import modality_allowed, rules

DICOM_EXTRA_FIX = "pip install 'clinvla-engine[dicom]'"

# A compressed frame that claims to expand more than this is refused before decoding: real chest
# X-rays compress about 2-4x lossless and up to ~50x lossy; 1000x means a header lies (or a blank
# frame, which is no radiograph either). Module attribute: raise it for genuinely sparse images.
MAX_COMPRESSION_RATIO = 1000

# Reduce a JPEG 2000 frame only when it is at least this many times larger than target_size:
# below that, a full decode costs little and keeps every pixel.
J2K_REDUCE_FACTOR = 2

_J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
})
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _source_path(ds: Any) -> Path:
    name = getattr(ds, "filename", None)
    return Path(name) if isinstance(name, (str, Path)) and name else Path("<dataset>")


def _parse(source: Any, path: Path, **read_options: Any) -> Any:
    """pydicom.dcmread(source) with every failure turned into an ImageDecodeError naming `path`."""
    pydicom = require_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd header; errors come below
            return pydicom.dcmread(source, **read_options)
    except InvalidDicomError as exc:
        raise ImageDecodeError(path, f"not a DICOM Part 10 file (no 'DICM' marker at byte 128): {exc}") from None
    except Exception as exc:  # truncated or corrupt header: pydicom raises many kinds
        raise ImageDecodeError(path, f"unreadable DICOM header, truncated or corrupt "
                                     f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None


def _read(path: Path) -> tuple[Any, int]:
    """The dataset with its pixel data left on disk (read after the checks), and the file size."""
    if not path.exists():
        raise ImageDecodeError(path, "no such file")
    if path.is_dir():
        raise ImageDecodeError(path, "is a folder, not a DICOM file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read the file ({exc})") from None
    if size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes); the copy or download was probably cut short")
    return _parse(path, path, defer_size="256 KB"), size


def _read_bytes(data: bytes, path: Path) -> tuple[Any, int]:
    """The same as _read for a file already in memory (e.g. downloaded from a PACS); `path` only
    names it in errors. Nothing is deferred: the bytes are here already."""
    if len(data) == 0:
        raise ImageDecodeError(path, "empty file (0 bytes); the copy or download was probably cut short")
    return _parse(BytesIO(data), path), len(data)


def _int(ds: Any, keyword: str, path: Path, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            if default is None:
                raise ImageDecodeError(path, f"{keyword} is missing from the DICOM header")
            return default
        return int(value)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(path, f"invalid {keyword} in the DICOM header ({exc})") from None


def _transfer_syntax(ds: Any, path: Path) -> Any:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not syntax:
        raise ImageDecodeError(path, "no TransferSyntaxUID in the file meta information; the file is not a "
                                     "complete DICOM Part 10 file")
    return syntax


def _syntax_name(syntax: Any) -> str:
    name = getattr(syntax, "name", "") or ""
    return f"{name} ({syntax})" if name and name != str(syntax) else str(syntax)


def _check_header(ds: Any, path: Path, file_size: int | None) -> tuple[int, int, int, Any]:
    """(rows, columns, bits_allocated, transfer syntax) after every check that needs no pixel."""
    if "PixelData" not in ds and "Rows" not in ds:  # checked first: a cut header also lacks Modality
        raise ImageDecodeError(path, "no image attributes (Rows, pixel data) in this DICOM file: not an image, "
                                     "or a file truncated inside its header")
    if not modality_allowed(ds):
        modality = str(ds.get("Modality", "") or "").strip() or "blank"
        allowed = "/".join(sorted(rules().modalities))
        raise ImageDecodeError(path, f"Modality {modality} is not a chest radiograph ({allowed} only); not decoded")
    refusal = dicom_refusal(ds)
    if refusal:
        raise ImageDecodeError(path, refusal)
    if "PixelData" not in ds:
        raise ImageDecodeError(path, "no pixel data (7FE0,0010) in this DICOM file; it is not an image")
    rows, columns = _int(ds, "Rows", path), _int(ds, "Columns", path)
    if rows <= 0 or columns <= 0:
        raise ImageDecodeError(path, f"Rows x Columns is {rows} x {columns}; not an image")
    _io._check_pixels(path, columns, rows)  # MAX_IMAGE_PIXELS, read at call time
    bits = _int(ds, "BitsAllocated", path)
    if bits not in (8, 16):
        raise ImageDecodeError(path, f"BitsAllocated {bits} is not 8 or 16, the only depths of a grey radiograph")
    stored = _int(ds, "BitsStored", path, bits)
    if not 1 <= stored <= bits:
        raise ImageDecodeError(path, f"BitsStored {stored} does not fit BitsAllocated {bits}")
    if _int(ds, "PixelRepresentation", path, 0) not in (0, 1):
        raise ImageDecodeError(path, "PixelRepresentation must be 0 (unsigned) or 1 (signed)")
    syntax = _transfer_syntax(ds, path)

    element = ds.get_item("PixelData")  # raw: its value may still be on disk (deferred)
    declared = getattr(element, "length", None)
    expected = rows * columns * (bits // 8)
    if declared is not None and declared != _UNDEFINED_LENGTH:
        # a deflated data set is smaller on disk than the pixel data it holds; its inflated size is
        # bounded below by Rows x Columns x BitsAllocated against the header's claim instead
        deflated = bool(getattr(syntax, "is_deflated", False))
        if deflated and declared > 2 * expected + 64:
            raise ImageDecodeError(path, f"pixel data claims {declared:,} bytes, far more than Rows x Columns x "
                                         f"BitsAllocated ({rows} x {columns} x {bits}) needs ({expected:,})")
        if file_size is not None and declared > file_size and not deflated:
            raise ImageDecodeError(path, f"pixel data claims {declared:,} bytes but the file has {file_size:,}; "
                                         "the file is truncated")
        if not syntax.is_encapsulated and declared < expected:
            raise ImageDecodeError(path, f"pixel data holds {declared:,} bytes, but Rows x Columns x "
                                         f"BitsAllocated ({rows} x {columns} x {bits}) needs {expected:,}; "
                                         "truncated file or wrong header")
    return rows, columns, bits, syntax


def _get_decoder(syntax: Any, path: Path) -> Any:
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.x: no per-syntax decoder registry
        import pydicom

        raise DatasetError(f"decoding DICOM needs pydicom 3.0 or later, found {pydicom.__version__}: "
                           f"{DICOM_EXTRA_FIX}") from None

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(path, f"transfer syntax {_syntax_name(syntax)} cannot be decoded (no pydicom "
                                     "decoder exists for it); convert the file, e.g. gdcmconv --raw") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ImageDecodeError(path, f"no codec installed for transfer syntax {_syntax_name(syntax)}: "
                                     f"{DICOM_EXTRA_FIX} (needs one of: {missing})")
    return decoder


def _first_frame(ds: Any) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def j2k_decomposition_levels(codestream: bytes) -> int:
    """Wavelet decomposition levels from the COD marker of a J2K codestream; 0 if not found."""
    if codestream[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ: a bare codestream, as DICOM requires
        return 0
    pos = 2
    while pos + 4 <= len(codestream):
        marker = codestream[pos:pos + 2]
        length = int.from_bytes(codestream[pos + 2:pos + 4], "big")
        if marker == b"\xff\x52":  # COD: Lcod, Scod, SGcod (order, layers(2), MCT), levels
            return codestream[pos + 9] if pos + 9 < len(codestream) else 0
        if marker == b"\xff\x90" or length < 2:  # first tile: the main header is over
            return 0
        pos += 2 + length
    return 0


def j2k_reduce_level(rows: int, columns: int, levels: int, target_size: int | None) -> int:
    """The reduction r for a frame of rows x columns (see the module doc); 0 means full size."""
    shorter = min(rows, columns)
    if not target_size or target_size <= 0 or shorter < J2K_REDUCE_FACTOR * target_size:
        return 0
    r = 0
    while r < levels and -(-shorter >> (r + 1)) >= target_size:  # ceil(shorter / 2^(r+1))
        r += 1
    return r


def _decode_j2k_reduced(frame: bytes, reduce: int, ds: Any) -> np.ndarray | None:
    """The frame at 1/2^reduce of its size via Pillow's OpenJPEG, or None when Pillow cannot."""
    from PIL import Image, features
    from pydicom.pixels.utils import get_j2k_parameters

    if not features.check("jpg_2000"):
        return None
    params = get_j2k_parameters(frame)
    precision = params.get("precision")
    if not precision or precision > 16:
        return None
    try:
        with Image.open(BytesIO(frame), formats=("JPEG2000",)) as im:
            im.reduce = reduce
            im.load()
            if im.mode not in ("L", "I;16"):
                return None
            raw = np.asarray(im)
    except Exception:  # e.g. a codestream Pillow's OpenJPEG rejects: pydicom's full decode decides
        return None
    # Pillow scales N-bit samples up to its 8- or 16-bit container and offsets signed ones to
    # unsigned (as pydicom's Pillow decoder notes); undo both to get stored values.
    container = 8 if precision <= 8 else 16
    values = raw.astype(np.int32)
    if params.get("is_signed") and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        values -= 1 << (container - 1)
    return values >> (container - precision)


def _decode_stored(ds: Any, path: Path, syntax: Any, rows: int, columns: int, bits: int,
                   target_size: int | None) -> np.ndarray:
    decoder = _get_decoder(syntax, path)
    try:
        if syntax.is_encapsulated:
            frame = _first_frame(ds)
            ratio = rows * columns * (bits // 8) / max(1, len(frame))
            if ratio > MAX_COMPRESSION_RATIO:
                raise ImageDecodeError(path, f"{len(frame):,} compressed bytes claim to expand to {rows} x {columns} "
                                             f"pixels ({ratio:,.0f}:1, over MAX_COMPRESSION_RATIO "
                                             f"{MAX_COMPRESSION_RATIO}); header and data disagree")
            if str(syntax) in _J2K_SYNTAXES and target_size:
                reduce = j2k_reduce_level(rows, columns, j2k_decomposition_levels(frame), target_size)
                if reduce:
                    reduced = _decode_j2k_reduced(frame, reduce, ds)
                    if reduced is not None:
                        return reduced
        elif len(ds.PixelData) < rows * columns * (bits // 8):  # deferred: read only now
            raise ImageDecodeError(path, f"pixel data holds {len(ds.PixelData):,} bytes, fewer than "
                                         f"{rows} x {columns} x {bits // 8} needs; truncated file or wrong header")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns and then copes (e.g. BitsStored vs J2K precision)
            return decoder.as_array(ds, index=0)[0]
    except ImageDecodeError:
        raise
    except Exception as exc:  # codecs raise many kinds on corrupt data
        raise ImageDecodeError(path, f"cannot decode the pixel data (transfer syntax {_syntax_name(syntax)}): "
                                     f"{type(exc).__name__}: {' '.join(str(exc).split())}; the file may be "
                                     "truncated or corrupt") from None


def decode_dicom(source: str | Path | bytes | Any, *, target_size: int | None = None,
                 name: str | None = None) -> np.ndarray:
    """One DICOM radiograph -> float32 (H, W) grey in [0, 1]; ImageDecodeError(path, reason) otherwise.

    source: a path, the bytes of a whole DICOM Part 10 file (e.g. downloaded from Orthanc), or a
    pydicom Dataset already read (with its pixel data); a file and its bytes decode identically.
    target_size: the model's input side, used only to decode JPEG 2000 at a reduced resolution
    (module doc). name: what errors call a bytes or Dataset source (default "<bytes>" /
    the dataset's filename).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        ds, file_size = _read(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        path = Path(name or "<bytes>")
        ds, file_size = _read_bytes(bytes(source), path)
    else:
        ds, path, file_size = source, Path(name) if name else _source_path(source), None
    rows, columns, bits, syntax = _check_header(ds, path, file_size)
    stored = _decode_stored(ds, path, syntax, rows, columns, bits, target_size)
    if stored.ndim != 2:
        raise ImageDecodeError(path, f"expected one 2-D grey frame, got pixel array of shape {stored.shape}")
    try:
        unit = dicom_to_unit(stored, ds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ImageDecodeError(path, f"invalid rescale / VOI LUT / window attributes ({exc})") from None
    return np.ascontiguousarray(unit, dtype=np.float32)
