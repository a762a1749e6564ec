"""The synthetic archive's records and their random draws: patients, findings, rendered studies.

Anatomy is one patient's body (every study of the patient is rendered from it); Finding is one
drawn finding, which `render_study` fills in with what each view shows. The class mix and the
constants the scene is built from live here because the planner, the scene and the renderer all
read them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..study import CLASSES

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
SIZE_SEVERITY = ("small", "moderate", "large")
GRADE_SEVERITY = ("mild", "moderate", "severe")
# graded small|moderate|large; the other findings mild|moderate|severe
SIZED = ("Consolidation", "Pleural Effusion", "Pneumothorax")
SIDE_SIGN = {"right": -1, "left": 1}
# Placements a reader needs the lateral view for (Finding.site), by class: on the frontal they lie
# behind the heart, behind the diaphragm dome or over the mediastinum, thin along the frontal rays.
LATERAL_SITES = {"retrocardiac": ("Consolidation", "Atelectasis"),
                 "posterior basal": ("Consolidation", "Atelectasis"),
                 "posterior sulcus": ("Pleural Effusion",),
                 "retrosternal": ("Consolidation",)}
# Kinds the frontal view shows best: a break in a posterior rib arc (the ribs of both sides overlap on
# the lateral) and an apical pneumothorax (the raised arms and shoulders cover the apices there)
FRONTAL_FAVOURED = ("Fracture", "Pneumothorax")
# With a lateral view: the share of each class drawn at a lateral-needed site (a small pleural
# effusion always lies in the posterior sulcus); about 30% of finding-positive studies then hold one
SITE_RATE = {"Consolidation": 0.6, "Atelectasis": 0.5}

# A finding is visible in a view when removing it changes at least AREA cm^2 of the displayed image
# by more than DELTA (a fraction of the grey range): enough to stand out of rib and vessel clutter.
# A break in a rib is a small sharp edge, which the eye catches at a lower contrast than a haze.
VISIBILITY = {"default": (0.08, 0.4), "Fracture": (0.035, 0.12)}  # label -> (DELTA, AREA cm^2)


@dataclass(frozen=True)
class Finding:
    """One drawn finding. visible_* and bbox_* are filled in by `render_study`."""

    label: str  # one of CLASSES[1:]
    side: str | None = None  # "left" | "right" | "bilateral" | None (cardiomegaly)
    zone: str | None = None  # "upper" | "middle" | "lower" | None
    severity: str = "moderate"  # small|moderate|large (effusion, pneumothorax, consolidation) or mild|moderate|severe
    rib: int | None = None  # the broken rib (4-9) of a fracture
    detail: int = 0  # seeds the finding's exact geometry
    # where in the zone, for the placements a reader needs the lateral view for (LATERAL_SITES) or
    # the frontal-favoured ones ("apical" pneumothorax, "posterior" rib arc); None: anywhere in the zone
    site: str | None = None
    visible_frontal: bool | None = None
    visible_lateral: bool | None = None
    bbox_frontal: tuple[int, int, int, int] | None = None  # x, y, w, h in pixels of the frontal image
    bboxes_frontal: tuple[tuple[int, int, int, int], ...] = ()  # one per side for bilateral findings
    bbox_lateral: tuple[int, int, int, int] | None = None  # x, y, w, h in pixels of the lateral image

    @property
    def lateral_needed(self) -> bool:
        """Placed where only the lateral shows it, and the measured visibility agrees."""
        return self.site in LATERAL_SITES and bool(self.visible_lateral) and not self.visible_frontal

    @property
    def frontal_favoured(self) -> bool:
        """A finding of a frontal-favoured kind that the frontal view shows and the lateral does not."""
        return self.label in FRONTAL_FAVOURED and bool(self.visible_frontal) and not self.visible_lateral

    def truth(self) -> dict:
        return {"label": self.label, "side": self.side, "zone": self.zone, "site": self.site,
                "severity": self.severity,
                "visible_frontal": bool(self.visible_frontal), "visible_lateral": bool(self.visible_lateral),
                "lateral_needed": self.lateral_needed, "frontal_favoured": self.frontal_favoured,
                "bbox_frontal": list(self.bbox_frontal) if self.bbox_frontal else None,
                "bboxes_frontal": [list(b) for b in self.bboxes_frontal],
                "bbox_lateral": list(self.bbox_lateral) if self.bbox_lateral else None, "rib": self.rib}


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
                    lateral: bool = True, lateral_site: bool = False) -> list[Finding]:
    """Findings for one study.

    labels: the classes to draw ("No Finding" or an empty list gives no findings); None draws them
    from `CLASS_MIX`. Side, zone, severity and geometry are random. With a lateral view, some
    consolidations, atelectases and small effusions are placed where only the lateral shows them
    (`SITE_RATE`, `LATERAL_SITES`); without one, none are, and a small pleural effusion (which lies in
    the posterior sulcus, seen only on the lateral) is drawn as moderate, so that the report, which
    mentions only what a view shows, can mention it.

    lateral_site (with a lateral view; a probe archive's mix): every consolidation and atelectasis
    takes a lateral-needed site and every effusion is small (in the posterior sulcus). Without it the
    draws are exactly those of synth 2.0's sampler (the site decision still draws its number).
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
        rib, site = None, None
        if label == "Cardiomegaly":
            side, zone, severity = None, None, rng.choice(GRADE_SEVERITY, p=(0.4, 0.4, 0.2))
        elif label == "Edema":
            side, zone, severity = "bilateral", None, rng.choice(GRADE_SEVERITY, p=(0.4, 0.4, 0.2))
        elif label == "Pleural Effusion":
            side = "bilateral" if rng.random() < 0.2 else side
            zone, severity = "lower", rng.choice(SIZE_SEVERITY, p=(0.45, 0.35, 0.2))
            if lateral and lateral_site:
                severity = "small"
            if severity == "small" and not lateral:
                severity = "moderate"
            if severity == "small":  # a small effusion collects in the posterior costophrenic sulcus
                side, site = side if side != "bilateral" else ("left" if rng.random() < 0.5 else "right"), \
                    "posterior sulcus"
        elif label == "Atelectasis":
            side = "bilateral" if rng.random() < 0.25 else side
            zone = "lower" if side == "bilateral" or rng.random() < 0.8 else "middle"
            severity = rng.choice(GRADE_SEVERITY, p=(0.45, 0.4, 0.15))
            if lateral and (rng.random() < SITE_RATE["Atelectasis"] or lateral_site):
                site = "retrocardiac" if rng.random() < 0.5 else "posterior basal"
                side, zone = ("left" if site == "retrocardiac" else side if side != "bilateral" else "right"), "lower"
        elif label == "Consolidation":
            severity = rng.choice(SIZE_SEVERITY, p=(0.3, 0.45, 0.25))
            if lateral and (rng.random() < SITE_RATE["Consolidation"] or lateral_site):
                site = ("retrocardiac", "posterior basal", "retrosternal")[int(rng.choice(3, p=(0.4, 0.4, 0.2)))]
                side = "left" if site == "retrocardiac" else side
                zone = "upper" if site == "retrosternal" else "lower"
        elif label == "Pneumonia":
            side = "bilateral" if rng.random() < 0.15 else side
            severity = rng.choice(GRADE_SEVERITY, p=(0.3, 0.45, 0.25))
        elif label == "Pneumothorax":
            zone, site, severity = "upper", "apical", rng.choice(SIZE_SEVERITY, p=(0.5, 0.3, 0.2))
        else:  # Fracture
            rib, site = int(rng.integers(4, 10)), "posterior"
            zone = "upper" if rib <= 4 else "middle" if rib <= 7 else "lower"
            severity = rng.choice(GRADE_SEVERITY, p=(0.35, 0.4, 0.25))
        out.append(Finding(label, side, zone, str(severity), rib, int(rng.integers(2**31)), site))
    return out
