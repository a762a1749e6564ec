"""Search an embedded archive: the index directory, two-stage retrieval and `clinvla index|search`.

    from clinvla_engine.search import SearchService
    service = SearchService.open("index/", "engine/")
    hits = service.search_text("left lower lobe consolidation", k=10, rerank=50)

Importing this package needs neither the compiled extension nor the engine; opening a service does.
"""
from .service import MAX_K, MAX_RERANK, BadQuery, IndexMismatch, NotFound, SearchError, SearchService

__all__ = ["MAX_K", "MAX_RERANK", "BadQuery", "IndexMismatch", "NotFound", "SearchError", "SearchService"]
