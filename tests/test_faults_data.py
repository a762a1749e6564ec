"""Faults in the data layer: a killed generator, reports in the wrong encoding, hostile or broken images.

Each case feeds the loaders what a crash, a careless export or an attacker leaves behind and checks
the outcome: a refusal (DatasetError) that names the file and the fix, a decode with a note naming
the file, or an ImageDecodeError (path, reason) that a training loop can catch and skip. The whole
file runs in well under 30 s on two cores.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

import fixtures_formats as fx
from clinvla_engine.data import ImageDecodeError, detect_format, open_dataset
from clinvla_engine.data import io as data_io
from clinvla_engine.data.dicom import load_dicom_tree
from clinvla_engine.data.io import decode_text, load_image
from clinvla_engine.data.mimic import load_mimic
from clinvla_engine.data.study import DatasetError
from clinvla_engine.data.synth import generate_archive

pydicom = pytest.importorskip("pydicom")

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# A killed `clinvla synth` is refused, and a re-run repairs it
# ---------------------------------------------------------------------------------------------
_SYNTH_CHILD = textwrap.dedent("""
    import sys
    from clinvla_engine.data.synth import generate_archive
    generate_archive(sys.argv[1], studies=2000, seed=3, fmt="dicom", size=32, progress=False, workers=1)
""")


def _kill_synth_mid_run(out: Path) -> None:
    """Start the generator in a child process and SIGKILL it once it has written a few studies."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _SYNTH_CHILD, str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    truth = out / "synth_truth.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if truth.is_file() and truth.stat().st_size > 0 and len(list(out.rglob("*.dcm"))) >= 6:
                break
            time.sleep(0.05)
        assert child.poll() is None, f"the generator ended before it could be killed: {child.stderr.read()!r}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_killed_synth_is_refused_and_a_rerun_repairs_it(tmp_path):
    out = tmp_path / "killed"
    _kill_synth_mid_run(out)
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["complete"] is False  # whole (written atomically), and says the run did not finish

    for load in (open_dataset, detect_format, load_dicom_tree):  # direct loader calls refuse it too
        with pytest.raises(DatasetError, match=r"incomplete synthetic archive") as info:
            load(out)
        assert str(out) in str(info.value) and "re-run `clinvla synth" in str(info.value)

    # every file the killed run wrote was listed first, so the re-run may replace them all
    generate_archive(out, studies=4, seed=3, fmt="dicom", size=32, progress=False)
    ds = open_dataset(out)
    assert ds.format == "dicom" and len(ds) == 4


def test_incomplete_or_unreadable_manifest_is_refused(tmp_path):
    out = tmp_path / "arch"
    generate_archive(out, studies=3, seed=1, fmt="chexpert", size=32, progress=False)
    assert len(open_dataset(out)) == 3
    manifest = out / "synth_manifest.json"
    record = json.loads(manifest.read_text())

    manifest.write_text(json.dumps({**record, "complete": False}))
    for folder in (out, out / "CheXpert-v1.0-small"):  # the subfolder a user may pass as well
        with pytest.raises(DatasetError, match=r"incomplete synthetic archive .*complete: False.*re-run"):
            open_dataset(folder)

    manifest.write_text(json.dumps(record)[:40])  # cut short
    with pytest.raises(DatasetError, match=r"unreadable synth_manifest\.json.*re-run `clinvla synth --out"):
        open_dataset(out)

    manifest.write_text(json.dumps(record))
    assert len(open_dataset(out)) == 3  # the check passes a complete archive untouched

    # a run killed between writing the manifest's temporary file and renaming it leaves the
    # temporary file behind; the next run takes it for its own and removes it
    stray = out / ".synth_manifest.json.4242.0123abcd.tmp"
    stray.write_text("{")
    generate_archive(out, studies=2, seed=1, fmt="chexpert", size=32, progress=False)
    assert not stray.exists() and len(open_dataset(out)) == 2


