"""A supervised per-view probe of a synthetic archive: can a classifier find each finding from the
frontal view alone, the lateral alone, or both?

It checks the test bed before any contrastive training: the lateral-needed findings (truth field
`lateral_needed`) must be detectable from the lateral and not from the frontal, the frontal-favoured
ones (`frontal_favoured`) the other way round. Groups, over the studies that have both views:

* each class: studies with the class against studies without it;
* the strata: studies whose findings are all lateral-needed (or all frontal-favoured) against
  normal studies. Normal studies only, so that a view cannot score by seeing *other* findings.

The probe is a linear read-out of fixed, reader-like features (`view_features`: local contrast on a
2.5 cm grid and fine detail energy, in cm, so 64 and 128 px archives are probed alike), one L2
logistic regression per group and view setting (frontal, lateral, both), cross-fitted over five
folds of patients: every study is scored by a model that never saw its patient. It learns from a
few hundred studies in seconds (a CNN from scratch on the same data learnt nothing: AUROC 0.48).
AUROC with a 95% percentile bootstrap interval (positives and negatives resampled apart); the
interval covers the evaluation set, not refitting. A group with too few positives or negatives
gets no number, only the reason. Reads the mimic and chexpert formats (JPEG). An archive with the
"probe" class mix (generate_archive(mix="probe")) gives every stratum enough studies.

Measured on same-patient, same-pose pairs rendered with and without each lateral-needed placement
(noise-free, 64 px, synth 2.1, 8 patients each): peak change on the frontal 0.048-0.059 of the grey
range (below the 0.08 visibility threshold), on the lateral 0.16 (small retrosternal) to 0.30
(moderate retrocardiac) over 3.5-10 cm^2 changed by more than 0.05; the noise is 0.011-0.013 per
pixel. Across patients and poses, though, the posterior costophrenic region, the domes and the spine
vary about as much as the opacity adds (per-feature d' 0.4-1.1 on the lateral), so the probe needs
data and resolution: lateral-needed from the lateral, probe mix, synth 2.1: 0.60 [0.55, 0.66] on 600
studies at 64 px, 0.69 [0.66, 0.72] on 1,500 at 64 px, 0.78 [0.74, 0.81] on 1,000 at 128 px and
0.80 [0.78, 0.83] on 1,500 at 128 px; from the frontal 0.54-0.56 throughout. The frontal-favoured
stratum is not shown (0.61 frontal vs 0.62 lateral at 1,500 x 128 px): the features cannot see a rib
break (Fracture 0.5 from every view), and apical pneumothoraces are found from both views.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from ..study import CLASSES
from .records import FOV_CM

VIEWS = ("frontal", "lateral", "both")
STRATA = ("lateral_needed", "frontal_favoured")
GROUPS = tuple(CLASSES[1:]) + STRATA
MIN_PER_SIDE = 8  # positives and negatives a group needs for an AUROC
ALL_FEATURES = ("contrast", "texture", "level")
FEATURES = ("contrast", "texture")  # the default: see view_features
L2 = 0.05  # ridge on standardised features (the loss is a weighted mean, so this is per item)
ITERATIONS = 300


class ProbeError(ValueError):
    """The archive cannot be probed (format, missing files, too few studies)."""


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _image_paths(root: Path, fmt: str) -> dict[str, dict[str, Path]]:
    """study_id -> {"frontal": path, "lateral": path} for the JPEG formats."""
    out: dict[str, dict[str, Path]] = {}
    if fmt == "mimic":
        for r in _read_csv(root / "mimic-cxr-2.0.0-metadata.csv"):
            sid = r["subject_id"]
            view = "lateral" if r["ViewPosition"] == "LATERAL" else "frontal"
            path = root / f"files/p{sid[:2]}/p{sid}/s{r['study_id']}/{r['dicom_id']}.jpg"
            out.setdefault(r["study_id"], {})[view] = path
    elif fmt == "chexpert":
        base = root / "CheXpert-v1.0-small"
        for part in ("train", "valid"):
            for r in _read_csv(base / f"{part}.csv"):
                study = "/".join(r["Path"].split("/")[2:4])
                out.setdefault(study, {})["lateral" if r["Frontal/Lateral"] == "Lateral" else "frontal"] = \
                    root / r["Path"]
    else:
        raise ProbeError(f"the probe reads JPEG archives (mimic, chexpert); this archive is {fmt!r}: "
                         "generate one with fmt='mimic'")
    return out


def load_archive(archive: str | Path, size: int) -> dict:
    """Images (N, 2, size, size) float32 of the studies with both views, their truth records and splits."""
    from PIL import Image

    root = Path(archive).expanduser()
    manifest_path = root / "synth_manifest.json"
    if not manifest_path.is_file():
        raise ProbeError(f"{root} has no synth_manifest.json: pass a folder written by "
                         "clinvla_engine.data.synth.generate_archive")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise ProbeError(f"{root}: the synthetic archive is incomplete (its run stopped); generate it again")
    records = [json.loads(line) for line in (root / "synth_truth.jsonl").read_text().splitlines() if line]
    if records and records[0]["findings"] == [] and not any(r["findings"] for r in records):
        raise ProbeError(f"{root}: no study has a finding; nothing to probe")
    sample = next((f for r in records for f in r["findings"]), {})
    if sample and "lateral_needed" not in sample:
        raise ProbeError(f"{root} was written by synth version {manifest.get('version')!r}, whose truth records have "
                         "no lateral_needed field; regenerate the archive with this version of the generator")
    paths = _image_paths(root, manifest["format"])
    images, kept = [], []
    for r in records:
        views = paths.get(r["study_id"], {})
        if not r["has_lateral"] or "frontal" not in views or "lateral" not in views:
            continue
        pair = []
        for view in ("frontal", "lateral"):
            im = Image.open(views[view]).convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR if size > im.size[0] else Image.BOX)
            pair.append(np.asarray(im, dtype=np.float32) / 255.0)
        images.append(np.stack(pair))
        kept.append(r)
    if not kept:
        raise ProbeError(f"{root}: no study has both a frontal and a lateral view")
    return {"images": np.stack(images), "records": kept, "manifest": manifest}


def targets(records: list[dict]) -> np.ndarray:
    """(N, len(GROUPS)) float: 1 positive, 0 negative, NaN not in the group's comparison."""
    y = np.full((len(records), len(GROUPS)), np.nan, dtype=np.float32)
    for n, r in enumerate(records):
        labels = {f["label"] for f in r["findings"]}
        for j, c in enumerate(CLASSES[1:]):
            y[n, j] = float(c in labels)
        for j, stratum in enumerate(STRATA, start=len(CLASSES) - 1):
            if not r["findings"]:
                y[n, j] = 0.0
            elif all(f[stratum] for f in r["findings"]):
                y[n, j] = 1.0
    return y


