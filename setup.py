"""Build script.

Metadata lives in pyproject.toml. This file lists the packages (``kernels/`` is installed as
``clinvla_engine.kernels``) and builds the C++/CUDA core in ``csrc/`` into ``clinvla_engine._C``
with pybind11. It never imports torch.

Build switches (environment variables):

* ``CLINVLA_NO_CUDA=1``      CPU only, even where nvcc is found.
* ``CLINVLA_CUDA_ARCH``      CUDA targets, e.g. ``90`` (the default), ``80;90`` or ``90a``: machine
                             code for each, plus PTX for the last so newer GPUs can JIT it.
* ``CLINVLA_BUILD_JOBS``     parallel compile jobs (``MAX_JOBS`` is honoured too); by default the
                             CPU count, bounded by free memory (about 1.5 GiB per job).
* ``CLINVLA_NO_EXTENSION=1`` skip the extension (the package imports without it and
                             ``clinvla_engine.build_info()`` says why).
* ``CUDA_HOME``              where the CUDA toolkit lives when nvcc is not on the PATH.
* ``CLINVLA_BUILD_CPP=1``    also build libclinvla (the C/C++ engine library, its CMake package and
                             the Orthanc plugin; what ``make cpp`` builds) into the package's
                             ``cpp/`` folder, so that a wheel carries it and
                             ``clinvla_engine.cmake_prefix_path()`` finds it once installed. Needs
                             cmake, torch in the build environment (for libtorch: build with
                             ``pip wheel --no-build-isolation .``), libssl-dev and nlohmann-json3-dev.

CPU kernels are compiled three times (baseline, AVX2+FMA+F16C, AVX-512) and picked at run time
from what the CPU reports, so a wheel built here also runs on older x86-64 machines.
"""
from __future__ import annotations

import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["clinvla_engine", "clinvla_engine.*"]) + ["clinvla_engine.kernels"]

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "scan_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "scan_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
}
KERNEL_FLAGS = ["-O3", "-ffp-contract=fast"]  # FMA contraction in the scan kernels


