"""libclinvla (the C++ engine library, its C API, clinvla_cli and the CMake package) against the
Python runtime on the same tiny AOTInductor bundle.

The library is built once per session with the commands `make cpp` runs (clinvla_engine.cpp:
incremental in build/cpp, installed into clinvla_engine/cpp) and loaded here with ctypes; the
bundle is the tiny CPU build that test_runtime.py shares (clinvla_engine.export.testing).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinvla_engine import cpp

ROOT = Path(__file__).resolve().parents[1]
OK, INVALID, IO, FORMAT, UNSUPPORTED = 0, 1, 2, 3, 5
COS_MIN = 0.9999

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _missing_tools() -> str | None:
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return "cmake and a C++17 compiler are needed to build libclinvla"
    for header, package in (("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"),
                            ("/usr/include/openssl/evp.h", "libssl-dev")):
        if not Path(header).is_file():
            return f"{header} is missing: install Debian's {package} (make setup does)"
    return None


@pytest.fixture(scope="session")
def libclinvla():
    why = _missing_tools()
    if why:
        pytest.skip(why)
    build_dir = cpp.build(jobs=2, quiet=True)  # the commands of `make cpp`; incremental
    lib = ctypes.CDLL(str(Path(cpp.cmake_prefix_path()) / "lib" / "libclinvla.so"))
    _declare(lib)
    return lib, build_dir


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import cpu_bundles

    # the same root as test_runtime.py's fixture: one build per session when both run
    return dict(cpu_bundles(str(tmp_path_factory.getbasetemp() / "engines")))


@pytest.fixture(scope="module")
def py_engine(bundles):
    from clinvla_engine.runtime import Engine

    e = Engine.load(bundles["aoti"])
    yield e
    e.close()


class Pixels(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("width", ctypes.c_int32), ("height", ctypes.c_int32),
                ("row_stride_bytes", ctypes.c_int64), ("type", ctypes.c_int)]


PIXEL_TYPE = {np.uint8: 0, np.uint16: 1, np.float32: 2}


def _declare(lib):
    p, i64, i32, f32p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_float)
    sigs = {
        "clinvla_last_error": (ctypes.c_char_p, []),
        "clinvla_engine_load": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(p)]),
        "clinvla_engine_free": (None, [p]),
        "clinvla_engine_dim": (i64, [p]),
        "clinvla_engine_image_size": (i32, [p]),
        "clinvla_engine_backend": (ctypes.c_char_p, [p]),
        "clinvla_engine_tokenizer": (p, [p]),
        "clinvla_engine_embed_study": (ctypes.c_int, [p, p, p, f32p]),
        "clinvla_engine_embed_studies": (ctypes.c_int, [p, i64, ctypes.POINTER(p), ctypes.POINTER(p), f32p]),
        "clinvla_engine_embed_study_pixels": (ctypes.c_int, [p, ctypes.POINTER(Pixels), ctypes.POINTER(Pixels), f32p]),
        "clinvla_engine_embed_text": (ctypes.c_int, [p, ctypes.c_char_p, f32p]),
        "clinvla_engine_embed_texts": (ctypes.c_int, [p, i64, ctypes.POINTER(ctypes.c_char_p), f32p]),
        "clinvla_engine_embed_tokens": (ctypes.c_int, [p, i64, ctypes.POINTER(ctypes.POINTER(i32)),
                                                       ctypes.POINTER(i64), f32p]),
        "clinvla_report_text": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, i64, ctypes.POINTER(i64)]),
        "clinvla_image_from_pixels": (ctypes.c_int, [ctypes.POINTER(Pixels), ctypes.POINTER(p)]),
        "clinvla_image_free": (None, [p]),
        "clinvla_index_create": (ctypes.c_int, [i64, ctypes.c_int, ctypes.POINTER(p)]),
        "clinvla_index_add": (ctypes.c_int, [p, i64, p, ctypes.c_int, ctypes.POINTER(i64), ctypes.POINTER(i64)]),
        "clinvla_index_save": (ctypes.c_int, [p, ctypes.c_char_p]),
        "clinvla_index_free": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def last_error(lib) -> str:
    return lib.clinvla_last_error().decode()


class CEngine:
    def __init__(self, lib, directory, device=None):
        self.lib = lib
        self.handle = ctypes.c_void_p()
        status = lib.clinvla_engine_load(str(directory).encode(), device and device.encode(), ctypes.byref(self.handle))
        if status != OK:
            raise RuntimeError(f"status {status}: {last_error(lib)}")
        self.dim = lib.clinvla_engine_dim(self.handle)

    def close(self):
        self.lib.clinvla_engine_free(self.handle)

    def _out(self, n=1):
        out = np.full((n, self.dim), np.nan, np.float32)  # poisoned: every value must be written
        return out, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def embed_pixels(self, frontal, lateral=None):
        out, ptr = self._out()
        f, keep_f = pixels(frontal)
        lat, keep_l = pixels(lateral) if lateral is not None else (None, None)
        status = self.lib.clinvla_engine_embed_study_pixels(self.handle, ctypes.byref(f),
                                                            ctypes.byref(lat) if lat is not None else None, ptr)
        assert status == OK, last_error(self.lib)
        return out[0]

    def embed_texts(self, texts):
        out, ptr = self._out(len(texts))
        arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
        status = self.lib.clinvla_engine_embed_texts(self.handle, len(texts), arr, ptr)
        assert status == OK, last_error(self.lib)
        return out


def pixels(array):
    array = np.ascontiguousarray(array)
    p = Pixels(array.ctypes.data, array.shape[1], array.shape[0], array.strides[0], PIXEL_TYPE[array.dtype.type])
    return p, array


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def c_engine(libclinvla, bundles):
    e = CEngine(libclinvla[0], bundles["aoti"])
    yield e
    e.close()


def pictures(n, seed, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(80, 87), (97, 64), (64, 64), (123, 71)]
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        if dtype == np.uint16:
            out.append(rng.integers(0, 65536, (h, w)).astype(np.uint16))
        elif dtype == np.uint8:
            out.append(rng.integers(0, 256, (h, w)).astype(np.uint8))
        else:
            out.append(rng.random((h, w), dtype=np.float32))
    return out


# ---- studies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_study_embeddings_equal_python_with_and_without_lateral(c_engine, py_engine, dtype):
    fronts, lats = pictures(6, 1, dtype), pictures(6, 2, dtype)
    lats = [x if i % 2 else None for i, x in enumerate(lats)]
    ours = np.stack([c_engine.embed_pixels(f, l) for f, l in zip(fronts, lats)])
    theirs = py_engine.embed_studies(fronts, lats)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert cos_rows(ours, theirs).min() >= COS_MIN
    # the lateral changes the embedding: the test would see a lateral that is ignored
    alone = c_engine.embed_pixels(fronts[1])
    assert cos_rows(alone[None], ours[1:2])[0] < 0.99999


def test_batched_studies_through_images_equal_python(libclinvla, c_engine, py_engine):
    lib = libclinvla[0]
    n = 11  # > the largest bucket (8): two graph calls
    fronts, lats = pictures(n, 3, np.uint16), pictures(n, 4, np.float32)
    lats = [x if i % 3 else None for i, x in enumerate(lats)]
    images, keep = [], []

    def image(a):
        p, arr = pixels(a)
        h = ctypes.c_void_p()
        assert lib.clinvla_image_from_pixels(ctypes.byref(p), ctypes.byref(h)) == OK, last_error(lib)
        keep.append(arr)
        images.append(h)
        return h.value

    f_arr = (ctypes.c_void_p * n)(*[image(f) for f in fronts])
    l_arr = (ctypes.c_void_p * n)(*[image(x) if x is not None else None for x in lats])
    out, ptr = c_engine._out(n)
    try:
        assert lib.clinvla_engine_embed_studies(c_engine.handle, n, f_arr, l_arr, ptr) == OK, last_error(lib)
    finally:
        for h in images:
            lib.clinvla_image_free(h)
    assert cos_rows(out, py_engine.embed_studies(fronts, lats)).min() >= COS_MIN


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory):
    pytest.importorskip("pydicom")
    from clinvla_engine.data.synth.generate import generate_archive

    root = tmp_path_factory.mktemp("dicom")
    generate_archive(root, 4, 3, fmt="dicom", size=96, lateral_fraction=0.5, progress=False, workers=1)
    studies = []
    for study in sorted(p for p in root.glob("p*/s*") if p.is_dir()):
        frontal = next(study.glob("*frontal*.dcm"))
        lateral = next(iter(study.glob("*lateral*.dcm")), None)
        studies.append((frontal, lateral))
    assert any(lat is None for _, lat in studies) and any(lat is not None for _, lat in studies)
    return studies


def _cli(build_dir, *args, stdin=None):
    return subprocess.run([str(build_dir / "clinvla_cli"), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_cli_embed_study_on_dicom_equals_python(libclinvla, bundles, py_engine, dicom_studies):
    build_dir = libclinvla[1]
    for frontal, lateral in dicom_studies:
        run = _cli(build_dir, "embed-study", bundles["aoti"], frontal, *([lateral] if lateral else []))
        assert run.returncode == 0, run.stderr
        ours = np.array(json.loads(run.stdout), np.float32)
        theirs = py_engine.embed_studies([str(frontal)], [str(lateral) if lateral else None])
        assert cos_rows(ours[None], theirs)[0] >= COS_MIN, (frontal, lateral)


def test_dicom_fixture_formats_embed_like_python(libclinvla, bundles, py_engine, tmp_path):
    pytest.importorskip("pydicom")
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_formats import write_dicom

    rng = np.random.default_rng(5)
    cases = {
        "mono1_12bit.dcm": dict(pixels=rng.integers(0, 4096, (72, 90)).astype(np.uint16), photometric="MONOCHROME1",
                                bits_stored=12),
        "window_rescale.dcm": dict(pixels=rng.integers(0, 4096, (90, 72)).astype(np.uint16), bits_stored=12,
                                   window=(1500.0, 2000.0), rescale=(2.0, -100.0)),
        "eight_bit.dcm": dict(pixels=rng.integers(0, 256, (64, 80)).astype(np.uint8)),
    }
    for name, kw in cases.items():
        path = write_dicom(tmp_path / name, kw.pop("pixels"), study_uid="1.2.3." + str(len(name)),
                           view_position="PA", **kw)
        run = _cli(libclinvla[1], "embed-study", bundles["aoti"], path)
        assert run.returncode == 0, (name, run.stderr)
        ours = np.array(json.loads(run.stdout), np.float32)
        assert cos_rows(ours[None], py_engine.embed_studies([str(path)]))[0] >= COS_MIN, name


# ---- texts ----------------------------------------------------------------------------------------
REPORTS = [
    "FINDINGS: Small left pleural effusion. IMPRESSION: No pneumothorax.",
    "no acute cardiopulmonary process",
    "Heart size is normal; lungs clear (no consolidation), 3.5 cm nodule at T4-T5!",
    "Élargissement cardiaque modéré, œdème — naïve café",
    "  COMPARISON:   None.\n\tHISTORY/INDICATION:  cough x3 days?  ",
    " ".join(["bilateral"] * 80) + " effusion",  # longer than the bundle's 48 tokens: cut, ending in [SEP]
    "Effusion.",  # [CLS] word . [SEP]
    "xqzzyv unknownwordz ¿¡ 你好",
]


def test_text_embeddings_equal_python(c_engine, py_engine):
    ours = c_engine.embed_texts(REPORTS)
    assert cos_rows(ours, py_engine.embed_texts(REPORTS)).min() >= COS_MIN
    one = c_engine.embed_texts(REPORTS[:1])  # clinvla_engine_embed_text, one at a time
    out, ptr = c_engine._out()
    assert c_engine.lib.clinvla_engine_embed_text(c_engine.handle, REPORTS[2].encode(), ptr) == OK
    assert cos_rows(out, py_engine.embed_texts(REPORTS[2:3]))[0] >= COS_MIN
    assert cos_rows(one, py_engine.embed_texts(REPORTS[:1]))[0] >= COS_MIN


def test_embed_tokens_cuts_like_python(libclinvla, c_engine, py_engine):
    import torch

    from clinvla_engine.runtime.graphs import truncate_tokens

    tok = py_engine.tokenizer
    long_row = [tok.cls_id] + [tok.vocab["effusion"]] * 60 + [tok.sep_id]  # longer than max_text_len (48)
    short_row = [tok.cls_id, tok.vocab["effusion"], tok.sep_id]
    ids = torch.full((2, len(long_row)), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate((long_row, short_row)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    ids, mask = truncate_tokens(ids, mask, py_engine.max_text_len, tok.sep_id, tok.pad_id)
    want = py_engine.run_graph("text", {"input_ids": ids, "attention_mask": mask}, ["text_emb"])["text_emb"].numpy()
    rows = [np.array(r, np.int32) for r in (long_row, short_row)]
    arr = (ctypes.POINTER(ctypes.c_int32) * 2)(*[r.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) for r in rows])
    lens = (ctypes.c_int64 * 2)(*[len(r) for r in rows])
    out, ptr = c_engine._out(2)
    assert libclinvla[0].clinvla_engine_embed_tokens(c_engine.handle, 2, arr, lens, ptr) == OK, last_error(libclinvla[0])
    assert cos_rows(out, want).min() >= COS_MIN


REPORT_TEXT_CASES = REPORTS + [
    "FINDINGS:IMPRESSION: x", "AB: not a header (2 letters)", "ABC: yes", "xABC: no boundary", "_ABC: no",
    "éABC: no (é is a word character)", "-ABC: boundary", "A B/C&D-E: all of the class", "ABC :space before colon",
    "ABC:\u00a0\u2003nbsp and em space", "trailing ABC:", "x\u2028y\u0085z\x1cw", "FINDINGS: ÀBC: É", "",
]


def test_report_text_equals_python(libclinvla):
    from clinvla_engine.data.dataset import report_text

    lib = libclinvla[0]
    buf = ctypes.create_string_buffer(4096)
    n = ctypes.c_int64()
    for text in REPORT_TEXT_CASES:
        assert lib.clinvla_report_text(text.encode(), buf, len(buf), ctypes.byref(n)) == OK, last_error(lib)
        assert buf.value.decode() == report_text(text), text
        assert n.value == len(report_text(text).encode())
    small = ctypes.create_string_buffer(4)
    assert lib.clinvla_report_text(b"a long report", small, 4, ctypes.byref(n)) == INVALID
    assert n.value == len("a long report") and "needs 14" in last_error(lib)


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_tokenize_and_embed_text(libclinvla, bundles, py_engine):
    build_dir = libclinvla[1]
    lines = [r.replace("\n", " ") for r in REPORTS]
    run = _cli(build_dir, "tokenize", bundles["aoti"], stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    got = [[int(t) for t in line.split()] for line in run.stdout.splitlines()]
    assert len(got) == len(lines)
    for line, ids in zip(lines, got):
        want_ids, want_mask = py_engine.tokenize([line])
        assert ids == want_ids[0][want_mask[0].bool()].tolist(), line
    run = _cli(build_dir, "embed-text", bundles["aoti"], stdin="\n".join(lines[:3]) + "\n")
    assert run.returncode == 0, run.stderr
    ours = np.array([json.loads(x) for x in run.stdout.splitlines()], np.float32)
    assert ours.shape == (3, py_engine.embed_dim)
    assert cos_rows(ours, py_engine.embed_texts(lines[:3])).min() >= COS_MIN


def test_cli_errors_and_exit_codes(libclinvla, bundles, tmp_path):
    build_dir = libclinvla[1]
    assert _cli(build_dir).returncode == 2
    run = _cli(build_dir, "frobnicate", bundles["aoti"])
    assert run.returncode == 2 and "unknown command frobnicate" in run.stderr
    run = _cli(build_dir, "embed-study", tmp_path / "nowhere", "a.dcm")
    assert run.returncode == 1 and "nowhere: no such directory" in run.stderr
    run = _cli(build_dir, "embed-study", bundles["aoti"], tmp_path / "missing.dcm")
    assert run.returncode == 1 and "missing.dcm" in run.stderr
    run = _cli(build_dir, "embed-text", bundles["aoti"], stdin="fine text\n   \n")
    assert run.returncode == 1 and "stdin line 2" in run.stderr and run.stdout.count("\n") == 1
    run = _cli(build_dir, "tokenize", bundles["onnxruntime"], stdin="x\n")
    assert run.returncode == 1 and "--backend aoti" in run.stderr


# ---- bundle refusals ------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load_error(lib, directory) -> tuple[int, str]:
    h = ctypes.c_void_p()
    status = lib.clinvla_engine_load(str(directory).encode(), None, ctypes.byref(h))
    if status == OK:
        lib.clinvla_engine_free(h)
    assert h.value is None or status == OK
    return status, last_error(lib)


def test_tampered_missing_and_extra_files_are_refused_by_name(libclinvla, bundles, tmp_path):
    lib = libclinvla[0]
    d = _copy(bundles["aoti"], tmp_path / "tampered")
    data = bytearray((d / "text.pt2").read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different hash
    (d / "text.pt2").write_bytes(bytes(data))
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "text.pt2 does not match its size and SHA-256" in msg

    d = _copy(bundles["aoti"], tmp_path / "missing")
    (d / "tokenizer" / "vocab.txt").unlink()
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "tokenizer/vocab.txt is listed in manifest.json but missing" in msg

    d = _copy(bundles["aoti"], tmp_path / "extra")
    (d / "notes.txt").write_text("added later")
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "notes.txt is not listed in manifest.json" in msg

    d = _copy(bundles["aoti"], tmp_path / "link")
    os.symlink(d / "config.json", d / "config2.json")
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "config2.json is a link" in msg

    d = _copy(bundles["aoti"], tmp_path / "incomplete")
    m = json.loads((d / "manifest.json").read_text())
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "is incomplete" in msg

    d = _copy(bundles["aoti"], tmp_path / "torch")
    m["complete"], m["versions"]["torch"] = True, "2.11.0+cu130"
    (d / "manifest.json").write_text(json.dumps(m))
    status, msg = _load_error(lib, d)
    assert status == FORMAT and "was built with torch 2.11.0+cu130" in msg

    (tmp_path / "nomanifest").mkdir()
    status, msg = _load_error(lib, tmp_path / "nomanifest")
    assert status == FORMAT and "has no manifest.json" in msg


def test_other_backends_are_unsupported(libclinvla, bundles):
    status, msg = _load_error(libclinvla[0], bundles["onnxruntime"])
    assert status == UNSUPPORTED and "onnxruntime engine" in msg and "--backend aoti" in msg


def test_a_cpu_bundle_is_refused_on_cuda_and_a_bad_device_named(libclinvla, bundles):
    lib = libclinvla[0]
    h = ctypes.c_void_p()
    assert lib.clinvla_engine_load(str(bundles["aoti"]).encode(), b"cuda", ctypes.byref(h)) == INVALID
    assert "compiled for cpu" in last_error(lib) and "--device cuda" in last_error(lib)
    assert lib.clinvla_engine_load(str(bundles["aoti"]).encode(), b"tpu:3", ctypes.byref(h)) == INVALID
    assert 'got "tpu:3"' in last_error(lib)


def test_tensorrt_runner(libclinvla):
    cache = (libclinvla[1] / "CMakeCache.txt").read_text()
    if "CLINVLA_WITH_TENSORRT:BOOL=ON" not in cache:
        pytest.skip("TensorRT is not installed here: libclinvla was built without CLINVLA_WITH_TENSORRT "
                    "(trt_runner.cpp is compiled only where CMake finds NvInfer.h and libnvinfer)")
    pytest.skip("a TensorRT bundle needs a GPU build (clinvla-build-engine --backend tensorrt), not done on CPU CI")


# ---- C API error paths -----------------------------------------------------------------------------
def test_c_api_null_pointers_and_bad_sizes(libclinvla, c_engine):
    lib, h = libclinvla[0], c_engine.handle
    out, ptr = c_engine._out()
    assert lib.clinvla_engine_load(b"/x", None, None) == INVALID and "out is a null pointer" in last_error(lib)
    handle = ctypes.c_void_p(1234)
    assert lib.clinvla_engine_load(None, None, ctypes.byref(handle)) == INVALID and handle.value is None
    assert "bundle_dir is a null pointer" in last_error(lib)
    assert lib.clinvla_engine_embed_study(None, None, None, ptr) == INVALID and "engine" in last_error(lib)
    assert lib.clinvla_engine_embed_study(h, None, None, ptr) == INVALID and "frontal" in last_error(lib)
    assert lib.clinvla_engine_embed_text(h, None, ptr) == INVALID and "utf8_report" in last_error(lib)
    assert lib.clinvla_engine_embed_text(h, b"fine", None) == INVALID and "out is a null" in last_error(lib)
    assert lib.clinvla_engine_embed_text(h, b"  \t ", ptr) == INVALID and "empty" in last_error(lib)
    assert lib.clinvla_engine_embed_text(h, b"FINDINGS: ", ptr) == INVALID  # Python refuses it too
    assert "once its section headers are removed" in last_error(lib)
    assert lib.clinvla_engine_embed_texts(h, 0, (ctypes.c_char_p * 1)(b"x"), ptr) == INVALID
    assert lib.clinvla_engine_embed_studies(h, 1, None, None, ptr) == INVALID
    assert lib.clinvla_engine_dim(None) == 0 and lib.clinvla_engine_image_size(h) == 64
    assert lib.clinvla_engine_backend(h) == b"aoti" and lib.clinvla_engine_tokenizer(h)
    lib.clinvla_engine_free(None)

    small, keep = pixels(np.zeros((4, 40), np.uint8))
    assert lib.clinvla_engine_embed_study_pixels(h, ctypes.byref(small), None, ptr) == INVALID
    assert "(4, 40) pixels is too small" in last_error(lib)
    bad, keep = pixels(np.zeros((32, 32), np.uint16))
    bad.row_stride_bytes = 10
    assert lib.clinvla_engine_embed_study_pixels(h, ctypes.byref(bad), None, ptr) == INVALID
    assert "row_stride_bytes must be >= width * 2 = 64, got 10" in last_error(lib)
    bad.row_stride_bytes, bad.type = 64, 9
    assert lib.clinvla_engine_embed_study_pixels(h, ctypes.byref(bad), None, ptr) == INVALID
    assert "type must be" in last_error(lib)
    bad.type, bad.data = 1, None
    assert lib.clinvla_engine_embed_study_pixels(h, ctypes.byref(bad), None, ptr) == INVALID
    assert "data is a null pointer" in last_error(lib)

    row = np.array([2, 99999, 3], np.int32)
    arr = (ctypes.POINTER(ctypes.c_int32) * 1)(row.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
    lens = (ctypes.c_int64 * 1)(3)
    assert lib.clinvla_engine_embed_tokens(h, 1, arr, lens, ptr) == INVALID and "99999" in last_error(lib)
    lens[0] = 1
    assert lib.clinvla_engine_embed_tokens(h, 1, arr, lens, ptr) == INVALID and "n_ids[0]" in last_error(lib)
    # a success clears the message
    good, keep = pixels(np.full((32, 32), 0.5, np.float32))
    assert lib.clinvla_engine_embed_study_pixels(h, ctypes.byref(good), None, ptr) == OK and last_error(lib) == ""
    assert np.isfinite(out).all()


# ---- the installed CMake package and the example project ---------------------------------------------
def test_cmake_prefix_path_names_make_cpp_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(cpp, "INSTALL_PREFIX", tmp_path / "nothing")
    with pytest.raises(cpp.CppNotBuiltError, match="make cpp"):
        cpp.cmake_prefix_path()


def test_example_project_embeds_a_dicom_study_and_searches_an_index(libclinvla, bundles, py_engine, dicom_studies,
                                                                     tmp_path):
    import clinvla_engine

    lib = libclinvla[0]
    prefix = clinvla_engine.cmake_prefix_path()
    assert (Path(prefix) / "include" / "clinvla" / "engine.h").is_file()
    assert (Path(prefix) / "share" / "clinvla" / "view_rules.json").is_file()
    emb = py_engine.embed_studies([str(f) for f, _ in dicom_studies],
                                  [str(lat) if lat else None for _, lat in dicom_studies])
    index = ctypes.c_void_p()
    assert lib.clinvla_index_create(emb.shape[1], 0, ctypes.byref(index)) == OK
    ids = np.arange(100, 100 + len(emb), dtype=np.int64)
    assert lib.clinvla_index_add(index, len(emb), emb.ctypes.data, 0, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                                 None) == OK, last_error(lib)
    assert lib.clinvla_index_save(index, str(tmp_path / "studies.clvx").encode()) == OK, last_error(lib)
    lib.clinvla_index_free(index)

    build = tmp_path / "example-build"
    for cmd in (["cmake", "-S", ROOT / "csrc" / "examples", "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", build, "-j", "2"]):
        run = subprocess.run(["nice", "-n", "10", *map(str, cmd)], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    query = max(range(len(dicom_studies)), key=lambda i: dicom_studies[i][1] is not None)  # one with a lateral
    frontal, lateral = dicom_studies[query]
    run = subprocess.run([str(build / "embed_and_search"), str(bundles["aoti"]), str(tmp_path / "studies.clvx"),
                          str(frontal), str(lateral), "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{frontal}: frontal") and lines[1].startswith(f"{lateral}: lateral")
    results = [line.split() for line in lines[2:]]
    assert len(results) == 3 and results[0][:2] == ["1", str(100 + query)]
    assert abs(float(results[0][2]) - 1.0) < 1e-4


@pytest.mark.slow  # a second AOTInductor build (about a minute on 2 idle cores): run with -m slow
def test_external_constants_packaging_loads_with_the_cpp_loader(libclinvla, bundles, py_engine, tmp_path):
    """A bundle whose packages keep their constants in safetensors files (--aoti-constants external)."""
    from clinvla_engine.export.build import build_engine
    from clinvla_engine.export.testing import TEST_BATCH_SIZES, TEST_TEXT_LEN
    from clinvla_engine.runtime import Engine

    out = tmp_path / "external"
    build_engine(bundles["checkpoint"], out, backend="aoti", device="cpu", batch_sizes=TEST_BATCH_SIZES,
                 max_text_len=TEST_TEXT_LEN, parity_studies=8, progress=False, force=True,
                 extra={"aoti_constants": "external"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["image"]["constants"] == "image.constants.safetensors"
    ours = CEngine(libclinvla[0], out)
    try:
        fronts = pictures(3, 7, np.uint16)
        got = np.stack([ours.embed_pixels(f) for f in fronts])
        texts = ours.embed_texts(REPORTS[:3])
    finally:
        ours.close()
    with Engine.load(out) as py:
        assert cos_rows(got, py.embed_studies(fronts)).min() >= COS_MIN
        assert cos_rows(texts, py.embed_texts(REPORTS[:3])).min() >= COS_MIN
