"""Confidence intervals for evaluation metrics: over the evaluation set, between two models, across seeds.

Every metric these functions take is a mean of per-item values (a query's P@k, a study's 0/1
zero-shot answer, a finding's pointing-game hit), so a resample of the items is a resample of the
metric. Intervals are percentile bootstrap intervals (95% by default, at least MIN_RESAMPLES
resamples, seeded: the same inputs and seed give the same interval).

* ``bootstrap_ci(values)``: the metric over one evaluation set, items resampled with replacement.
* ``paired_bootstrap(a, b)``: the difference between two models scored on the same items; both are
  resampled with the same indices, so what the two share (easy and hard items) cancels out.
* ``seed_bootstrap(per_seed)``: one metric over several training seeds, each scored on the same
  items. Each replicate resamples the seeds, then the items, and takes the mean over the drawn
  seeds of each seed's mean over the drawn items, so the interval holds both sources of variance
  (training noise and the finite evaluation set). The items are drawn once per replicate and shared
  by the drawn seeds: every seed is scored on the same items (items crossed with seeds, not nested
  in them), and drawing them independently per seed would average the set's own variance away.
* ``seed_bootstrap_difference(per_seed_a, per_seed_b)``: the same for a difference of two arms
  (e.g. ClinVLA and the CLIP baseline, each trained with its own seeds): the seeds of each arm are
  resampled independently, the items once per replicate for both.

Bad input is refused with a StatsError (a ValueError) naming what is wrong: NaN or infinite values
(a NaN metric is never a number here), empty sets, fewer than 2 seeds for an across-seed interval,
item sets that differ between the things compared, fewer than MIN_RESAMPLES resamples.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_RESAMPLES = 1000
DEFAULT_RESAMPLES = 2000
# replicates are computed in blocks, so memory stays ~ block x n_items whatever n_resamples is
_BLOCK = 256


class StatsError(ValueError):
    """Input that no interval can honestly be computed from; the message names it and the fix."""


def _values(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise StatsError(f"{what} must be a 1-D sequence of per-item values, got shape {arr.shape}")
    if arr.size == 0:
        raise StatsError(f"{what} is empty: an interval needs at least one evaluated item")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise StatsError(f"{what} has {len(idx)} NaN or infinite value(s) (first at item {idx[0]}); a metric that "
                         "is not a number is an error upstream (check the model and the protocol), not a value")
    return arr


def _check_settings(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < MIN_RESAMPLES:
        raise StatsError(f"n_resamples must be a whole number >= {MIN_RESAMPLES} (a percentile interval from fewer "
                         f"resamples is itself noisy), got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must lie strictly between 0 and 1 (0.95 for a 95% interval), got {confidence!r}")


def _check_ids(ids_a, ids_b, n_a: int, n_b: int, what: str) -> None:
    if ids_a is None and ids_b is None:
        if n_a != n_b:
            raise StatsError(f"{what}: the two sets have {n_a} and {n_b} items; a paired comparison needs the same "
                             "items scored by both (evaluate both on the same set)")
        return
    if ids_a is None or ids_b is None:
        raise StatsError(f"{what}: item ids were given for only one side; pass both or neither")
    ids_a, ids_b = list(ids_a), list(ids_b)
    if len(ids_a) != n_a or len(ids_b) != n_b:
        raise StatsError(f"{what}: {len(ids_a)} and {len(ids_b)} ids for {n_a} and {n_b} values")
    if ids_a != ids_b:
        set_a, set_b = set(ids_a), set(ids_b)
        only_a = [i for i in ids_a if i not in set_b]
        only_b = [i for i in ids_b if i not in set_a]
        detail = (f"{len(only_a)} only in the first (e.g. {only_a[:3]}), {len(only_b)} only in the second "
                  f"(e.g. {only_b[:3]})") if only_a or only_b else "the same items in another order"
        raise StatsError(f"{what}: the item sets differ ({detail}); compare models on the same evaluation set, "
                         "drawn with the same set seed from the same archive")


def _interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(replicates, (tail, 100.0 - tail))
    return float(lo), float(hi)


def _item_means(rng: np.random.Generator, matrix: np.ndarray, n_resamples: int) -> np.ndarray:
    """(n_resamples, S) means over resampled items (shared indices across the S rows) of matrix (S, n)."""
    s, n = matrix.shape
    out = np.empty((n_resamples, s))
    for start in range(0, n_resamples, _BLOCK):
        b = min(_BLOCK, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        out[start:start + b] = matrix[:, idx].mean(axis=2).T
    return out


def bootstrap_ci(values: Sequence[float], n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                 seed: int = 0) -> dict:
    """{"mean", "ci": [lo, hi], "n", "n_resamples", "confidence"}: percentile bootstrap of the mean of
    `values` (one value per evaluated item). A constant set gives the degenerate interval [c, c]."""
    _check_settings(n_resamples, confidence)
    arr = _values(values, "values")
    reps = _item_means(np.random.default_rng(seed), arr[None, :], n_resamples)[:, 0]
    lo, hi = _interval(reps, confidence)
    mean = float(arr.mean())
    return {"mean": mean, "ci": [lo, hi], "n": int(arr.size),
            "n_resamples": int(n_resamples), "confidence": confidence}


def paired_bootstrap(values_a: Sequence[float], values_b: Sequence[float], ids_a: Sequence | None = None,
                     ids_b: Sequence | None = None, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """The difference mean(a) - mean(b) of two models on the same items, with the percentile interval
    from resampling both with the same indices. {"diff", "ci", "mean_a", "mean_b", "p_le_zero", "n", ...}:
    p_le_zero is the share of replicates with a difference <= 0 (a one-sided bootstrap p-value for
    "a beats b"). Identical inputs give exactly 0 with the interval [0, 0]."""
    _check_settings(n_resamples, confidence)
    a, b = _values(values_a, "values_a"), _values(values_b, "values_b")
    _check_ids(ids_a, ids_b, a.size, b.size, "paired_bootstrap")
    reps = _item_means(np.random.default_rng(seed), np.stack([a, b]), n_resamples)
    diffs = reps[:, 0] - reps[:, 1]
    diff = float(a.mean() - b.mean())
    lo, hi = _interval(diffs, confidence)
    return {"diff": diff, "ci": [lo, hi], "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "p_le_zero": float((diffs <= 0).mean()), "n": int(a.size), "n_resamples": int(n_resamples),
            "confidence": confidence}


def _per_seed_matrix(per_seed: Sequence[Sequence[float]], ids: Sequence[Sequence] | None, what: str) -> np.ndarray:
    if per_seed is None or len(per_seed) < 2:
        got = 0 if per_seed is None else len(per_seed)
        raise StatsError(f"{what}: an across-seed interval needs the results of at least 2 training seeds, got {got}; "
                         "train and evaluate more seeds (or report the single seed's bootstrap_ci over the items)")
    rows = [_values(v, f"{what}: seed #{i}") for i, v in enumerate(per_seed)]
    if ids is not None:
        if len(ids) != len(rows):
            raise StatsError(f"{what}: {len(ids)} id lists for {len(rows)} seeds")
        for i in range(1, len(rows)):
            _check_ids(ids[0], ids[i], rows[0].size, rows[i].size, f"{what}: seed #0 vs seed #{i}")
    elif len({r.size for r in rows}) != 1:
        raise StatsError(f"{what}: the seeds were scored on sets of different sizes ({[r.size for r in rows]}); "
                         "every seed must be evaluated on the same items")
    return np.stack(rows)


def seed_bootstrap(per_seed: Sequence[Sequence[float]], ids: Sequence[Sequence] | None = None,
                   n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict:
    """One metric over S >= 2 training seeds, each a list of per-item values on the same items.
    {"mean" (of the per-seed means), "ci", "per_seed", "seed_sd", "n_seeds", "n", ...}; see the module
    docstring for the resampling."""
    _check_settings(n_resamples, confidence)
    m = _per_seed_matrix(per_seed, ids, "seed_bootstrap")
    rng = np.random.default_rng(seed)
    s, n = m.shape
    reps = np.empty(n_resamples)
    for start in range(0, n_resamples, _BLOCK):
        b = min(_BLOCK, n_resamples - start)
        seeds = rng.integers(0, s, size=(b, s))
        items = rng.integers(0, n, size=(b, n))
        for r in range(b):
            reps[start + r] = m[seeds[r]][:, items[r]].mean()
    per = m.mean(axis=1)
    mean = float(per.mean())
    lo, hi = _interval(reps, confidence)
    return {"mean": mean, "ci": [lo, hi], "per_seed": [float(x) for x in per],
            "seed_sd": float(per.std(ddof=1)), "n_seeds": int(s), "n": int(n), "n_resamples": int(n_resamples),
            "confidence": confidence}


def seed_bootstrap_difference(per_seed_a: Sequence[Sequence[float]], per_seed_b: Sequence[Sequence[float]],
                              ids_a: Sequence[Sequence] | None = None, ids_b: Sequence[Sequence] | None = None,
                              n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> dict:
    """mean over a's seeds - mean over b's seeds, each arm with >= 2 seeds, all on the same items.
    Each replicate resamples a's seeds and b's seeds independently (their training runs are
    independent) and the items once for both. {"diff", "ci", "mean_a", "mean_b", "p_le_zero", ...}."""
    _check_settings(n_resamples, confidence)
    a = _per_seed_matrix(per_seed_a, ids_a, "seed_bootstrap_difference (a)")
    b = _per_seed_matrix(per_seed_b, ids_b, "seed_bootstrap_difference (b)")
    _check_ids(None if ids_a is None else ids_a[0], None if ids_b is None else ids_b[0], a.shape[1], b.shape[1],
               "seed_bootstrap_difference")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    diffs = np.empty(n_resamples)
    for start in range(0, n_resamples, _BLOCK):
        blk = min(_BLOCK, n_resamples - start)
        sa = rng.integers(0, a.shape[0], size=(blk, a.shape[0]))
        sb = rng.integers(0, b.shape[0], size=(blk, b.shape[0]))
        items = rng.integers(0, n, size=(blk, n))
        for r in range(blk):
            diffs[start + r] = a[sa[r]][:, items[r]].mean() - b[sb[r]][:, items[r]].mean()
    diff = float(a.mean() - b.mean())
    lo, hi = _interval(diffs, confidence)
    return {"diff": diff, "ci": [lo, hi], "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "per_seed_a": [float(x) for x in a.mean(axis=1)], "per_seed_b": [float(x) for x in b.mean(axis=1)],
            "p_le_zero": float((diffs <= 0).mean()), "n_seeds_a": int(a.shape[0]), "n_seeds_b": int(b.shape[0]),
            "n": int(n), "n_resamples": int(n_resamples), "confidence": confidence}


__all__ = ["DEFAULT_RESAMPLES", "MIN_RESAMPLES", "StatsError", "bootstrap_ci", "paired_bootstrap",
           "seed_bootstrap", "seed_bootstrap_difference"]
