"""One patient's body as scene objects: soft tissue, lungs, heart, diaphragm, airways, bones, vessels.

Patient coordinates in cm: x towards the patient's left, y caudal, z anterior (see the package
docstring for the whole design). The rib paths are kept in `g["ribs"]` and drawn only after the
findings, since a fracture replaces one of them.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .records import AIRLESS, MU_BONE, MU_TISSUE, Anatomy
from .scene import Scene, frame_along, rotation, segments_to_points

def _lung_geometry(a: Anatomy, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and semi-axes of the lung on side s (-1 right, +1 left)."""
    center = np.array((s * 7.3 * a.width + (0.3 if s > 0 else 0.0), 2.5 * a.height, -1.8 * a.depth))
    return center, np.array((6.0 * a.width, 17.5 * a.height, 8.2 * a.depth))


def build_anatomy(sc: Scene, a: Anatomy, inspiration: float) -> dict:
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
        raised = sc.ell((s * 7.0 * W, -17.0, 3.0 * D), (4.0, 7.0, 4.2), rotation(ax=0.5))  # arms up, lateral view
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

    heart_rot = rotation(ay=0.15, az=0.52)
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
    sc.add(-MU_TISSUE, [sc.ell((0.4, -12.5, 0.0), (0.85, 9.5, 0.85), rotation(ax=0.12))])
    carina = np.array((0.4, -3.2 * H, -1.0))
    for s in (-1, 1):
        end = np.array((s * 4.2, 0.2 * H + (0.8 if s < 0 else 0.0), -1.6))
        d = end - carina
        bronchus = sc.ell(carina + d / 2, (0.55, np.linalg.norm(d) / 2, 0.55), frame_along(d))
        sc.add(-MU_TISSUE, [bronchus], [g["lung"][s]])
    # Spine and sternum.
    for k in range(15):
        y = -18.0 + k * 2.75 * H
        sc.add(MU_BONE * 0.28, [sc.ell((0.0, y, -6.2 * D), (2.1, 1.25 * H, 1.8))])
        sc.add(MU_BONE * 0.3, [sc.ell((0.0, y + 0.5, -8.8 * D), (2.6, 0.8, 0.95))])
    sc.add(MU_BONE * 0.8, [sc.ell((0.0, -9.8 * H, 9.2 * D), (2.2, 2.4, 0.7))])
    sc.add(MU_BONE * 0.8, [sc.ell((0.0, -1.8 * H, 9.8 * D), (1.4, 5.6 * H, 0.6), rotation(ax=-0.1))])
    _add_ribs(sc, a, g)
    return g


RIB_RADIUS = 0.55  # cm, outer radius of the rib cross-section
_RIB_MASS = MU_BONE * math.pi * RIB_RADIUS**2 * 0.4  # per cm: a cortical shell around marrow


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


def _add_ribs(sc: Scene, a: Anatomy, g: dict) -> None:
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
    return segments_to_points(starts, ends, mass, step)


def add_vessels(sc: Scene, a: Anatomy, g: dict) -> None:
    """Pulmonary arteries at each hilum and the vessel tree, clipped in 3-D to the (possibly
    collapsed) lung and kept out of the heart, mediastinum and dome."""
    for s in (-1, 1):
        hilum = np.array((s * 4.6 * a.width, 0.6 * a.height, -1.4))
        clip, excl = [g["vessel_clip"][s]], [g["heart_ex"], g["medi"], g["dome"][s]]
        sc.add(AIRLESS, [sc.ell(hilum, (1.4, 2.4, 1.3), rotation(az=-s * 0.3)), clip[0]], excl[:2])
        points, mass = _vessel_tree(a, s, min(0.3, 0.7 * sc.pix))
        sc.points(points, mass, "vessel", inside=clip, outside=excl)
