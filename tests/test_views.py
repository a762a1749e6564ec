"""View rules: every case of tests/data/view_rule_vectors.json (shared with the C++ PACS side),
on pydicom datasets and on plain mappings, and the rule table's own consistency."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from clinvla_engine.pipeline import views
from clinvla_engine.pipeline.views import classify, classify_view, decide, normalise, pick_views

VECTORS = json.loads((Path(__file__).parent / "data" / "view_rule_vectors.json").read_text(encoding="utf-8"))
CLASSIFY = VECTORS["classify"]
PICK = VECTORS["pick"]


def as_dataset(header: dict):
    """The vector's header as a pydicom Dataset, as read from a file (values kept as written)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-case or hyphenated CS values are invalid DICOM, as in real files
        for keyword, value in header.items():
            if keyword.endswith("Sequence"):
                items = []
                for item in value:
                    entry = Dataset()
                    for k, v in item.items():
                        setattr(entry, k, v)
                    items.append(entry)
                setattr(ds, keyword, Sequence(items))
            else:
                setattr(ds, keyword, value)
    assert isinstance(ds, pydicom.Dataset)
    return ds


def test_vectors_cover_the_required_cases():
    rules_seen = {case["rule"] for case in CLASSIFY}
    assert len(CLASSIFY) >= 40
    assert rules_seen == {"view_position", "view_code", "patient_orientation", "modality", "none"}
    names = [case["name"] for case in CLASSIFY + PICK]
    assert len(names) == len(set(names)), "vector names must be unique (the C++ test reports by name)"


@pytest.mark.parametrize("case", CLASSIFY, ids=[c["name"] for c in CLASSIFY])
def test_classify_vectors_on_datasets(case):
    ds = as_dataset(case["header"])
    got = classify(ds)
    assert (got.view, got.rule, got.label) == (case["view"], case["rule"], case["label"])
    assert decide(ds) == (case["view"], case["rule"])
    assert classify_view(ds) == case["view"]


@pytest.mark.parametrize("case", CLASSIFY, ids=[c["name"] for c in CLASSIFY])
def test_classify_vectors_on_mappings(case):
    got = classify(case["header"])
    assert (got.view, got.rule, got.label) == (case["view"], case["rule"], case["label"])


@pytest.mark.parametrize("case", PICK, ids=[c["name"] for c in PICK])
def test_pick_vectors(case):
    candidates = case["candidates"]
    frontal, lateral = pick_views(candidates)
    expected_frontal = None if case["frontal"] is None else candidates[case["frontal"]]
    expected_lateral = None if case["lateral"] is None else candidates[case["lateral"]]
    assert frontal is expected_frontal and lateral is expected_lateral
    # the choice must not depend on the order the archive listed the files in
    frontal_r, lateral_r = pick_views(list(reversed(candidates)))
    assert frontal_r is expected_frontal and lateral_r is expected_lateral


def test_pick_views_on_headers():
    pa = as_dataset({"Modality": "DX", "ViewPosition": "PA", "Rows": 100, "Columns": 100, "InstanceNumber": 2})
    ap = as_dataset({"Modality": "DX", "ViewPosition": "AP", "Rows": 3000, "Columns": 3000, "InstanceNumber": 1})
    lat = as_dataset({"Modality": "DX", "PatientOrientation": ["A", "F"], "Rows": 100, "Columns": 100})
    ct = as_dataset({"Modality": "CT", "ViewPosition": "PA", "Rows": 5000, "Columns": 5000})
    assert pick_views([ct, ap, lat, pa]) == (pa, lat)


def test_rule_table_is_normalised_and_consistent():
    r = views.rules()
    listed = list(r.position) + list(r.excluded) + list(r.meanings)
    for value in listed:
        assert normalise(value) == value, f"{value!r} in view_rules.json is not in normalised form"
    assert not set(r.position) & r.excluded, "a ViewPosition value is both classified and excluded"
    labels = {label for _, label in list(r.position.values()) + list(r.codes.values()) + list(r.meanings.values())}
    labels |= {"FRONTAL", "LATERAL"}  # the orientation rule's labels
    assert labels == set(r.rank["frontal"]) | set(r.rank["lateral"]), "every label needs a pick rank"
    for view, label in list(r.position.values()) + list(r.codes.values()):
        assert label in r.rank[view], f"{label} ranked under the wrong view"
    assert r.order == ("view_position", "view_code", "patient_orientation")


def test_package_and_views_import_without_pyarrow_or_pydicom():
    import subprocess
    import sys

    code = ("import sys; import clinvla_engine.pipeline, clinvla_engine.pipeline.views as v; "
            "v.classify({'Modality': 'DX', 'ViewPosition': 'PA'}); "
            "print(sorted(m for m in ('pyarrow', 'pydicom', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_normalise():
    assert normalise("  ap_horizontal ") == "AP HORIZONTAL"
    assert normalise("Postero-Anterior") == "POSTERO ANTERIOR"
    assert normalise(None) == "" and normalise("   ") == ""
    assert normalise(["PA", "lat"]) == "PA\\LAT"
