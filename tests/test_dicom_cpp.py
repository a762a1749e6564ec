"""libclinvla's DICOM reading, display conversion, images and view rules (C++) against Python.

The driver tests/cpp/dicom_main.cpp and the sources it needs (csrc/libclinvla/{dicom,views,image}.cpp
plus the core's C API) are compiled with g++ straight into a temporary folder once per module (no
CMake, no libtorch). Every DICOM file is decoded by both sides: where Python's load_image gives an
image, the C++ one must equal it (max abs diff <= 1e-5); where Python refuses the file, C++ must
refuse it too, with the status and message a PACS integrator can act on.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
# pydicom warns about the damaged and VOI-LUT-on-float files these tests write on purpose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from clinvla_engine.data import io as cio  # noqa: E402
from clinvla_engine.data import views  # noqa: E402
from clinvla_engine.data.transforms import to_unit_float  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_formats as ff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
RULES = ROOT / "clinvla_engine" / "data" / "view_rules.json"
VECTORS = ROOT / "tests" / "data" / "view_rule_vectors.json"
TOL = 1e-5
OK, INVALID, IO, FORMAT, UNSUPPORTED = 0, 1, 2, 3, 5

# Sources and flags; the same list goes into libclinvla (see csrc/CMakeLists.txt).
OWN_SOURCES = ["libclinvla/dicom.cpp", "libclinvla/views.cpp", "libclinvla/image.cpp"]
CORE_SOURCES = {
    "core/dispatch.cpp": [], "core/flat_index.cpp": [], "core/io.cpp": [], "core/cuda_stub.cpp": [],
    "core/scan_generic.cpp": [], "core/scan_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "core/scan_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
}
OWN_FLAGS = ["-std=c++17", "-ffp-contract=off", "-fPIC", "-Wall", "-Wextra", "-Werror"]


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _c_api_source(build: Path) -> Path:
    """csrc/core/c_api.cpp: the per-thread message clinvla::detail::set_last_error sets."""
    return CSRC / "core" / "c_api.cpp"


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (apt-get install g++)")
    for header in ("/usr/include/zlib.h", "/usr/include/nlohmann/json.hpp"):
        if not Path(header).exists():
            pytest.skip(f"{header} is missing (apt-get install zlib1g-dev nlohmann-json3-dev)")
    build = tmp_path_factory.mktemp("dicom_cpp")
    inc = ["-I", str(CSRC / "include"), "-I", str(CSRC / "core")]
    jobs = []
    for rel in OWN_SOURCES:  # -O2 where the decode speed is measured, -O1 elsewhere (a faster build)
        jobs.append((CSRC / rel, [*OWN_FLAGS, "-O2" if rel.endswith("dicom.cpp") else "-O1"]))
    jobs.append((ROOT / "tests" / "cpp" / "dicom_main.cpp", [*OWN_FLAGS, "-O1"]))
    for rel, extra in CORE_SOURCES.items():
        jobs.append((CSRC / rel, ["-std=c++17", "-O0", "-fopenmp", "-fPIC", *extra]))  # only linked, not timed
    jobs.append((_c_api_source(build), ["-std=c++17", "-O0", "-fopenmp", "-fPIC"]))
    objects, running = [], []
    for i, (src, flags) in enumerate(jobs):
        obj = build / f"{i}_{src.stem}.o"
        objects.append(obj)
        running.append(subprocess.Popen(["g++", *flags, *inc, "-c", str(src), "-o", str(obj)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if len(running) >= 2:
            _finish(running.pop(0))
    for p in running:
        _finish(p)
    exe = build / "dicom_main"
    _finish(subprocess.Popen(["g++", "-fopenmp", "-o", str(exe), *map(str, objects), "-lz"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return exe


def _finish(p: subprocess.Popen) -> None:
    out, _ = p.communicate()
    assert p.returncode == 0, f"{' '.join(p.args)}\n{out}"


# ---------------------------------------------------------------------------------------------
# Running both sides
# ---------------------------------------------------------------------------------------------
def cpp_read(driver: Path, path: Path, tmp: Path) -> tuple[dict, np.ndarray | None]:
    out = tmp / "cpp_out.f32"
    if out.exists():
        out.unlink()
    res = subprocess.run([str(driver), "read", str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert "bug" not in info, info
    if info["status"] != OK:
        assert info["error"], f"{path}: status {info['status']} without a message"
        return info, None
    img = np.fromfile(out, dtype=np.float32).reshape(info["height"], info["width"])
    return info, img


def py_read(path: Path) -> tuple[np.ndarray | None, Exception | None]:
    try:
        img = cio.load_image(path)
    except Exception as exc:  # noqa: BLE001 - every refusal is compared with the C++ one
        return None, exc
    try:
        to_unit_float(img)  # the model's own size rule (at least 8 x 8)
    except ValueError as exc:
        return None, exc
    return img, None


def assert_same(driver: Path, path: Path, tmp: Path, *, status: int | None = None, message: str | None = None) -> dict:
    """Both sides decode `path` alike; returns the C++ result (status, error, tags)."""
    expected, py_error = py_read(path)
    info, got = cpp_read(driver, path, tmp)
    if expected is None:
        assert info["status"] != OK, f"{path}: Python refuses ({py_error}) but C++ decoded it"
    else:
        assert info["status"] == OK, f"{path}: Python decodes it but C++ says: {info['error']}"
        assert got.shape == expected.shape
        diff = float(np.abs(got - expected).max())
        assert diff <= TOL, f"{path}: max abs diff {diff}"
        assert np.isfinite(got).all() and got.min() >= 0.0 and got.max() <= 1.0
    if status is not None:
        assert info["status"] == status, info
    if message is not None:
        assert message in info["error"], info
    return info


# ---------------------------------------------------------------------------------------------
# Hand-made DICOM files
# ---------------------------------------------------------------------------------------------
def make_ds(path: Path, pixels: np.ndarray | bytes, *, rows: int | None = None, cols: int | None = None,
            bits_allocated: int | None = None, bits_stored: int | None = None, signed: bool = False,
            ts=ExplicitVRLittleEndian, photometric: str = "MONOCHROME2", **attrs) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if isinstance(pixels, np.ndarray):
        rows, cols = pixels.shape
        bits_allocated = bits_allocated or 8 * pixels.dtype.itemsize
        raw = pixels.tobytes() if ts != ExplicitVRBigEndian else pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    else:
        raw = pixels
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = raw
    if ts == ExplicitVRBigEndian:
        ds["PixelData"].VR = "OW"
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:  # save_as refuses to change endianness
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def lut_item(entries: list[int], first: int, bits: int, vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), first, bits])
    if vr == "OW":
        item.add_new(0x00283006, "OW", struct.pack(f"<{len(entries)}H", *entries))
    else:
        item.add_new(0x00283006, "US", list(entries))
    return item


def gradient(rows: int, cols: int, lo: int, hi: int, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.integers(lo, hi + 1, size=(rows, cols), dtype=np.int64)
    values[0, 0], values[-1, -1] = lo, hi
    return values.astype(dtype)


def hand_made(root: Path) -> dict[str, Path]:
    """name -> file: one per decoding feature the C++ reader must get right."""
    files: dict[str, Path] = {}

    def add(name: str, ds: FileDataset) -> None:
        files[name] = save(ds, root / f"{name}.dcm")

    u12 = gradient(23, 17, 0, 4095, np.uint16, 1)  # odd sizes: 23 x 17
    add("u16_plain", make_ds(root, gradient(16, 16, 0, 65535, np.uint16, 2)))
    add("u12_plain", make_ds(root, u12, bits_stored=12))
    # garbage above BitsStored (an overlay in the high bits): masked by the reader
    add("u12_high_bits", make_ds(root, (u12 | 0xA000).astype(np.uint16), bits_stored=12))
    add("u8_plain", make_ds(root, gradient(9, 11, 0, 255, np.uint8, 3)))
    add("u8_odd_length", make_ds(root, gradient(9, 9, 0, 255, np.uint8, 4)))  # 81 bytes: padded
    add("u8_mono1", make_ds(root, gradient(12, 10, 3, 250, np.uint8, 5), photometric="MONOCHROME1"))
    s12 = gradient(16, 20, -2048, 2047, np.int16, 6)
    add("s12_raw", make_ds(root, (s12.view(np.uint16) & 0x0FFF).astype(np.uint16), bits_stored=12, signed=True))
    add("s16_rescale", make_ds(root, gradient(16, 16, -32768, 32767, np.int16, 7), signed=True,
                               RescaleSlope="0.5", RescaleIntercept="-1024"))
    add("s16_window_rescale", make_ds(root, gradient(14, 18, -1000, 3000, np.int16, 8), signed=True,
                                      RescaleSlope="1", RescaleIntercept="-1024", WindowCenter="40",
                                      WindowWidth="400"))
    add("u12_window", make_ds(root, u12, bits_stored=12, WindowCenter="2048", WindowWidth="1000"))
    add("u12_window_multi", make_ds(root, u12, bits_stored=12, WindowCenter=["1500", "3000"],
                                    WindowWidth=["800", "200"]))
    add("u12_window_mono1", make_ds(root, u12, bits_stored=12, photometric="MONOCHROME1",
                                    WindowCenter="1024.5", WindowWidth="2047"))
    add("u12_linear_exact", make_ds(root, u12, bits_stored=12, WindowCenter="2000", WindowWidth="0.5",
                                    VOILUTFunction="LINEAR_EXACT"))
    add("u12_sigmoid", make_ds(root, u12, bits_stored=12, WindowCenter="2000", WindowWidth="900",
                               VOILUTFunction="SIGMOID"))
    add("u12_width_1", make_ds(root, u12, bits_stored=12, WindowCenter="2000", WindowWidth="1"))
    add("u16_rescale_window", make_ds(root, gradient(16, 16, 0, 4000, np.uint16, 9), bits_stored=12,
                                      RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="2000",
                                      WindowWidth="3000"))
    lut8 = [int(v) for v in np.linspace(0, 255, 256) ** 1.0][::-1]
    add("u8_voi_lut", make_ds(root, gradient(10, 10, 0, 255, np.uint8, 10), VOILUTSequence=[lut_item(lut8, 0, 8)]))
    lut12 = [int(4095 * (i / 3000) ** 0.5) for i in range(3001)]
    add("u12_voi_lut_first_map", make_ds(root, u12, bits_stored=12, VOILUTSequence=[lut_item(lut12, 500, 12)]))
    add("u12_voi_lut_ow_rescaled", make_ds(root, u12, bits_stored=12, RescaleSlope="1.5", RescaleIntercept="-10",
                                           VOILUTSequence=[lut_item(lut12, 0, 16, vr="OW")]))
    add("u12_voi_lut_and_window", make_ds(root, u12, bits_stored=12, WindowCenter="100", WindowWidth="50",
                                          VOILUTSequence=[lut_item(lut12, 0, 12)]))
    mlut = [int(v) for v in (np.arange(4096) // 16)]
    add("u12_modality_lut", make_ds(root, u12, bits_stored=12, ModalityLUTSequence=[lut_item(mlut, 0, 8)]))
    add("u12_modality_lut_window", make_ds(root, u12, bits_stored=12, ModalityLUTSequence=[lut_item(mlut, 0, 8)],
                                           WindowCenter="128", WindowWidth="100"))
    add("u32_plain", make_ds(root, gradient(8, 8, 0, 2**20, np.uint32, 11), bits_stored=24))
    # the transfer syntaxes
    add("implicit_le", make_ds(root, u12, bits_stored=12, ts=ImplicitVRLittleEndian, WindowCenter="2000",
                               WindowWidth="3000", VOILUTFunction="LINEAR", ViewPosition="PA"))
    add("implicit_voi_lut", make_ds(root, u12, bits_stored=12, ts=ImplicitVRLittleEndian,
                                    VOILUTSequence=[lut_item(lut12, 0, 12)]))
    add("deflated", make_ds(root, u12, bits_stored=12, ts=DeflatedExplicitVRLittleEndian, RescaleSlope="1",
                            RescaleIntercept="0", ViewPosition="LL"))
    add("big_endian", make_ds(root, u12, bits_stored=12, ts=ExplicitVRBigEndian, WindowCenter="1000",
                              WindowWidth="2000"))
    # sequences of undefined length (and undefined-length items) before the pixel data
    ds = make_ds(root, u12, bits_stored=12, ViewPosition="", PatientOrientation=["L", "F"])
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399067008", "SCT", "lateral"
    code.is_undefined_length_sequence_item = True
    nested = Dataset()
    nested.CodeValue, nested.CodingSchemeDesignator, nested.CodeMeaning = "1", "99X", "nested"
    code.ConceptNameCodeSequence = [nested]
    code["ConceptNameCodeSequence"].is_undefined_length = True
    ds.ViewCodeSequence = [code]
    ds["ViewCodeSequence"].is_undefined_length = True
    ds.VOILUTSequence = [lut_item(lut12, 0, 12)]
    ds["VOILUTSequence"].is_undefined_length = True
    ds.ImageComments = "odd"  # an odd-length text value (padded by the writer)
    add("undefined_length_sequences", ds)
    return files


# ---------------------------------------------------------------------------------------------
# Tests: DICOM files
# ---------------------------------------------------------------------------------------------
def test_fixture_formats_files(driver, tmp_path):
    """Every DICOM of the loader fixtures (tree, RSNA) decodes like Python or is refused like it."""
    ff.make_dicom_tree(tmp_path / "tree")
    ff.make_rsna(tmp_path / "rsna")
    files = [p for p in sorted((tmp_path / "tree").rglob("*")) + sorted((tmp_path / "rsna").rglob("*"))
             if p.is_file() and cio.is_dicom(p)]
    assert len(files) >= 12
    decoded = 0
    for path in files:
        info = assert_same(driver, path, tmp_path)
        decoded += info["status"] == OK
    assert decoded >= 9  # the SR reports are refused, the images decode


def test_fixture_write_dicom_variants(driver, tmp_path):
    """write_dicom's variants: 8/16-bit, window + rescale, VOI LUT, MONOCHROME1, multi-frame, RGB."""
    w = ff.write_dicom
    ramp = ff.ramp(20, 24)
    cases = {
        "u8.dcm": dict(pixels=ramp),
        "u16_window_rescale.dcm": dict(pixels=ff.stored_12bit(), bits_stored=12, window=ff.WINDOW, rescale=ff.RESCALE),
        "u16_window.dcm": dict(pixels=ff.stored_12bit(), bits_stored=12, window=(1000.0, 500.0)),
        "u16_rescale.dcm": dict(pixels=ff.stored_12bit(), bits_stored=12, rescale=(0.25, 10.0)),
        "mono1.dcm": dict(pixels=ramp, photometric="MONOCHROME1"),
        "voi.dcm": dict(pixels=ramp, voi_lut=np.clip(np.arange(256) * 2, 0, 255)),
        "multiframe.dcm": dict(pixels=np.stack([ramp, ramp])),
        "rgb.dcm": dict(pixels=np.stack([ramp] * 3, axis=-1), photometric="RGB"),
    }
    for name, kw in cases.items():
        pixels = kw.pop("pixels")
        path = w(tmp_path / name, pixels, study_uid="1.2.3", **kw)
        info = assert_same(driver, path, tmp_path)
        if name == "multiframe.dcm":
            assert info["status"] == FORMAT and "multi-frame" in info["error"]
        if name == "rgb.dcm":
            assert info["status"] == FORMAT and "colour DICOM" in info["error"]


