"""decode_dicom: every transfer syntax round-trips, display rules, hostile files refused.

Files are synthetic, written here with pydicom's encoders (RLE, JPEG-LS via pyjpegls, JPEG 2000
via pylibjpeg-openjpeg) and python-gdcm (the JPEG processes, which pydicom cannot encode).
"""
from __future__ import annotations

import copy
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate, generate_frames  # noqa: E402
from pydicom.uid import UID, generate_uid  # noqa: E402

from clinvla_engine.data.io import ImageDecodeError  # noqa: E402
from clinvla_engine.pipeline import decode as decode_module  # noqa: E402
from clinvla_engine.pipeline.decode import (  # noqa: E402
    decode_dicom,
    j2k_decomposition_levels,
    j2k_reduce_level,
)

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT_LE = UID("1.2.840.10008.1.2.1")
IMPLICIT_LE = UID("1.2.840.10008.1.2")
EXPLICIT_BE = UID("1.2.840.10008.1.2.2")
DEFLATED = UID("1.2.840.10008.1.2.1.99")
RLE = UID("1.2.840.10008.1.2.5")
JPEG_BASELINE = UID("1.2.840.10008.1.2.4.50")
JPEG_EXTENDED = UID("1.2.840.10008.1.2.4.51")
JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")
JPEG_LOSSLESS_SV1 = UID("1.2.840.10008.1.2.4.70")
JPEG_LS_LOSSLESS = UID("1.2.840.10008.1.2.4.80")
JPEG_LS_NEAR = UID("1.2.840.10008.1.2.4.81")
J2K_LOSSLESS = UID("1.2.840.10008.1.2.4.90")
J2K_LOSSY = UID("1.2.840.10008.1.2.4.91")


def radiograph(rows: int, columns: int, bits: int, *, signed: bool = False, seed: int = 0,
               noise: float = 0.05) -> np.ndarray:
    """A smooth body-like gradient plus noise over the full stored range (never all zeros, and
    noisy enough that no codec compresses it past the decoder's ratio guard)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    base = 0.5 + 0.35 * np.sin(x / (columns / 5.0)) * np.cos(y / (rows / 4.0))
    noise = rng.normal(0.0, noise, size=(rows, columns))
    unit = np.clip(base + noise, 0.0, 1.0)
    top = 2**bits - 1
    values = np.round(unit * top).astype(np.int64)
    values[0, 0], values[-1, -1] = 0, top  # the full range is present
    if signed:
        values -= 2 ** (bits - 1)
        return values.astype(np.int8 if bits <= 8 else np.int16)
    return values.astype(np.uint8 if bits <= 8 else np.uint16)


def make_dataset(arr: np.ndarray, bits_stored: int, *, modality: str = "DX",
                 photometric: str = "MONOCHROME2", **extra) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta.MediaStorageSOPClassUID = DX_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DX_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientID = "TEST-1"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
    return ds


def unit_of(arr: np.ndarray, bits_stored: int, signed: bool = False) -> np.ndarray:
    """The decoder's expected output without LUTs: the stored range mapped to [0, 1]."""
    low = -(2 ** (bits_stored - 1)) if signed else 0
    high = low + 2**bits_stored - 1
    return ((arr.astype(np.float64) - low) / (high - low)).astype(np.float32)


def write(ds: Dataset, path: Path, syntax: UID = EXPLICIT_LE) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == EXPLICIT_BE:
        arr = np.frombuffer(ds.PixelData, dtype=f"<{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()  # the writer does not swap bytes
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def gdcm_encode(ds: Dataset, syntax: UID, tmp: Path) -> Dataset:
    """ds with its pixel data re-encoded by GDCM (JPEG baseline/extended/lossless)."""
    gdcm = pytest.importorskip("gdcm")
    src, dst = tmp / f"gdcm_src_{syntax}.dcm", tmp / f"gdcm_dst_{syntax}.dcm"
    write(copy.deepcopy(ds), src)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    image = reader.GetImage()
    if syntax == JPEG_EXTENDED:
        # GDCM picks its 8/12/16-bit IJG codec from BitsAllocated; 16 would make an invalid
        # 16-bit lossy stream, so the in-memory image says 12 (the header is rewritten below).
        fmt = image.GetPixelFormat()
        fmt.SetBitsAllocated(12)
        image.SetPixelFormat(fmt)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(syntax))))
    change.SetInput(image)
    assert change.Change(), f"GDCM cannot encode {syntax.name}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    frame = next(generate_frames(pydicom.dcmread(dst).PixelData, number_of_frames=1))
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    out.PixelData = encapsulate([frame])
    out["PixelData"].VR = "OB"
    return out