# ---------------------------------------------------------------------------------------------
# Report text in UTF-16, Windows-1252, or binary
# ---------------------------------------------------------------------------------------------
ACCENTED = "IMPRESSION: Pneumothorax \u2013 r\u00e9sum\u00e9 of na\u00efve findings."


@pytest.mark.parametrize("encoding, note", [
    ("utf-8", None),
    ("utf-8-sig", None),
    ("utf-16", r"is UTF-16 \(byte-order mark\); decoded as UTF-16"),
    ("utf-16-le", r"UTF-16 without a byte-order mark; decoded as utf-16-le"),
    ("utf-16-be", r"UTF-16 without a byte-order mark; decoded as utf-16-be"),
    ("utf-32", r"is UTF-32 \(byte-order mark\)"),
    ("cp1252", r"not UTF-8 \(first bad byte 25 \(0x96\)\); decoded as Windows-1252 \(cp1252\)"),
])
def test_decode_text_reads_each_encoding_back(encoding, note):
    text, got = decode_text(ACCENTED.encode(encoding), "r.txt")
    assert text == ACCENTED
    if note is None:
        assert got is None
    else:
        assert got.startswith("r.txt: ") and re.search(note, got), got


def test_decode_text_refuses_binary_and_bad_bom():
    with pytest.raises(DatasetError, match=r"blob\.txt: holds NUL bytes, so it is binary.*save it as UTF-8"):
        decode_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x02", "blob.txt")
    with pytest.raises(DatasetError, match=r"odd\.txt: starts with a UTF-16 byte-order mark but is not valid"):
        decode_text(b"\xff\xfe\x00\xd8", "odd.txt")  # a lone surrogate


def test_mimic_reports_in_other_encodings_are_decoded_with_a_note(tmp_path):
    expected = fx.make_mimic(tmp_path)
    utf16 = fx.mimic_report(tmp_path, "10000032", "50414267")
    binary = fx.mimic_report(tmp_path, "10000032", "53189527")
    windows = fx.MIMIC_REPORT_FULL.replace("\n", "\r\n")
    utf16.write_bytes(windows.encode("utf-16"))  # a Windows "Unicode" export, CRLF line ends
    binary.write_bytes(b"\x00\x01\x02\x03binary\x00" * 10)
    ds = load_mimic(tmp_path)
    by_id = {s.study_id: s for s in ds}
    assert by_id["50414267"].report == expected["50414267"]["report"]  # parsed as if it were UTF-8
    assert f"{utf16}: text is UTF-16 (byte-order mark); decoded as UTF-16" in ds.problems
    assert f"{binary}: holds NUL bytes, so it is binary, not report text; save it as UTF-8 text; " \
           "study kept without report" in ds.problems
    assert by_id["53189527"].report is None

    cp1252 = windows.replace("Mild cardiomegaly", "Mild\u2013moderate cardiom\u00e9galie")
    utf16.write_bytes(cp1252.encode("cp1252"))  # a legacy Windows export: invalid as UTF-8
    ds = load_mimic(tmp_path)
    report = {s.study_id: s for s in ds}["50414267"].report
    assert report.endswith("IMPRESSION: Mild\u2013moderate cardiom\u00e9galie. No acute process.")
    assert any(p.startswith(f"{utf16}: text is not UTF-8") and "cp1252" in p for p in ds.problems)


