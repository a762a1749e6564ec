"""The claims study's evaluation cache: a re-run reuses an evaluation only while everything it
depends on (checkpoint, archive, manifest, settings, code) is unchanged."""
import json

import pytest

from clinvla_engine import claims_study
from clinvla_engine.claims_study import ARMS, COMPARISONS, arm_config, evaluate_run_cached, evaluation_key


@pytest.fixture
def study(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "synth_truth.jsonl").write_text('{"study_id": "s1", "findings": []}\n')
    (archive / "synth_files.txt").write_text("files/p10/p1/s1\n")
    run = tmp_path / "clinvla-seed0"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights v1")
    manifest = tmp_path / "eval_manifest.json"
    calls = []

    def fake_evaluate_run(model, dataset, archive_, manifest_, seed, per_class, protocols):
        # stands in for the real protocols (tested in test_eval_claims / test_evaluate); like them,
        # the first evaluation writes the manifest the later ones read
        calls.append((seed, per_class, tuple(protocols)))
        if not manifest_.exists():
            manifest_.write_text('{"sets": "v1"}')
        return {"seed": seed, "metrics": {"5x200/i2t_P@10": 0.5 + len(calls) / 100},
                "items": {"5x200/i2t_P@10": {"values": [0.5], "ids": ["q1"]}}, "classic": {}, "skipped_studies": []}

    monkeypatch.setattr(claims_study, "evaluate_run", fake_evaluate_run)
    cache = tmp_path / "eval" / "clinvla-seed0.json"
    cache.parent.mkdir()

    def evaluate(per_class=20):
        return evaluate_run_cached(None, [], archive, manifest, 0, per_class, run=run, cache=cache)

    return {"archive": archive, "run": run, "manifest": manifest, "cache": cache, "calls": calls, "evaluate": evaluate}


def test_an_unchanged_run_is_not_evaluated_again(study):
    first = study["evaluate"]()
    assert len(study["calls"]) == 1
    saved = json.loads(study["cache"].read_text())
    assert saved["evaluation_key"] == evaluation_key(study["run"], study["archive"], study["manifest"], 0, 20,
                                                     ("strata", "laterality", "pointing"))
    again = study["evaluate"]()
    assert len(study["calls"]) == 1 and again == first and "evaluation_key" not in again


@pytest.mark.parametrize("change", ["checkpoint", "manifest", "truth", "per_class", "code", "corrupt cache"])
def test_any_change_it_depends_on_evaluates_again(study, monkeypatch, change):
    first = study["evaluate"]()
    per_class = 20
    if change == "checkpoint":
        (study["run"] / "model.safetensors").write_bytes(b"weights v2")
    elif change == "manifest":
        study["manifest"].write_text('{"sets": "v2"}')
    elif change == "truth":
        (study["archive"] / "synth_truth.jsonl").write_text('{"study_id": "s2", "findings": []}\n')
    elif change == "per_class":
        per_class = 30
    elif change == "code":
        monkeypatch.setattr(claims_study, "_package_digest", lambda: "another version of the code")
    else:
        study["cache"].write_text('{"seed": 0, "metr')  # a file cut short: re-evaluated, not a crash
    second = study["evaluate"](per_class)
    assert len(study["calls"]) == 2 and second != first
    assert json.loads(study["cache"].read_text())["metrics"] == second["metrics"]


def test_the_pretraining_comparison_differs_from_the_recipe_only_in_its_start():
    assert ("full", "clinvla") in [(a, b) for a, b, _ in COMPARISONS]
    base = {"vision": {"num_views": 2}, "train": {"seed": 0}, "loss": {}}
    full, recipe = arm_config("full", base, "pre/model.safetensors"), arm_config("clinvla", base)
    assert full["vision"].pop("init_from") == "pre/model.safetensors"
    assert full["vision"].pop("frozen") is False and "frozen" not in recipe["vision"]
    assert full == recipe
    assert ARMS["full"].pretrained and not ARMS["clinvla"].pretrained
