"""Triton kernels (installed as clinvla_engine.kernels), one module per op, each beside its `_ref`."""
