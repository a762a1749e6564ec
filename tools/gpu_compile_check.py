#!/usr/bin/env python3
"""Compile every Triton kernel of the project for sm_90 (the H200) on a machine with no GPU, and
fail when one would not launch there.

    tools/gpu_compile_check.py [--small | --shape B_IMG,B_TXT,M,T,D] [--dtype fp32|bf16]
                               [--json FILE] [--notes [FILE]] [--spill-budget BYTES] [--no-cuda]

How: a stand-in Triton driver reports the target GPUTarget("cuda", 90, 32) and every launch
``kernel[grid](...)`` becomes ``kernel.run(..., warmup=True)``. The package's own launchers
(``_LocalAlignStats.forward`` and ``.backward`` in clinvla_engine.kernels.local_align) run on CPU
tensors, so what compiles is exactly what they launch: their argument types, constexprs, tile
sizes, warps, stages and integer specialisations. Nothing executes; the figures come from the
compiled kernels:

* shared memory: the compiled kernel's metadata (``metadata.shared``, bytes per block);
* registers and stack: ``cuobjdump --dump-resource-usage`` on the cubin that would be loaded;
* spills: ``ptxas -v`` (Triton's bundled ptxas for sm_90) on the kernel's PTX;
* tensor cores: ``wgmma`` (Hopper) or ``mma`` instructions in the PTX.

A kernel fails when its shared memory exceeds the H200's 232,448 bytes per block (the launch
would raise OutOfResources), its registers exceed 255 per thread or 65,536 per block, or it
spills more than the spill budget (bytes of spill stores per thread; DEFAULT_SPILL_BUDGET says
why 2 KB).

Shapes: the benchmark's (benchmarks/bench_local_align.py: the paper shape, GLoRIA's D = 768, the
re-ranking shape), the GPU tests' largest, float32 and bfloat16, forward and backward; ``--small``
compiles two small shapes (the CI test). The batch only enters the grid and integer arguments, so
each shape runs with its batch reduced to at most 31 while keeping what Triton specialises on
(equal to 1, divisible by 16): the same kernels compile, without gigabytes of CPU tensors.

The CUDA extension's figures come from tools/cuda_compile_check.py (``check(arch) -> rows``) when
that file exists; its rows join the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# H200 (sm_90) limits per block / per thread
H200 = dict(arch=90, max_shared=232_448, max_regs_per_thread=255, regs_per_block=65_536)
# Bytes of spill stores per thread. Version 1 of the kernels spilled 7-176 KB per thread; the
# backward now spills up to about 1.3 KB at some shapes (its dE, dc and region tiles all live in
# registers), a few percent of its memory traffic. 2 KB admits that and catches any return to
# KB-scale spilling; splitting D across programs would bring it to 0 (benchmarks/NOTES_local_align.md).
DEFAULT_SPILL_BUDGET = 2048

NOTES = ROOT / "benchmarks" / "NOTES_local_align.md"

# (name, B_img, B_txt, M, T, D): the GPU tests' shapes that no benchmark covers
TEST_SHAPES = [
    ("test: largest M and T", 4, 4, 2048, 256, 64),
    ("largest float32 D", 4, 4, 392, 128, 256),  # MAX_D_FP32 of the kernel module
]
SMALL_SHAPES = [
    ("small", 2, 3, 37, 21, 24),
    ("small, one text", 3, 1, 45, 21, 24),  # same launch plan and tile strides: reuses the kernels above
]


def benchmark_shapes() -> list[tuple]:
    """(name, B_img, B_txt, M, T, D) for every shape benchmarks/bench_local_align.py runs on a GPU."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_local_align import GPU_SHAPES, RERANK_SHAPE_GPU

    names = {(96, 128, 392, 128): "paper", (48, 97, 361, 768): "GLoRIA D=768"}
    out = [(names.get((b, t, m, d), "bench"), b, b, m, t, d) for b, t, m, d in GPU_SHAPES]
    k, t, m, d = RERANK_SHAPE_GPU
    out.append(("re-ranking", k, 1, m, t, d))
    return out


# ----------------------------------------------------------------------------------------------
# The stand-in driver and the launch redirection
# ----------------------------------------------------------------------------------------------

