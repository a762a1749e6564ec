"""The local-loss watch: a local loss stuck at chance (ln B) after its ramp is reported once."""
import math

import pytest

from clinvla_engine.train.watch import LocalChanceWatch


def feed(watch, values, weight=lambda s: 1.0, every=5):
    out = []
    for i, v in enumerate(values):
        step = (i + 1) * every
        w = watch.update(step, weight(step), v)
        if w:
            out.append((step, w))
    return out


def test_stuck_at_chance_warns_once_after_patience():
    watch = LocalChanceWatch(global_batch=32, full_weight=1.0, patience=100)
    chance = math.log(32)
    warnings = feed(watch, [chance + 0.05] * 60)
    assert len(warnings) == 1
    step, text = warnings[0]
    assert step == 105  # first judged once 100 steps at full weight have passed (from step 5)
    assert "ln 32 = 3.466" in text and "loss.tau3" in text


def test_learning_local_loss_never_warns():
    watch = LocalChanceWatch(global_batch=32, full_weight=1.0, patience=100)
    values = [math.log(32) - 0.002 * i for i in range(100)]  # falls below chance - margin early
    assert feed(watch, values[:5] + [3.2] * 95) == []


def test_ramp_resets_and_zero_weight_or_missing_values_are_ignored():
    watch = LocalChanceWatch(global_batch=32, full_weight=1.0, patience=50)
    chance = math.log(32)
    # ramped in over the first 200 steps: nothing is judged before full weight
    assert feed(watch, [chance] * 40, weight=lambda s: min(1.0, s / 200)) == []
    assert watch.update(205, 1.0, None) is None  # a window without the local loss
    assert watch.update(210, 1.0, float("nan")) is None
    assert LocalChanceWatch(32, full_weight=0.0).update(500, 0.0, chance) is None


def test_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="global_batch"):
        LocalChanceWatch(global_batch=1, full_weight=1.0)


# The logged local loss every 25 steps (steps 25..500) of two demo runs (small preset, batch 32,
# local weight 1 ramped in over 100 steps): GLoRIA's tau3 = 10, whose region features collapsed,
# and tau3 = 1, which learned (benchmarks/recipe_search.md).
TAU3_10 = [4.173, 3.823, 3.68, 3.715, 3.546, 3.576, 3.544, 3.539, 3.509, 3.52, 3.482, 3.484, 3.477, 3.475,
           3.459, 3.458, 3.459, 4.011, 3.708, 3.653]
TAU3_1 = [3.466, 3.463, 3.449, 3.455, 3.487, 3.439, 3.42, 3.429, 3.379, 3.285, 3.296, 3.293, 3.319, 3.354,
          3.357, 3.274, 3.179, 3.349, 3.299, 3.229]


@pytest.mark.parametrize("values, warns_at", [(TAU3_10, 300), (TAU3_1, None)])
def test_demo_runs(values, warns_at):
    watch = LocalChanceWatch(global_batch=32, full_weight=1.0)  # the default patience
    warnings = feed(watch, values, weight=lambda s: min(1.0, s / 100), every=25)
    assert [s for s, _ in warnings] == ([warns_at] if warns_at else [])


# ---- tools/local_diagnostics.py: the instrument behind the collapse diagnosis --------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diag_archive(tmp_path_factory):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.mktemp("diag") / "archive"
    generate_archive(out, studies=16, seed=3, fmt="mimic", size=64, lateral_fraction=1.0,
                     split_fractions=(1.0, 0.0, 0.0), progress=False, workers=1)
    return out


def run_tool(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "tools" / "local_diagnostics.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_diagnostics_tell_a_collapsed_local_head_from_a_live_one(diag_archive, tmp_path):
    import sys

    import torch

    from clinvla_engine.model import create_model, save_checkpoint

    sys.path.insert(0, str(ROOT / "tools"))
    from local_diagnostics import diagnose
    from torch.utils.data import DataLoader

    from clinvla_engine.data import open_dataset
    from clinvla_engine.data.dataset import Collate, StudyDataset

    torch.manual_seed(0)
    live = create_model({"preset": "tiny", "loss": {"tau3": 1.0}}).eval()
    collapsed = create_model({"preset": "tiny", "loss": {"tau3": 1.0}}).eval()
    with torch.no_grad():  # the local head ignores its input: every region of every study is alike
        collapsed.image_local_head.fc2.weight.zero_()
        collapsed.image_local_head.fc2.bias.normal_()
    studies = [s for s in open_dataset(diag_archive) if s.report][:8]
    v = live.config.vision
    ds = StudyDataset(studies, v.image_size, v.pixel_mean, v.pixel_std, train=False, two_views=True, need_reports=True)
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=Collate(live.tokenizer))))
    d_live, d_flat = diagnose(live, batch), diagnose(collapsed, batch)
    assert d_flat["region_variance_across_studies"] < 1e-10 and d_flat["region_variance_within_study"] < 1e-10
    # scores that ignore the image: text to image is exactly chance
    assert d_flat["local"]["cross_entropy_text_to_image"] == pytest.approx(math.log(8), abs=1e-5)
    assert d_live["local"]["cross_entropy_text_to_image"] != pytest.approx(math.log(8), abs=1e-3)
    assert d_flat["local"]["spread_over_studies"] < 1e-5
    assert d_live["region_variance_across_studies"] > 1e-4
    assert d_live["local"]["spread_over_studies"] > 1e-3

    ckpt = save_checkpoint(live, tmp_path / "live")
    r = run_tool(ckpt, "--archive", diag_archive, "--batch", 8)
    assert r.returncode == 0, r.stderr
    assert "chance ln B = 2.079" in r.stdout and "local  scores" in r.stdout and "region variance" in r.stdout
    r = run_tool(ckpt, "--archive", tmp_path / "missing")
    assert r.returncode == 2 and "cannot read the archive" in r.stderr
    r = run_tool(ckpt, "--archive", diag_archive, "--split", "test")
    assert r.returncode == 2 and "choose another --split" in r.stderr
