"""Frontal / lateral view rules for DICOM chest X-rays, read from ``view_rules.json``.

The rules live once, as data, because the C++ PACS integration applies exactly the same ones;
``tests/data/view_rule_vectors.json`` holds the cases both sides must pass.

API (``header`` is a pydicom Dataset or any mapping from DICOM keywords to values, sequences as
lists of such mappings, e.g. ``{"Modality": "DX", "ViewPosition": "PA"}``):

- ``classify_view(header) -> "frontal" | "lateral" | None``
- ``decide(header) -> (view, rule)``: rule is the one that decided: ``"view_position"``,
  ``"view_code"``, ``"patient_orientation"``, ``"modality"`` (Modality not CR/DX: never
  classified) or ``"none"`` (no rule reached a decision).
- ``classify(header) -> ViewDecision(view, rule, label)``: label is the canonical view
  (``PA``, ``AP``, ``FRONTAL``, ``LL``, ``RL``, ``LATERAL``, ``XTABLE LATERAL``) or None.
- ``pick_views(candidates) -> (frontal, lateral_or_None)`` among the images of one study.

The rule table (see the JSON for every value):

1. Modality must be CR or DX.
2. ViewPosition, normalised (upper case, ``_``/``-`` as spaces, whitespace collapsed): PA, AP
   and their spellings -> frontal; LL, RL, LATERAL, LAT, L, cross-table lateral -> lateral;
   angled, decubitus, oblique, swimmer's -> excluded (view None, decided, no fallback);
   blank or unknown -> next rule.
3. ViewCodeSequence[0]: CID 4010 codes (SNOMED CT 272479007 / SRT R-10214 postero-anterior,
   399348003 / R-10206 antero-posterior, 399033003 / R-10202 frontal, 399173006 / R-10236 left
   lateral, 399198007 / R-10232 right lateral, 399067008 / R-102CD lateral), else the
   CodeMeaning; unknown -> next rule.
4. PatientOrientation row direction: exactly L or R -> frontal, A or P -> lateral.

The first rule that decides wins, so conflicting tags resolve in that order (ViewPosition
"PA" with a lateral ViewCodeSequence is a frontal).

``pick_views``: frontal by label rank PA < AP < FRONTAL, then most pixels, then lowest
InstanceNumber, then smallest path; the lateral by LL < LATERAL < RL < XTABLE LATERAL, same ties.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

RULES_FILE = "view_rules.json"


class ViewDecision(NamedTuple):
    view: str | None  # "frontal" | "lateral" | None
    rule: str  # view_position | view_code | patient_orientation | modality | none
    label: str | None  # PA, AP, FRONTAL, LL, RL, LATERAL, XTABLE LATERAL


class _Rules(NamedTuple):
    raw: dict
    as_space: tuple[str, ...]
    modalities: frozenset[str]
    order: tuple[str, ...]
    position: dict[str, tuple[str, str]]  # normalised value -> (view, label)
    excluded: frozenset[str]
    codes: dict[tuple[str, str], tuple[str, str]]  # (scheme, code) -> (view, label)
    meanings: dict[str, tuple[str, str]]
    frontal_rows: frozenset[str]
    lateral_rows: frozenset[str]
    rank: dict[str, dict[str, int]]  # view -> label -> rank


@lru_cache(maxsize=1)
def rules() -> _Rules:
    """The parsed view_rules.json (package data), read once."""
    raw = json.loads(resources.files(__package__).joinpath(RULES_FILE).read_text(encoding="utf-8"))
    position: dict[str, tuple[str, str]] = {}
    for view in ("frontal", "lateral"):
        for value, label in raw["view_position"][view].items():
            position[value] = (view, label)
    codes: dict[tuple[str, str], tuple[str, str]] = {}
    for entry in raw["view_code"]["codes"]:
        for scheme in entry["schemes"]:
            codes[(scheme, entry["code"].upper())] = (entry["view"], entry["label"])
    meanings = {m: (view, label) for view in ("frontal", "lateral")
                for m, label in raw["view_code"]["meanings"][view].items()}
    pick = raw["pick"]
    return _Rules(
        raw=raw,
        as_space=tuple(raw["normalise"]["as_space"]),
        modalities=frozenset(raw["modalities"]["allowed"]),
        order=tuple(raw["rule_order"]),
        position=position,
        excluded=frozenset(raw["view_position"]["excluded"]),
        codes=codes,
        meanings=meanings,
        frontal_rows=frozenset(raw["patient_orientation"]["frontal_rows"]),
        lateral_rows=frozenset(raw["patient_orientation"]["lateral_rows"]),
        rank={"frontal": dict(pick["frontal_rank"]), "lateral": dict(pick["lateral_rank"])},
    )


def normalise(value: Any) -> str:
    """A tag value as the rules compare it (see the JSON's "normalise"): '' for None/blank."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        # several values in a single-valued tag: joined with a backslash, which no entry holds
        return "\\".join(normalise(v) for v in value)
    text = str(value).upper()
    for char in rules().as_space:
        text = text.replace(char, " ")
    return " ".join(text.split())


def _get(item: Any, keyword: str) -> Any:
    try:
        return item.get(keyword)
    except Exception:  # a malformed element pydicom cannot convert: treated as absent
        return None


def modality_allowed(header: Any) -> bool:
    return normalise(_get(header, "Modality")) in rules().modalities


def _by_position(header: Any) -> ViewDecision | None:
    value = normalise(_get(header, "ViewPosition"))
    if not value:
        return None
    r = rules()
    if value in r.position:
        view, label = r.position[value]
        return ViewDecision(view, "view_position", label)
    if value in r.excluded:
        return ViewDecision(None, "view_position", None)
    return None


def _by_code(header: Any) -> ViewDecision | None:
    items = _get(header, "ViewCodeSequence")
    if not items:
        return None
    try:
        item = items[0]
    except (IndexError, TypeError, KeyError):
        return None
    r = rules()
    scheme = normalise(_get(item, "CodingSchemeDesignator"))
    code = str(_get(item, "CodeValue") or "").strip().upper()
    found = r.codes.get((scheme, code))
    if found is None:
        found = r.meanings.get(normalise(_get(item, "CodeMeaning")))
    if found is None:
        return None
    return ViewDecision(found[0], "view_code", found[1])


def _by_orientation(header: Any) -> ViewDecision | None:
    value = _get(header, "PatientOrientation")
    if value is None:
        return None
    if isinstance(value, str):  # a dict header or an unsplit string: "L\\F"
        values = value.split("\\")
    else:
        try:
            values = [str(v) for v in value]
        except TypeError:
            return None
    if len(values) != 2:  # the standard's two values (rows, columns); anything else is not trusted
        return None
    row = normalise(values[0])
    r = rules()
    if row in r.frontal_rows:
        return ViewDecision("frontal", "patient_orientation", "FRONTAL")
    if row in r.lateral_rows:
        return ViewDecision("lateral", "patient_orientation", "LATERAL")
    return None


_RULE_FUNCS = {"view_position": _by_position, "view_code": _by_code, "patient_orientation": _by_orientation}


def classify(header: Any) -> ViewDecision:
    """The full decision: view, the rule that decided, and the canonical label."""
    if not modality_allowed(header):
        return ViewDecision(None, "modality", None)
    for name in rules().order:
        decision = _RULE_FUNCS[name](header)
        if decision is not None:
            return decision
    return ViewDecision(None, "none", None)


def decide(header: Any) -> tuple[str | None, str]:
    """(view, rule): "frontal" | "lateral" | None and which rule decided (see the module doc)."""
    decision = classify(header)
    return decision.view, decision.rule


def classify_view(header: Any) -> str | None:
    """"frontal", "lateral" or None (not a CR/DX image, an excluded view, or nothing decides)."""
    return classify(header).view


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _candidate_facts(candidate: Any) -> tuple[str | None, str | None, int, int | None, str]:
    """(view, label, pixels, instance number, path) of a manifest row (mapping with "view",
    "view_label", "rows", "columns", "instance_number", "path") or of a header (classified here)."""
    if isinstance(candidate, Mapping) and "view" in candidate:
        view, label = candidate.get("view"), candidate.get("view_label")
        rows, columns = candidate.get("rows"), candidate.get("columns")
        number, path = candidate.get("instance_number"), candidate.get("path")
    else:
        decision = classify(candidate)
        view, label = decision.view, decision.label
        rows, columns = _get(candidate, "Rows"), _get(candidate, "Columns")
        number = _get(candidate, "InstanceNumber")
        path = getattr(candidate, "filename", None) or _get(candidate, "path")
    pixels = (_as_int(rows) or 0) * (_as_int(columns) or 0)
    return view, label, pixels, _as_int(number), str(path or "")


def _best(found: list[tuple[tuple, int]]) -> int | None:
    return min(found)[1] if found else None


def pick_views(candidates: Iterable[Any]) -> tuple[Any, Any]:
    """(frontal, lateral or None) among the images of ONE study, as the objects passed in.

    candidates: manifest rows (mappings with view, view_label, rows, columns, instance_number,
    path) or pydicom headers. Order: the label's rank from view_rules.json "pick" (PA < AP <
    FRONTAL; LL < LATERAL < RL < XTABLE LATERAL; an unranked label after all ranked ones), then
    most pixels, then lowest InstanceNumber (missing last), then smallest path. frontal is None
    when the study has no frontal image (the caller skips such a study).
    """
    items = list(candidates)
    r = rules()
    keyed: dict[str, list[tuple[tuple, int]]] = {"frontal": [], "lateral": []}
    for index, candidate in enumerate(items):
        view, label, pixels, number, path = _candidate_facts(candidate)
        if view not in keyed:
            continue
        rank = r.rank[view].get(label or "", len(r.rank[view]))
        key = (rank, -pixels, number is None, number if number is not None else 0, path, index)
        keyed[view].append((key, index))
    frontal, lateral = _best(keyed["frontal"]), _best(keyed["lateral"])
    return (items[frontal] if frontal is not None else None,
            items[lateral] if lateral is not None else None)