def _make_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """What JITFunction.run and triton.compile ask of a driver, for a GPU that is not here."""

        @classmethod
        def is_active(cls):
            return False  # never picked by Triton's own driver discovery

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise RuntimeError("the compile check benchmarks nothing: there is no GPU")

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(arch: int, launches: list):
    """Inside: Triton targets sm_<arch> and every kernel[grid](...) compiles instead of launching;
    `launches` receives (kernel name, grid, compiled kernel, seconds)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import KernelInterface

    def getitem(self, grid):
        def launch(*args, **kwargs):
            t0 = time.perf_counter()
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            launches.append((self.fn.__name__, grid, kernel, time.perf_counter() - t0))

        return launch

    saved = KernelInterface.__getitem__
    # restore the driver that was active, not the default: on a machine without a GPU, making the
    # default raises (0 active drivers)
    saved_driver = driver._active
    driver.set_active(_make_driver(arch))
    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = saved
        driver._active = saved_driver


# ----------------------------------------------------------------------------------------------
# Figures from the compiled kernel
# ----------------------------------------------------------------------------------------------

def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (3.6 and 3.9 both expose get_ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_flags() -> list[str]:
    """The register-allocation flag Triton's own ptxas call passes (3.9 does, 3.6 does not), so
    that the spill figures below come from the same allocation as the cubin."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    return ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin) else []


def resource_usage(kernel, arch: int) -> dict:
    """Registers, stack, spills and tensor-core use of one compiled kernel."""
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([_ptxas(arch), "-v", *_ptxas_flags(), f"--gpu-name=sm_{arch}a", str(src),
                              "-o", str(Path(tmp) / "o")], capture_output=True, text=True)
        if log.returncode != 0:
            raise RuntimeError(f"ptxas failed on {kernel.name}: {log.stderr.strip()}")
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stderr)
    used = re.search(r"Used (\d+) registers", log.stderr)
    if res is None or spill is None or used is None:
        raise RuntimeError(f"cannot read the resource usage of {kernel.name}:\n{dump}\n{log.stderr}")
    tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    if int(used.group(1)) != int(res.group(1)):  # a different allocation: its spill figures would not apply
        raise RuntimeError(f"ptxas -v allocated {used.group(1)} registers for {kernel.name}, the cubin has "
                           f"{res.group(1)}: align _ptxas_flags with Triton's make_cubin")
    return dict(registers=int(res.group(1)), stack=int(res.group(2)), spill_stores=int(spill.group(1)),
                spill_loads=int(spill.group(2)), tensor_cores=tensor_cores)


def judge(row: dict, spill_budget: int) -> dict:
    why = []
    if row["shared"] > H200["max_shared"]:
        why.append(f"shared memory {row['shared']:,} B > {H200['max_shared']:,} B")
    if row["registers"] > H200["max_regs_per_thread"]:
        why.append(f"{row['registers']} registers > {H200['max_regs_per_thread']} per thread")
    if row["registers"] * 32 * row["num_warps"] > H200["regs_per_block"]:
        why.append(f"{row['registers']} registers x {32 * row['num_warps']} threads > {H200['regs_per_block']:,}")
    if row["spill_stores"] > spill_budget:
        why.append(f"spills {row['spill_stores']} B > budget {spill_budget} B")
    row["ok"] = not why
    row["why"] = "; ".join(why)
    return row


# ----------------------------------------------------------------------------------------------
# The project's kernels
# ----------------------------------------------------------------------------------------------

def _reduced_batch(b: int) -> int:
    """A batch no larger than 31 that Triton specialises like b (== 1, divisible by 16)."""
    return b if b <= 16 else 16 + b % 16


def compile_local_align(shape: tuple, dtype, arch: int, backward: bool = True) -> list[tuple]:
    """Compiles the forward and backward kernels of local_align through its launchers."""
    import torch

    from clinvla_engine.kernels import local_align as la

    _, b_img, b_txt, m, t, d = shape
    bi, bt = _reduced_batch(b_img), _reduced_batch(b_txt)
    regions = torch.randn(bi, m, d, dtype=dtype, requires_grad=True)
    words = torch.randn(bt, t, d, dtype=dtype, requires_grad=True)
    word_ok = torch.ones(bt, t, dtype=torch.bool)
    region_ok = torch.ones(bi, m, dtype=torch.bool)
    launches: list = []
    with compile_only(arch, launches):
        u, n2 = la._LocalAlignStats.apply(regions, words, word_ok, region_ok, torch.tensor(4.0))
        n_fwd = len(launches)
        if backward:  # the buffers hold garbage (nothing ran); backward only needs their shapes
            torch.autograd.backward((u, n2), (torch.ones_like(u), torch.ones_like(n2)))
    return [(name, "fwd" if j < n_fwd else "bwd", kernel, secs)
            for j, (name, _grid, kernel, secs) in enumerate(launches)]


