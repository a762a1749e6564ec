"""Batched embedding of an archive (``clinvla embed``) and the DICOM side it stands on.

Submodules are imported on first use, so ``import clinvla_engine.pipeline`` needs neither
pydicom nor pyarrow: ``views`` (frontal/lateral rules from view_rules.json), ``decode``
(any DICOM transfer syntax -> float32 grey in [0, 1]), ``scan`` (header-only manifest of a DICOM
tree, Parquet), ``phi`` (salted hashes of patient ids and accession numbers).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "classify_view": "views",
    "decide": "views",
    "pick_views": "views",
    "decode_dicom": "decode",
    "scan_dicom_tree": "scan",
    "MANIFEST_SCHEMA": "scan",
    "load_salt": "phi",
    "hash_identifier": "phi",
    "embed_archive": "embed",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