def test_utf16_text_in_a_dicom_sr_is_decoded_with_a_note(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.4242"
    fx.write_dicom(tmp_path / "img.dcm", fx.ramp(), study_uid=uid, view_position="PA")
    smuggled = "No pneumothorax.".encode("utf-16-le").decode("latin-1")  # NUL after every letter
    sr = fx.write_text_sr(tmp_path / "sr.dcm", study_uid=uid, impression=smuggled)
    ds = load_dicom_tree(tmp_path)
    assert ds[0].report == "IMPRESSION: No pneumothorax."
    assert any(p.startswith(f"{sr}: text is UTF-16 without a byte-order mark") for p in ds.problems)


def test_a_utf16_csv_is_read_and_a_binary_one_refused(tmp_path):
    fx.make_rsna(tmp_path)
    labels = tmp_path / "stage_2_train_labels.csv"
    plain = load_rsna_ids(tmp_path)
    labels.write_bytes(labels.read_text(encoding="utf-8").encode("utf-16"))
    assert load_rsna_ids(tmp_path) == plain
    labels.write_bytes(labels.read_text(encoding="utf-16").encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv: cannot read a CSV header"):
        open_dataset(tmp_path, fmt="rsna")


def load_rsna_ids(root: Path) -> list[str]:
    return [s.study_id for s in open_dataset(root, fmt="rsna")]


# ---------------------------------------------------------------------------------------------
# Images: decompression bombs, huge headers, empty, truncated and non-image files
# ---------------------------------------------------------------------------------------------
def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header (with a valid CRC) claims width x height, with a tiny body."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    body = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [60000, 8000], ids=["past-PIL-limit", "past-our-limit"])
def test_png_bomb_is_a_clear_error_in_bounded_memory(tmp_path, side):
    bomb = _png_claiming(tmp_path / "bomb.png", side, side)
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as info:
            load_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.path == bomb and str(bomb) in str(info.value)
    assert "not decoded" in info.value.reason and "MAX_IMAGE_PIXELS" in info.value.reason
    assert peak < 16 * 2**20, f"refusing the bomb took {peak / 2**20:.0f} MiB"


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    image = fx.write_png(tmp_path / "ok.png", fx.ramp(40, 30))
    dicom = fx.write_dicom(tmp_path / "ok.dcm", fx.ramp(40, 30), study_uid="1.2.3")
    assert load_image(image).shape == load_image(dicom).shape == (40, 30)
    monkeypatch.setattr(data_io, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    for path in (image, dicom):
        with pytest.raises(ImageDecodeError, match=r"claims 30 x 40 pixels \(1,200\), over the limit of 1,199"):
            load_image(path)


def test_dicom_claiming_huge_dimensions_is_refused_before_decoding(tmp_path):
    path = fx.write_dicom(tmp_path / "huge.dcm", fx.ramp(), study_uid="1.2.3")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 60000  # 3.6e9 pixels claimed, 256 bytes present
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match=r"huge\.dcm: image claims 60000 x 60000 pixels"):
        load_image(path)


def _broken_files(folder: Path) -> dict[str, Path]:
    jpeg = fx.write_jpeg(folder / "whole.jpg", fx.ramp(64, 64)).read_bytes()
    png = fx.write_png(folder / "whole.png", fx.ramp(64, 64)).read_bytes()
    files = {
        "zero-byte jpg": (folder / "empty.jpg", b""),
        "zero-byte dcm": (folder / "empty.dcm", b""),
        "truncated jpg": (folder / "cut.jpg", jpeg[: len(jpeg) // 3]),
        "truncated png": (folder / "cut.png", png[: len(png) // 2]),
        "text named png": (folder / "notes.png", b"these are not pixels\n" * 20),
        "html named jpg": (folder / "page.jpg", b"<html><body>404 Not Found</body></html>"),
        "header-only dcm": (folder / "head.dcm", b"\x00" * 128 + b"DICM"),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


def test_broken_files_raise_image_decode_error_naming_the_file(tmp_path):
    for name, path in _broken_files(tmp_path).items():
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        err = info.value
        assert isinstance(err, DatasetError), name  # existing `except DatasetError` still catches it
        assert err.path == path and str(err).startswith(f"{path}: ") and err.reason, name
    for missing in (tmp_path / "gone.jpg", tmp_path):
        with pytest.raises(ImageDecodeError):
            load_image(missing)


def test_image_decode_error_survives_pickling():
    # DataLoader workers send exceptions to the main process by pickling them
    err = pickle.loads(pickle.dumps(ImageDecodeError(Path("/a/b.png"), "corrupt or truncated image")))
    assert isinstance(err, ImageDecodeError) and err.path == Path("/a/b.png")
    assert err.reason == "corrupt or truncated image" and str(err) == "/a/b.png: corrupt or truncated image"
