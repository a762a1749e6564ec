"""Synthetic multi-view chest X-ray archives: a test bed for mechanisms, not clinical evidence.

The generator writes archives in the on-disk formats of FORMATS.md (mimic, dicom, chexpert, rsna)
so that the loaders, the training loop, the index and the retrieval protocols can be exercised end
to end without patient data. Nothing learnt or measured on it says anything about real radiographs:
the anatomy is a handful of ellipsoids and tubes, the findings are drawn from templates, and a
model that does well here has only shown that the machinery works.

Design
------
*Anatomy in 3-D, one per patient.* Patient coordinates in cm: x towards the patient's left,
y caudal, z anterior. The body is a tall ellipsoid of soft tissue with shoulders (and, for some
female patients, soft breast shadows); inside it two lungs (parenchyma replaces tissue), a rotated
heart (anterior, left of midline), a mediastinum and aortic knob, two diaphragm domes (the right
one higher; the lung reaches lowest behind them, in the posterior costophrenic sulcus), the
trachea and main bronchi, a vertebral column (bodies and posterior elements), a sternum, and a
four-generation tree of pulmonary vessels from each hilum. Ribs run from the spine round the
chest wall to the front, dropping as they go; clavicles run from the sternum to the shoulders.
Arms hang at the sides on the frontal view and are raised over the upper chest on the lateral.

*Projection.* Each view is a line integral of attenuation through the same scene: frontal (PA/AP)
rays run along z, lateral (left lateral, anterior to the viewer's left) rays along x. An
ellipsoid (p - c)' A (p - c) <= 1 cuts each ray in an interval found in closed form (a quadratic
per pixel, evaluated only inside the ellipsoid's projected bounding box). Every solid object is a
term `density * |I1 & I2 & ... - (E1 | E2 | ...)|`: the length of the intersection of some
ellipsoids minus a union of others, exact per ray by inclusion-exclusion over interval
intersections (e.g. aerated lung = lung - heart - dome - mediastinum). Ribs, clavicles and vessels
are dense 3-D point chains splatted onto the view (vessels clipped in 3-D to the lung) and given
their cross-section by a kernel (ribs: cortex brighter than marrow). Patient rotation, in-plane
tilt, magnification and shift are rigid transforms of the scene per view, so both views stay
consistent; an AP view also gets a shallower inspiration and more rotation.

*Image formation.* The projected attenuation is blurred, its large-scale range compressed and its
detail boosted (the usual radiograph processing, one FFT transfer function), windowed from the
finding-free image's histogram with exposure jitter, passed through a soft S-curve with a random
gamma, and given signal-dependent, slightly correlated noise. Output: floats in [0, 1], written as
8-bit JPEG (mimic, chexpert), 12-bit values in 16-bit DICOM with WindowCenter/WindowWidth (dicom)
or 8-bit DICOM (rsna). At 128 px a two-view study renders in about 15-20 ms on one core, at 256 px
in about 40 ms.

*Findings are 3-D objects drawn into the same scene*, so both views show them:
consolidation = a dense lobulated ellipsoid (with air bronchograms) clipped to the lung;
pneumonia = a patchy cluster of overlapping blobs; atelectasis = a plate-like disc at a base (or
mid zone), with a raised hemidiaphragm when moderate or severe; cardiomegaly = the heart scaled
about its right upper base (wider on the frontal, deeper on the lateral); edema = bilateral
perihilar haze plus interstitial (Kerley B) septal plates; pleural effusion = fluid filling the
pleural space below a meniscus that climbs the lateral wall, from the lowest point of the space
upwards; a small effusion only fills the posterior gutter (wide, thin, shallow), so it shows on
the lateral view and barely on the frontal; pneumothorax = the lung shrunk towards its base and
hilum, leaving an apical/lateral rim of air without vessels and a thin visceral pleural line;
fracture = a cleft and a step in one rib's posterior arc.

*Visibility per view* is measured, not assumed: each finding's own contribution is rendered as a
separate layer, and a finding is visible in a view when removing it changes at least 0.4 cm^2 of
the displayed image by more than 8% of the grey range (a rib break, a small sharp edge: 0.12 cm^2
by 3.5%); the frontal bounding box (pixels of the written image) covers where it changes the
image by more than a quarter of its peak change. One rule overrides the measurement: a rib
fracture is never marked visible on the lateral view, where the ribs of both sides overlap (the
measurement cannot see clutter). In an archive, a finding that no view of its study shows is
redrawn one grade more severe (at most twice), since its report describes it.

*Reports* come from `reports.write_report` (FINDINGS/IMPRESSION with varied wording, negations,
hedges) and the label files follow the report, not the truth: a hedged finding is -1.0.
`synth_truth.jsonl` keeps what was drawn (label, side, zone, severity, visibility, frontal box;
plus, beyond FORMATS.md, `bboxes_frontal` per side, `rib`, and the study's `view_position`).

Class mix (`CLASS_MIX`): 20% No Finding, 55% exactly one of the eight findings (evenly spread),
25% two findings from plausible pairs; assigned by stratified counts, so an archive of n studies
has round(0.55 n / 8) single-finding studies per class (minus the ~10% whose report hedges).
Patients have 1-4 studies (one each in rsna); splits are drawn by patient.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import reports
from .study import CHEXPERT_COLUMNS, CLASSES

SYNTH_VERSION = "1.0"
FORMATS = ("mimic", "dicom", "chexpert", "rsna")
FOV_CM = 40.0  # side of the square field of view, both views

# Linear attenuation, relative units per cm. Only differences matter: lung replaces tissue by
# parenchyma, bone adds to the tissue it replaces.
MU_TISSUE = 1.0
MU_PARENCHYMA = 0.22
MU_BONE = 1.5
AIRLESS = MU_TISSUE - MU_PARENCHYMA  # what filling aerated lung with fluid or tissue adds

CLASS_MIX = {"none": 0.20, "single": 0.55, "pair": 0.25}
# Two-finding studies: pairs that occur together in practice.
PAIRS = (
    ("Cardiomegaly", "Edema"), ("Cardiomegaly", "Pleural Effusion"), ("Edema", "Pleural Effusion"),
    ("Pneumonia", "Pleural Effusion"), ("Atelectasis", "Pleural Effusion"), ("Consolidation", "Pleural Effusion"),
    ("Pneumothorax", "Fracture"), ("Atelectasis", "Cardiomegaly"), ("Pneumonia", "Atelectasis"),
    ("Consolidation", "Atelectasis"), ("Cardiomegaly", "Pneumonia"), ("Edema", "Atelectasis"),
)
FINDING_LABELS = CLASSES[1:]
_SIZE_SEVERITY = ("small", "moderate", "large")
_GRADE_SEVERITY = ("mild", "moderate", "severe")
# graded small|moderate|large; the other findings mild|moderate|severe
_SIZED = ("Consolidation", "Pleural Effusion", "Pneumothorax")
_SIDE_SIGN = {"right": -1, "left": 1}

# A finding is visible in a view when removing it changes at least AREA cm^2 of the displayed image
# by more than DELTA (a fraction of the grey range): enough to stand out of rib and vessel clutter.
# A break in a rib is a small sharp edge, which the eye catches at a lower contrast than a haze.
VISIBILITY = {"default": (0.08, 0.4), "Fracture": (0.035, 0.12)}  # label -> (DELTA, AREA cm^2)


# =================================================================================================
# Records
# =================================================================================================
@dataclass(frozen=True)
class Finding:
    """One drawn finding. visible_* and bbox_* are filled in by `render_study`."""

    label: str  # one of CLASSES[1:]
    side: str | None = None  # "left" | "right" | "bilateral" | None (cardiomegaly)
    zone: str | None = None  # "upper" | "middle" | "lower" | None
    severity: str = "moderate"  # small|moderate|large (effusion, pneumothorax, consolidation) or mild|moderate|severe
    rib: int | None = None  # the broken rib (4-9) of a fracture
    detail: int = 0  # seeds the finding's exact geometry
    visible_frontal: bool | None = None
    visible_lateral: bool | None = None
    bbox_frontal: tuple[int, int, int, int] | None = None  # x, y, w, h in pixels of the frontal image
    bboxes_frontal: tuple[tuple[int, int, int, int], ...] = ()  # one per side for bilateral findings

    def truth(self) -> dict:
        return {"label": self.label, "side": self.side, "zone": self.zone, "severity": self.severity,
                "visible_frontal": bool(self.visible_frontal), "visible_lateral": bool(self.visible_lateral),
                "bbox_frontal": list(self.bbox_frontal) if self.bbox_frontal else None,
                "bboxes_frontal": [list(b) for b in self.bboxes_frontal], "rib": self.rib}


@dataclass(frozen=True)
class Anatomy:
    """One patient's body; every study of the patient is rendered from it."""

    sex: str = "Male"  # "Male" | "Female"
    age: int = 60
    seed: int = 0  # vessel tree and small shape jitter
    width: float = 1.0  # thorax width factor
    depth: float = 1.0  # thorax depth factor
    height: float = 1.0  # lung height factor
    heart: float = 1.0  # heart size factor (a normal heart: 0.92-1.06)
    heart_x: float = 1.8  # heart centre, cm left of the midline
    dome_right: float = 7.5  # top of the right hemidiaphragm, cm below the origin (inspiration adds)
    dome_step: float = 1.5  # the left dome lies this much lower
    rib_spacing: float = 2.3  # cm between posterior ribs
    breast: float = 0.0  # breast size factor (0 = none)


