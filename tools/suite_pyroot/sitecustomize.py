"""Makes the source tree importable as the installed package, for tools/gpu_suite.sh's CMake fallback.

When ``pip install -e .`` fails on the GPU machine, the suite builds ``clinvla_engine._C`` with
CMake and puts this folder and the repository on PYTHONPATH. Two things an install would provide
are then missing, and this module (imported by ``site`` at every interpreter start, so also in
pytest's and Inductor's subprocesses) provides them with a meta-path finder:

* ``clinvla_engine.kernels`` is the top-level ``kernels/`` folder (pyproject's package-dir mapping;
  a top-level ``kernels`` package would collide on PyPI), so the source tree alone has no such
  package;
* ``clinvla_engine._C`` is the CMake-built module, loaded from the build folder
  (``CLINVLA_EXT_SO``), so that nothing is written into the source tree.

Environment: ``CLINVLA_SOURCE_ROOT`` (the repository), ``CLINVLA_EXT_SO`` (the built ``_C*.so``;
optional). Another ``sitecustomize`` further along sys.path (e.g. tools/simulate_gpu_env.py's)
still runs.
"""
import importlib.machinery
import importlib.util
import os
import sys


class _SourceTreeFinder:
    def __init__(self, root, ext_so):
        self.root = root
        self.ext_so = ext_so

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "clinvla_engine.kernels":
            init = os.path.join(self.root, "kernels", "__init__.py")
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[os.path.dirname(init)])
        if fullname == "clinvla_engine._C" and self.ext_so:
            loader = importlib.machinery.ExtensionFileLoader(fullname, self.ext_so)
            return importlib.util.spec_from_file_location(fullname, self.ext_so, loader=loader)
        return None

    def __repr__(self):
        return f"<clinvla source-tree finder {self.root} (_C: {self.ext_so or 'not built'})>"


_root = os.environ.get("CLINVLA_SOURCE_ROOT", "")
if _root and os.path.isfile(os.path.join(_root, "kernels", "__init__.py")):
    _so = os.environ.get("CLINVLA_EXT_SO", "")
    sys.meta_path.insert(0, _SourceTreeFinder(os.path.abspath(_root), os.path.abspath(_so) if _so else ""))


def _chain():
    """Runs the sitecustomize that this one shadows, if any (only the first on sys.path is imported)."""
    # every sitecustomize of the chain records its folder, so that two of them never run each other
    done = getattr(sys, "_clinvla_sitecustomize_dirs", set())
    done.add(os.path.dirname(os.path.abspath(__file__)))
    sys._clinvla_sitecustomize_dirs = done
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) not in done]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_chain()