def test_synthetic_archive(driver, tmp_path):
    from clinvla_engine.data.synth import generate_archive

    generate_archive(tmp_path / "synth", studies=3, seed=5, fmt="dicom", size=32, progress=False, workers=1)
    files = [p for p in sorted((tmp_path / "synth").rglob("*")) if p.is_file() and cio.is_dicom(p)]
    assert len(files) >= 3
    for path in files:
        info = assert_same(driver, path, tmp_path)
        if info["status"] == OK:  # the tags the view rules read come through the C API
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert info["tags"]["SOPInstanceUID"] == ds.SOPInstanceUID
            assert info["tags"]["Modality"] == ds.Modality


def test_hand_made_variants(driver, tmp_path):
    files = hand_made(tmp_path / "hand")
    statuses = {}
    for name, path in files.items():
        statuses[name] = assert_same(driver, path, tmp_path)["status"]
    # all of these are images Python decodes: none may be refused
    assert all(s == OK for s in statuses.values()), statuses


def test_tags_and_views_from_files(driver, tmp_path):
    """The tags read from a file classify like Python's views.classify of the same file."""
    files = hand_made(tmp_path / "hand")
    ff.make_dicom_tree(tmp_path / "tree")
    paths = [files["implicit_le"], files["deflated"], files["undefined_length_sequences"]]
    paths += [p for p in sorted((tmp_path / "tree").rglob("*.dcm")) if "sr_" not in p.name and "report" not in p.name]
    lines = []
    for path in paths:
        info, _ = cpp_read(driver, path, tmp_path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert info["tags"]["ViewPosition"] == str(ds.get("ViewPosition", "") or "")
        header = {"Modality": info["tags"]["Modality"], "ViewPosition": info["tags"]["ViewPosition"],
                  "PatientOrientation": info["tags"]["PatientOrientation"].split("\\")
                  if info["tags"]["PatientOrientation"] else ""}
        if "ViewCodeSequence" in ds:
            item = ds.ViewCodeSequence[0]
            header["ViewCodeSequence"] = [{"CodingSchemeDesignator": str(item.get("CodingSchemeDesignator", "")),
                                           "CodeValue": str(item.get("CodeValue", "")),
                                           "CodeMeaning": info["tags"]["ViewCodeMeaning"]}]
        lines.append((path, header, views.classify(ds)))
    got = run_classify(driver, [h for _, h, _ in lines])
    for (path, _, want), g in zip(lines, got):
        assert (g["view"], g["rule"], g["label"]) == (want.view, want.rule, want.label), path


def test_big_file_and_speed(driver, tmp_path):
    """A 2048 x 2048 16-bit file: equal to Python; decode time of both sides (printed)."""
    pixels = gradient(2048, 2048, 0, 4095, np.uint16, 12)
    path = save(make_ds(tmp_path, pixels, bits_stored=12, RescaleSlope="1", RescaleIntercept="-1024",
                        WindowCenter="500", WindowWidth="2500"), tmp_path / "big.dcm")
    assert_same(driver, path, tmp_path)
    res = subprocess.run([str(driver), "bench", str(path), "5"], capture_output=True, text=True, check=True)
    cpp_s = json.loads(res.stdout)["median_s"]
    py_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        cio.load_image(path)
        py_times.append(time.perf_counter() - t0)
    py_s = sorted(py_times)[1]
    print(f"\n2048x2048 16-bit DICOM decode: C++ {cpp_s * 1e3:.1f} ms, Python {py_s * 1e3:.1f} ms "
          f"({py_s / cpp_s:.1f}x)")
    assert cpp_s < py_s


# ---------------------------------------------------------------------------------------------
# Tests: refusals
# ---------------------------------------------------------------------------------------------
def test_compressed_syntaxes_are_unsupported(driver, tmp_path):
    from pydicom.encaps import encapsulate

    for ts, name in ((JPEGBaseline8Bit, "JPEG Baseline"), (RLELossless, "RLE Lossless"),
                     ("1.2.840.10008.1.2.4.90", "JPEG 2000"), ("1.2.840.10008.1.2.4.80", "JPEG-LS")):
        ds = make_ds(tmp_path, encapsulate([b"\xff\xd8 not really a codestream \xff\xd9"]), rows=16, cols=16,
                     bits_allocated=8, ts=ts)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        path = save(ds, tmp_path / f"compressed_{name.replace(' ', '_')}.dcm")
        info = assert_same(driver, path, tmp_path, status=UNSUPPORTED, message=name)
        assert "decode it in the PACS" in info["error"] and "convert" in info["error"]


def test_corrupt_truncated_and_odd_files(driver, tmp_path):
    good = save(make_ds(tmp_path, gradient(64, 64, 0, 4095, np.uint16, 13), bits_stored=12,
                        WindowCenter="2000", WindowWidth="1000"), tmp_path / "good.dcm")
    data = good.read_bytes()
    cases: dict[str, tuple[bytes, int | None, str | None]] = {
        "empty": (b"", FORMAT, "empty file"),
        "preamble_only": (data[:132], None, None),
        "mid_meta": (data[:150], FORMAT, None),
        "mid_header": (data[:400], FORMAT, None),
        "mid_pixels": (data[: len(data) - 1000], FORMAT, None),
        "no_dicm": (b"\0" * 128 + b"XXXX" + data[132:], FORMAT, "DICM"),
        "text": (b"hello, not an image\n" * 20, FORMAT, "DICM"),
    }
    rng = np.random.default_rng(0)
    for i in range(6):  # garbage after the meta header
        junk = rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes()
        cases[f"garbage_{i}"] = (data[:300] + junk, None, None)
    for name, (blob, status, message) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(blob)
        info = assert_same(driver, path, tmp_path, status=status, message=message)
        assert info["status"] != OK, name

    # huge claimed sizes: refused from the header, before any allocation
    for rows, cols in ((60000, 60000), (16385, 16), (8000, 8000)):
        ds = make_ds(tmp_path, b"\0\0" * 64, rows=rows, cols=cols, bits_allocated=16)
        path = save(ds, tmp_path / f"huge_{rows}x{cols}.dcm")
        assert_same(driver, path, tmp_path, status=INVALID, message="over the limit")
    # 1 pixel and 4 x 100: Python decodes them, the model refuses them; C++ refuses at once
    for shape in ((1, 1), (4, 100)):
        path = save(make_ds(tmp_path, np.full(shape, 7, np.uint16)), tmp_path / f"small_{shape[0]}x{shape[1]}.dcm")
        assert_same(driver, path, tmp_path, status=INVALID, message="too small")
    # no pixel data, missing file, a folder
    ds = make_ds(tmp_path, gradient(8, 8, 0, 9, np.uint8))
    del ds.PixelData
    assert_same(driver, save(ds, tmp_path / "no_pixels.dcm"), tmp_path, status=FORMAT, message="no pixel data")
    assert_same(driver, tmp_path / "missing.dcm", tmp_path, status=IO, message="no such file")
    (tmp_path / "folder.dcm").mkdir()
    assert_same(driver, tmp_path / "folder.dcm", tmp_path, status=IO, message="folder")
    # invalid display attributes
    u12 = gradient(16, 16, 0, 4095, np.uint16, 14)
    for name, attrs in {
        "window_width_0": dict(WindowCenter="100", WindowWidth="0"),
        "bad_voi_function": dict(WindowCenter="100", WindowWidth="10", VOILUTFunction="CUBIC"),
        "flat_rescale": dict(RescaleSlope="0", RescaleIntercept="5"),
        "voi_lut_6bit": dict(VOILUTSequence=[lut_item(list(range(64)), 0, 6)]),
        "voi_lut_short": dict(VOILUTSequence=[Dataset()]),
    }.items():
        if name == "voi_lut_short":
            item = Dataset()
            item.add_new(0x00283002, "US", [4096, 0, 12])
            item.add_new(0x00283006, "US", list(range(100)))  # 100 entries for 4096 values
            attrs = dict(VOILUTSequence=[item])
        path = save(make_ds(tmp_path, u12, bits_stored=12, **attrs), tmp_path / f"{name}.dcm")
        assert_same(driver, path, tmp_path, status=FORMAT)


def test_randomly_damaged_files_never_crash(driver, tmp_path):
    """Bytes changed at random in the headers, some files cut short: the driver always answers (no
    crash, no hang); whenever both sides decode a file, the images are equal. (Where pydicom's
    recovery heuristics read a damaged header that C++ refuses, or the reverse, both are fine.)"""
    files = hand_made(tmp_path / "hand")
    sources = [files[k] for k in ("u12_window", "implicit_le", "deflated", "undefined_length_sequences",
                                  "u12_voi_lut_first_map", "s16_rescale")]
    rng = np.random.default_rng(7)
    both_decoded = agree = 0
    for i in range(90):
        data = bytearray(sources[i % len(sources)].read_bytes())
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(132, min(len(data), 900)))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(132, len(data)))]
        path = tmp_path / f"damaged_{i}.dcm"
        path.write_bytes(bytes(data))
        expected, _ = py_read(path)
        info, got = cpp_read(driver, path, tmp_path)
        agree += (expected is None) == (got is None)
        if expected is not None and got is not None:
            both_decoded += 1
            assert got.shape == expected.shape and float(np.abs(got - expected).max()) <= TOL, path
    assert both_decoded >= 20 and agree >= 80


