"""The deployment runtime: load a verified engine bundle and embed studies and report texts.

    from clinvla_engine.runtime import Engine
    engine = Engine.load("engine_dir")
    study_emb = engine.embed_studies(frontal_paths, lateral_paths)   # (N, E) float32
    text_emb = engine.embed_texts(["right lower lobe pneumonia"])     # (N, E) float32

Bundles are written by ``clinvla-build-engine`` (clinvla_engine.export); see ``bundle`` for the
layout and the checks made at load time.
"""
from .bundle import BundleError, load_bundle, read_manifest
from .engine import Engine

__all__ = ["BundleError", "Engine", "load_bundle", "read_manifest"]
