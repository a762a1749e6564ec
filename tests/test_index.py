"""clinvla_engine.index.Index: ids, add / remove, the file format, and the C++ test program.

Search correctness against references lives in tests/test_topk.py.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinvla_engine import backends

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not backends.extension(), reason=f"{backends.extension().why}")

if backends.extension():
    from clinvla_engine import _C
    from clinvla_engine.index import Index

HEADER = 64


def _crc32c_py(data: bytes, crc: int = 0) -> int:
    """Bytewise CRC-32C (Castagnoli), written out from the definition: the file format's checksum."""
    table = []
    for b in range(256):
        r = b
        for _ in range(8):
            r = (r >> 1) ^ 0x82F63B78 if r & 1 else r >> 1
        table.append(r)
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _index(n=200, d=12, dtype="float16", seed=0, ids=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    index = Index(d, dtype)
    index.add(x, ids=ids)
    return index, x


# ---------------------------------------------------------------- package / build

def test_package_imports_without_the_extension():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'clinvla_engine._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import clinvla_engine.index as ix\n"
        "from clinvla_engine import backends\n"
        "assert not backends.extension()\n"
        "try:\n"
        "    ix.Index(8)\n"
        "except backends.BackendUnavailable as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "pip install -e ." in out.stdout


@needs_ext
def test_build_info_reports_the_extension():
    import clinvla_engine

    info = _C.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["simd"] in ("generic", "avx2", "avx512")
    assert info["cuda"] == (info["cuda_arch"] is not None)
    assert clinvla_engine.build_info()["extension_build"]["simd"] == info["simd"]


# ---------------------------------------------------------------- add / remove / ids

@needs_ext
def test_sequential_and_explicit_ids():
    index = Index(4, "float32")
    np.testing.assert_array_equal(index.add(np.eye(4, dtype=np.float32)), [0, 1, 2, 3])
    np.testing.assert_array_equal(index.add(np.ones((2, 4), np.float32), ids=[100, 7]), [100, 7])
    assert index.next_id == 101 and len(index) == 6 and 7 in index and 8 not in index
    np.testing.assert_array_equal(index.add(np.ones((1, 4), np.float32)), [101])
    with pytest.raises(ValueError, match=r"id 7 .* already"):
        index.add(np.ones((1, 4), np.float32), ids=[7])
    with pytest.raises(ValueError, match=r"already"):
        index.add(np.ones((2, 4), np.float32), ids=[500, 500])
    with pytest.raises(ValueError, match=r">= 0"):
        index.add(np.ones((1, 4), np.float32), ids=[-3])
    with pytest.raises(ValueError, match=r"ids must be \(2,\) int64"):
        index.add(np.ones((2, 4), np.float32), ids=[1, 2, 3])
    assert len(index) == 7 and 500 not in index  # failed adds change nothing


@needs_ext
def test_remove_keeps_the_rest_searchable():
    index, x = _index(n=300, d=8, dtype="float32")
    assert index.remove([5, 17, 17, 9999]) == 2
    assert len(index) == 298 and 5 not in index and 6 in index
    scores, ids = index.search(x[[5, 6]], 1)
    assert ids[0, 0] != 5 and ids[1, 0] == 6
    assert index.remove(np.array([], np.int64)) == 0
    np.testing.assert_array_equal(index.ids(), np.delete(np.arange(300), [5, 17]))


@pytest.mark.parametrize("value,dtype", [(np.nan, "float32"), (np.inf, "float16"), (1e6, "float16"), (3.4e38, "bfloat16")])
@needs_ext
def test_non_finite_or_overflowing_vectors_refused(value, dtype):
    index = Index(3, dtype)
    x = np.ones((4, 3), np.float32)
    x[2, 1] = value  # 1e6 and 3.4e38 are finite float32 values that overflow float16 / bfloat16
    with pytest.raises(ValueError, match=r"finite and representable.*vector 2.*dimension 1"):
        index.add(x)
    assert len(index) == 0


@needs_ext
def test_vectors_converted_to_the_index_dtype():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)
    for src in (x, x.astype(np.float16), torch.from_numpy(x).bfloat16()):
        index = Index(16, "bfloat16")
        index.add(src)
        stored = index._native.vectors().view(np.uint16)
        want = torch.from_numpy(np.asarray(src.float() if hasattr(src, "float") else src, np.float32)).bfloat16()
        np.testing.assert_array_equal(stored, want.view(torch.int16).numpy().view(np.uint16))


