"""The eight findings as 3-D objects added to a patient's scene, and the scene of one study.

Each finding adds terms tagged with its layer `(finding index, part)`, so that the renderer can
measure what the finding alone changes in each view.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..study import CLASSES
from .anatomy import add_vessels, build_anatomy
from .records import AIRLESS, MU_PARENCHYMA, SIDE_SIGN, Anatomy, Finding
from .scene import Scene, frame_along, rotation

def _zone_point(sc: Scene, g: dict, s: int, zone: str, rng: np.random.Generator, margin: float = 1.5) -> np.ndarray:
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
    return [-1, 1] if f.side == "bilateral" else [SIDE_SIGN[f.side or "right"]]


def _clip_lung(sc: Scene, g: dict, s: int, density: float, objects: Sequence[int], group) -> None:
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


# Lateral-needed placements (records.LATERAL_SITES): an opacity wide across the chest (along the
# lateral view's rays) and thin front to back (along the frontal's), in lung that the frontal view
# sees through the heart, the diaphragm dome or the mediastinum. On the frontal it is a faint, broad
# haze over a dense shadow, which the radiograph processing flattens further; on the lateral a
# compact dense opacity (over the lower spine, in the posterior sulcus, in the retrosternal space).
SITE_OPACITY = ("retrocardiac", "posterior basal", "retrosternal")
# The opacity's half-thickness front to back (cm), the density of its airless core and of its soft
# margin (fractions of AIRLESS), and how far it may tilt out of the coronal plane (radians at gain 1).
# Thin and fully airless so that the frontal sees little more than a faint broad haze (peak change
# about 0.05 of the grey range, below VISIBILITY) while the lateral shows 0.16-0.30 at 64 px;
# measured on same-patient, same-pose pairs with and without the finding (probe.py's docstring).
SITE_THICKNESS = (0.45, 0.6)
SITE_DENSITY = (1.0, 0.1)
SITE_TILT = 0.06
SITE_DEPTH = {"retrocardiac": -0.62, "posterior basal": -0.8, "retrosternal": 0.62}  # centre z / lung semi z
SITE_SPREAD = (1.6, 1.25)  # scales the half-width across the chest (x) and the half-height (y)
SITE_GAIN = {"Consolidation": {"small": 0.8, "moderate": 1.0, "large": 1.2},
             "Atelectasis": {"mild": 0.8, "moderate": 1.0, "severe": 1.2}}


def _site_center(g: dict, s: int, site: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(centre, semi-axes) of a lateral-needed opacity on side s at this site."""
    c, semi = g["lung_center"][s], g["lung_semi"][s]
    top = g["dome_top"][s]
    if site == "retrocardiac":  # left lower lobe, medial, behind the heart, above the dome
        p = (c[0] - s * 0.45 * semi[0], top - rng.uniform(2.2, 3.2), c[2] + SITE_DEPTH[site] * semi[2])
        half = (rng.uniform(3.2, 3.8), rng.uniform(2.4, 3.0), rng.uniform(*SITE_THICKNESS))
    elif site == "posterior basal":  # posterior basal segment: the lung behind and below the dome top
        p = (c[0] + s * rng.uniform(-0.1, 0.15) * semi[0], top + rng.uniform(0.2, 1.0), c[2] + SITE_DEPTH[site] * semi[2])
        half = (rng.uniform(3.4, 4.0), rng.uniform(2.4, 3.0), rng.uniform(*SITE_THICKNESS))
    else:  # retrosternal: anterior lung just behind the sternum, next to the midline
        p = (c[0] - s * 0.72 * semi[0], c[1] - 0.3 * semi[1] + rng.uniform(-1.0, 1.0), c[2] + SITE_DEPTH[site] * semi[2])
        half = (rng.uniform(3.2, 3.8), rng.uniform(3.0, 3.6), rng.uniform(*SITE_THICKNESS))
    return np.array(p), np.array(half) * (SITE_SPREAD[0], SITE_SPREAD[1], 1.0)


def _add_site_opacity(sc, g, f, rng, i) -> None:
    s = _sides(f)[0]
    p, half = _site_center(g, s, f.site, rng)
    gain = SITE_GAIN[f.label].get(f.severity, 1.0)
    core = sc.ell(p, half * gain, rotation(*rng.uniform(-SITE_TILT, SITE_TILT, 3)))
    _clip_lung(sc, g, s, AIRLESS * SITE_DENSITY[0], [core], (i, 0))
    rim = sc.ell(p + rng.normal(0, 0.25, 3) * (1.0, 1.0, 0.5), half * gain * (1.25, 1.2, 1.0),
                 rotation(*rng.uniform(-1.6 * SITE_TILT, 1.6 * SITE_TILT, 3)))
    _clip_lung(sc, g, s, AIRLESS * SITE_DENSITY[1], [rim], (i, 0))  # a soft margin


