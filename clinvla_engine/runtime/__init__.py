"""The deployment runtime: load a verified engine bundle and embed studies and report texts.

    from clinvla_engine.runtime import Engine
    engine = Engine.load("engine_dir")
    study_emb = engine.embed_studies(frontal_paths, lateral_paths)   # (N, E) float32
    text_emb = engine.embed_texts(["right lower lobe pneumonia"])     # (N, E) float32

Bundles are written by ``clinvla-build-engine`` (clinvla_engine.export); see ``bundle`` for the
layout and the checks made at load time. Nothing here imports the builder: a deployment needs
this package and the bundle only. Modules: ``bundle`` (manifest checks, the bundle's tokenizer and
weights), ``files`` (atomic writes, hashing), ``graphs`` (the graph wrappers and dtype maps the
builder shares), ``inputs``, ``runners`` (one per backend), ``engine``, ``aoti_probe``.
"""
from .bundle import BundleError, load_bundle, read_manifest
from .engine import Engine

__all__ = ["BundleError", "Engine", "load_bundle", "read_manifest"]
