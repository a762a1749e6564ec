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

Modules (arrows point down the list; none imports one above it)
-------
generate    generate_archive: output folder, rendering workers, files in plan order, manifest
writers     the four format writers (mimic, chexpert, dicom, rsna) and the file claims
planning    studies, patients, class mix, splits, dates and identifiers, from the seed alone
render      render_study: pose, exposure, tone, noise, visibility per view
projection  exact ray lengths through the scene, splats, radiograph processing
findings    the eight findings as 3-D objects; the scene of one study
anatomy     the patient's body as scene objects
scene       ellipsoids, terms and tubes
records     Anatomy, Finding, RenderedStudy, their random draws, the shared constants
"""
from __future__ import annotations

from .generate import MANIFEST, PARALLEL_MIN_STUDIES, SYNTH_VERSION, TRUTH, default_workers, generate_archive
from .planning import FORMATS, GENERATOR, SPLITS
from .records import (
    CLASS_MIX,
    FINDING_LABELS,
    FOV_CM,
    PAIRS,
    VISIBILITY,
    Anatomy,
    Finding,
    RenderedStudy,
    sample_anatomy,
    sample_findings,
)
from .render import render_study, to_uint8
from .writers import FILE_LIST

__all__ = [
    "CLASS_MIX",
    "FILE_LIST",
    "FINDING_LABELS",
    "FORMATS",
    "FOV_CM",
    "GENERATOR",
    "MANIFEST",
    "PAIRS",
    "PARALLEL_MIN_STUDIES",
    "SPLITS",
    "SYNTH_VERSION",
    "TRUTH",
    "VISIBILITY",
    "Anatomy",
    "Finding",
    "RenderedStudy",
    "default_workers",
    "generate_archive",
    "render_study",
    "sample_anatomy",
    "sample_findings",
    "to_uint8",
]
