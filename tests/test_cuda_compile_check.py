"""The CUDA sources compile for sm_90 with warnings as errors, and every kernel fits the H200.

tools/cuda_compile_check.py runs nvcc -Xptxas -v on every csrc/*.cu file; these tests run it where
nvcc is on the PATH (no GPU needed) and check its ptxas parser and limits on canned reports
everywhere, so a kernel that would not launch (too many registers, too much shared memory) or that
spills is caught before a GPU is lent.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("cuda_compile_check", ROOT / "tools" / "cuda_compile_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cc = _load_tool()
needs_nvcc = pytest.mark.skipif(cc.find_nvcc() is None,
                                reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME) "
                                       "- the CUDA compile check needs it, not a GPU")

# Shaped like CUDA 13's ptxas -v: names mangled, a cmem line on some versions only.
CANNED = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1152 bytes smem, 388 bytes cmem[0]
ptxas info    : Compile time = 12.0 ms
ptxas info    : Compiling entry function '_Z6spillyPf' for 'sm_90'
ptxas info    : Function properties for _Z6spillyPf
    176 bytes stack frame, 96 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 50000 bytes smem
ptxas info    : Compiling entry function '_Z3bigPf' for 'sm_90'
ptxas info    : Function properties for _Z3bigPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 256 registers, used 0 barriers, 240000 bytes smem
"""


def _judged(text: str, budget: int = 0) -> dict:
    rows = cc.parse_ptxas(text)
    for r in rows:
        r["spill_bytes"] = r["spill_store_bytes"] + r["spill_load_bytes"]
        cc._judge(r, budget)
    return {r["mangled"]: r for r in rows}


def test_parser_reads_every_figure():
    rows = _judged(CANNED)
    assert list(rows) == ["_Z4goodPf", "_Z6spillyPf", "_Z3bigPf"]
    good, spilly, big = rows.values()
    assert (good["registers"], good["smem_bytes"], good["cmem_bytes"], good["stack_bytes"]) == (40, 1152, 388, 0)
    assert good["ok"] and good["why"] == ""
    assert (spilly["stack_bytes"], spilly["spill_store_bytes"], spilly["spill_load_bytes"]) == (176, 96, 80)
    assert spilly["cmem_bytes"] is None and spilly["target"] == "sm_90"


def test_limits_reject_what_would_not_launch_or_spills():
    rows = _judged(CANNED)
    spilly, big = rows["_Z6spillyPf"], rows["_Z3bigPf"]
    assert not spilly["ok"] and "spills 96 B stores + 80 B loads > budget 0 B" in spilly["why"]
    assert "static shared memory > 49152" in spilly["why"]  # 50,000 B static: cannot be opted in
    assert not big["ok"] and "256 registers > 255" in big["why"] and "> 232448" in big["why"]
    # 255 registers is the hardware maximum, allowed; a budget of 176 B admits the spills
    assert "registers" not in _judged(CANNED, budget=176)["_Z6spillyPf"]["why"]
    assert "spills" not in _judged(CANNED, budget=176)["_Z6spillyPf"]["why"]


def test_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"arch must look like '90'.*got 'ninety'"):
        cc.check("ninety")
    monkeypatch.setattr(cc, "find_nvcc", lambda: None)
    with pytest.raises(FileNotFoundError, match="put the CUDA toolkit's bin/ on the PATH or set CUDA_HOME"):
        cc.check("90")


@pytest.fixture(scope="module")
def strict_rows():
    # One strict compile serves both checks below: warnings are errors (nvcc, host -Wall -Wextra,
    # ptxas spill / local-memory warnings), and the ptxas report gives the resources.
    return cc.check("90", strict=True)


@needs_nvcc
def test_cuda_sources_compile_strictly_for_sm90(strict_rows):
    names = " ".join(r["name"] for r in strict_rows)
    for kernel in ("scan_kernel<__half, 64, false>", "scan_resident_kernel<__half, false>",
                   "scan_resident_kernel<__nv_bfloat16, true>", "select_kernel", "finite_kernel<float>"):
        assert kernel in names, f"{kernel} missing from the sm_90 compile: {names}"
    assert {r["source"] for r in strict_rows} == {str(p.relative_to(ROOT)) for p in cc.cuda_sources()}
    assert all(r["target"] == "sm_90" for r in strict_rows)


@needs_nvcc
def test_every_kernel_fits_the_h200(strict_rows):
    bad = [f"{r['name']}: {r['why']}" for r in strict_rows if not r["ok"]]
    assert not bad, "kernels over the H200 limits:\n" + "\n".join(bad)
    for r in strict_rows:
        assert r["registers"] is not None and 0 < r["registers"] <= cc.MAX_REGISTERS
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
