"""``clinvla serve``: the HTTP service and the search page over one open ``SearchService``.

    from clinvla_engine.search import SearchService
    from clinvla_engine.serve import create_app
    app = create_app(SearchService.open("index/", "engine/"), token=None)

The names resolve lazily so that ``import clinvla_engine.serve`` (and ``clinvla --help``) needs
neither FastAPI nor the engine; ``create_app`` and ``run`` need the ``serve`` extra.
"""
from __future__ import annotations

__all__ = ["DEFAULT_MAX_K", "DEFAULT_MAX_UPLOAD_BYTES", "ServeError", "create_app", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