def _add_consolidation(sc, g, f, rng, i):
    if f.site in SITE_OPACITY:
        return _add_site_opacity(sc, g, f, rng, i)
    s = _sides(f)[0]
    p = _zone_point(sc, g, s, f.zone or "lower", rng)
    size = {"small": 1.9, "moderate": 3.0, "large": 4.4}[f.severity] * rng.uniform(0.9, 1.1)
    semi = size * rng.uniform(0.8, 1.2, 3)
    rot = rotation(*rng.uniform(-0.4, 0.4, 3))
    inner = sc.ell(p, semi * 0.8, rot)
    _clip_lung(sc, g, s, AIRLESS * 0.45, [inner], (i, 0))
    for _ in range(4):  # soft, lobulated margins
        lobe = sc.ell(p + rng.normal(0, 0.35, 3) * semi, semi * rng.uniform(0.6, 0.9, 3),
                      rotation(*rng.uniform(-1, 1, 3)))
        _clip_lung(sc, g, s, AIRLESS * 0.13, [lobe], (i, 0))
    if f.severity != "small":  # air bronchograms inside the dense core
        for _ in range(2):
            d = rng.normal(size=3)
            r, dens = sc.thin(0.22, -AIRLESS * 0.6)
            sc.add(dens, [sc.ell(p + rng.normal(0, 0.4, 3), (r, size * 0.7, r), frame_along(d)), inner], (), (i, 0))


def _add_pneumonia(sc, g, f, rng, i):
    n, spread = {"mild": (10, 1.3), "moderate": (16, 1.8), "severe": (24, 2.4)}[f.severity]
    for part, s in enumerate(_sides(f)):
        p = _zone_point(sc, g, s, f.zone or "lower", rng)
        for _ in range(n):  # a patchy cluster of overlapping blobs; overlap makes the soft margins
            q = p + rng.normal(0, spread, 3) * (1.0, 0.8, 1.0)
            semi = rng.uniform(0.6, 1.5, 3)
            _clip_lung(sc, g, s, AIRLESS * 0.28, [sc.ell(q, semi, rotation(*rng.uniform(-1, 1, 3)))], (i, part))


def _add_atelectasis(sc, g, f, rng, i):
    if f.site in SITE_OPACITY:
        return _add_site_opacity(sc, g, f, rng, i)
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
                           rotation(ax=rng.uniform(-0.2, 0.2), az=s * rng.uniform(0.05, 0.25)))
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


# a small effusion's fluid in the posterior costophrenic sulcus: (forward offset of the gutter cm,
# its half-thickness front to back cm, the meniscus height above the sulcus floor cm, the gutter's
# half-height cm)
GUTTER = (0.2, 0.55, (3.4, 4.4), 4.2)


def _add_effusion(sc, g, f, rng, i):
    depth = {"small": GUTTER[2], "moderate": (6.0, 7.5), "large": (10.5, 13.0)}[f.severity]
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
            space.append(sc.ell(bottom + (0.0, 0.0, GUTTER[0]), (0.95 * semi[0], GUTTER[3], GUTTER[1])))
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


def build_scene(a: Anatomy, findings: Sequence[Finding], inspiration: float, pix: float) -> tuple[Scene, dict]:
    sc = Scene(pix)
    g = build_anatomy(sc, a, inspiration)
    g.update(heart_ex=g["heart"], vessel_clip=dict(g["lung"]), broken_ribs={})
    order = sorted(range(len(findings)), key=lambda j: findings[j].label != "Cardiomegaly")  # heart first
    for j in order:
        f = findings[j]
        _BUILDERS[f.label](sc, g, f, np.random.default_rng([a.seed, f.detail, CLASSES.index(f.label)]), j)
    add_vessels(sc, a, g)
    intact = [v for key, v in g["ribs"].items() if key not in g["broken_ribs"]]
    sc.curves.append((np.concatenate([p for p, _, _ in intact]), np.concatenate([m for _, m, _ in intact]),
                      True, None, "rib"))
    for key, (points, mass, group) in g["broken_ribs"].items():
        sc.curves.append((points, mass, True, None, "rib"))
        sc.curves.append((points, mass, False, group, "rib"))  # the finding's layer: broken minus intact
        sc.curves.append((g["ribs"][key][0], -g["ribs"][key][1], False, group, "rib"))
    return sc, g
