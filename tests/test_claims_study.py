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


@pytest.mark.parametrize("pretrained_arm, scratch_arm", [("full", "clinvla"), ("clip_mae", "clip")])
def test_an_arm_from_the_mae_tower_differs_from_its_arm_from_scratch_only_in_its_start(pretrained_arm, scratch_arm):
    # full - clinvla reads what the pre-training changes; full - clip_mae is the verdict's pretrained comparison
    assert {("full", "clinvla"), ("full", "clip_mae")} <= {(a, b) for a, b, _ in COMPARISONS}
    base = {"vision": {"num_views": 2}, "train": {"seed": 0}, "loss": {}}
    pretrained, scratch = arm_config(pretrained_arm, base, "pre/model.safetensors"), arm_config(scratch_arm, base)
    assert pretrained["vision"].pop("init_from") == "pre/model.safetensors"
    assert pretrained["vision"].pop("frozen") is False and "frozen" not in scratch["vision"]
    assert pretrained == scratch
    assert ARMS[pretrained_arm].pretrained and not ARMS[scratch_arm].pretrained
    with pytest.raises(ValueError, match="pass pretrain_checkpoint"):
        arm_config(pretrained_arm, base)


def test_the_verdict_judges_each_start_against_the_margins():
    def diff(d, lo):
        return {"diff": d, "ci": [lo, d + 0.05]}

    comparisons = {("clinvla", "clip"): {"8x200/t2i_P@10": diff(0.04, 0.01), "5x200/i2t_P@10": diff(0.06, -0.01)},
                   ("full", "clip_mae"): {"8x200/t2i_P@10": diff(0.02, 0.005)}}
    assert claims_study.verdicts(comparisons) == [
        "8x200/t2i_P@10 (from scratch): ClinVLA - CLIP = +0.040 [+0.010, +0.090] (target >= +0.03 with the "
        "interval above 0): met",
        "5x200/i2t_P@10 (from scratch): ClinVLA - CLIP = +0.060 [-0.010, +0.110] (target >= +0.05 with the "
        "interval above 0): NOT met",  # the margin is reached, the interval is not above 0
        "8x200/t2i_P@10 (both from the MAE tower): ClinVLA - CLIP = +0.020 [+0.005, +0.070] (target >= +0.03 "
        "with the interval above 0): NOT met",  # above 0, below the margin
        "5x200/i2t_P@10 (both from the MAE tower): not measured"]


def test_a_finished_run_is_found_again_by_another_path_to_the_same_tower(tmp_path):
    tower = tmp_path / "study" / "pretrain-seed0" / "model.safetensors"
    tower.parent.mkdir(parents=True)
    tower.write_bytes(b"pretrained tower v1")
    base = {"vision": {"num_views": 2}, "train": {"seed": 0}, "loss": {}}
    cfg = arm_config("full", base, str(tower))
    saved = {"config": cfg, "init_from_sha256": claims_study._init_digest(cfg)}
    assert claims_study.same_run(saved, cfg)
    moved = tmp_path / "elsewhere"
    (tmp_path / "study").rename(moved)  # the study folder moved (or --out given another way)
    assert claims_study.same_run(saved, arm_config("full", base, str(moved / "pretrain-seed0" / "model.safetensors")))
    # a retrained tower at the same path is another start: the run is redone
    there = str(moved / "pretrain-seed0" / "model.safetensors")
    (moved / "pretrain-seed0" / "model.safetensors").write_bytes(b"pretrained tower v2")
    assert not claims_study.same_run(saved, arm_config("full", base, there))
    # another setting, or a start from scratch, is another run whatever the tower
    assert not claims_study.same_run(saved, arm_config("frozen", base, there))
    assert not claims_study.same_run(saved, arm_config("clinvla", base))
    assert claims_study.same_run({"config": arm_config("clinvla", base)}, arm_config("clinvla", base))
    # a run recorded before the digest was kept matches by its path only
    old = {"config": cfg}
    assert claims_study.same_run(old, cfg)
    assert not claims_study.same_run(old, arm_config("full", base, "other/model.safetensors"))
