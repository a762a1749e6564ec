"""Build script.

Metadata lives in pyproject.toml. This file exists for the C++ core: a later change builds csrc/
into ``clinvla_engine._C`` with pybind11 here. Until then it builds no extension, only lists the
packages (``kernels/`` is installed as ``clinvla_engine.kernels``). It never imports torch.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["clinvla_engine", "clinvla_engine.*"]) + ["clinvla_engine.kernels"]

setup(packages=packages)
