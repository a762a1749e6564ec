"""Compile every CUDA source of csrc/ for one GPU target and check each kernel's resources.

No GPU is needed: nvcc compiles each ``.cu`` file of ``csrc/`` (``-arch=sm_{arch} -Xptxas -v``,
the include paths and defines setup.py uses) and ptxas's report gives, per kernel: registers per
thread, stack frame, spill stores / loads, static shared memory and (where ptxas prints it)
constant memory. A kernel fails the check when

* it uses more than 255 registers per thread (the hardware maximum: it would not launch),
* its shared memory is above the H200's 232,448 bytes per block (the opt-in maximum), or its
  *static* shared memory is above 48 KiB (static shared memory cannot be opted in; only dynamic
  can, with cudaFuncSetAttribute),
* it spills more than ``spill_budget`` bytes per thread (spill stores + loads; default 0: the
  top-k kernels keep everything in registers, and a spill in their inner loops is a regression).

Dynamic shared memory is sized at launch, so ptxas cannot see it: the CUDA sources bound it with
``static_assert`` (e.g. the resident scan's ``kResidentMaxSmem``, select's ``kMaxK * 12``), which
this compile therefore checks too.

    python tools/cuda_compile_check.py                 # sm_90, a Markdown table, exit 1 on failure
    python tools/cuda_compile_check.py --arch 80 --json
    python tools/cuda_compile_check.py --strict        # warnings are errors (host and device)

``check()`` is the API (tools/gpu_compile_check.py imports it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

MAX_REGISTERS = 255
MAX_SMEM_OPTIN = 232_448   # H200 (sm_90): cudaDevAttrMaxSharedMemoryPerBlockOptin
MAX_STATIC_SMEM = 48 * 1024
SPILL_BUDGET = 0           # bytes per thread, spill stores + spill loads

# The flags setup.py gives nvcc (BuildExt._nvcc_flags and the .cu file's -I / -D options), less
# the code-generation ones, which are replaced by the single target under check.
BASE_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DCLINVLA_WITH_CUDA=1",
              "-Xcompiler", "-fPIC,-fvisibility=hidden"]
# Strict: every nvcc / ptxas warning is an error, the host compiler warns on -Wall -Wextra and fails
# on any warning, and ptxas warns on spills and local-memory use. It also drops
# --expt-relaxed-constexpr, which the CMake build (csrc/CMakeLists.txt, the GPU suite's fallback)
# does not pass: device code must not lean on it.
STRICT_FLAGS = ["--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
                "-Xptxas", "-warn-spills,-warn-lmem-usage"]
RELAXED = "--expt-relaxed-constexpr"

_ENTRY = re.compile(r"ptxas info\s*:\s*Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas info\s*:\s*Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*:\s*Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, the PATH, or /usr/local/cuda (setup.py's order)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def cuda_sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def _demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (c++filt when present), without the anonymous-namespace noise."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    out = names
    if tool and names:
        try:
            res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
            lines = res.stdout.splitlines()
            if len(lines) == len(names):
                out = lines
        except (OSError, subprocess.CalledProcessError):
            pass
    clean = [re.sub(r"\(anonymous namespace\)::|clinvla::", "", n) for n in out]
    return dict(zip(names, clean))


def parse_ptxas(text: str) -> list[dict]:
    """Per-kernel figures from `ptxas -v` output (one row per entry function and target)."""
    rows: dict[str, dict] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            rows[current] = {"mangled": current, "target": m.group(2), "registers": None, "stack_bytes": 0,
                             "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 0, "cmem_bytes": None}
            continue
        m = _PROPS.search(line)
        if m:
            current = m.group(1) if m.group(1) in rows else current
            continue
        if current is None:
            continue
        row = rows[current]
        m = _FRAME.search(line)
        if m:
            row["stack_bytes"], row["spill_store_bytes"], row["spill_load_bytes"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            row["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            row["smem_bytes"] = int(s.group(1)) if s else 0
            cm = _CMEM.findall(line)
            if cm:
                row["cmem_bytes"] = sum(int(b) for b, _bank in cm)
    return list(rows.values())


def _judge(row: dict, spill_budget: int) -> None:
    why = []
    if row["registers"] is None:
        why.append("ptxas reported no register count")
    elif row["registers"] > MAX_REGISTERS:
        why.append(f"{row['registers']} registers > {MAX_REGISTERS}")
    if row["smem_bytes"] > MAX_SMEM_OPTIN:
        why.append(f"{row['smem_bytes']} B shared memory > {MAX_SMEM_OPTIN} (H200 per-block opt-in maximum)")
    elif row["smem_bytes"] > MAX_STATIC_SMEM:
        why.append(f"{row['smem_bytes']} B static shared memory > {MAX_STATIC_SMEM} (only dynamic can opt in)")
    if row["spill_bytes"] > spill_budget:
        why.append(f"spills {row['spill_store_bytes']} B stores + {row['spill_load_bytes']} B loads "
                   f"> budget {spill_budget} B")
    row["ok"] = not why
    row["why"] = "; ".join(why)


def compile_one(src: Path, arch: str, nvcc: str, strict: bool = False) -> str:
    """Compiles one .cu file; returns nvcc's ptxas report. Raises RuntimeError naming the fix."""
    with tempfile.TemporaryDirectory(prefix="clinvla-cucheck-") as tmp:
        cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / (src.stem + ".o")), f"-arch=sm_{arch}",
               "-Xptxas", "-v", f"-I{CSRC / 'include'}",
               *([f for f in BASE_FLAGS if f != RELAXED] + STRICT_FLAGS if strict else BASE_FLAGS)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
        mode = "strict (warnings are errors) " if strict else ""
        raise RuntimeError(f"{mode}nvcc failed on {src.relative_to(ROOT)} for sm_{arch} "
                           f"(exit {res.returncode}): fix the source; command: {' '.join(cmd)}\n{tail}")
    return res.stdout + res.stderr