# ---------------------------------------------------------------------------------------------
# Tests: stored values + JSON attributes (the Orthanc path), raw pixels
# ---------------------------------------------------------------------------------------------
def simplified_json(ds) -> dict:
    """Orthanc's "simplified" tags of the attributes that matter: keyword -> string."""
    out = {}
    for elem in ds:
        if elem.keyword in ("PixelData", "") or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            out[elem.keyword] = [simplified_json(item) for item in elem.value]
        elif elem.VR in ("OW", "OB"):
            out[elem.keyword] = "\\".join(str(v) for v in struct.unpack(f"<{len(elem.value) // 2}H", elem.value))
        elif elem.VM > 1:
            out[elem.keyword] = "\\".join(str(v) for v in elem.value)
        else:
            out[elem.keyword] = "" if elem.value is None else str(elem.value)
    return out


def test_display_from_stored_matches_files(driver, tmp_path):
    files = hand_made(tmp_path / "hand")
    tree = ff.make_dicom_tree(tmp_path / "tree")
    paths = [p for n, p in files.items() if n != "u32_plain"] + [tmp_path / "tree" / v["frontal"] for v in tree.values()]
    for path in paths:
        ds = pydicom.dcmread(path)
        expected = cio.load_image(path)
        stored = ds.pixel_array
        kind = "u8" if stored.dtype.itemsize == 1 else "u16"
        raw = stored.astype(np.uint8 if kind == "u8" else np.uint16, copy=False)
        # a padded row stride, as a PACS decoder's buffer may have
        padded = np.zeros((raw.shape[0], raw.shape[1] + 3), dtype=raw.dtype)
        padded[:, : raw.shape[1]] = raw
        (tmp_path / "stored.raw").write_bytes(padded.tobytes())
        (tmp_path / "attrs.json").write_text(json.dumps(simplified_json(ds)))
        res = subprocess.run([str(driver), "stored", str(tmp_path / "stored.raw"), str(raw.shape[1]),
                              str(raw.shape[0]), kind, str(padded.strides[0]), str(tmp_path / "attrs.json"),
                              str(tmp_path / "out.f32")], capture_output=True, text=True, check=True)
        info = json.loads(res.stdout)
        assert info["status"] == OK, (path, info)
        got = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(expected.shape)
        assert float(np.abs(got - expected).max()) <= TOL, path


