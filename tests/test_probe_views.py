"""The per-view probe on a synthetic archive (1,000 studies at 128 px, the "probe" class mix, every
study with a lateral view; generated once for the module: about 15 s on 2 quiet cores, the probe
about 10 s).

The probe is an instrument that can fail: what the frontal plainly shows (cardiomegaly, edema) it
finds, with shuffled labels it falls to chance, and the frontal view alone fails the lateral-needed
bar. The lateral-needed stratum is found from the lateral and not the frontal (measured: lateral
0.78 [0.74, 0.81], frontal 0.56). The frontal-favoured stratum is NOT shown by this probe, which is
blind to rib fractures from any view (AUROC ~0.5): a strict xfail carrying the numbers (issue 11).
At 64 px the lateral-needed stratum is weaker (0.69 [0.66, 0.72] on 1,500 studies; the slow test)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinvla_engine.data import synth
from clinvla_engine.data.synth import probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "archive"
    synth.generate_archive(out, 1000, seed=11, size=128, lateral_fraction=1.0, mix="probe", progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(archive) -> dict:
    return probe.prepare(archive, 128)


@pytest.fixture(scope="module")
def result(prepared) -> dict:
    return probe.run_probe(prepared, views=("frontal", "lateral"))


def test_probe_finds_what_the_frontal_plainly_shows(result):
    for label in ("Cardiomegaly", "Edema"):
        frontal = result["auroc"]["frontal"][label]
        assert frontal["ci95"][0] > 0.8, (label, frontal)


def test_lateral_needed_is_seen_from_the_lateral_only(result):
    lateral, frontal = result["auroc"]["lateral"]["lateral_needed"], result["auroc"]["frontal"]["lateral_needed"]
    assert lateral["n_pos"] > 200 and lateral["n_neg"] > 200, lateral
    assert lateral["ci95"][0] > 0.7, lateral
    assert frontal["auroc"] < 0.65, frontal
    # the same bar applied to the frontal view fails: the assertion above can fail
    assert not frontal["ci95"][0] > 0.7, frontal


def test_shuffled_labels_fall_to_chance(prepared, result):
    shuffled = probe.run_probe(prepared, views=("lateral",), shuffle_labels=True)
    for label in ("Cardiomegaly", "lateral_needed"):
        r = shuffled["auroc"]["lateral"][label]
        assert r["ci95"][0] < 0.6 and r["auroc"] < 0.65, (label, r)
    assert not shuffled["auroc"]["lateral"]["lateral_needed"]["ci95"][0] > 0.7  # fails the bar


@pytest.mark.xfail(strict=True, reason="issue 11: measured on this archive (synth 2.1): frontal-favoured from the "
                   "frontal AUROC 0.62 [0.56, 0.68], from the lateral 0.55, 143 positives; Fracture 0.5 from every "
                   "view: the probe's features (detail energy on 5 cm cells) cannot see a rib break")
def test_frontal_favoured_is_seen_from_the_frontal_only(result):
    frontal, lateral = result["auroc"]["frontal"]["frontal_favoured"], result["auroc"]["lateral"]["frontal_favoured"]
    assert frontal["ci95"][0] > 0.7, frontal
    assert lateral["auroc"] < 0.65, lateral


@pytest.mark.slow
def test_lateral_needed_at_64_px(tmp_path):
    out = tmp_path / "a64"
    synth.generate_archive(out, 1500, seed=0, size=64, lateral_fraction=1.0, mix="probe", progress=False)
    r = probe.run_probe(out, 64, views=("frontal", "lateral"))
    assert r["auroc"]["lateral"]["lateral_needed"]["ci95"][0] > 0.6, r["auroc"]["lateral"]["lateral_needed"]
    assert r["auroc"]["frontal"]["lateral_needed"]["auroc"] < 0.65, r["auroc"]["frontal"]["lateral_needed"]


def test_box_filter_and_features():
    rng = np.random.default_rng(0)
    x = rng.random((2, 64, 64))
    box = probe._box(x, 5)
    assert np.allclose(box[:, 10, 10], x[:, 8:13, 8:13].mean(axis=(1, 2)))
    feats = probe.view_features(x)
    assert feats.shape == (2, 16 * 16 + 8 * 8) and np.isfinite(feats).all()
    with pytest.raises(probe.ProbeError, match="multiple of 16"):
        probe.view_features(x[:, :40, :40])
    with pytest.raises(probe.ProbeError, match="feature kinds"):
        probe.view_features(x, ("edges",))


def test_logistic_fit_separates_a_planted_signal():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 40))
    y = np.stack([(f[:, 0] + 0.3 * rng.normal(size=300) > 0), rng.random(300) < 0.5], 1).astype(np.float32)
    y[:50, 1] = np.nan  # not in the second group's comparison
    fold = probe.patient_folds([str(i // 2) for i in range(300)], 5, 0)
    scores = probe.cross_fit(f, y, fold)
    assert probe.auroc(y[:, 0], scores[:, 0]) > 0.85
    assert abs(probe.auroc(y[50:, 1], scores[50:, 1]) - 0.5) < 0.15
    assert len({(fold[i], fold[i + 1]) for i in range(0, 300, 2) if fold[i] != fold[i + 1]}) == 0


def test_auroc_and_its_interval():
    y = np.array([0, 0, 1, 1] * 5)
    assert probe.auroc(y, np.array([0.1, 0.2, 0.8, 0.9] * 5)) == 1.0
    assert probe.auroc(y, np.full(20, 0.5)) == 0.5  # ties count half
    few = probe.auroc_ci(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9]))
    assert few["auroc"] is None and "fewer than" in few["reason"]
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(60), np.zeros(60)]
    ci = probe.auroc_ci(y, y + rng.normal(0, 1.0, 120))
    assert ci["ci95"][0] < ci["auroc"] < ci["ci95"][1] and 0.6 < ci["auroc"] < 0.9
    with pytest.raises(probe.ProbeError, match="not finite"):
        probe.auroc_ci(y, np.r_[np.nan, np.ones(119)])


def test_old_and_foreign_archives_are_refused(tmp_path, archive):
    with pytest.raises(probe.ProbeError, match="synth_manifest.json"):
        probe.run_probe(tmp_path, 64)
    with pytest.raises(probe.ProbeError, match="multiple of 16"):
        probe.run_probe(archive, 40)
    with pytest.raises(probe.ProbeError, match="views="):
        probe.run_probe(archive, 64, views=("oblique",))
    old = tmp_path / "old"
    old.mkdir()
    records = [json.loads(x) for x in (archive / "synth_truth.jsonl").read_text().splitlines()]
    for r in records:
        for f in r["findings"]:
            del f["lateral_needed"]
    (old / "synth_truth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = json.loads((archive / "synth_manifest.json").read_text())
    (old / "synth_manifest.json").write_text(json.dumps({**manifest, "version": "1.0"}))
    with pytest.raises(probe.ProbeError, match="regenerate"):
        probe.run_probe(old, 64)


def test_tool_refuses_a_bad_size(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools/probe_views.py"), "--archive", str(tmp_path),
                           "--size", "8"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--size 8" in done.stderr


def test_tool_prints_the_table(result):
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_views", ROOT / "tools/probe_views.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tool._table(result)
    assert "| group | n+ / n- | frontal | lateral |" in table
    row = next(line for line in table.splitlines() if line.startswith("| lateral_needed |"))
    assert f"{result['auroc']['lateral']['lateral_needed']['auroc']:.3f}" in row
    json.dumps(result)  # what --out writes
