"""Bootstrap intervals: known answers, coverage on simulated data, and refusal of bad input."""
import numpy as np
import pytest

from clinvla_engine.stats import (
    MIN_RESAMPLES,
    StatsError,
    bootstrap_ci,
    paired_bootstrap,
    seed_bootstrap,
    seed_bootstrap_difference,
)


def test_a_constant_has_a_degenerate_interval():
    r = bootstrap_ci([0.3] * 37, n_resamples=1000, seed=4)
    # (to the last bit: a mean of n copies of 0.3 need not be 0.3 exactly in floating point)
    assert r["ci"] == pytest.approx([0.3, 0.3], abs=1e-15) and r["mean"] == pytest.approx(0.3, abs=1e-15)
    assert r["n"] == 37
    s = seed_bootstrap([[0.3] * 20, [0.3] * 20, [0.3] * 20], n_resamples=1000)
    assert s["ci"] == pytest.approx([0.3, 0.3], abs=1e-15) and s["mean"] == pytest.approx(0.3, abs=1e-15)
    assert s["per_seed"] == [s["mean"]] * 3 and s["seed_sd"] == 0.0


def test_the_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(50)
    a, b = bootstrap_ci(values, seed=1), bootstrap_ci(values, seed=1)
    assert a == b
    assert a["ci"][0] < a["mean"] < a["ci"][1]
    assert bootstrap_ci(values, seed=2)["ci"] != a["ci"]
    # the width shrinks like 1/sqrt(n): four times the items, about half the width
    wide = np.diff(bootstrap_ci(values[:25], seed=0)["ci"])[0]
    narrow = np.diff(bootstrap_ci(np.tile(values[:25], 4), seed=0)["ci"])[0]
    assert 0.35 < narrow / wide < 0.65


def test_coverage_is_about_95_percent_on_simulated_data():
    # 400 evaluation sets of 60 per-query precisions (values in [0, 1], skewed): the true mean should
    # fall inside the 95% interval about 95% of the time (the percentile bootstrap runs a little
    # under at small n; 400 draws give a standard error of ~1.1 points)
    rng = np.random.default_rng(123)
    true_mean = 2 / 7  # Beta(2, 5)
    inside = 0
    for i in range(400):
        ci = bootstrap_ci(rng.beta(2, 5, size=60), n_resamples=1000, seed=i)["ci"]
        inside += ci[0] <= true_mean <= ci[1]
    assert 0.90 <= inside / 400 <= 0.98, inside / 400


def test_a_paired_difference_of_identical_models_is_exactly_zero():
    values = np.random.default_rng(1).random(40)
    r = paired_bootstrap(values, values.copy(), ids_a=list(range(40)), ids_b=list(range(40)))
    assert r["diff"] == 0.0 and r["ci"] == [0.0, 0.0] and r["p_le_zero"] == 1.0


def test_pairing_cancels_what_the_models_share():
    # b is a plus a constant 0.1 on every item: paired, the difference is known exactly; unpaired
    # it would be buried in the items' own spread
    a = np.random.default_rng(2).random(80)
    r = paired_bootstrap(a + 0.1, a)
    assert r["diff"] == pytest.approx(0.1) and r["ci"] == pytest.approx([0.1, 0.1])
    assert r["p_le_zero"] == 0.0
    unpaired = np.diff(bootstrap_ci(a)["ci"])[0]
    assert unpaired > 0.05


def test_seed_bootstrap_holds_both_sources_of_variance():
    rng = np.random.default_rng(3)
    items = rng.random(100)
    # five seeds that differ only by a constant offset: no item spread between them, yet the
    # across-seed interval must be wider than the single-set interval of their mean
    offsets = np.array([-0.08, -0.03, 0.0, 0.04, 0.07])
    per_seed = [items + o for o in offsets]
    r = seed_bootstrap(per_seed, n_resamples=2000, seed=0)
    assert r["mean"] == pytest.approx(items.mean() + offsets.mean())
    assert r["per_seed"] == pytest.approx(list(items.mean() + offsets))
    assert r["seed_sd"] == pytest.approx(offsets.std(ddof=1))
    single = bootstrap_ci(items + offsets.mean(), n_resamples=2000, seed=0)
    assert np.diff(r["ci"])[0] > 1.3 * np.diff(single["ci"])[0]
    # seeds that agree exactly leave only the item variance: the same width as one set
    same = seed_bootstrap([items, items, items], n_resamples=4000, seed=0)
    assert np.diff(same["ci"])[0] == pytest.approx(np.diff(bootstrap_ci(items, n_resamples=4000)["ci"])[0], rel=0.15)


def test_seed_bootstrap_difference():
    a = np.random.default_rng(4).random(50)
    # every seed of each arm identical, b = a - 0.2 item by item: the difference is exactly 0.2
    r = seed_bootstrap_difference([a, a, a], [a - 0.2, a - 0.2], n_resamples=1000)
    assert r["diff"] == pytest.approx(0.2) and r["ci"] == pytest.approx([0.2, 0.2]) and r["p_le_zero"] == 0.0
    assert r["n_seeds_a"] == 3 and r["n_seeds_b"] == 2
    # arms that differ only by seed noise: an interval around 0
    noisy = seed_bootstrap_difference([a + 0.02, a - 0.02], [a + 0.01, a - 0.01], n_resamples=1000)
    assert noisy["ci"][0] < 0 < noisy["ci"][1]


def test_bad_input_is_refused():
    with pytest.raises(StatsError, match="NaN or infinite.*item 2"):
        bootstrap_ci([0.1, 0.2, float("nan")])
    with pytest.raises(StatsError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(StatsError, match=f">= {MIN_RESAMPLES}"):
        bootstrap_ci([0.1, 0.2], n_resamples=100)
    with pytest.raises(StatsError, match="confidence"):
        bootstrap_ci([0.1, 0.2], confidence=95)
    with pytest.raises(StatsError, match="at least 2 training seeds, got 1"):
        seed_bootstrap([[0.1, 0.2]])
    with pytest.raises(StatsError, match="at least 2 training seeds"):
        seed_bootstrap_difference([[0.1, 0.2]], [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(StatsError, match="seed #1.*NaN"):
        seed_bootstrap([[0.1, 0.2], [0.1, float("inf")]])
    with pytest.raises(StatsError, match="different sizes"):
        seed_bootstrap([[0.1, 0.2], [0.1, 0.2, 0.3]])
    with pytest.raises(StatsError, match="3 and 2 items"):
        paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(StatsError, match=r"item sets differ \(1 only in the first \(e.g. \['c'\]\)"):
        paired_bootstrap([0.1, 0.2], [0.1, 0.2], ids_a=["a", "c"], ids_b=["a", "b"])
    with pytest.raises(StatsError, match="another order"):
        paired_bootstrap([0.1, 0.2], [0.1, 0.2], ids_a=["a", "b"], ids_b=["b", "a"])
    with pytest.raises(StatsError, match="seed #0 vs seed #1"):
        seed_bootstrap([[0.1, 0.2], [0.1, 0.2]], ids=[["a", "b"], ["a", "x"]])