def test_display_from_stored_bad_input(driver, tmp_path):
    raw = np.zeros((16, 16), np.uint16)
    (tmp_path / "s.raw").write_bytes(raw.tobytes())
    for attrs, message in (("not json", "not valid JSON"), ("[1, 2]", "must be an object"),
                           (json.dumps({"Rows": "20"}), "Rows"),
                           (json.dumps({"PhotometricInterpretation": "RGB"}), "colour DICOM"),
                           (json.dumps({"BitsAllocated": "8"}), "BitsAllocated"),
                           (json.dumps({"WindowCenter": "1", "WindowWidth": "0",
                                        "PhotometricInterpretation": "MONOCHROME2"}), "Window Width")):
        (tmp_path / "a.json").write_text(attrs)
        res = subprocess.run([str(driver), "stored", str(tmp_path / "s.raw"), "16", "16", "u16", "32",
                              str(tmp_path / "a.json"), str(tmp_path / "o.f32")], capture_output=True, text=True,
                             check=True)
        info = json.loads(res.stdout)
        assert info["status"] != OK and message in info["error"], (attrs, info)


@pytest.mark.parametrize("kind", ["u8", "u16", "f32"])
def test_image_from_pixels(driver, tmp_path, kind):
    dtype = {"u8": np.uint8, "u16": np.uint16, "f32": np.float32}[kind]
    rng = np.random.default_rng(1)
    if kind == "f32":
        pixels = rng.random((13, 21), dtype=np.float32)
    else:
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, size=(13, 21)).astype(dtype)
    padded = np.zeros((13, 26), dtype=dtype)
    padded[:, :21] = pixels
    (tmp_path / "p.raw").write_bytes(padded.tobytes())
    res = subprocess.run([str(driver), "pixels", str(tmp_path / "p.raw"), "21", "13", kind, str(padded.strides[0]),
                          str(tmp_path / "o.f32")], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    assert info["status"] == OK, info
    got = np.fromfile(tmp_path / "o.f32", dtype=np.float32).reshape(13, 21)
    want = to_unit_float(pixels).numpy()
    assert np.array_equal(got, want)
    # too small, a stride shorter than a row, a NaN
    for w, h, stride, message in ((7, 13, padded.strides[0], "too small"), (21, 13, 10, "row_stride_bytes")):
        res = subprocess.run([str(driver), "pixels", str(tmp_path / "p.raw"), str(w), str(h), kind, str(stride),
                              str(tmp_path / "o.f32")], capture_output=True, text=True, check=True)
        info = json.loads(res.stdout)
        assert info["status"] == INVALID and message in info["error"], info
    if kind == "f32":
        padded[3, 4] = np.nan
        (tmp_path / "p.raw").write_bytes(padded.tobytes())
        res = subprocess.run([str(driver), "pixels", str(tmp_path / "p.raw"), "21", "13", kind,
                              str(padded.strides[0]), str(tmp_path / "o.f32")], capture_output=True, text=True,
                             check=True)
        info = json.loads(res.stdout)
        assert info["status"] == INVALID and "not finite" in info["error"], info


# ---------------------------------------------------------------------------------------------
# Tests: view rules
# ---------------------------------------------------------------------------------------------
def _tag_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(_tag_text(v) for v in value)
    return str(value)


def _driver_line(header: dict) -> str:
    """A header (keyword -> value, as in the vector file) as the driver reads it: the six ViewTags
    fields, hex-encoded UTF-8 ("-" for empty)."""
    seq = header.get("ViewCodeSequence") or [{}]
    item = seq[0]
    fields = [header.get("Modality"), header.get("ViewPosition"), item.get("CodingSchemeDesignator"),
              item.get("CodeValue"), item.get("CodeMeaning"), header.get("PatientOrientation")]
    return " ".join(_tag_text(f).encode().hex() or "-" for f in fields) + "\n"


def run_classify(driver: Path, headers: list[dict], rules: Path | str = RULES) -> list[dict]:
    res = subprocess.run([str(driver), "classify", str(rules)], input="".join(_driver_line(h) for h in headers),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_view_rule_vectors(driver):
    cases = json.loads(VECTORS.read_text())["classify"]
    got = run_classify(driver, [c["header"] for c in cases])
    assert len(got) == len(cases)
    capi_checked = 0
    for case, g in zip(cases, got):
        want = (case["view"], case["rule"], case["label"])
        assert (g["view"], g["rule"], g["label"]) == want, case["name"]
        # the C API's clinvla_dicom_tags carries ViewCodeSequence's CodeMeaning only (unless built with
        # the scheme and value fields): it must agree wherever the code itself does not decide
        seq = case["header"].get("ViewCodeSequence") or [{}]
        needs_code = any(seq[0].get(k) for k in ("CodeValue", "CodingSchemeDesignator"))
        assert g["capi"]["status"] == OK
        if g["capi_has_view_code"] or not needs_code or case["rule"] != "view_code":
            if not g["capi_has_view_code"] and needs_code:
                # the code might have decided differently than the meaning alone; compare with Python
                header = dict(case["header"])
                header["ViewCodeSequence"] = [{"CodeMeaning": seq[0].get("CodeMeaning", "")}]
                d = views.classify(header)
                want = (d.view, d.rule, d.label)
            assert (g["capi"]["view"], g["capi"]["rule"], g["capi"]["label"]) == want, case["name"]
            capi_checked += 1
    assert capi_checked >= 40


def test_view_rules_normalisation_matches_python(driver):
    """Odd spellings, whitespace and case, compared with Python on the fly."""
    values = ["pa", " P-A ", "postero_anterior", "Postero - Anterior", "x\u00a0table lateral", "LAT\u2003",
              "ap\tsupine", "\u0131", "la\u0131teral", "AP\\LAT", "", "  ", "ll", "R L"]
    headers = [{"Modality": m, "ViewPosition": v} for v in values for m in ("DX", " cr ", "Dx\u00a0")]
    headers += [{"Modality": "DX", "PatientOrientation": po} for po in (["l", "f"], ["A ", "F"], ["L"], ["L", "F", "H"])]
    got = run_classify(driver, headers)
    for h, g in zip(headers, got):
        d = views.classify(h)
        assert (g["view"], g["rule"], g["label"]) == (d.view, d.rule, d.label), h


def test_view_rules_bad_file(driver, tmp_path):
    for text, message in (("{", "not valid JSON"), ('{"schema_version": 2}', "schema_version"),
                          ('{"schema_version": 1}', "lacks an entry")):
        (tmp_path / "rules.json").write_text(text)
        got = run_classify(driver, [], tmp_path / "rules.json")
        assert got and got[0]["status"] == FORMAT and message in got[0]["error"], got
    got = run_classify(driver, [], tmp_path / "missing.json")
    assert got[0]["status"] == IO and "missing.json" in got[0]["error"]
    # NULL path: the installed file, found through $CLINVLA_VIEW_RULES here
    env = dict(os.environ, CLINVLA_VIEW_RULES=str(RULES))
    res = subprocess.run([str(driver), "classify", "-"], input=_driver_line({"Modality": "DX", "ViewPosition": "PA"}),
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(res.stdout)["label"] == "PA"