def check_triton(shapes: list[tuple], spill_budget: int, dtypes=("fp32", "bf16"), backward: bool = True,
                 arch: int = H200["arch"], progress=print) -> list[dict]:
    import torch

    rows = []
    seen: dict = {}  # compiled kernel object -> first row that compiled it
    for shape in shapes:
        name, b_img, b_txt, m, t, d = shape
        for dname in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            from clinvla_engine.kernels.local_align import unsupported

            why = unsupported(t, d, dtype)
            if why is not None:  # the dispatcher takes the reference here: nothing to launch
                progress(f"  {name} {dname}: not launched ({why})")
                rows.append(dict(kernel="(reference)", direction="", shape=name,
                                 dims=f"B={b_img}x{b_txt} M={m} T={t} D={d}", dtype=dname, num_warps=None,
                                 num_stages=None, shared=None, registers=None, stack=None, spill_stores=None,
                                 spill_loads=None, tensor_cores="", compile_s=None, reused=None, ok=True,
                                 why=f"kernel not launched: {why}; local_alignment_scores takes the reference"))
                continue
            t0 = time.perf_counter()
            compiled = compile_local_align(shape, dtype, arch, backward)
            progress(f"  {name} {dname}: {len(compiled)} kernels in {time.perf_counter() - t0:.1f} s")
            for kname, direction, kernel, secs in compiled:
                md = kernel.metadata
                row = dict(kernel=kname, direction=direction, shape=name,
                           dims=f"B={b_img}x{b_txt} M={m} T={t} D={d}", dtype=dname,
                           num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                           compile_s=round(secs, 2), reused=seen.get(id(kernel)), **resource_usage(kernel, arch))
                seen.setdefault(id(kernel), f"{name} {dname}")
                rows.append(judge(row, spill_budget))
    return rows


