"""Where libclinvla (the C++ engine, tokenizer, DICOM reader and index as a CMake package) lives,
and the commands that build it.

    cmake -S my_pacs -B build -DCMAKE_PREFIX_PATH=$(python -c "import clinvla_engine; print(clinvla_engine.cmake_prefix_path())")

then ``find_package(clinvla REQUIRED)`` and ``target_link_libraries(my_target PRIVATE clinvla::clinvla)``.
``make cpp`` (``python -m clinvla_engine.cpp build``) configures and builds ``build/cpp`` (with
``build/cpp/clinvla_cli``) and installs the package into ``clinvla_engine/cpp/``. Torch-free.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INSTALL_PREFIX = PACKAGE_DIR / "cpp"
CONFIG = Path("lib") / "cmake" / "clinvla" / "clinvlaConfig.cmake"


class CppNotBuiltError(RuntimeError):
    """libclinvla is not installed in this package; the message says how to build it."""


def cmake_prefix_path() -> str:
    """The install prefix of libclinvla's CMake package (give it to CMake as CMAKE_PREFIX_PATH)."""
    if (INSTALL_PREFIX / CONFIG).is_file():
        return str(INSTALL_PREFIX)
    raise CppNotBuiltError(
        f"libclinvla is not installed in {INSTALL_PREFIX} (no {CONFIG.as_posix()}); build it from a source "
        "checkout with `make cpp` (needs cmake, a C++17 compiler, libssl-dev and nlohmann-json3-dev)")


def cmake_commands(source_dir: Path, build_dir: Path, prefix: Path, python: str, jobs: int = 2) -> list[list[str]]:
    """configure, build, install: what `make cpp` runs (and what the tests run, incrementally)."""
    return [
        ["cmake", "-S", str(source_dir / "csrc"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         "-DCLINVLA_LIBCLINVLA=ON", "-DCLINVLA_BUILD_TESTS=OFF", f"-DCLINVLA_PYTHON_EXECUTABLE={python}",
         f"-DCMAKE_INSTALL_PREFIX={prefix}"],
        ["cmake", "--build", str(build_dir), "-j", str(jobs)],
        ["cmake", "--install", str(build_dir)],
    ]


def build(source_dir: Path | None = None, build_dir: Path | None = None, prefix: Path | None = None,
          jobs: int = 2, quiet: bool = False) -> Path:
    """Runs cmake_commands (niced) from a source checkout; returns the build directory."""
    source_dir = Path(source_dir or PACKAGE_DIR.parent)
    if not (source_dir / "csrc" / "CMakeLists.txt").is_file():
        raise CppNotBuiltError(f"{source_dir} is not a clinvla-engine source checkout (no csrc/CMakeLists.txt); "
                               "libclinvla builds from the repository with `make cpp`")
    build_dir = Path(build_dir or source_dir / "build" / "cpp")
    prefix = Path(prefix or INSTALL_PREFIX)
    for cmd in cmake_commands(source_dir, build_dir, prefix, sys.executable, jobs):
        if not quiet:
            print("+", " ".join(cmd), flush=True)
        run = subprocess.run(["nice", "-n", "10", *cmd], cwd=source_dir, text=True,
                             capture_output=quiet, env=dict(os.environ))
        if run.returncode != 0:
            tail = ((run.stdout or "") + (run.stderr or ""))[-4000:] if quiet else ""
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {run.returncode})" + (f":\n{tail}" if tail else ""))
    return build_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clinvla_engine.cpp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="configure, build and install libclinvla (what `make cpp` runs)")
    b.add_argument("--build-dir", type=Path, default=None, help="default: build/cpp")
    b.add_argument("--prefix", type=Path, default=None, help=f"default: {INSTALL_PREFIX}")
    b.add_argument("--jobs", type=int, default=int(os.environ.get("CLINVLA_BUILD_JOBS", "2")))
    sub.add_parser("prefix", help="print cmake_prefix_path()")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build(build_dir=args.build_dir, prefix=args.prefix, jobs=args.jobs)
        else:
            print(cmake_prefix_path())
    except (CppNotBuiltError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
