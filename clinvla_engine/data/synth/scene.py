"""The scene a study is projected from: ellipsoids, terms over them, and splatted tubes.

An ellipsoid is a centre and a shape matrix S = R diag(semi^2) R'. A term is
`density * |I1 & I2 & ... - (E1 | E2 | ...)|` along each ray: the length of the intersection of
some ellipsoids minus a union of others (projection.py computes it exactly). Thin structures
(ribs, vessels) are dense 3-D point chains, splatted at render time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

def rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation Rz(az) @ Ry(ay) @ Rx(ax), radians."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame_along(direction: np.ndarray) -> np.ndarray:
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
class Term:
    density: float
    include: tuple[int, ...]  # ellipsoids intersected
    exclude: tuple[int, ...] = ()  # ellipsoids removed
    group: tuple[int, int] | None = None  # (finding index, part) whose layer this is
    view: str | None = None  # drawn on this view only ("frontal" | "lateral"), or on both


class Scene:
    """Ellipsoids (centre, covariance-like shape matrix S = R diag(semi^2) R'), terms, tubes."""

    def __init__(self, pix: float):
        self.pix = pix  # cm per pixel: thin structures are widened to stay visible at small sizes
        self.centers: list[np.ndarray] = []
        self.shapes: list[np.ndarray] = []
        self.terms: list[Term] = []
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
        self.terms.append(Term(density, tuple(include), tuple(exclude), group, view))

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
        """Point masses along tubes (from `segments_to_points`), kept only inside every `inside`
        and no `outside` ellipsoid; splatted at render time with the kernel's cross-section."""
        keep = np.ones(len(points), dtype=bool)
        for k in inside:
            keep &= self.inside(k, points)
        for k in outside:
            keep &= ~self.inside(k, points)
        self.curves.append((points[keep], mass[keep], True, None, kernel))


def segments_to_points(starts: np.ndarray, ends: np.ndarray, mass_per_cm: np.ndarray, step: float):
    """Straight tubes (starts (S, 3) -> ends (S, 3), mass per cm (S,)) as points about `step` cm
    apart, each carrying its share of the mass: (points (M, 3), mass (M,))."""
    length = np.linalg.norm(ends - starts, axis=1)
    counts = np.maximum(1, np.ceil(length / step).astype(int))
    seg = np.repeat(np.arange(len(starts)), counts)
    frac = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + 0.5) / counts[seg]
    return starts[seg] + frac[:, None] * (ends - starts)[seg], (mass_per_cm * length / counts)[seg]
