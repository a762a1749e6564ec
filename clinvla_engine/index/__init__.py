"""Exact top-k retrieval: `Index` over the C++/CUDA core (csrc/), for `clinvla index` / `clinvla search`.

Importing this package never needs the compiled extension; creating an `Index` does, and says how
to build it when it is missing (see clinvla_engine.backends).
"""
from .flat import DTYPES, MAX_K, MAX_K_CUDA, MAX_RESULT_BYTES, Index

__all__ = ["DTYPES", "MAX_K", "MAX_K_CUDA", "MAX_RESULT_BYTES", "Index"]
