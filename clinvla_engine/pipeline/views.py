"""The pipeline's entry point to the view rules (``classify_view(header) -> "frontal" | "lateral" |
None``). The rules and their code live in ``clinvla_engine.data.views`` (read from
``data/view_rules.json``), because the archive loaders apply them too and arrows point down the
flow: data/ never imports pipeline/. The C++ PACS side reads the same JSON file."""
from __future__ import annotations

from ..data.views import (  # noqa: F401  (re-exported)
    RULES_FILE,
    ViewDecision,
    classify,
    classify_view,
    decide,
    modality_allowed,
    normalise,
    pick_views,
    rules,
)