def check(arch: str = "90", *, strict: bool = False, spill_budget: int = SPILL_BUDGET,
          sources: list[Path] | None = None) -> list[dict]:
    """Rows {name, registers, spill_bytes, smem_bytes, ok, why, ...} for every kernel of csrc/*.cu.

    Also: source, target, stack_bytes, spill_store_bytes, spill_load_bytes, cmem_bytes (None when
    ptxas does not print it), mangled, and the aliases smem (= smem_bytes), spills (= spill_bytes). Raises FileNotFoundError when nvcc is missing and
    RuntimeError when a file does not compile (or, with strict=True, warns).
    """
    arch = str(arch).lower().removeprefix("sm_")
    if not re.fullmatch(r"\d+[af]?", arch):
        raise ValueError(f"arch must look like '90', '90a' or 'sm_90', got {arch!r}")
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: put the CUDA toolkit's bin/ on the PATH or set CUDA_HOME")
    srcs = cuda_sources() if sources is None else [Path(s) for s in sources]
    if not srcs:
        raise FileNotFoundError(f"no .cu files under {CSRC}: nothing to check")
    rows: list[dict] = []
    for src in srcs:
        parsed = parse_ptxas(compile_one(src, arch, nvcc, strict))
        if not parsed:
            raise RuntimeError(f"ptxas printed no kernel report for {src}: is -Xptxas -v reaching ptxas?")
        names = _demangle([r["mangled"] for r in parsed])
        for r in parsed:
            r["name"] = names[r["mangled"]]
            r["source"] = str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src)
            r["spill_bytes"] = r["spill_store_bytes"] + r["spill_load_bytes"]
            # Short aliases that tools/gpu_compile_check.py (written alongside) reads.
            r["smem"], r["spills"] = r["smem_bytes"], r["spill_bytes"]
            _judge(r, spill_budget)
            rows.append(r)
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows (for benchmarks/NOTES_*.md)."""
    lines = ["| kernel | target | registers | stack B | spill st/ld B | static smem B | cmem B | ok |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        cmem = "" if r["cmem_bytes"] is None else str(r["cmem_bytes"])
        ok = "yes" if r["ok"] else f"NO: {r['why']}"
        lines.append(f"| `{r['name']}` | {r['target']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['smem_bytes']} | {cmem} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=os.environ.get("CLINVLA_CUDA_ARCH", "90").split(";")[-1],
                    help="compute capability without the sm_ (default: the last of CLINVLA_CUDA_ARCH, else 90)")
    ap.add_argument("--strict", action="store_true", help="warnings are errors (nvcc, host compiler, ptxas)")
    ap.add_argument("--spill-budget", type=int, default=SPILL_BUDGET,
                    help=f"allowed spill bytes per thread (default {SPILL_BUDGET})")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        rows = check(args.arch, strict=args.strict, spill_budget=args.spill_budget)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"cuda_compile_check: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} kernels exceed the sm_{args.arch} limits", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} kernels within the sm_{args.arch} limits"
          f" (registers <= {MAX_REGISTERS}, smem <= {MAX_SMEM_OPTIN} B, static smem <= {MAX_STATIC_SMEM} B,"
          f" spills <= {args.spill_budget} B)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