# ---------------------------------------------------------------- file format

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@needs_ext
def test_save_load_round_trip(tmp_path, dtype):
    index, x = _index(n=333, d=20, dtype=dtype, ids=np.arange(333) * 5 + 3)
    index.remove([8, 13])
    path = tmp_path / "a.clvx"
    index.save(path)
    loaded = Index.load(path)
    assert (loaded.dim, loaded.dtype, len(loaded), loaded.next_id) == (20, dtype, 331, index.next_id)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    q = x[:7] if dtype != "float16" else x[:7].astype(np.float16)
    if dtype == "bfloat16":
        import torch

        q = torch.from_numpy(x[:7]).bfloat16()
    a, b = index.search(q, 9), loaded.search(q, 9)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # a mapped index is copied on the first change; the file stays as it was
    before = path.read_bytes()
    loaded.add(np.ones((2, 20), np.float32))
    loaded.remove([3])
    assert path.read_bytes() == before and len(loaded) == 332


@needs_ext
def test_file_layout_and_checksums(tmp_path):
    index, _ = _index(n=3000, d=100, dtype="float16")  # ~600 KB: the multi-threaded CRC path too
    path = tmp_path / "b.clvx"
    index.save(path)
    raw = path.read_bytes()
    magic, version, dtype, dim, count, next_id, voff, ioff, pcrc, hcrc = struct.unpack("<8sIIQQQQQII", raw[:HEADER])
    assert (magic, version, dtype, dim, count, next_id, voff) == (b"CLVXIDX1", 1, 1, 100, 3000, 3000, 64)
    assert ioff % 64 == 0 and len(raw) == ioff + 8 * count
    assert hcrc == _crc32c_py(raw[:60])
    assert pcrc == _crc32c_py(raw[HEADER:])
    assert _C.crc32c(raw[HEADER:]) == pcrc and _C.crc32c(b"123456789") == 0xE3069283
    np.testing.assert_array_equal(np.frombuffer(raw[ioff:], np.int64), np.arange(3000))