def _log(msg: str) -> None:
    print(f"[clinvla build] {msg}", file=sys.stderr, flush=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    if _truthy("CLINVLA_NO_CUDA"):
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None


def _cuda_lib_dir(nvcc: str) -> str | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for root in filter(None, roots):
        cands = [os.path.join(root, "lib64"), os.path.join(root, "lib")]
        cands += glob.glob(os.path.join(root, "targets", "*", "lib"))
        for d in cands:
            if os.path.isfile(os.path.join(d, "libcudart_static.a")):
                return d
    return None


def _cuda_archs() -> list[str]:
    raw = os.environ.get("CLINVLA_CUDA_ARCH", "90")
    archs = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if tok:
            if not (tok.rstrip("af").isdigit()):
                raise SystemExit(f"CLINVLA_CUDA_ARCH: cannot parse {tok!r} (expected e.g. 90, 80;90 or 90a)")
            archs.append(tok)
    return archs or ["90"]


def _jobs() -> int:
    for name in ("CLINVLA_BUILD_JOBS", "MAX_JOBS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        jobs = min(jobs, max(1, int(avail_kb / (1.5 * 2**20))))
    except (OSError, StopIteration, ValueError):
        pass
    return max(1, min(jobs, 16))


class BuildExt(build_ext):
    """Per-file flags (ISA variants), nvcc for .cu files, and a bounded parallel compile."""

    def build_extensions(self):
        compiler = self.compiler
        if not _truthy("CLINVLA_DEBUG"):  # Python's own CFLAGS carry -g: slower builds, 10x larger .so
            for attr in ("compiler_so", "compiler_cxx", "linker_so"):
                args = getattr(compiler, attr, None)
                if isinstance(args, list):
                    setattr(compiler, attr, [a for a in args if a != "-g"])
        compiler.src_extensions.append(".cu")
        default_compile = compiler._compile
        nvcc = getattr(self, "_nvcc", None)

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            name = os.path.basename(src)
            if src.endswith(".cu"):
                pp = [o for o in pp_opts if o.startswith("-I") or o == "-DCLINVLA_WITH_CUDA=1"]
                cmd = [nvcc, "-c", src, "-o", obj, *pp, *self._nvcc_flags]
                _log(" ".join(shlex.quote(c) for c in cmd))
                subprocess.check_call(cmd)
                return
            extra = list(extra_postargs)
            if name.startswith("scan_"):
                extra += KERNEL_FLAGS + (ISA_FLAGS.get(name, []) if X86 else [])
            default_compile(obj, src, ext, cc_args, extra, pp_opts)

        def compile_all(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                        extra_preargs=None, extra_postargs=None, depends=None):
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
            # Longest first: the CUDA file, then the kernel variants.
            order = sorted(objects, key=lambda o: (not build[o][0].endswith(".cu"),
                                                   not os.path.basename(build[o][0]).startswith("scan_")))
            jobs = _jobs()
            _log(f"compiling {len(order)} files with {jobs} job(s)")
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for fut in [pool.submit(compile_one, o, build[o][0], build[o][1], cc_args, extra_postargs, pp_opts)
                            for o in order]:
                    fut.result()
            return objects

        compiler.compile = compile_all
        super().build_extensions()


def _extension() -> list[Extension]:
    if _truthy("CLINVLA_NO_EXTENSION"):
        _log("CLINVLA_NO_EXTENSION=1: not building clinvla_engine._C")
        return []
    try:
        import pybind11
    except ImportError:
        _log("pybind11 is not installed: clinvla_engine._C is not built (pip install pybind11)")
        return []

    core = ["dispatch", "flat_index", "io", "c_api", "scan_generic", "scan_avx2", "scan_avx512"]
    sources = [f"csrc/core/{n}.cpp" for n in core] + ["csrc/python/bindings.cpp"]
    macros = []
    link_args = ["-fopenmp"]
    libraries, library_dirs = [], []
    nvcc = _find_nvcc()
    if nvcc:
        archs = _cuda_archs()
        lib_dir = _cuda_lib_dir(nvcc)
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        BuildExt._nvcc = nvcc
        BuildExt._nvcc_flags = ["-std=c++17", "-O3", "-lineinfo", "-Icsrc/include", "-DNDEBUG",
                                "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr", *gencode]
        sources.append("csrc/cuda/flat_index_cuda.cu")
        macros += [("CLINVLA_WITH_CUDA", "1"), ("CLINVLA_CUDA_ARCH_STR", '"' + ";".join(archs) + '"')]
        libraries += ["cudart_static", "dl", "rt", "pthread"]
        if lib_dir:
            library_dirs.append(lib_dir)
        _log(f"CUDA: {nvcc}, targets {archs} (+PTX), cudart from {lib_dir or 'the default linker path'}")
    else:
        sources.append("csrc/core/cuda_stub.cpp")
        _log("CUDA: skipped (" + ("CLINVLA_NO_CUDA=1" if _truthy("CLINVLA_NO_CUDA") else "nvcc not found") + ")")

    return [Extension(
        "clinvla_engine._C",
        sources=sources,
        include_dirs=["csrc/include", pybind11.get_include()],
        define_macros=macros,
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-fopenmp", "-DNDEBUG",
                            "-Wall", "-Wno-unknown-pragmas"],
        extra_link_args=link_args,
        libraries=libraries,
        library_dirs=library_dirs,
        language="c++",
    )]


class BuildPy(build_py):
    """With CLINVLA_BUILD_CPP=1: the package files, then libclinvla installed into the built package."""

    def run(self):
        super().run()
        if not _truthy("CLINVLA_BUILD_CPP"):
            return
        import importlib.util

        # clinvla_engine/cpp.py is stdlib-only: load it by path (importing the package would need torch)
        spec = importlib.util.spec_from_file_location("_clinvla_cpp", os.path.join(ROOT, "clinvla_engine", "cpp.py"))
        cpp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cpp)
        prefix = os.path.join(os.path.abspath(self.build_lib), "clinvla_engine", "cpp")
        _log(f"libclinvla: building into {prefix}")
        cpp.build(source_dir=ROOT, build_dir=os.path.join(ROOT, "build", "cpp-wheel"), prefix=prefix, jobs=_jobs())


setup(packages=packages, ext_modules=_extension(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