def encode(ds: Dataset, syntax: UID, tmp: Path, **options) -> Dataset:
    if syntax in (JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS_P14, JPEG_LOSSLESS_SV1):
        return gdcm_encode(ds, syntax, tmp)
    out = copy.deepcopy(ds)  # compress() and write() change file_meta, which a shallow copy shares
    if not syntax.is_compressed:
        return out  # written in that syntax by write()
    out.compress(syntax, generate_instance_uid=False, **options)
    return out


# (syntax, bits stored, signed, encoder options, (max, mean) abs error in [0, 1] units; None: exact)
ROUND_TRIPS = [
    (EXPLICIT_LE, 12, False, {}, None),
    (EXPLICIT_LE, 16, True, {}, None),
    (IMPLICIT_LE, 12, False, {}, None),
    (EXPLICIT_BE, 12, False, {}, None),
    (EXPLICIT_BE, 12, True, {}, None),
    (DEFLATED, 8, False, {}, None),
    (RLE, 12, False, {}, None),
    (RLE, 12, True, {}, None),
    (JPEG_BASELINE, 8, False, {}, (0.08, 0.01)),
    (JPEG_EXTENDED, 12, False, {}, (0.08, 0.01)),
    (JPEG_LOSSLESS_P14, 12, False, {}, None),
    (JPEG_LOSSLESS_SV1, 16, False, {}, None),
    (JPEG_LOSSLESS_SV1, 12, False, {}, None),
    (JPEG_LS_LOSSLESS, 12, False, {}, None),
    (JPEG_LS_LOSSLESS, 12, True, {}, None),
    (JPEG_LS_NEAR, 12, False, {"jls_error": 3}, (3 / 4095 + 1e-7, 2 / 4095)),
    (J2K_LOSSLESS, 12, False, {}, None),
    (J2K_LOSSLESS, 16, False, {}, None),
    (J2K_LOSSLESS, 12, True, {}, None),
    (J2K_LOSSY, 12, False, {"j2k_cr": [4]}, (0.15, 0.02)),
]