@needs_ext
def test_truncated_files_refused(tmp_path):
    index, _ = _index(n=50, d=8)
    path = tmp_path / "c.clvx"
    index.save(path)
    raw = path.read_bytes()
    for cut in (0, 10, 63, 64, 100, len(raw) // 2, len(raw) - 8, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.clvx"
        bad.write_bytes(raw[:cut])
        with pytest.raises(OSError, match=r"truncated|not a ClinVLA index file"):
            Index.load(bad)
    longer = tmp_path / "long.clvx"
    longer.write_bytes(raw + b"\0" * 8)
    with pytest.raises(OSError, match=r"longer than its header says"):
        Index.load(longer)


@needs_ext
def test_corrupted_files_refused(tmp_path):
    index, _ = _index(n=50, d=8)
    path = tmp_path / "d.clvx"
    index.save(path)
    raw = bytearray(path.read_bytes())
    cases = {0: r"bad magic", 9: r"version|header checksum", 20: r"header checksum",
             HEADER + 5: r"payload checksum", len(raw) - 3: r"payload checksum"}
    for offset, message in cases.items():
        bad = bytearray(raw)
        bad[offset] ^= 0x04
        p = tmp_path / f"flip{offset}.clvx"
        p.write_bytes(bytes(bad))
        with pytest.raises(OSError, match=message):
            Index.load(p)
    # verify=False skips the payload checksum (for trusted files), never the header checks
    p = tmp_path / f"flip{HEADER + 5}.clvx"
    assert len(Index.load(p, verify=False)) == 50
    newer = bytearray(raw)
    newer[8:12] = struct.pack("<I", 2)
    newer[60:64] = struct.pack("<I", _crc32c_py(bytes(newer[:60])))
    p = tmp_path / "v2.clvx"
    p.write_bytes(bytes(newer))
    with pytest.raises(OSError, match=r"format version 2; this build reads version 1"):
        Index.load(p)
    with pytest.raises(OSError, match=r"cannot open index file"):
        Index.load(tmp_path / "missing.clvx")


@needs_ext
def test_empty_index_round_trip(tmp_path):
    index = Index(7, "float32")
    index.save(tmp_path / "e.clvx")
    loaded = Index.load(tmp_path / "e.clvx")
    assert len(loaded) == 0 and loaded.dim == 7
    _, ids = loaded.search(np.ones((2, 7), np.float32), 3)
    assert np.all(ids == -1)


# ---------------------------------------------------------------- the C++ test program

def _build_cpp_test() -> Path:
    build = ROOT / "build" / "cpp-tests"
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "CMakeCache.txt").exists() else []
    subprocess.run([cmake, "-S", str(ROOT / "csrc"), "-B", str(build), "-DCLINVLA_WITH_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", *gen], check=True, capture_output=True, text=True, timeout=300)
    out = subprocess.run([cmake, "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return build / "clinvla_test"


def test_cpp_program_public_headers_and_c_api(tmp_path):
    exe = _build_cpp_test()
    out = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all" in out.stdout and "checks passed" in out.stdout


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not (backends.extension() and _C.build_info().get("cuda") and _C.cuda_device_count() > 0),
                    reason="needs the CUDA build and a GPU")
def test_cuda_index_add_remove_save_load(tmp_path):
    import torch

    index = Index(24, "bfloat16", device="cuda")
    x = torch.randn(1000, 24, device="cuda")
    np.testing.assert_array_equal(index.add(x.bfloat16()), np.arange(1000))
    index.add(x[:10].cpu().numpy(), ids=np.arange(5000, 5010))  # host vectors too
    assert len(index) == 1010 and index.device == "cuda:0"
    assert index.remove([0, 5000]) == 2
    index.save(tmp_path / "g.clvx")
    cpu = Index.load(tmp_path / "g.clvx")
    q = x[:5].bfloat16()
    s_gpu, i_gpu = index.search(q, 16)
    s_cpu, i_cpu = cpu.search(q.cpu(), 16)
    np.testing.assert_array_equal(i_gpu.cpu().numpy(), i_cpu.numpy())
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- FAISS conventions

@needs_ext
def test_faiss_names_and_padding():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    index = Index(16, "float16")
    assert (index.ntotal, index.d) == (0, 16)
    np.testing.assert_array_equal(index.add_with_ids(x, np.arange(100, 106)), np.arange(100, 106))
    assert (index.ntotal, index.d) == (6, 16) == (len(index), index.dim)
    scores, ids = index.search(x[:2], 9)  # k above ntotal: -1 ids and -inf scores pad the tail
    assert ids.shape == scores.shape == (2, 9)
    assert (ids[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all() and (ids[:, :6] >= 100).all()
    assert index.remove_ids(np.array([100, 103, 999])) == 2 and index.ntotal == 4
    scores, ids = index.search(x[:1], 5)
    assert set(ids[0, :4]) == {101, 102, 104, 105} and ids[0, 4] == -1


@needs_ext
def test_float32_queries_into_a_float16_index_are_converted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    index = Index(32, "float16")
    index.add(x)
    q = rng.standard_normal((5, 32))  # float64 too
    want_s, want_i = index.search(q.astype(np.float16), 10)
    for query in (q.astype(np.float32), q, torch.from_numpy(q.astype(np.float32))):
        s, i = index.search(query, 10)
        np.testing.assert_array_equal(np.asarray(i), want_i)
        np.testing.assert_array_equal(np.asarray(s), want_s)
    # a float16 query into a float32 index is widened the same way
    index32 = Index(32, "float32")
    index32.add(x)
    np.testing.assert_array_equal(index32.search(q.astype(np.float16), 10)[1],
                                  index32.search(q.astype(np.float16).astype(np.float32), 10)[1])
    # a wrong shape is still refused with what the caller passed
    with pytest.raises(ValueError, match=r"got \(5, 16\) float32"):
        index.search(np.ones((5, 16), np.float32), 3)