@dataclass
class RenderedStudy:
    frontal: np.ndarray  # (size, size) float32 in [0, 1], bright = dense
    lateral: np.ndarray | None  # (size, size) float32 or None
    findings: list[Finding]  # with visible_frontal / visible_lateral / bbox_frontal filled in
    view_position: str  # "PA" | "AP"


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult patient."""
    female = rng.random() < 0.45
    return Anatomy(
        sex="Female" if female else "Male",
        age=int(rng.integers(18, 91)),
        seed=int(rng.integers(2**31)),
        width=float(rng.normal(0.94 if female else 1.0, 0.04)),
        depth=float(rng.normal(0.95 if female else 1.0, 0.05)),
        height=float(rng.normal(0.96 if female else 1.0, 0.04)),
        heart=float(rng.uniform(0.92, 1.05)),
        heart_x=float(rng.normal(1.8, 0.4)),
        dome_right=float(rng.normal(7.5, 0.6)),
        dome_step=float(rng.uniform(1.0, 2.2)),
        rib_spacing=float(rng.normal(2.3, 0.1)),
        breast=float(rng.uniform(0.6, 1.2)) if female and rng.random() < 0.8 else 0.0,
    )


def sample_findings(rng: np.random.Generator, labels: Sequence[str] | None = None, *,
                    lateral: bool = True) -> list[Finding]:
    """Findings for one study.

    labels: the classes to draw ("No Finding" or an empty list gives no findings); None draws them
    from `CLASS_MIX`. Side, zone, severity and geometry are random. Without a lateral view a small
    pleural effusion (visible only there) is drawn as moderate, so that the report can mention it.
    """
    if labels is None:
        u = rng.random()
        if u < CLASS_MIX["none"]:
            labels = []
        elif u < CLASS_MIX["none"] + CLASS_MIX["single"]:
            labels = [FINDING_LABELS[int(rng.integers(len(FINDING_LABELS)))]]
        else:
            labels = list(PAIRS[int(rng.integers(len(PAIRS)))])
    unknown = [lb for lb in labels if lb not in CLASSES]
    if unknown:
        raise ValueError(f"labels {unknown} are not classes; use names from {CLASSES}")
    out = []
    for label in sorted({lb for lb in labels if lb != "No Finding"}, key=CLASSES.index):
        side = "left" if rng.random() < 0.5 else "right"
        zone = ("upper", "middle", "lower")[int(rng.choice(3, p=(0.25, 0.3, 0.45)))]
        rib = None
        if label == "Cardiomegaly":
            side, zone, severity = None, None, rng.choice(_GRADE_SEVERITY, p=(0.4, 0.4, 0.2))
        elif label == "Edema":
            side, zone, severity = "bilateral", None, rng.choice(_GRADE_SEVERITY, p=(0.4, 0.4, 0.2))
        elif label == "Pleural Effusion":
            side = "bilateral" if rng.random() < 0.2 else side
            zone, severity = "lower", rng.choice(_SIZE_SEVERITY, p=(0.45, 0.35, 0.2))
            if severity == "small" and not lateral:
                severity = "moderate"
        elif label == "Atelectasis":
            side = "bilateral" if rng.random() < 0.25 else side
            zone = "lower" if side == "bilateral" or rng.random() < 0.8 else "middle"
            severity = rng.choice(_GRADE_SEVERITY, p=(0.45, 0.4, 0.15))
        elif label == "Consolidation":
            severity = rng.choice(_SIZE_SEVERITY, p=(0.3, 0.45, 0.25))
        elif label == "Pneumonia":
            side = "bilateral" if rng.random() < 0.15 else side
            severity = rng.choice(_GRADE_SEVERITY, p=(0.3, 0.45, 0.25))
        elif label == "Pneumothorax":
            zone, severity = "upper", rng.choice(_SIZE_SEVERITY, p=(0.5, 0.3, 0.2))
        else:  # Fracture
            rib = int(rng.integers(4, 10))
            zone = "upper" if rib <= 4 else "middle" if rib <= 7 else "lower"
            severity = rng.choice(_GRADE_SEVERITY, p=(0.35, 0.4, 0.25))
        out.append(Finding(label, side, zone, str(severity), rib, int(rng.integers(2**31))))
    return out


# =================================================================================================
# Scene: ellipsoids, terms over them, and splatted tubes
# =================================================================================================
def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation Rz(az) @ Ry(ay) @ Rx(ax), radians."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _frame(direction: np.ndarray) -> np.ndarray:
    """A rotation whose second column (local y) is `direction`."""
    dx, dy, dz = (float(v) for v in direction)
    n = math.sqrt(dx * dx + dy * dy + dz * dz)
    dx, dy, dz = dx / n, dy / n, dz / n
    # e1 = helper x d, with helper = x-axis unless d is close to it (then z-axis)
    ex, ey, ez = (0.0, -dz, dy) if abs(dx) < 0.9 else (-dy, dx, 0.0)
    m = math.sqrt(ex * ex + ey * ey + ez * ez)
    ex, ey, ez = ex / m, ey / m, ez / m
    return np.array([[ex, dx, ey * dz - ez * dy], [ey, dy, ez * dx - ex * dz], [ez, dz, ex * dy - ey * dx]])


@dataclass
class _Term:
    density: float
    include: tuple[int, ...]  # ellipsoids intersected
    exclude: tuple[int, ...] = ()  # ellipsoids removed
    group: tuple[int, int] | None = None  # (finding index, part) whose layer this is
    view: str | None = None  # drawn on this view only ("frontal" | "lateral"), or on both


class _Scene:
    """Ellipsoids (centre, covariance-like shape matrix S = R diag(semi^2) R'), terms, tubes."""

    def __init__(self, pix: float):
        self.pix = pix  # cm per pixel: thin structures are widened to stay visible at small sizes
        self.centers: list[np.ndarray] = []
        self.shapes: list[np.ndarray] = []
        self.terms: list[_Term] = []
        # (points (M, 3), mass per point (M,), drawn in the image?, finding layer or None, kernel name)
        self.curves: list[tuple[np.ndarray, np.ndarray, bool, tuple[int, int] | None, str]] = []

    def ell(self, center, semi, rot: np.ndarray | None = None) -> int:
        sq = np.square(np.asarray(semi, dtype=np.float64))
        self.centers.append(np.asarray(center, dtype=np.float64))
        self.shapes.append(np.diag(sq) if rot is None else (rot * sq) @ rot.T)
        return len(self.centers) - 1

    def scaled(self, k: int, anchor, factor: float) -> int:
        anchor = np.asarray(anchor, dtype=np.float64)
        self.centers.append(anchor + factor * (self.centers[k] - anchor))
        self.shapes.append(self.shapes[k] * factor**2)
        return len(self.centers) - 1

    def shifted(self, k: int, offset) -> int:
        self.centers.append(self.centers[k] + np.asarray(offset, dtype=np.float64))
        self.shapes.append(self.shapes[k].copy())
        return len(self.centers) - 1

    def add(self, density: float, include, exclude=(), group=None, view: str | None = None) -> None:
        self.terms.append(_Term(density, tuple(include), tuple(exclude), group, view))

    def thin(self, radius: float, density: float) -> tuple[float, float]:
        """Widen a thin plate or line to >= 0.45 px (so that pixel centres do not miss it), keeping
        density x thickness: (radius, density) to draw it with."""
        wide = max(radius, 0.45 * self.pix)
        return wide, density * radius / wide

    def inside(self, k: int, points: np.ndarray) -> np.ndarray:
        """Which of points (N, 3) lie inside ellipsoid k."""
        q = points - self.centers[k]
        return ((q @ np.linalg.inv(self.shapes[k])) * q).sum(axis=1) <= 1.0

    def points(self, points: np.ndarray, mass: np.ndarray, kernel: str, inside: Sequence[int] = (),
               outside: Sequence[int] = ()) -> None:
        """Point masses along tubes (from `_segments_to_points`), kept only inside every `inside`
        and no `outside` ellipsoid; splatted at render time with the kernel's cross-section."""
        keep = np.ones(len(points), dtype=bool)
        for k in inside:
            keep &= self.inside(k, points)
        for k in outside:
            keep &= ~self.inside(k, points)
        self.curves.append((points[keep], mass[keep], True, None, kernel))


def _segments_to_points(starts: np.ndarray, ends: np.ndarray, mass_per_cm: np.ndarray, step: float):
    """Straight tubes (starts (S, 3) -> ends (S, 3), mass per cm (S,)) as points about `step` cm
    apart, each carrying its share of the mass: (points (M, 3), mass (M,))."""
    length = np.linalg.norm(ends - starts, axis=1)
    counts = np.maximum(1, np.ceil(length / step).astype(int))
    seg = np.repeat(np.arange(len(starts)), counts)
    frac = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + 0.5) / counts[seg]
    return starts[seg] + frac[:, None] * (ends - starts)[seg], (mass_per_cm * length / counts)[seg]