@pytest.mark.parametrize(
    "syntax,bits,signed,options,bound", ROUND_TRIPS,
    ids=[f"{s.name}-{b}bit{'-signed' if sg else ''}" for s, b, sg, _, _ in ROUND_TRIPS],
)
def test_round_trip(tmp_path, syntax, bits, signed, options, bound):
    arr = radiograph(97, 84, bits, signed=signed)  # odd rows, columns not a multiple of 8
    ds = make_dataset(arr, bits)
    path = write(encode(ds, syntax, tmp_path, **options), tmp_path / "image.dcm", syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    out = decode_dicom(path)
    expected = unit_of(arr, bits, signed)
    assert out.dtype == np.float32 and out.shape == arr.shape
    if bound is None:
        np.testing.assert_array_equal(out, expected)
    else:
        error = np.abs(out - expected)
        assert error.max() <= bound[0], f"{syntax.name}: max error {error.max():.4f} over {bound[0]}"
        assert error.mean() <= bound[1], f"{syntax.name}: mean error {error.mean():.5f} over {bound[1]}"
        assert error.max() > 0  # the lossy codec really ran


def test_dataset_input_matches_path_input(tmp_path):
    arr = radiograph(40, 36, 12)
    path = write(make_dataset(arr, 12), tmp_path / "a.dcm")
    np.testing.assert_array_equal(decode_dicom(pydicom.dcmread(path)), decode_dicom(path))


def test_monochrome1_is_inverted(tmp_path):
    arr = radiograph(40, 36, 12)
    mono1 = decode_dicom(write(make_dataset(arr, 12, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(mono1, 1.0 - unit_of(arr, 12), atol=1e-6)


def test_modality_lut_and_first_window(tmp_path):
    arr = radiograph(40, 36, 12)
    slope, intercept, center, width = 2.0, -1024.0, 1000.0, 3000.0
    ds = make_dataset(arr, 12, RescaleSlope=slope, RescaleIntercept=intercept,
                      WindowCenter=[center, 40.0], WindowWidth=[width, 400.0])  # the first window is used
    out = decode_dicom(write(ds, tmp_path / "win.dcm"))
    hu = arr.astype(np.float64) * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)  # DICOM linear window
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert 0.0 < out.mean() < 1.0 and (out == 0).any() and (out == 1).any()


def test_modality_lut_without_window_spans_rescaled_range(tmp_path):
    arr = radiograph(40, 36, 10, signed=True)
    ds = make_dataset(arr, 10, RescaleSlope=0.5, RescaleIntercept=100.0)
    out = decode_dicom(write(ds, tmp_path / "lut.dcm"))
    np.testing.assert_allclose(out, unit_of(arr, 10, signed=True), atol=1e-6)  # linear LUT: same mapping


@pytest.mark.parametrize("bits,signed", [(12, False), (16, False), (12, True), (8, False)])
def test_j2k_decoded_at_reduced_resolution(tmp_path, bits, signed):
    arr = radiograph(512, 384, bits, signed=signed, noise=0.0)  # smooth: LL band ~ box filter
    path = write(encode(make_dataset(arr, bits), J2K_LOSSLESS, tmp_path), tmp_path / "big.dcm", J2K_LOSSLESS)
    frame = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    levels = j2k_decomposition_levels(frame)
    assert levels >= 2
    full = decode_dicom(path)
    start = time.perf_counter()
    reduced = decode_dicom(path, target_size=96)  # 384 -> 192 -> 96: two levels
    elapsed = time.perf_counter() - start
    assert full.shape == (512, 384) and reduced.shape == (128, 96)
    pooled = full.reshape(128, 4, 96, 4).mean(axis=(1, 3))  # the LL band is a low-passed image
    assert np.abs(reduced - pooled).mean() < 0.005, np.abs(reduced - pooled).mean()
    assert decode_dicom(path, target_size=300).shape == (512, 384)  # not far larger: full size
    print(f"J2K 512x384 reduced decode: {elapsed * 1e3:.1f} ms")


def test_j2k_reduce_level_rules():
    assert j2k_reduce_level(3000, 2500, 5, 224) == 3  # 2500 -> 1250 -> 625 -> 313 (next 157 < 224)
    assert j2k_reduce_level(3000, 2500, 2, 224) == 2  # capped by the codestream's levels
    assert j2k_reduce_level(400, 400, 5, 224) == 0  # under twice the target: full size
    assert j2k_reduce_level(3000, 2500, 5, None) == 0


# ---------------------------------------------------------------------------------------------
# Hostile and broken input
# ---------------------------------------------------------------------------------------------
def _hostile_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a word the reason must contain)."""
    arr = radiograph(64, 48, 12)
    good = write(make_dataset(arr, 12), tmp / "good.dcm")
    files: dict[str, tuple[Path, str]] = {}

    empty = tmp / "empty.dcm"
    empty.write_bytes(b"")
    files["zero-byte"] = (empty, "empty")
    text = tmp / "report.dcm"
    text.write_text("FINDINGS: no acute disease.\n" * 20)
    files["not dicom"] = (text, "DICOM")
    data = good.read_bytes()
    cut = tmp / "truncated.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    files["truncated native"] = (cut, "truncated")
    cut_header = tmp / "truncated_header.dcm"
    cut_header.write_bytes(data[:200])
    files["truncated header"] = (cut_header, "truncated")

    huge = make_dataset(arr, 12)
    huge.Rows, huge.Columns = 60000, 60000
    files["huge claim"] = (write(huge, tmp / "huge.dcm"), "over the limit")
    big = make_dataset(arr, 12)
    big.Rows, big.Columns = 7000, 7000  # within MAX_IMAGE_PIXELS, but 6 KB of data
    files["rows x columns vs data"] = (write(big, tmp / "big.dcm"), "needs")
    j2k = encode(make_dataset(arr, 12), J2K_LOSSLESS, tmp)
    j2k.Rows, j2k.Columns = 7000, 7000
    files["compressed claim"] = (write(j2k, tmp / "j2k_claim.dcm", J2K_LOSSLESS), "MAX_COMPRESSION_RATIO")
    bad_bits = make_dataset(arr, 12)
    bad_bits.BitsAllocated = 12
    files["BitsAllocated 12"] = (write(bad_bits, tmp / "bits12.dcm"), "BitsAllocated")
    wide_bits = make_dataset(radiograph(64, 48, 8), 8)
    wide_bits.BitsAllocated, wide_bits.BitsStored, wide_bits.HighBit = 16, 16, 15  # 8-bit data, 16 claimed
    files["BitsAllocated 16 for 8-bit data"] = (write(wide_bits, tmp / "bits16.dcm"), "needs")
    stored_bits = make_dataset(arr, 12)
    stored_bits.BitsStored = 20
    files["BitsStored over BitsAllocated"] = (write(stored_bits, tmp / "stored20.dcm"), "BitsStored")
    no_pixels = make_dataset(arr, 12)
    del no_pixels.PixelData
    files["no PixelData"] = (write(no_pixels, tmp / "nopix.dcm"), "no pixel data")
    files["CT"] = (write(make_dataset(arr, 12, modality="CT"), tmp / "ct.dcm"), "Modality CT")
    files["blank modality"] = (write(make_dataset(arr, 12, modality=""), tmp / "nomod.dcm"), "Modality blank")
    colour = make_dataset(arr, 12, photometric="RGB")
    files["colour"] = (write(colour, tmp / "rgb.dcm"), "colour")
    frames = make_dataset(arr, 12, NumberOfFrames=3)
    files["multi-frame"] = (write(frames, tmp / "frames.dcm"), "multi-frame")
    for name, damage in [("J2K header overwritten", lambda f: f[:4] + bytes(40) + f[44:]),
                         ("J2K cut to 120 bytes", lambda f: f[:120])]:
        broken = encode(make_dataset(arr, 12), J2K_LOSSLESS, tmp)
        broken.PixelData = encapsulate([damage(next(generate_frames(broken.PixelData, number_of_frames=1)))])
        files[name] = (write(broken, tmp / f"{name.replace(' ', '_')}.dcm", J2K_LOSSLESS), "cannot decode")
    mpeg = make_dataset(arr, 12)
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(4000)])
    files["unknown syntax"] = (write(mpeg, tmp / "mpeg.dcm", UID("1.2.840.10008.1.2.4.100")), "cannot be decoded")
    return files


def test_hostile_files_raise_with_reason_and_bounded_memory(tmp_path):
    tracemalloc.start()
    try:
        for name, (path, word) in _hostile_files(tmp_path).items():
            tracemalloc.reset_peak()
            with pytest.raises(ImageDecodeError) as info:
                decode_dicom(path)
            peak = tracemalloc.get_traced_memory()[1]
            assert info.value.path == path, name
            assert word.lower() in info.value.reason.lower(), f"{name}: {info.value.reason}"
            assert peak < 8 << 20, f"{name}: {peak / 2**20:.1f} MiB allocated for a refused file"
    finally:
        tracemalloc.stop()


def test_missing_codec_names_the_extra_and_syntax(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    arr = radiograph(40, 36, 12)
    path = write(encode(make_dataset(arr, 12), J2K_LOSSLESS, tmp_path), tmp_path / "j2k.dcm", J2K_LOSSLESS)
    decoder = get_decoder(J2K_LOSSLESS)
    # as on a machine without the extra: no plugin available, the reasons pydicom records
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0")})
    with pytest.raises(ImageDecodeError) as info:
        decode_dicom(path)
    reason = info.value.reason
    assert "pip install 'clinvla-engine[dicom]'" in reason and "JPEG 2000" in reason and str(J2K_LOSSLESS) in reason


def test_ratio_guard_is_a_module_setting(tmp_path, monkeypatch):
    arr = radiograph(64, 48, 12)
    path = write(encode(make_dataset(arr, 12), J2K_LOSSLESS, tmp_path), tmp_path / "j.dcm", J2K_LOSSLESS)
    monkeypatch.setattr(decode_module, "MAX_COMPRESSION_RATIO", 1.0)
    with pytest.raises(ImageDecodeError, match="MAX_COMPRESSION_RATIO"):
        decode_dicom(path)


def test_decode_speed_per_codec(tmp_path):
    """Reports ms per decode of a 1024 x 1024 12-bit frame per codec (printed with -s)."""
    arr = radiograph(1024, 1024, 12)
    base = make_dataset(arr, 12)
    lines = []
    for syntax, options in [(EXPLICIT_LE, {}), (RLE, {}), (JPEG_LOSSLESS_SV1, {}), (JPEG_LS_LOSSLESS, {}),
                            (J2K_LOSSLESS, {}), (J2K_LOSSY, {"j2k_cr": [10]})]:
        path = write(encode(base, syntax, tmp_path, **options), tmp_path / f"speed_{syntax}.dcm", syntax)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = decode_dicom(path)
            times.append(time.perf_counter() - start)
        assert out.shape == arr.shape
        lines.append(f"{syntax.name}: {min(times) * 1e3:.1f} ms")
    start = time.perf_counter()
    assert decode_dicom(tmp_path / f"speed_{J2K_LOSSLESS}.dcm", target_size=224).shape == (256, 256)
    lines.append(f"JPEG 2000 Lossless reduced to 256 (target 224): {(time.perf_counter() - start) * 1e3:.1f} ms")
    print("\n" + "\n".join(lines))


def test_deflated_file_smaller_than_its_pixel_data_decodes(tmp_path):
    # a smooth 16-bit image deflates far below its raw size: the on-disk size check must not call
    # the file truncated (it did, for every compressible deflated image)
    y, x = np.mgrid[0:128, 0:128]
    arr = ((x + y) * 100).astype(np.uint16)
    path = write(make_dataset(arr, 16), tmp_path / "deflated.dcm", DEFLATED)
    assert path.stat().st_size < arr.nbytes // 2
    np.testing.assert_array_equal(decode_dicom(path), unit_of(arr, 16))