def check_cuda(arch: str = "90") -> tuple[list[dict], str]:
    """Rows of tools/cuda_compile_check.py when it exists, in this table's columns."""
    path = Path(__file__).with_name("cuda_compile_check.py")
    if not path.exists():
        return [], "tools/cuda_compile_check.py is not present: the CUDA extension was not checked"
    sys.path.insert(0, str(path.parent))
    import cuda_compile_check

    try:
        found = cuda_compile_check.check(arch=arch)
    except FileNotFoundError as exc:  # no nvcc here: say so in the table's header, the Triton part stands
        return [], f"CUDA extension: not checked ({exc})"
    rows = []
    for r in found:
        rows.append(dict(kernel=r["name"], direction="", shape="CUDA extension", dims=r.get("source", ""),
                         dtype="", num_warps=None, num_stages=None,
                         shared=r.get("smem_bytes", r.get("smem", r.get("shared_memory"))),
                         registers=r.get("registers"), stack=r.get("stack_bytes"),
                         spill_stores=r.get("spill_store_bytes", r.get("spills")),
                         spill_loads=r.get("spill_load_bytes"), tensor_cores="", compile_s=None, reused=None,
                         ok=bool(r["ok"]), why=r.get("why", "")))
    return rows, f"CUDA extension: {len(rows)} kernels from tools/cuda_compile_check.py (its own limits and budget)"


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def markdown(rows: list[dict], header: str) -> str:
    cols = ["kernel", "pass", "shape", "dtype", "warps", "stages", "shared B", "regs", "spill B st/ld",
            "stack B", "tensor cores", "compile s", "ok"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def show(v):
        return "" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    for r in rows:
        spill = ("" if r["spill_stores"] is None else f"{r['spill_stores']:,}" if r["spill_loads"] is None
                 else f"{r['spill_stores']:,}/{r['spill_loads']:,}")
        ok = ("yes" + (f": {r['why']}" if r["why"] else "")) if r["ok"] else f"**NO**: {r['why']}"
        if r["reused"]:
            ok += f" (same kernel as {r['reused']})"
        lines.append("| " + " | ".join([
            f"`{r['kernel']}`", r["direction"], f"{r['shape']} ({r['dims']})" if r["dims"] else r["shape"], r["dtype"],
            show(r["num_warps"]), show(r["num_stages"]), show(r["shared"]), show(r["registers"]), spill,
            show(r["stack"]), r["tensor_cores"], show(r["compile_s"]), ok]) + " |")
    return "\n".join(lines) + "\n"


def write_notes(path: Path, section: str, key: str) -> None:
    """Replaces (or appends) this Triton version's section of the notes, between markers."""
    begin, end = f"<!-- gpu_compile_check {key} begin -->", f"<!-- gpu_compile_check {key} end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="two small shapes only (the CI test)")
    ap.add_argument("--shape", help="one shape B_IMG,B_TXT,M,T,D instead of the benchmark shapes")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], action="append",
                    help="compile only this dtype (repeatable; default both)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--out", help="also write compile_check.json and compile_check.md to this folder "
                                  "(tools/gpu_suite.sh uses it)")
    ap.add_argument("--notes", nargs="?", const=str(NOTES),
                    help=f"write the table into this Markdown file's section for this Triton version "
                         f"(default {NOTES.relative_to(ROOT)})")
    ap.add_argument("--spill-budget", type=int, default=DEFAULT_SPILL_BUDGET,
                    help="bytes of spill stores per thread allowed (default %(default)s)")
    ap.add_argument("--forward-only", action="store_true", help="compile the forward kernels only")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's check")
    ap.add_argument("--fresh", action="store_true",
                    help="compile into an empty Triton cache, so that 'compile s' is the cold compile time")
    args = ap.parse_args(argv)

    if "clinvla_engine.kernels.local_align" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("the kernels were imported under TRITON_INTERPRET=1 (interpreted, not compiled): "
                         "run this check in its own process")
    os.environ["TRITON_INTERPRET"] = "0"
    if args.fresh:  # before Triton is imported: its cache location is read from the environment
        import atexit
        import shutil

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_compile_check_")
        atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    if args.shape:
        try:
            b_img, b_txt, m, t, d = (int(x) for x in args.shape.split(","))
        except ValueError:
            raise SystemExit(f"--shape takes five integers B_IMG,B_TXT,M,T,D, got {args.shape!r}")
        shapes = [(f"--shape {args.shape}", b_img, b_txt, m, t, d)]
    else:
        shapes = SMALL_SHAPES if args.small else benchmark_shapes() + TEST_SHAPES
    print(f"Triton {triton.__version__}, torch {torch.__version__}: compiling for sm_{H200['arch']}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = check_triton(shapes, args.spill_budget, tuple(args.dtype or ("fp32", "bf16")), not args.forward_only,
                        progress=lambda s: print(s, file=sys.stderr))
    cuda_note = "CUDA extension: not checked (--no-cuda)"
    if not args.no_cuda:
        cuda_rows, cuda_note = check_cuda(str(H200["arch"]))
        rows += cuda_rows
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if not r["ok"]]
    command = " ".join(["tools/gpu_compile_check.py"] + (["--small"] if args.small else [])
                       + ([f"--shape {args.shape}"] if args.shape else [])
                       + [f"--dtype {x}" for x in args.dtype or []] + (["--forward-only"] if args.forward_only else [])
                       + (["--no-cuda"] if args.no_cuda else []) + (["--fresh"] if args.fresh else [])
                       + ([f"--spill-budget {args.spill_budget}"] if args.spill_budget != DEFAULT_SPILL_BUDGET else [])
                       + ["--notes"])
    header = (f"### sm_90 compile check, Triton {triton.__version__} (torch {torch.__version__})\n\n"
              f"Made by `{command}` on a machine without a GPU ({elapsed:.0f} s). Limits: shared memory "
              f"{H200['max_shared']:,} B per block, {H200['max_regs_per_thread']} registers per thread, "
              f"{H200['regs_per_block']:,} per block, spill budget {args.spill_budget} B per thread. "
              f"Batches are reduced to at most 31 with the same specialisation (see the tool's docstring). "
              f"'compile s' is {'a cold compile (empty cache)' if args.fresh else 'from the Triton cache where warm'}; "
              f"'same kernel as' marks a launch that reused an earlier compile (no second kernel set). "
              f"{cuda_note}. Result: **{'PASS' if not failed else f'FAIL ({len(failed)} kernels)'}**.")
    table = markdown(rows, header)
    print(table)
    report = json.dumps(dict(triton=triton.__version__, torch=torch.__version__, limits=H200,
                             spill_budget=args.spill_budget, rows=rows), indent=1)
    targets = [(Path(args.json), report)] if args.json else []
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        targets += [(Path(args.out) / "compile_check.json", report), (Path(args.out) / "compile_check.md", table)]
    for path, text in targets:
        _write_atomic(path, text)
    if args.notes:
        write_notes(Path(args.notes), table, f"triton-{triton.__version__}{'-small' if args.small else ''}")
    for r in failed:
        print(f"FAIL {r['kernel']} {r['direction']} {r['shape']} {r['dtype']}: {r['why']}", file=sys.stderr)
    return 1 if failed else 0



def _write_atomic(path: Path, text: str) -> None:
    """A unique temporary name beside `path`, renamed into place: never a half-written report."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
