"""Rendering one study: pose, projection, exposure, tone curve, noise, and what each view shows.

A finding is visible in a view when removing its layer changes enough of the displayed image
(`VISIBILITY`); its box in each view that shows it (frontal, lateral) covers where it changes the
image by more than a quarter of its peak change.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from .findings import build_scene
from .projection import project
from .records import FOV_CM, GRADE_SEVERITY, SIZE_SEVERITY, SIZED, VISIBILITY, Anatomy, Finding, RenderedStudy
from .scene import rotation

def _tone(x: np.ndarray, lo: float, hi: float, gamma: float) -> np.ndarray:
    """Window [lo, hi] -> [0, 1] through a soft S-curve (half linear, half smoothstep) and a gamma."""
    d = np.clip((x - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    s = d * (0.5 + d * (1.5 - d))  # 0.5 d + 0.5 (3 d^2 - 2 d^3)
    return s if gamma == 1.0 else s**gamma


def _pose(rng: np.random.Generator, view: str, scale: float, ap: bool) -> tuple[np.ndarray, np.ndarray]:
    turn = rng.normal(0, 0.05 if ap else 0.035)
    tilt = rng.normal(0, 0.025)
    rot = rotation(az=tilt) @ rotation(ay=turn) if view == "frontal" else rotation(ax=tilt) @ rotation(ay=turn)
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
    sc, _ = build_scene(anatomy, list(findings), inspiration, pix)
    scale = rng.uniform(0.95, 1.05)
    images: dict[str, np.ndarray] = {}
    vis: dict[str, dict] = {}
    for view in ("frontal", "lateral") if lateral else ("frontal",):
        pose, shift = _pose(rng, view, scale, ap)
        processing = {"blur": rng.uniform(0.5, 0.9), "wide_cm": rng.uniform(4.0, 6.0),
                      "compress": rng.uniform(0.35, 0.5), "narrow_cm": rng.uniform(0.6, 1.0),
                      "detail": rng.uniform(0.4, 0.8)}
        image, layers = project(sc, view, pose, shift, size, processing)
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
        visible_lateral = f.label != "Fracture" and any(v for v, _ in side)
        out.append(replace(f, visible_frontal=any(v for v, _ in front), visible_lateral=visible_lateral,
                           bbox_frontal=_union(boxes), bboxes_frontal=boxes,
                           bbox_lateral=_union([b for v, b in side if v and b]) if visible_lateral else None))
    return RenderedStudy(images["frontal"], images.get("lateral"), out, view_position)


def _union(boxes) -> tuple[int, int, int, int] | None:
    """The box (x, y, w, h) around boxes, or None for none."""
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return x0, y0, x1 - x0, y1 - y0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Display values in [0, 1] -> 8-bit grey."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _more_severe(f: Finding) -> Finding:
    scale = SIZE_SEVERITY if f.label in SIZED else GRADE_SEVERITY
    if f.severity in scale[:-1]:
        # a larger effusion no longer fits the posterior sulcus: it is an ordinary one
        site = None if f.site == "posterior sulcus" else f.site
        return replace(f, severity=scale[scale.index(f.severity) + 1], site=site)
    return replace(f, detail=f.detail + 1)  # already the most severe: another geometry


def render_visible(anatomy: Anatomy, findings: list[Finding], size: int, rng_seed: list, lateral: bool,
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