def _box(x: np.ndarray, width: int) -> np.ndarray:
    """Mean over a width x width box (width odd) around each pixel of images x (N, S, S); edges
    repeat. Summed-area table, numpy only."""
    r = width // 2
    pad = np.pad(x, ((0, 0), (r + 1, r), (r + 1, r)), mode="edge")
    pad[:, 0, :] = 0.0
    pad[:, :, 0] = 0.0
    table = pad.cumsum(axis=1).cumsum(axis=2)
    s = x.shape[1]
    total = (table[:, width:width + s, width:width + s] - table[:, :s, width:width + s]
             - table[:, width:width + s, :s] + table[:, :s, :s])
    return total / (width * width)


def _pool(x: np.ndarray, grid: int) -> np.ndarray:
    """Block means of images x (N, S, S) on a grid x grid lattice: (N, grid * grid)."""
    n, s = x.shape[0], x.shape[-1]
    return x.reshape(n, grid, s // grid, grid, s // grid).mean(axis=(2, 4)).reshape(n, -1)


def view_features(images: np.ndarray, kinds: tuple[str, ...] = FEATURES) -> np.ndarray:
    """Features of one view, images (N, S, S) in [0, 1] with S a multiple of 16: (N, D) float64.

    Each image is standardised (mean 0, sd 1: exposure and window vary between studies), then:
    "contrast": local contrast (the image minus its mean over a box of about 4.4 cm) averaged over a
    16 x 16 grid of 2.5 cm cells, signed (an opacity that stands out of its surroundings is positive);
    "texture": fine detail energy (|image - its mean over about 1.2 cm|) over an 8 x 8 grid (edges,
    rib breaks, vessel markings, or their absence beyond a pleural line);
    "level": plain block means over an 8 x 8 grid (broad density, whatever its cause).
    The scales are fixed in cm (the field of view is FOV_CM at every size), so 64 and 128 px archives
    are probed alike; the default leaves out "level", as a reader does not call a broad shift of
    density over a dense shadow a finding (the visibility rule measures local change too).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[1] % 16 or x.shape[1] < 32:
        raise ProbeError(f"view images must be (N, S, S) with S a multiple of 16 and >= 32, got {x.shape}")
    unknown = [k for k in kinds if k not in ALL_FEATURES]
    if unknown or not kinds:
        raise ProbeError(f"feature kinds {list(kinds)}: use some of {ALL_FEATURES}")
    size = x.shape[1]
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-3)
    wide = 2 * round(2.2 / (FOV_CM / size)) + 1  # odd box widths: about 4.4 cm and 1.2 cm
    narrow = 2 * round(0.6 / (FOV_CM / size)) + 1
    out = []
    if "contrast" in kinds:
        out.append(_pool(x - _box(x, wide), 16))
    if "texture" in kinds:
        out.append(_pool(np.abs(x - _box(x, narrow)), 8))
    if "level" in kinds:
        out.append(_pool(x, 8))
    return np.concatenate(out, axis=1)


def fit_logistic(features: np.ndarray, y: np.ndarray, *, l2: float = L2, iterations: int = ITERATIONS) -> tuple:
    """L2-regularised logistic regression, one per column of y (N, G) (1, 0, NaN = not in this
    group's comparison), each group's positives and negatives weighted to equal shares. Features
    (N, D) are standardised with the training mean and sd. Full-batch gradient descent with Nesterov
    momentum and step 1/L (L bounds the loss's curvature): deterministic, well under a second for
    a thousand studies.
    Returns (mean, sd, weights (D, G), bias (G,))."""
    f = np.asarray(features, dtype=np.float64)
    mean, sd = f.mean(axis=0), f.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    z = ((f - mean) / sd).astype(np.float32)  # float32 halves the cost; the fit needs no more
    known = ~np.isnan(y)
    t = np.nan_to_num(y)
    pos = (t * known).sum(axis=0)
    neg = known.sum(axis=0) - pos
    # each group's positives and negatives carry half its weight; a group without both learns nothing
    w_item = np.where(t == 1, 0.5 / np.maximum(pos, 1), 0.5 / np.maximum(neg, 1)) * known
    w_item[:, (pos == 0) | (neg == 0)] = 0.0
    d = z.shape[1]
    # the weighted loss's curvature: X' diag(w p (1 - p)) X <= 0.25 max(w) ||X||^2
    lipschitz = 0.25 * float(w_item.max()) * np.linalg.norm(z, 2) ** 2 + l2
    step = 1.0 / lipschitz
    weights = np.zeros((d, y.shape[1]))
    bias = np.zeros(y.shape[1])
    vw, vb = weights.copy(), bias.copy()
    for k in range(iterations):
        mom = k / (k + 3)
        lw, lb = weights + mom * (weights - vw), bias + mom * (bias - vb)
        vw, vb = weights, bias
        p = 1.0 / (1.0 + np.exp(-(z @ lw + lb)))
        g = (p - t) * w_item
        weights = lw - step * (z.T @ g + l2 * lw)
        bias = lb - step * g.sum(axis=0)
    return mean, sd, weights, bias


def score_logistic(model: tuple, features: np.ndarray) -> np.ndarray:
    mean, sd, weights, bias = model
    out = ((np.asarray(features, dtype=np.float64) - mean) / sd) @ weights + bias
    if not np.isfinite(out).all():
        raise ProbeError("the probe's scores are not finite; the fit diverged (check the features)")
    return out


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's usual companions
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def patient_folds(subjects: list[str], folds: int, seed: int) -> np.ndarray:
    """A fold number per study; all studies of a patient share one (no patient on both sides)."""
    unique = sorted(set(subjects))
    draw = np.random.default_rng([seed, 7]).permutation(len(unique)) % folds
    fold_of = dict(zip(unique, draw))
    return np.array([fold_of[s] for s in subjects])


def cross_fit(features: np.ndarray, y: np.ndarray, fold: np.ndarray, *, shuffle_labels: bool = False,
              seed: int = 0, **fit_args) -> np.ndarray:
    """Scores (N, G) of every study by a model fitted on the other folds (cross-fitting).
    shuffle_labels permutes each training set's rows of y (a control: AUROCs fall to chance)."""
    scores = np.full(y.shape, np.nan)
    rng = np.random.default_rng([seed, 8])
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        y_train = y[train]
        if shuffle_labels:
            y_train = y_train[rng.permutation(len(y_train))]
        scores[test] = score_logistic(fit_logistic(features[train], y_train, **fit_args), features[test])
    return scores


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve: the share of (positive, negative) pairs the scores order right, ties
    counting half. y holds 1 and 0 only, with both present."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg) or len(pos) + len(neg) != len(y):
        raise ProbeError(f"auroc needs labels of 1 and 0 only, both present; got {len(pos)} ones, {len(neg)} zeros "
                         f"of {len(y)}")
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def auroc_ci(y: np.ndarray, s: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """AUROC and its 95% percentile bootstrap interval, positives and negatives resampled apart
    (stratified). AUROC is not a mean of per-item values, so clinvla_engine.stats (which bootstraps
    means) does not apply; the replicates come from the P x N win matrix: a replicate's AUROC is
    counts_pos' W counts_neg / (P N) for multinomial resample counts."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < MIN_PER_SIDE:
        return {"n_pos": n_pos, "n_neg": n_neg, "auroc": None, "ci95": None,
                "reason": f"fewer than {MIN_PER_SIDE} positives or negatives; use a larger archive (or --mix probe)"}
    if not np.isfinite(s).all():
        raise ProbeError("scores are not finite; an AUROC of them would not be a number")
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    rng = np.random.default_rng(seed)
    cp = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=resamples)
    cn = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=resamples)
    boot = np.einsum("bp,pn,bn->b", cp, wins, cn) / (n_pos * n_neg)
    lo, hi = np.percentile(boot, (2.5, 97.5))
    return {"n_pos": n_pos, "n_neg": n_neg, "auroc": round(float(wins.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def prepare(archive: str | Path, size: int | None = None, *, features: tuple[str, ...] = FEATURES,
            folds: int = 5, seed: int = 0) -> dict:
    """Read the archive once: per-view features, targets, patient folds (run_probe's input).
    size: pixels a side the probe reads the images at (default: the archive's)."""
    root = Path(archive).expanduser()
    if size is None:
        manifest = root / "synth_manifest.json"
        size = int(json.loads(manifest.read_text()).get("size", 64)) if manifest.is_file() else 64
    if size < 32 or size % 16:
        raise ProbeError(f"size={size}: the probe reads images at a multiple of 16 pixels >= 32 (e.g. 64 or 128)")
    data = load_archive(root, size)
    records = data["records"]
    if len(records) < folds * 10:
        raise ProbeError(f"{archive}: {len(records)} studies with both views; the probe needs at least {folds * 10}: "
                         "generate a larger archive")
    return {"archive": str(archive), "manifest": data["manifest"], "size": size, "features": tuple(features),
            "folds": folds, "seed": seed, "studies": len(records), "y": targets(records),
            "fold": patient_folds([r["subject_id"] for r in records], folds, seed),
            "x": [view_features(data["images"][:, v], features) for v in range(2)]}


def run_probe(archive: str | Path | dict, size: int | None = None, *, features: tuple[str, ...] = FEATURES,
              folds: int = 5, seed: int = 0, shuffle_labels: bool = False, l2: float = L2,
              views: tuple[str, ...] = VIEWS, progress: bool = False) -> dict:
    """Cross-fitted probe per view setting over the studies with both views: AUROC per group.

    archive: a folder, or what `prepare` returned for it (then size, features and folds are its).
    shuffle_labels permutes the training targets (a control: every AUROC should fall to chance).
    views: the view settings to probe (default all of VIEWS)."""
    t0 = time.perf_counter()
    if not views or any(v not in VIEWS for v in views):
        raise ProbeError(f"views={views!r}: use some of {VIEWS}")
    data = archive if isinstance(archive, dict) else prepare(archive, size, features=features, folds=folds,
                                                                seed=seed)
    y, fold, per_view = data["y"], data["fold"], data["x"]
    results: dict = {}
    for view in views:
        x = np.concatenate(per_view, axis=1) if view == "both" else per_view[VIEWS.index(view)]
        with _one_blas_thread():  # small matrices: threads only contend (10x slower on a busy 2-core box)
            scores = cross_fit(x, y, fold, shuffle_labels=shuffle_labels, seed=seed, l2=l2)
        results[view] = {}
        for j, group in enumerate(GROUPS):
            known = ~np.isnan(y[:, j])
            results[view][group] = auroc_ci(y[known, j], scores[known, j], seed=seed)
        if progress:
            print(f"probe {view}: " + ", ".join(f"{g} {results[view][g]['auroc']}" for g in GROUPS), flush=True)
    counts = {g: {"pos": int(np.nansum(y[:, j])), "neg": int((y[:, j] == 0).sum())} for j, g in enumerate(GROUPS)}
    manifest = data["manifest"]
    return {"archive": data["archive"], "synth_version": manifest.get("version"),
            "mix": manifest.get("mix", "archive"), "archive_size": manifest.get("size"),
            "size": data["size"], "features": list(data["features"]), "l2": l2, "folds": data["folds"],
            "studies_with_both_views": data["studies"], "seed": seed, "shuffle_labels": shuffle_labels,
            "counts": counts, "auroc": results, "seconds": round(time.perf_counter() - t0, 1)}