# =================================================================================================
# Anatomy and findings as scene objects
# =================================================================================================
def _lung_geometry(a: Anatomy, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and semi-axes of the lung on side s (-1 right, +1 left)."""
    center = np.array((s * 7.3 * a.width + (0.3 if s > 0 else 0.0), 2.5 * a.height, -1.8 * a.depth))
    return center, np.array((6.0 * a.width, 17.5 * a.height, 8.2 * a.depth))


def _build_anatomy(sc: _Scene, a: Anatomy, inspiration: float) -> dict:
    g: dict = {"lung": {}, "dome": {}, "lung_semi": {}, "lung_center": {}, "dome_top": {}}
    W, D, H = a.width, a.depth, a.height
    body = sc.ell((0.0, 12.0, -0.3), (15.5 * W, 60.0, 10.5 * D))
    sc.add(MU_TISSUE, [body])
    g["body"] = body
    shoulders = []
    for s in (-1, 1):
        sh = sc.ell((s * 14.0 * W, -16.5, -1.0), (6.8 * W, 6.0, 6.8 * D))
        sc.add(MU_TISSUE, [sh], [body], view="frontal")
        shoulders.append(sh)
        raised = sc.ell((s * 7.0 * W, -17.0, 3.0 * D), (4.0, 7.0, 4.2), _rot(ax=0.5))  # arms up, lateral view
        sc.add(MU_TISSUE * 0.8, [raised], [body], view="lateral")
        if a.breast > 0:  # two nested shells: a soft-edged shadow over the lower zones
            for scale in (1.0, 0.75):
                br = sc.ell((s * 8.8 * W, 8.5, 9.0 * D), np.array((5.0, 4.5, 3.4)) * a.breast * scale)
                sc.add(MU_TISSUE * 0.4, [br], [body])
        arm = sc.ell((s * 19.0 * W, -6.0, -1.0), (4.0, 15.0, 4.5))  # frontal only: raised on the lateral
        sc.add(MU_TISSUE, [arm], [body, *shoulders], view="frontal")
        head = sc.ell((s * 17.3 * W, -14.8, -1.2), (2.6, 2.8, 2.6))
        shaft = sc.ell((s * 18.8 * W, -3.5, -1.2), (1.3, 9.5, 1.3))
        sc.add(MU_BONE * 0.7, [head], view="frontal")
        sc.add(MU_BONE * 0.7, [shaft], view="frontal")

    heart_rot = _rot(ay=0.15, az=0.52)
    heart_semi = np.array((6.7, 4.9, 5.8)) * a.heart
    heart = sc.ell((a.heart_x, 6.3 * H, 1.8 * D), heart_semi, heart_rot)
    medi = sc.ell((0.3, -5.5, -0.8), (3.0 * W, 12.0, 6.0 * D))
    aorta = sc.ell((2.6, -6.2 * H, -1.8), (1.9, 1.9, 2.4))
    g.update(heart=heart, heart_rot=heart_rot, heart_semi=heart_semi, medi=medi, aorta=aorta)
    for s in (-1, 1):
        top = (a.dome_right + (a.dome_step if s > 0 else 0.0)) * H + inspiration
        g["dome"][s] = sc.ell((s * 7.0 * W, top + 12.0, 2.0 * D), (8.5 * W, 12.0, 11.5 * D))
        g["dome_top"][s] = top
        center, semi = _lung_geometry(a, s)
        g["lung"][s] = sc.ell(center, semi)
        g["lung_center"][s], g["lung_semi"][s] = center, semi
        # aerated lung: parenchyma replaces tissue inside the lung, outside heart, dome and mediastinum
        sc.add(-AIRLESS, [g["lung"][s]], [heart, g["dome"][s], medi] + ([aorta] if s > 0 else []))
    # Trachea and main bronchi: air columns in the mediastinum.
    sc.add(-MU_TISSUE, [sc.ell((0.4, -12.5, 0.0), (0.85, 9.5, 0.85), _rot(ax=0.12))])
    carina = np.array((0.4, -3.2 * H, -1.0))
    for s in (-1, 1):
        end = np.array((s * 4.2, 0.2 * H + (0.8 if s < 0 else 0.0), -1.6))
        d = end - carina
        bronchus = sc.ell(carina + d / 2, (0.55, np.linalg.norm(d) / 2, 0.55), _frame(d))
        sc.add(-MU_TISSUE, [bronchus], [g["lung"][s]])
    # Spine and sternum.
    for k in range(15):
        y = -18.0 + k * 2.75 * H
        sc.add(MU_BONE * 0.28, [sc.ell((0.0, y, -6.2 * D), (2.1, 1.25 * H, 1.8))])
        sc.add(MU_BONE * 0.3, [sc.ell((0.0, y + 0.5, -8.8 * D), (2.6, 0.8, 0.95))])
    sc.add(MU_BONE * 0.8, [sc.ell((0.0, -9.8 * H, 9.2 * D), (2.2, 2.4, 0.7))])
    sc.add(MU_BONE * 0.8, [sc.ell((0.0, -1.8 * H, 9.8 * D), (1.4, 5.6 * H, 0.6), _rot(ax=-0.1))])
    _add_ribs(sc, a, g)
    return g


_RIB_RADIUS = 0.55  # cm, outer radius of the rib cross-section
_RIB_MASS = MU_BONE * math.pi * _RIB_RADIUS**2 * 0.4  # per cm: a cortical shell around marrow


def _rib_points(a: Anatomy, g: dict, step: float) -> dict:
    """Every rib as dense 3-D points along its path and the bone mass each carries.

    Rib k on side s runs from the spine round the chest wall to the front (angle phi from the
    back), dropping as it goes; the anterior end is thinner. Points are dense in phi (about
    `step` cm apart); each carries mass per cm times its own arc length, so the splat is exact
    for the uneven spacing. Returns {(s, k): (points (M, 3), mass (M,), arc (M,) cm)}.
    """
    H, spacing = a.height, a.rib_spacing * a.height
    ks = np.arange(1, 12)
    end = np.where(ks >= 11, 1.45, np.where(ks == 1, 2.0, 2.35))
    m = int(math.ceil(42.0 / step))
    frac = np.linspace(0.0, 1.0, m)
    phi = 0.12 + frac[None, :] * (end[:, None] - 0.12)  # (11, M)
    out = {}
    for s in (-1, 1):
        cy, b = g["lung_center"][s][1], g["lung_semi"][s][1]
        y0 = cy - b + 1.3 + (ks - 1) * spacing
        level = np.minimum(y0 + 3.0, cy + 0.95 * b)
        half_width = g["lung_semi"][s][0] * np.sqrt(np.maximum(0.05, 1 - ((level - cy) / b) ** 2))
        reach = abs(g["lung_center"][s][0]) + half_width + 0.9
        depth = 9.4 * a.depth * (0.75 + 0.25 * np.minimum(1.0, ks / 4))
        x = s * (0.8 + (reach[:, None] - 0.8) * np.sin(phi))
        z = -0.5 * a.depth - depth[:, None] * np.cos(phi)
        y = y0[:, None] + spacing * (0.35 * phi + 0.45 * phi**2)
        pts = np.stack([x, y, z], axis=-1)  # (11, M, 3)
        seg = np.linalg.norm(np.diff(pts, axis=1), axis=-1)
        ds = np.zeros(phi.shape)  # each point's share of the arc: half of each adjacent segment
        ds[:, :-1] += seg / 2
        ds[:, 1:] += seg / 2
        arc = np.concatenate([np.zeros((11, 1)), np.cumsum(seg, axis=1)], axis=1)
        taper = np.interp(frac, (0.0, 0.5, 1.0), (1.0, 1.0, 0.55))  # thinner anterior ends
        for j, k in enumerate(ks):
            out[(s, int(k))] = (pts[j], _RIB_MASS * taper * ds[j], arc[j])
    return out


def _add_ribs(sc: _Scene, a: Anatomy, g: dict) -> None:
    """Rib paths into g["ribs"] (drawn after the findings, which may break one); clavicles now."""
    step = min(0.3, 0.7 * sc.pix)
    g["ribs"] = _rib_points(a, g, step)
    n = int(math.ceil(16.0 / step))
    t = np.linspace(0, 1, n)[:, None]
    for s in (-1, 1):  # clavicle: sternal end to acromion, thickened by three parallel strands
        p0, p1 = np.array((s * 2.0, -11.8, 7.2 * a.depth)), np.array((s * 15.0 * a.width, -15.2, -1.5))
        path = p0 + t * (p1 - p0) + np.array((0.0, -0.6, 1.2)) * np.sin(np.pi * t)
        ds = np.linalg.norm(p1 - p0) / (n - 1)
        for dy in (-0.45, 0.0, 0.45):
            sc.curves.append((path + (0.0, dy, 0.0), np.full(n, _RIB_MASS * 1.1 * ds), True, None, "rib"))


def _zone_point(sc: _Scene, g: dict, s: int, zone: str, rng: np.random.Generator, margin: float = 1.5) -> np.ndarray:
    """A point in aerated lung on side s, in the zone (upper/middle/lower third above the dome)."""
    c, semi = g["lung_center"][s], g["lung_semi"][s]
    apex, dome = c[1] - semi[1], g["dome_top"][s]
    lo, hi = {"upper": (0.14, 0.36), "middle": (0.38, 0.6), "lower": (0.62, 0.84)}[zone]
    blockers = [g["heart_ex"], g["dome"][s], g["medi"]]
    for attempt in range(60):
        shrink = 1.0 - attempt / 90
        p = np.array((c[0] + rng.uniform(-0.5, 0.5) * semi[0] * shrink,
                      apex + rng.uniform(lo, hi) * (dome - apex),
                      c[2] + rng.uniform(-0.45, 0.45) * semi[2] * shrink))
        probe = p + np.array([[0, 0, 0], [margin, 0, 0], [-margin, 0, 0], [0, margin, 0], [0, -margin, 0],
                              [0, 0, margin], [0, 0, -margin]])
        if sc.inside(g["lung"][s], probe).all() and not any(sc.inside(b, probe).any() for b in blockers):
            return p
    return np.array((c[0], apex + 0.5 * (lo + hi) * (dome - apex), c[2]))


def _sides(f: Finding) -> list[int]:
    return [-1, 1] if f.side == "bilateral" else [_SIDE_SIGN[f.side or "right"]]


def _clip_lung(sc: _Scene, g: dict, s: int, density: float, objects: Sequence[int], group) -> None:
    for k in objects:
        sc.add(density, [k, g["lung"][s]], [g["heart_ex"], g["dome"][s], g["medi"]], group)


def _add_cardiomegaly(sc, g, f, rng, i):
    factor = {"mild": 1.14, "moderate": 1.26, "severe": 1.40}[f.severity] * rng.uniform(0.97, 1.03)
    # enlarge about the heart's right upper anterior base: it grows left, down and backwards
    anchor = sc.centers[g["heart"]] + g["heart_rot"] @ (np.array((-0.45, -0.45, 0.55)) * g["heart_semi"])
    big = sc.scaled(g["heart"], anchor, factor)
    for s in (-1, 1):
        sc.add(AIRLESS, [g["lung"][s], big], [g["heart"], g["dome"][s], g["medi"]], (i, 0))
    g["heart_ex"] = big


def _add_consolidation(sc, g, f, rng, i):
    s = _sides(f)[0]
    p = _zone_point(sc, g, s, f.zone or "lower", rng)
    size = {"small": 1.9, "moderate": 3.0, "large": 4.4}[f.severity] * rng.uniform(0.9, 1.1)
    semi = size * rng.uniform(0.8, 1.2, 3)
    rot = _rot(*rng.uniform(-0.4, 0.4, 3))
    inner = sc.ell(p, semi * 0.8, rot)
    _clip_lung(sc, g, s, AIRLESS * 0.45, [inner], (i, 0))
    for _ in range(4):  # soft, lobulated margins
        lobe = sc.ell(p + rng.normal(0, 0.35, 3) * semi, semi * rng.uniform(0.6, 0.9, 3), _rot(*rng.uniform(-1, 1, 3)))
        _clip_lung(sc, g, s, AIRLESS * 0.13, [lobe], (i, 0))
    if f.severity != "small":  # air bronchograms inside the dense core
        for _ in range(2):
            d = rng.normal(size=3)
            r, dens = sc.thin(0.22, -AIRLESS * 0.6)
            sc.add(dens, [sc.ell(p + rng.normal(0, 0.4, 3), (r, size * 0.7, r), _frame(d)), inner], (), (i, 0))


def _add_pneumonia(sc, g, f, rng, i):
    n, spread = {"mild": (10, 1.3), "moderate": (16, 1.8), "severe": (24, 2.4)}[f.severity]
    for part, s in enumerate(_sides(f)):
        p = _zone_point(sc, g, s, f.zone or "lower", rng)
        for _ in range(n):  # a patchy cluster of overlapping blobs; overlap makes the soft margins
            q = p + rng.normal(0, spread, 3) * (1.0, 0.8, 1.0)
            semi = rng.uniform(0.6, 1.5, 3)
            _clip_lung(sc, g, s, AIRLESS * 0.28, [sc.ell(q, semi, _rot(*rng.uniform(-1, 1, 3)))], (i, part))


def _add_atelectasis(sc, g, f, rng, i):
    th = {"mild": 0.2, "moderate": 0.3, "severe": 0.45}[f.severity]
    lift = {"mild": 0.0, "moderate": 1.1, "severe": 2.0}[f.severity] if f.zone == "lower" else 0.0
    for part, s in enumerate(_sides(f)):
        c, semi = g["lung_center"][s], g["lung_semi"][s]
        dome = g["dome"][s]
        if lift:  # volume loss: the hemidiaphragm rises into the lung
            raised = sc.shifted(dome, (0.0, -lift * rng.uniform(0.85, 1.15), 0.0))
            sc.add(AIRLESS, [g["lung"][s], raised], [dome, g["heart_ex"]], (i, part))
        for _ in range(2 if f.severity == "severe" else 1):
            if f.zone == "lower":
                y = g["dome_top"][s] - lift - rng.uniform(1.4, 2.8)
                p = np.array((c[0] + s * rng.uniform(-0.1, 0.3) * semi[0], y, c[2] + rng.uniform(-0.3, 0.2) * semi[2]))
            else:
                p = _zone_point(sc, g, s, "middle", rng) + np.array((0.0, 0.0, 0.25 * semi[2]))
            r, dens = sc.thin(th, AIRLESS * 0.8)
            plate = sc.ell(p, (rng.uniform(3.0, 4.8), r, rng.uniform(2.0, 3.2)),
                           _rot(ax=rng.uniform(-0.2, 0.2), az=s * rng.uniform(0.05, 0.25)))
            sc.add(dens, [plate, g["lung"][s]], [dome, g["heart_ex"]], (i, part))


def _add_edema(sc, g, f, rng, i):
    level = {"mild": 0.07, "moderate": 0.095, "severe": 0.13}[f.severity]
    lines = {"mild": 3, "moderate": 5, "severe": 7}[f.severity]
    for part, s in enumerate((-1, 1)):
        hilum = np.array((s * 5.2, 0.8, -1.2))
        for scale in (1.0, 0.8, 0.62, 0.45):  # nested shells: a haze that fades outwards from the hilum
            e = sc.ell(hilum, np.array((5.5, 8.5, 6.0)) * scale * rng.uniform(0.9, 1.1))
            sc.add(AIRLESS * level, [e, g["lung"][s]], [g["heart_ex"], g["medi"]], (i, part))
        c, semi = g["lung_center"][s], g["lung_semi"][s]
        for _ in range(lines):  # Kerley B lines: short septal plates at the lateral bases
            y = g["dome_top"][s] - rng.uniform(0.8, 6.0)
            half = semi[0] * math.sqrt(max(0.0, 1 - ((y - c[1]) / semi[1]) ** 2))
            p = np.array((c[0] + s * (half - 1.0), y, c[2] + rng.uniform(-3, 3)))
            r, dens = sc.thin(0.05, AIRLESS * 0.8)
            sc.add(dens, [sc.ell(p, (1.0, r, 1.8)), g["lung"][s]], [g["dome"][s]], (i, part))


def _add_effusion(sc, g, f, rng, i):
    depth = {"small": (1.4, 2.0), "moderate": (6.0, 7.5), "large": (10.5, 13.0)}[f.severity]
    for part, s in enumerate(_sides(f)):
        c, semi = g["lung_center"][s], g["lung_semi"][s]
        # the lowest point of the pleural space: sample the lung below the dome top
        xs = c[0] + np.linspace(-0.95, 0.95, 17) * semi[0]
        ys = np.linspace(g["dome_top"][s], c[1] + semi[1], 40)
        zs = c[2] + np.linspace(-0.98, 0.98, 25) * semi[2]
        pts = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), -1).reshape(-1, 3)
        ok = sc.inside(g["lung"][s], pts) & ~sc.inside(g["dome"][s], pts)
        if ok.any():
            bottom = pts[ok][np.argmax(pts[ok][:, 1])]
        else:  # pragma: no cover - the lung always reaches below the dome top
            bottom = np.array((c[0], g["dome_top"][s] + 3, c[2] - semi[2] * 0.7))
        level = bottom[1] - rng.uniform(*depth)
        # aerated lung lies inside a wide ellipsoid whose floor is the meniscus: lowest at the
        # bottom of the sulcus, rising towards the chest wall
        spread = {"small": 3.5, "moderate": 2.2, "large": 2.0}[f.severity]
        b = 30.0
        # the floor is lowest towards the mediastinum, so the meniscus climbs the lateral wall
        air = sc.ell((c[0] - s * 0.5 * semi[0], level - b, bottom[2] + 2.0), (spread * semi[0], b, spread * semi[2]))
        space = [g["lung"][s]]
        if f.severity == "small":  # a little fluid lies in the posterior gutter: wide, shallow, thin
            space.append(sc.ell(bottom + (0.0, 0.0, 0.1), (0.95 * semi[0], 3.0, 0.5)))
        sc.add(AIRLESS, space, [air, g["dome"][s], g["heart_ex"], g["medi"]], (i, part))


def _add_pneumothorax(sc, g, f, rng, i):
    s = _sides(f)[0]
    lo, hi = {"small": (0.93, 0.95), "moderate": (0.85, 0.89), "large": (0.72, 0.78)}[f.severity]
    factor = rng.uniform(lo, hi)
    c, semi = g["lung_center"][s], g["lung_semi"][s]
    # the lung falls away from the apex and the lateral wall, towards its base and the hilum
    anchor = c + np.array((-s * 0.25 * semi[0], 0.8 * semi[1], 0.0))
    shrunk = sc.scaled(g["lung"][s], anchor, factor)
    sc.add(-MU_PARENCHYMA, [g["lung"][s]], [shrunk, g["dome"][s], g["heart_ex"], g["medi"]], (i, 0))
    # visceral pleural line: a thin shell of the shrunk lung, only where air lies outside it
    thickness = max(0.06, 0.6 * sc.pix)
    inner = sc.scaled(shrunk, sc.centers[shrunk], 1.0 - thickness / semi.min())
    extent = {"small": 0.55, "moderate": 0.8, "large": 1.1}[f.severity]
    cap = sc.ell(c + np.array((s * 0.3 * semi[0], -semi[1], 0.0)), (1.2 * semi[0], extent * semi[1], 1.3 * semi[2]))
    sc.add(AIRLESS * 0.9, [shrunk, cap], [inner], (i, 0))
    g["vessel_clip"][s] = shrunk  # no lung markings beyond the pleural line


def _add_fracture(sc, g, f, rng, i):
    s = _sides(f)[0]
    points, mass, arc = g["ribs"][(s, f.rib or 7)]
    site = rng.uniform(0.12, 0.3) * arc[-1]  # the posterior arc, where the rib crosses the lung field
    # a cleft about a rib's width (a thinner one blurs shut at these pixel sizes) and a step
    gap = {"mild": 1.0, "moderate": 1.2, "severe": 1.4}[f.severity]
    step = {"mild": 0.5, "moderate": 0.9, "severe": 1.3}[f.severity]
    keep = np.abs(arc - site) > gap / 2
    # the distal fragment's end is stepped down; the step fades out along the rib (it stays attached)
    fade = np.clip(1.0 - (arc - site) / 5.0, 0.0, 1.0) * (arc > site)
    broken = points + np.outer(fade, np.array((s * 0.25, 1.0, 0.1)) * step)
    g["broken_ribs"][(s, f.rib or 7)] = (broken[keep], mass[keep], (i, 0))


_BUILDERS = {"Cardiomegaly": _add_cardiomegaly, "Consolidation": _add_consolidation, "Pneumonia": _add_pneumonia,
             "Atelectasis": _add_atelectasis, "Edema": _add_edema, "Pleural Effusion": _add_effusion,
             "Pneumothorax": _add_pneumothorax, "Fracture": _add_fracture}


_VESSEL_GAIN = 2.0  # vessels drawn twice their physical mass: real films owe their markings to edge enhancement


@functools.lru_cache(maxsize=16)
def _vessel_tree(a: Anatomy, side: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """A four-generation vessel tree from one hilum as splat points (a patient's own; cached).

    Each generation runs part of the way to its goal, then splits towards two jittered goals."""
    rng = np.random.default_rng([a.seed, 7, side + 1])
    c, semi = _lung_geometry(a, side)
    hilum = np.array((side * 4.6 * a.width, 0.6 * a.height, -1.4))
    start = np.repeat(hilum[None], 9, axis=0)
    goal = c + rng.uniform(-0.8, 0.8, (9, 3)) * semi * (0.85, 1.0, 0.85)
    goal[:, 1] = np.minimum(goal[:, 1], a.dome_right * a.height)
    segments, radius = [], 0.34
    for gen, frac in enumerate((0.4, 0.45, 0.55, 0.9)):
        end = start + frac * (goal - start)
        segments.append((start, end, np.full(len(start), _VESSEL_GAIN * AIRLESS * math.pi * radius**2)))
        if gen < 3:
            start, goal = np.repeat(end, 2, axis=0), np.repeat(goal, 2, axis=0) + rng.normal(0, 2.0, (2 * len(end), 3))
            radius *= 0.7
    starts, ends, mass = (np.concatenate(parts) for parts in zip(*segments))
    return _segments_to_points(starts, ends, mass, step)


def _add_vessels(sc: _Scene, a: Anatomy, g: dict) -> None:
    """Pulmonary arteries at each hilum and the vessel tree, clipped in 3-D to the (possibly
    collapsed) lung and kept out of the heart, mediastinum and dome."""
    for s in (-1, 1):
        hilum = np.array((s * 4.6 * a.width, 0.6 * a.height, -1.4))
        clip, excl = [g["vessel_clip"][s]], [g["heart_ex"], g["medi"], g["dome"][s]]
        sc.add(AIRLESS, [sc.ell(hilum, (1.4, 2.4, 1.3), _rot(az=-s * 0.3)), clip[0]], excl[:2])
        points, mass = _vessel_tree(a, s, min(0.3, 0.7 * sc.pix))
        sc.points(points, mass, "vessel", inside=clip, outside=excl)


def _build_scene(a: Anatomy, findings: Sequence[Finding], inspiration: float, pix: float) -> tuple[_Scene, dict]:
    sc = _Scene(pix)
    g = _build_anatomy(sc, a, inspiration)
    g.update(heart_ex=g["heart"], vessel_clip=dict(g["lung"]), broken_ribs={})
    order = sorted(range(len(findings)), key=lambda j: findings[j].label != "Cardiomegaly")  # heart first
    for j in order:
        f = findings[j]
        _BUILDERS[f.label](sc, g, f, np.random.default_rng([a.seed, f.detail, CLASSES.index(f.label)]), j)
    _add_vessels(sc, a, g)
    intact = [v for key, v in g["ribs"].items() if key not in g["broken_ribs"]]
    sc.curves.append((np.concatenate([p for p, _, _ in intact]), np.concatenate([m for _, m, _ in intact]),
                      True, None, "rib"))
    for key, (points, mass, group) in g["broken_ribs"].items():
        sc.curves.append((points, mass, True, None, "rib"))
        sc.curves.append((points, mass, False, group, "rib"))  # the finding's layer: broken minus intact
        sc.curves.append((g["ribs"][key][0], -g["ribs"][key][1], False, group, "rib"))
    return sc, g


# =================================================================================================
# Projection
# =================================================================================================
_VIEWS = {"frontal": (0, 1, 2), "lateral": (2, -1, 0)}  # (column axis, its sign, ray axis)


class _Projector:
    """One view of a posed scene: per-ellipsoid ray intervals in their bounding boxes, and terms."""

    def __init__(self, sc: _Scene, view: str, pose: np.ndarray, shift: np.ndarray, size: int):
        self.col, self.sign, self.ray = _VIEWS[view]
        self.size, self.pix = size, FOV_CM / size
        centers = np.stack(sc.centers) @ pose.T + shift
        shapes = pose @ np.stack(sc.shapes) @ pose.T
        # float32 on the grids: twice as fast, and 1e-6 relative error is far below a pixel
        self.c, self.A = centers.astype(np.float32), np.linalg.inv(shapes).astype(np.float32)
        ext_u = np.sqrt(shapes[:, self.col, self.col])
        ext_v = np.sqrt(shapes[:, 1, 1])
        uc, vc = self.sign * centers[:, self.col], centers[:, 1]
        to_px = lambda x: (x + FOV_CM / 2) / self.pix - 0.5  # noqa: E731
        c0 = np.clip(np.ceil(to_px(uc - ext_u)), 0, size).astype(int)
        c1 = np.clip(np.floor(to_px(uc + ext_u)) + 1, 0, size).astype(int)
        r0 = np.clip(np.ceil(to_px(vc - ext_v)), 0, size).astype(int)
        r1 = np.clip(np.floor(to_px(vc + ext_v)) + 1, 0, size).astype(int)
        self.win = np.stack([r0, r1, c0, c1], axis=1)
        self.windows = [tuple(w) for w in self.win.tolist()]
        self.grid = (-FOV_CM / 2 + (np.arange(size) + 0.5) * self.pix).astype(np.float32)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _interval(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Entry and exit ray coordinate over ellipsoid k's window (equal where the ray misses)."""
        if k not in self.cache:
            r0, r1, c0, c1 = self.windows[k]
            A, c, col, ray = self.A[k], self.c[k], self.col, self.ray
            qc = (self.sign * self.grid[c0:c1] - c[col])[None, :]
            qy = (self.grid[r0:r1] - c[1])[:, None]
            arr = A[ray, ray]
            b = A[ray, col] * qc + A[ray, 1] * qy
            k0 = A[col, col] * qc * qc + A[1, 1] * qy * qy + 2.0 * A[col, 1] * qc * qy - 1.0
            half = np.sqrt(np.maximum(b * b - arr * k0, 0.0)) / arr
            mid = c[ray] - b / arr
            self.cache[k] = (mid - half, mid + half)
        return self.cache[k]

    def _on(self, k: int, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Ellipsoid k's interval on a window, empty (+big, -big) where k's own window ends."""
        t0, t1 = self._interval(k)
        kr0, kr1, kc0, kc1 = self.windows[k]
        if kr0 <= r0 and kr1 >= r1 and kc0 <= c0 and kc1 >= c1:
            return t0[r0 - kr0:r1 - kr0, c0 - kc0:c1 - kc0], t1[r0 - kr0:r1 - kr0, c0 - kc0:c1 - kc0]
        o0 = np.full((r1 - r0, c1 - c0), 1e9, dtype=np.float32)
        o1 = np.full((r1 - r0, c1 - c0), -1e9, dtype=np.float32)
        ar0, ar1, ac0, ac1 = max(r0, kr0), min(r1, kr1), max(c0, kc0), min(c1, kc1)
        if ar0 < ar1 and ac0 < ac1:
            o0[ar0 - r0:ar1 - r0, ac0 - c0:ac1 - c0] = t0[ar0 - kr0:ar1 - kr0, ac0 - kc0:ac1 - kc0]
            o1[ar0 - r0:ar1 - r0, ac0 - c0:ac1 - c0] = t1[ar0 - kr0:ar1 - kr0, ac0 - kc0:ac1 - kc0]
        return o0, o1

    def chords(self, ks: Sequence[int]) -> np.ndarray:
        """Chord lengths through many small ellipsoids at once, each over its own window placed at
        the top left of a (len(ks), h, w) block big enough for all of them."""
        win = np.array([self.windows[k] for k in ks]).reshape(-1, 4)
        h, w = int((win[:, 1] - win[:, 0]).max()), int((win[:, 3] - win[:, 2]).max())
        rows = np.minimum(win[:, :1] + np.arange(h), self.size - 1)  # (N, h); beyond a window: clamped, unused
        cols = np.minimum(win[:, 2:3] + np.arange(w), self.size - 1)
        A, c, col, ray = self.A[ks], self.c[ks], self.col, self.ray
        qc = (self.sign * self.grid[cols] - c[:, col:col + 1])[:, None, :]  # (N, 1, w)
        qy = (self.grid[rows] - c[:, 1:2])[:, :, None]  # (N, h, 1)
        a = lambda i, j: A[:, i, j][:, None, None]  # noqa: E731
        b = a(ray, col) * qc + a(ray, 1) * qy
        k0 = a(col, col) * qc * qc + a(1, 1) * qy * qy + 2.0 * a(col, 1) * qc * qy - 1.0
        return 2.0 * np.sqrt(np.maximum(b * b - a(ray, ray) * k0, 0.0)) / a(ray, ray)

    def length(self, include: Sequence[int], exclude: Sequence[int]):
        """(window, |intersection of include minus union of exclude| per ray) or None if empty."""
        win = self.windows
        r0, r1, c0, c1 = win[include[0]]
        for k in include[1:]:
            w = win[k]
            r0, r1, c0, c1 = max(r0, w[0]), min(r1, w[1]), max(c0, w[2]), min(c1, w[3])
        if r0 >= r1 or c0 >= c1:
            return None
        lo = hi = None
        for k in include:
            t0, t1 = self._on(k, r0, r1, c0, c1)
            lo = t0 if lo is None else np.maximum(lo, t0)
            hi = t1 if hi is None else np.minimum(hi, t1)
        total = np.maximum(hi - lo, 0.0)
        # inclusion-exclusion, |I - (E1 | ... | En)| = sum over subsets S of (-1)^|S| |I & S|, each
        # term computed only over the window where all of its ellipsoids project
        stack = [((r0, r1, c0, c1), lo, hi, 1.0)]
        for k in exclude:
            kr0, kr1, kc0, kc1 = win[k]
            grown = []
            for (a0, a1, b0, b1), l, h, sign in stack:
                w0, w1, v0, v1 = max(a0, kr0), min(a1, kr1), max(b0, kc0), min(b1, kc1)
                if w0 >= w1 or v0 >= v1:
                    continue
                t0, t1 = self._on(k, w0, w1, v0, v1)
                sub = (slice(w0 - a0, w1 - a0), slice(v0 - b0, v1 - b0))
                l2, h2 = np.maximum(l[sub], t0), np.minimum(h[sub], t1)
                total[w0 - r0:w1 - r0, v0 - c0:v1 - c0] -= sign * np.maximum(h2 - l2, 0.0)
                grown.append(((w0, w1, v0, v1), l2, h2, -sign))
            stack += grown
        return (r0, r1, c0, c1), total


def _splat(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bilinear splat of point masses onto a grid."""
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = rows - r0, cols - c0
    idx, wts = [], []
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        idx.append(rr[ok] * shape[1] + cc[ok])
        wts.append((weights * w)[ok])
    flat = np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=shape[0] * shape[1])
    return flat.reshape(shape)


_OPTICS: dict[int, dict] = {}


def _optics(size: int) -> dict:
    """Per image size: padding, frequency grid and the rib cross-section's transfer function."""
    if size not in _OPTICS:
        pad = (size // 8 + 1) // 2 * 2  # reflect padding keeps the big unsharp kernel off the far edge
        n = size + 2 * pad
        fy = np.fft.fftfreq(n)[:, None]
        fx = np.fft.rfftfreq(n)[None, :]
        f2 = fy * fy + fx * fx
        pix = FOV_CM / size
        r_out = max(_RIB_RADIUS / pix, 0.8)
        offset = np.fft.fftfreq(n) * n  # pixel offsets from the origin, wrapped: the kernel's grid
        d2 = offset[:, None] ** 2 + offset[None, :] ** 2
        # the rib's cross-section: a disc minus most of an inner disc (cortex brighter than marrow)
        rib = np.sqrt(np.maximum(r_out**2 - d2, 0)) - 0.7 * np.sqrt(np.maximum((0.62 * r_out) ** 2 - d2, 0))
        # the kernel is symmetric, so its transform is real; float64 transforms are the fast path in numpy
        _OPTICS[size] = {"pad": pad, "n": n, "f2": f2, "rib": np.fft.rfft2(rib / rib.sum()).real}
    return _OPTICS[size]


def _project(sc: _Scene, view: str, pose: np.ndarray, shift: np.ndarray, size: int,
             processing: dict) -> tuple[np.ndarray, dict]:
    """Processed attenuation image (size, size) and each finding part's processed layer."""
    pj = _Projector(sc, view, pose, shift, size)
    image = np.zeros((size, size))
    layers: dict[tuple[int, int], np.ndarray] = {}
    terms = [t for t in sc.terms if t.view is None or t.view == view]
    # small solitary ellipsoids (vertebrae, sternum, ...) in one batch: the loop below is per term
    def small(t: _Term) -> bool:
        r0, r1, c0, c1 = pj.windows[t.include[0]]
        return len(t.include) == 1 and not t.exclude and t.group is None and r0 < r1 and c0 < c1 \
            and (r1 - r0) * (c1 - c0) <= (size // 4) ** 2

    solo = [t for t in terms if small(t)]
    if solo:
        chords = pj.chords([t.include[0] for t in solo])
        for t, chord in zip(solo, chords):
            r0, r1, c0, c1 = pj.windows[t.include[0]]
            image[r0:r1, c0:c1] += t.density * chord[:r1 - r0, :c1 - c0]
    done = {id(t) for t in solo}
    for term in terms:
        if id(term) in done:
            continue
        got = pj.length(term.include, term.exclude)
        if got is None:
            continue
        (r0, r1, c0, c1), length = got
        image[r0:r1, c0:c1] += term.density * length
        if term.group is not None:
            layer = layers.setdefault(term.group, np.zeros((size, size)))
            layer[r0:r1, c0:c1] += term.density * length
    opt = _optics(size)
    pad, n = opt["pad"], opt["n"]
    by_key: dict = {(None, "rib"): [], (None, "vessel"): []}
    for points, mass, in_image, group, kernel in sc.curves:
        by_key.setdefault((None if in_image else group, kernel), []).append((points, mass))
    splats = {}
    for key, parts in by_key.items():
        p = np.concatenate([pts for pts, _ in parts] or [np.zeros((0, 3))]) @ pose.T + shift
        mass = np.concatenate([m for _, m in parts] or [np.zeros(0)])
        cols = (pj.sign * p[:, pj.col] + FOV_CM / 2) / pj.pix - 0.5 + pad
        rows = (p[:, 1] + FOV_CM / 2) / pj.pix - 0.5 + pad
        splats[key] = _splat((n, n), rows, cols, mass / pj.pix**2)
    # radiograph processing: blur, compress the large-scale range (a wide kernel), boost local
    # detail (a narrow one): out = blur * (x - compress * wide(x) + detail * (x - narrow(x)))
    f2 = opt["f2"]
    gauss = lambda sigma_px: np.exp(-2 * np.pi**2 * sigma_px**2 * f2)  # noqa: E731
    wide, narrow = gauss(processing["wide_cm"] / pj.pix), gauss(processing["narrow_cm"] / pj.pix)
    transfer = gauss(processing["blur"]) * (1 - processing["compress"] * wide + processing["detail"] * (1 - narrow))
    # one stack through the FFT: the image, each finding layer, and their splatted tubes
    keys = [None] + sorted(set(layers) | {k for k, _ in splats if k is not None})
    zero = np.zeros((n, n))
    # vessels: a small binomial blur for their cross-section (~0.2 cm), cheaper than a transform
    vessels = splats[(None, "vessel")]
    for _ in range(min(6, math.ceil(2 * (0.2 / pj.pix) ** 2))):  # each [1 2 1]/4 pass adds 0.5 px^2
        vessels = 0.5 * vessels + 0.25 * (np.roll(vessels, 1, 0) + np.roll(vessels, -1, 0))
        vessels = 0.5 * vessels + 0.25 * (np.roll(vessels, 1, 1) + np.roll(vessels, -1, 1))
    dense = np.stack([np.pad(image, pad, mode="reflect") + vessels] +
                     [np.pad(layers[k], pad) if k in layers else zero for k in keys[1:]])
    bones = np.stack([splats.get((k, "rib"), zero) for k in keys])
    spectrum = np.fft.rfft2(dense) * transfer + np.fft.rfft2(bones) * (transfer * opt["rib"])
    out = np.fft.irfft2(spectrum, s=(n, n))[:, pad:pad + size, pad:pad + size]
    return out[0], {k: out[j] for j, k in enumerate(keys) if k is not None}


# =================================================================================================
# Rendering a study
# =================================================================================================
def _tone(x: np.ndarray, lo: float, hi: float, gamma: float) -> np.ndarray:
    """Window [lo, hi] -> [0, 1] through a soft S-curve (half linear, half smoothstep) and a gamma."""
    d = np.clip((x - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    s = d * (0.5 + d * (1.5 - d))  # 0.5 d + 0.5 (3 d^2 - 2 d^3)
    return s if gamma == 1.0 else s**gamma


def _pose(rng: np.random.Generator, view: str, scale: float, ap: bool) -> tuple[np.ndarray, np.ndarray]:
    turn = rng.normal(0, 0.05 if ap else 0.035)
    tilt = rng.normal(0, 0.025)
    rot = _rot(az=tilt) @ _rot(ay=turn) if view == "frontal" else _rot(ax=tilt) @ _rot(ay=turn)
    shift = np.zeros(3)
    shift[1] = rng.normal(0, 0.8)
    shift[0 if view == "frontal" else 2] = rng.normal(0, 0.8)
    return scale * rng.uniform(0.96, 1.04) * rot, shift


def _visibility(image: np.ndarray, layer: np.ndarray, lo: float, hi: float, gamma: float, pix: float, label: str):
    """(visible, bbox) of one finding layer in one processed view."""
    delta, area = VISIBILITY.get(label, VISIBILITY["default"])
    near = np.abs(layer) > 1e-3  # the processed layer is tiny away from the finding: skip that part
    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    if not len(rows):
        return False, None
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    diff = np.abs(_tone(image[window], lo, hi, gamma) - _tone(image[window] - layer[window], lo, hi, gamma))
    visible = int((diff > delta).sum()) * pix * pix >= area
    peak = float(diff.max())
    if not visible or peak <= 0:
        return visible, None
    r, c = np.nonzero(diff > max(0.015, 0.25 * peak))  # the whole opacity, as a reader would box it
    x0, y0 = int(cols[0] + c.min()), int(rows[0] + r.min())
    return True, (x0, y0, int(cols[0] + c.max()) - x0 + 1, int(rows[0] + r.max()) - y0 + 1)


def render_study(anatomy: Anatomy, findings: Sequence[Finding] = (), *, size: int = 256,
                 rng: np.random.Generator | int | None = 0, lateral: bool = True, view_position: str = "PA",
                 noise: bool = True) -> RenderedStudy:
    """Render the frontal (and lateral) view of one study of this patient with these findings.

    rng drives the pose, inspiration, exposure and noise (not the anatomy or the findings, which
    carry their own seeds): the same anatomy, findings and rng give the same arrays, and the same
    rng with and without a finding differ only where the finding is (with noise=False exactly so).
    """
    if size < 32:
        raise ValueError(f"size={size} is too small to draw anatomy; use size >= 32 (e.g. 128 or 256)")
    if view_position not in ("PA", "AP"):
        raise ValueError(f"view_position={view_position!r}; use 'PA' or 'AP'")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ap = view_position == "AP"
    inspiration = rng.normal(1.2 if ap else 0.0, 0.5)
    pix = FOV_CM / size
    sc, _ = _build_scene(anatomy, list(findings), inspiration, pix)
    scale = rng.uniform(0.95, 1.05)
    images: dict[str, np.ndarray] = {}
    vis: dict[str, dict] = {}
    for view in ("frontal", "lateral") if lateral else ("frontal",):
        pose, shift = _pose(rng, view, scale, ap)
        processing = {"blur": rng.uniform(0.5, 0.9), "wide_cm": rng.uniform(4.0, 6.0),
                      "compress": rng.uniform(0.35, 0.5), "narrow_cm": rng.uniform(0.6, 1.0),
                      "detail": rng.uniform(0.4, 0.8)}
        image, layers = _project(sc, view, pose, shift, size, processing)
        base = image - sum(layers.values()) if layers else image
        # auto-exposure from the finding-free image: the darkest body pixels (lung) sit near a
        # fifth of the grey range, the densest (spine, abdomen) near the top
        sample = base[::3, ::3].ravel()
        top = np.percentile(sample, 99.7)
        dark, hi = np.percentile(sample[sample > 0.12 * top], (3.0, 99.5))
        hi = hi + rng.normal(0.03, 0.02) * (hi - dark)
        lo = dark - (0.28 + rng.normal(0, 0.03)) * (hi - dark)
        gamma = rng.uniform(0.85, 1.15)
        display = _tone(image, lo, hi, gamma)
        vis[view] = {k: _visibility(image, layer, lo, hi, gamma, pix, findings[k[0]].label)
                     for k, layer in layers.items()}
        n_rng = np.random.default_rng(rng.integers(2**63))
        amplitude = rng.uniform(0.010, 0.022)  # drawn either way: noise=False must not shift the stream
        if noise:
            white = n_rng.normal(0, 1, (size + 2, size + 2))
            grain = (white[1:-1, 1:-1] * 2 + white[:-2, 1:-1] + white[2:, 1:-1] + white[1:-1, :-2]
                     + white[1:-1, 2:]) / math.sqrt(8)  # unit variance, slightly correlated
            display = display + amplitude * (0.35 + display) * grain
        images[view] = np.clip(display, 0.0, 1.0).astype(np.float32)
    out = []
    for j, f in enumerate(findings):
        parts = sorted({k for view_vis in vis.values() for k in view_vis if k[0] == j})
        front = [vis["frontal"].get(k, (False, None)) for k in parts]
        side = [vis["lateral"].get(k, (False, None)) for k in parts] if lateral else []
        boxes = tuple(b for v, b in front if v and b)
        union = None
        if boxes:
            x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
            x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
            union = (x0, y0, x1 - x0, y1 - y0)
        out.append(replace(f, visible_frontal=any(v for v, _ in front),
                           visible_lateral=f.label != "Fracture" and any(v for v, _ in side),
                           bbox_frontal=union, bboxes_frontal=boxes))
    return RenderedStudy(images["frontal"], images.get("lateral"), out, view_position)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Display values in [0, 1] -> 8-bit grey."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# =================================================================================================
# The archive: plan, files, ground truth, manifest
# =================================================================================================
MANIFEST = "synth_manifest.json"
TRUTH = "synth_truth.jsonl"
FILE_LIST = "synth_files.txt"  # every file the generator wrote, so that a re-run never touches others
GENERATOR = "clinvla synth"
SPLITS = ("train", "validate", "test")
_BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass
class _Planned:
    index: int
    subject: int  # index of the patient
    labels: tuple[str, ...]
    has_lateral: bool
    view_position: str  # of the frontal view: "PA" | "AP"
    split: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS.fff
    ids: dict = field(default_factory=dict)


def _check_arguments(studies, fmt, size, lateral_fraction, split_fractions) -> tuple[float, float, float]:
    if isinstance(studies, bool) or not isinstance(studies, (int, np.integer)) or studies < 1:
        raise ValueError(f"studies={studies!r}: ask for at least one study (an integer >= 1)")
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a format this generator writes; use one of {', '.join(FORMATS)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size={size!r}: images need at least 32 pixels a side to show anatomy; use e.g. 128 or 256")
    if not 0.0 <= float(lateral_fraction) <= 1.0:
        raise ValueError(f"lateral_fraction={lateral_fraction!r} must lie in [0, 1] "
                         "(e.g. 0.85: most studies have a lateral view)")
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"split_fractions={split_fractions!r} must be three non-negative fractions (train, validate, "
                         "test) summing to 1 with some train, e.g. (0.8, 0.1, 0.1)")
    return fractions


def _prepare_out(out: Path) -> None:
    """Refuse a folder holding anything but a previous synthetic archive; clear that archive's files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file, not a folder; pass a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    try:
        ours = json.loads(manifest.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"output folder {out} is not empty and is not a synthetic archive (no {MANIFEST} from "
                              f"{GENERATOR}); pass a new or empty folder. Nothing was changed.")
    listing = out / FILE_LIST
    listed = {line for line in listing.read_text().splitlines() if line} if listing.is_file() else set()
    listed |= {MANIFEST, FILE_LIST}
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()
                     and p.relative_to(out).as_posix() not in listed)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise FileExistsError(f"output folder {out} holds a synthetic archive plus files it did not write "
                              f"({', '.join(foreign[:3])}{more}); move them away or pass another folder. "
                              "Nothing was changed.")
    root = out.resolve()
    emptied = set()
    for rel in sorted(listed):
        path = (out / rel).resolve()
        if path.parent != root and root not in path.parents:
            continue  # a listing that points outside the archive is not followed
        path.unlink(missing_ok=True)
        emptied.update(p for p in path.parents if root in p.parents)
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # only folders we emptied
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _plan(studies: int, seed: int, fmt: str, lateral_fraction: float, fractions) -> list[_Planned]:
    rng = np.random.default_rng([seed, 0])
    counts: list[int] = []
    while sum(counts) < studies:  # 1 to 4 studies per patient (RSNA: one image per patient)
        counts.append(1 if fmt == "rsna" else int(min(4, 1 + rng.poisson(0.5))))
    counts[-1] -= sum(counts) - studies
    subject_of = np.repeat(np.arange(len(counts)), counts)

    # class mix by stratified counts, so that every single-finding class gets its share
    n_none = int(round(CLASS_MIX["none"] * studies))
    n_single = int(round(CLASS_MIX["single"] * studies))
    n_single = min(n_single, studies - n_none)
    off_single, off_pair = int(rng.integers(len(FINDING_LABELS))), int(rng.integers(len(PAIRS)))
    combos = ([()] * n_none + [(FINDING_LABELS[(off_single + i) % len(FINDING_LABELS)],) for i in range(n_single)]
              + [PAIRS[(off_pair + i) % len(PAIRS)] for i in range(studies - n_none - n_single)])
    combos = [combos[i] for i in rng.permutation(studies)]

    # split by subject: whole patients go to test, then validate, until each has its share
    split_of_subject = np.zeros(len(counts), dtype=int)
    filled = [0, 0, 0]
    targets = [0, int(fractions[1] * studies + 0.5), int(fractions[2] * studies + 0.5)]
    for subject in rng.permutation(len(counts)):
        for split in (2, 1):
            if filled[split] < targets[split]:
                split_of_subject[subject] = split
                filled[split] += counts[subject]
                break

    lateral = rng.random(studies) < lateral_fraction if fmt != "rsna" else np.zeros(studies, dtype=bool)
    ap_draw = rng.random(studies)
    base_days = rng.integers(0, 40 * 365, len(counts))
    plan = []
    for k in range(studies):
        subject = int(subject_of[k])
        if fmt == "rsna":
            view = "AP" if ap_draw[k] < 0.45 else "PA"
        else:  # portable AP studies rarely come with a lateral
            view = "AP" if ap_draw[k] < (0.03 if lateral[k] else 0.6) else "PA"
        first = int(np.flatnonzero(subject_of == subject)[0])
        day = np.datetime64("2110-01-01") + int(base_days[subject]) + 90 * (k - first) + int(rng.integers(0, 60))
        seconds, millis = int(rng.integers(6 * 3600, 22 * 3600)), int(rng.integers(1000))
        plan.append(_Planned(k, subject, tuple(combos[k]), bool(lateral[k]), view, SPLITS[split_of_subject[subject]],
                             str(day).replace("-", ""),
                             f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{millis:03d}"))
    _assign_ids(plan, len(counts), seed, fmt)
    return plan


def _assign_ids(plan: list[_Planned], subjects: int, seed: int, fmt: str) -> None:
    """Identifiers in each format's style, all drawn from the seed."""
    rng = np.random.default_rng([seed, 9])
    subject_ids = 10_000_000 + rng.choice(10_000_000, subjects, replace=False)
    study_ids = 50_000_000 + rng.choice(10_000_000, len(plan), replace=False)
    per_subject: dict[int, int] = {}
    for p in plan:
        per_subject[p.subject] = per_subject.get(p.subject, 0) + 1
        sid, study = str(subject_ids[p.subject]), str(study_ids[p.index])
        hexes = [rng.bytes(20).hex() for _ in range(2)]
        p.ids = {
            "subject_id": sid, "study_id": study, "accession": study,
            "dicom_ids": ["-".join(h[i:i + 8] for i in range(0, 40, 8)) for h in hexes],
            "patient": f"patient{p.subject + 1:05d}", "study_number": per_subject[p.subject],
            "uuid": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        }
        if fmt == "chexpert":
            p.ids["study_id"] = f"{p.ids['patient']}/study{per_subject[p.subject]}"
            p.ids["subject_id"] = p.ids["patient"]
        elif fmt == "rsna":
            p.ids["study_id"] = p.ids["subject_id"] = p.ids["uuid"]
        elif fmt == "dicom":
            p.ids["study_id"] = _uid(seed, study, "study")


def _uid(seed: int, *parts: str) -> str:
    from pydicom.uid import generate_uid  # deterministic: a hash of the seed and the parts

    return str(generate_uid(entropy_srcs=[GENERATOR, str(seed), *parts]))


# ---- writers --------------------------------------------------------------------------------------
class _Archive:
    """Claims every path in FILE_LIST before writing it (a crash leaves no unlisted file)."""

    def __init__(self, root: Path, seed: int, size: int):
        self.root, self.seed, self.size = root, seed, size
        self.listing = open(root / FILE_LIST, "a", encoding="utf-8")
        self.images = 0

    def claim(self, rel: str) -> Path:
        self.listing.write(rel + "\n")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def jpeg(self, rel: str, image: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(to_uint8(image)).save(self.claim(rel), format="JPEG", quality=95)
        self.images += 1

    def csv(self, rel: str, header: Sequence[str], rows: list[list]) -> None:
        with open(self.claim(rel), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    def close(self) -> None:
        self.listing.close()


def _labels_row(labels: dict, columns: Sequence[str]) -> list[str]:
    return [reports.format_label(labels[c]) for c in columns]


_EXAM = {("PA", True): "CHEST (PA AND LAT)", ("PA", False): "CHEST (SINGLE VIEW)",
         ("AP", True): "CHEST (AP AND LAT)", ("AP", False): "CHEST (PORTABLE AP)"}


class _MimicWriter:
    META = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
            "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning")

    def __init__(self, archive: _Archive):
        self.a, self.meta, self.labels, self.splits = archive, [], [], []

    def study(self, p: _Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        sid, study = p.ids["subject_id"], p.ids["study_id"]
        folder = f"files/p{sid[:2]}/p{sid}"
        exam = _EXAM[(p.view_position, r.lateral is not None)]
        views = [(p.ids["dicom_ids"][0], r.frontal, p.view_position,
                  "postero-anterior" if p.view_position == "PA" else "antero-posterior")]
        if r.lateral is not None:
            views.append((p.ids["dicom_ids"][1], r.lateral, "LATERAL", "lateral"))
        for dicom_id, image, position, meaning in views:
            self.a.jpeg(f"{folder}/s{study}/{dicom_id}.jpg", image)
            self.meta.append([dicom_id, sid, study, exam, position, self.a.size, self.a.size, p.date, p.time, exam,
                              meaning, "Recumbent" if p.view_position == "AP" else "Erect"])
            self.splits.append([dicom_id, study, sid, p.split])
        text = reports.mimic_report_text(report, rng, examination=exam, sex=anatomy.sex)
        self.a.claim(f"{folder}/s{study}.txt").write_text(text, encoding="utf-8")
        self.labels.append([sid, study] + _labels_row(report.labels, reports.MIMIC_LABEL_COLUMNS))

    def finish(self) -> None:
        self.a.csv("mimic-cxr-2.0.0-metadata.csv", self.META, self.meta)
        self.a.csv("mimic-cxr-2.0.0-chexpert.csv", ("subject_id", "study_id") + reports.MIMIC_LABEL_COLUMNS,
                   self.labels)
        self.a.csv("mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"), self.splits)


class _ChexpertWriter:
    HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_COLUMNS
    ROOT = "CheXpert-v1.0-small"

    def __init__(self, archive: _Archive):
        self.a, self.rows = archive, {"train": [], "valid": []}

    def study(self, p: _Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        part = "train" if p.split == "train" else "valid"  # test studies go to valid.csv; the truth file has the split
        folder = f"{self.ROOT}/{part}/{p.ids['patient']}/study{p.ids['study_number']}"
        labels = _labels_row(report.labels, CHEXPERT_COLUMNS)
        views = [("view1_frontal.jpg", r.frontal, "Frontal", p.view_position)]
        if r.lateral is not None:
            views.append(("view2_lateral.jpg", r.lateral, "Lateral", ""))
        for name, image, kind, ap_pa in views:
            self.a.jpeg(f"{folder}/{name}", image)
            self.rows[part].append([f"{folder}/{name}", anatomy.sex, anatomy.age, kind, ap_pa] + labels)

    def finish(self) -> None:
        for part, rows in self.rows.items():
            self.a.csv(f"{self.ROOT}/{part}.csv", self.HEADER, rows)


def _dicom_file(sop_class: str, sop_uid: str, implementation_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = implementation_uid
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def _save_dicom(ds, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


_VIEW_CODES = {"PA": ("R-10214", "postero-anterior"), "AP": ("R-10206", "antero-posterior"),
               "LL": ("R-10236", "left lateral")}


class _DicomWriter:
    """A PACS-like export: DX images (12 bits in 16) and a Basic Text SR per study, plus labels.csv."""

    def __init__(self, archive: _Archive, eight_bit: bool = False):
        self.a, self.eight_bit, self.labels, self.boxes = archive, eight_bit, [], []
        self.implementation = _uid(archive.seed, "implementation")

    def _patient(self, ds, p: _Planned, anatomy: Anatomy, patient_id: str, study_uid: str) -> None:
        ds.PatientID, ds.PatientName = patient_id, f"SYNTH^{patient_id[:8]}"
        ds.PatientSex, ds.PatientAge, ds.PatientBirthDate = anatomy.sex[0], f"{anatomy.age:03d}Y", ""
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, p.date, p.time
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = p.ids["accession"], str(p.index + 1), ""
        ds.StudyDescription = _EXAM[(p.view_position, p.has_lateral)]
        ds.Manufacturer = "ClinVLA synthetic (not clinical data)"

    def image(self, rel: str, image: np.ndarray, p: _Planned, anatomy: Anatomy, view: str, number: int,
              rng: np.random.Generator, patient_id: str, study_uid: str) -> None:
        seed, key = self.a.seed, p.ids["study_id"]
        ds = _dicom_file(_CR_IMAGE if self.eight_bit else _DX_FOR_PRESENTATION, _uid(seed, key, view, "sop"),
                         self.implementation)
        self._patient(ds, p, anatomy, patient_id, study_uid)
        ds.Modality = "CR" if self.eight_bit else "DX"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = _uid(seed, key, view, "series"), number, 1
        ds.SeriesDescription, ds.BodyPartExamined = f"CHEST {view}", "CHEST"
        ds.ViewPosition = view
        ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]
        code, meaning = _VIEW_CODES[view]
        ds.ViewCodeSequence = [_code(code, "SRT", meaning)]
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = self.a.size
        spacing = f"{FOV_CM * 10 / self.a.size:.4f}"
        ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
        if self.eight_bit:
            pixels = to_uint8(image)
            ds.BitsAllocated = ds.BitsStored = 8
        else:  # 12 bits stored; the window maps them back to the display values
            offset, span = int(rng.integers(150, 700)), int(rng.integers(2600, 3300))
            pixels = np.round(offset + np.clip(image, 0, 1) * span).astype(np.uint16)
            ds.BitsAllocated, ds.BitsStored = 16, 12
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.WindowCenter, ds.WindowWidth = f"{offset + span / 2:.1f}", str(span)
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = pixels.tobytes()
        _save_dicom(ds, self.a.claim(rel))
        self.a.images += 1

    def report(self, rel: str, report: reports.Report, p: _Planned, anatomy: Anatomy, study_uid: str) -> None:
        from pydicom.dataset import Dataset

        seed, key = self.a.seed, p.ids["study_id"]
        ds = _dicom_file(_BASIC_TEXT_SR, _uid(seed, key, "sr", "sop"), self.implementation)
        self._patient(ds, p, anatomy, p.ids["subject_id"], study_uid)
        ds.Modality, ds.SeriesInstanceUID = "SR", _uid(seed, key, "sr", "series")
        ds.SeriesNumber, ds.InstanceNumber = 99, 1
        ds.ContentDate, ds.ContentTime = p.date, p.time
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
        ds.ReferencedPerformedProcedureStepSequence, ds.PerformedProcedureCodeSequence = [], []
        items = []
        sections = ((report.findings, "121070", "Findings"), (report.impression, "121073", "Impression"))
        for text, code, meaning in sections:
            item = Dataset()
            item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
            item.ConceptNameCodeSequence = [_code(code, "DCM", meaning)]
            items.append(item)
        ds.ContentSequence = items
        _save_dicom(ds, self.a.claim(rel))

    def study(self, p: _Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        sid, study_uid = p.ids["subject_id"], p.ids["study_id"]
        folder = f"p{sid}/s{p.ids['accession']}"
        self.image(f"{folder}/1_frontal.dcm", r.frontal, p, anatomy, p.view_position, 1, rng, sid, study_uid)
        if r.lateral is not None:
            self.image(f"{folder}/2_lateral.dcm", r.lateral, p, anatomy, "LL", 2, rng, sid, study_uid)
        self.report(f"{folder}/3_report.dcm", report, p, anatomy, study_uid)
        self.labels.append([study_uid, p.split] + _labels_row(report.labels, CHEXPERT_COLUMNS))

    def finish(self) -> None:
        self.a.csv("labels.csv", ("study_id", "split") + CHEXPERT_COLUMNS, self.labels)


class _RsnaWriter(_DicomWriter):
    """RSNA Pneumonia Detection layout: frontal-only 8-bit images, boxes from the truth."""

    def __init__(self, archive: _Archive):
        super().__init__(archive, eight_bit=True)
        self.classes = []

    def study(self, p: _Planned, r: RenderedStudy, report: reports.Report, anatomy: Anatomy, rng) -> None:
        pid = p.ids["uuid"]
        self.image(f"stage_2_train_images/{pid}.dcm", r.frontal, p, anatomy, p.view_position, 1, rng, pid,
                   _uid(self.a.seed, pid, "study"))
        pneumonia = [f for f in r.findings if f.label == "Pneumonia" and f.visible_frontal]
        if pneumonia:
            kind = "Lung Opacity"
            for x, y, w, h in pneumonia[0].bboxes_frontal:
                self.boxes.append([pid, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", 1])
        else:
            kind = "Normal" if not r.findings else "No Lung Opacity / Not Normal"
            self.boxes.append([pid, "", "", "", "", 0])
        self.classes += [[pid, kind]] * (len(self.boxes) - len(self.classes))

    def finish(self) -> None:
        self.a.csv("stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), self.boxes)
        self.a.csv("stage_2_detailed_class_info.csv", ("patientId", "class"), self.classes)


_WRITERS = {"mimic": _MimicWriter, "chexpert": _ChexpertWriter, "dicom": _DicomWriter, "rsna": _RsnaWriter}


def _more_severe(f: Finding) -> Finding:
    scale = _SIZE_SEVERITY if f.label in _SIZED else _GRADE_SEVERITY
    if f.severity in scale[:-1]:
        return replace(f, severity=scale[scale.index(f.severity) + 1])
    return replace(f, detail=f.detail + 1)  # already the most severe: another geometry


def _render_visible(anatomy: Anatomy, findings: list[Finding], size: int, rng_seed: list, lateral: bool,
                    view_position: str) -> RenderedStudy:
    """Render; a finding that no view of the study shows is redrawn one grade more severe (at most
    twice), so that the report, which describes every finding, does not describe an invisible one."""
    for attempt in range(3):
        rendered = render_study(anatomy, findings, size=size, rng=np.random.default_rng(rng_seed), lateral=lateral,
                                view_position=view_position)
        hidden = {j for j, f in enumerate(rendered.findings) if not (f.visible_frontal or f.visible_lateral)}
        if not hidden or attempt == 2:
            return rendered
        findings = [_more_severe(f) if j in hidden else f for j, f in enumerate(findings)]
    return rendered  # pragma: no cover - the loop always returns


def _manifest(seed, studies, fmt, size, lateral_fraction, fractions, complete: bool, summary=None) -> str:
    return json.dumps({"generator": GENERATOR, "version": SYNTH_VERSION, "seed": seed, "studies": studies,
                       "format": fmt, "size": size, "lateral_fraction": lateral_fraction,
                       "split_fractions": list(fractions), "complete": complete, "summary": summary}, indent=2)


# below this many studies the rendering stays in this process (starting workers costs ~1 s)
PARALLEL_MIN_STUDIES = 256


def _render_planned(job: tuple[int, int, _Planned]) -> tuple[Anatomy, RenderedStudy, reports.Report]:
    """Everything random about one planned study, from its own seeds only, so that the result does
    not depend on which process renders it or in which order."""
    seed, size, p = job
    anatomy = sample_anatomy(np.random.default_rng([seed, 1, p.subject]))
    findings = sample_findings(np.random.default_rng([seed, 2, p.index]), list(p.labels), lateral=p.has_lateral)
    rendered = _render_visible(anatomy, findings, size, [seed, 3, p.index], p.has_lateral, p.view_position)
    report = reports.write_report(rendered.findings, np.random.default_rng([seed, 4, p.index]),
                                  has_lateral=p.has_lateral)
    return anatomy, rendered, report


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def generate_archive(out: str | Path, studies: int, seed: int, fmt: str = "mimic", size: int = 256,
                     lateral_fraction: float = 0.85, split_fractions=(0.8, 0.1, 0.1), progress: bool = True,
                     workers: int | None = None) -> dict:
    """Write a synthetic archive of `studies` studies in format `fmt` into folder `out`.

    The same arguments give the same files (CSVs, reports and pixels), whatever `workers` is: the
    studies are rendered by `workers` processes (default: one per available core; archives under
    PARALLEL_MIN_STUDIES studies render in this process) and written here in order. `out` must be
    new, empty, or a previous synthetic archive (whose files, and only those, are replaced).
    Returns a summary: counts per class (drawn findings), per split, of exclusively positive
    studies per class (from the labels), images written, and the time taken.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    fractions = _check_arguments(studies, fmt, size, lateral_fraction, split_fractions)
    if fmt in ("dicom", "rsna"):
        try:
            import pydicom  # noqa: F401
        except ImportError as exc:  # pragma: no cover - pydicom is a dev dependency
            raise ImportError(f"fmt={fmt!r} writes DICOM files and needs pydicom: "
                              "pip install 'clinvla-engine[dicom]'") from exc
    studies, size, seed = int(studies), int(size), int(seed)
    out = Path(out).expanduser()
    _prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    archive = _Archive(out, seed, size)
    archive.claim(MANIFEST).write_text(_manifest(seed, 0, fmt, size, lateral_fraction, fractions, complete=False))
    plan = _plan(studies, seed, fmt, float(lateral_fraction), fractions)
    writer = _WRITERS[fmt](archive)
    per_class = {c: 0 for c in CLASSES}
    per_split = {s: 0 for s in SPLITS}
    exclusive = {c: 0 for c in CLASSES}
    from tqdm import tqdm

    workers = min(workers or default_workers(), studies) if studies >= PARALLEL_MIN_STUDIES else 1
    pool = None
    if workers > 1:
        # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork
        pool = multiprocessing.get_context("spawn").Pool(workers)
        rendered_studies = pool.imap(_render_planned, ((seed, size, p) for p in plan), chunksize=8)
    else:
        rendered_studies = map(_render_planned, ((seed, size, p) for p in plan))
    bar = tqdm(total=studies, desc=f"synth {fmt} {size}px", unit="study", disable=not progress, mininterval=0.5)
    try:
        with open(archive.claim(TRUTH), "w", encoding="utf-8") as truth:
            for p, (anatomy, rendered, report) in zip(plan, rendered_studies):
                writer.study(p, rendered, report, anatomy, np.random.default_rng([seed, 5, p.index]))
                truth.write(json.dumps({"study_id": p.ids["study_id"], "subject_id": p.ids["subject_id"],
                                        "split": p.split, "has_lateral": p.has_lateral,
                                        "view_position": p.view_position,
                                        "findings": [f.truth() for f in rendered.findings]}) + "\n")
                for f in rendered.findings:
                    per_class[f.label] += 1
                per_class["No Finding"] += not rendered.findings
                per_split[p.split] += 1
                positive = [c for c in CLASSES if report.labels.get(c) == reports.POSITIVE]
                if len(positive) == 1:
                    exclusive[positive[0]] += 1
                bar.update(1)
        writer.finish()
    finally:
        if pool is not None:
            pool.terminate()  # every result has been read, or we are unwinding an error
            pool.join()
        bar.close()
        archive.close()
    seconds = time.perf_counter() - t0
    summary = {"out": str(out), "format": fmt, "studies": studies, "subjects": len({p.subject for p in plan}),
               "images": archive.images, "size": size, "per_class": per_class, "per_split": per_split,
               "exclusive_positive": exclusive, "workers": workers, "seconds": round(seconds, 2),
               "studies_per_second": round(studies / max(seconds, 1e-9), 1)}
    (out / MANIFEST).write_text(_manifest(seed, studies, fmt, size, lateral_fraction, fractions, True, summary))
    return summary
