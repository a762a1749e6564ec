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
upwards; pneumothorax = the lung shrunk towards its base and hilum, leaving an apical/lateral rim
of air without vessels and a thin visceral pleural line; fracture = a cleft and a step in one
rib's posterior arc.

*Findings a reader needs the lateral for* (`records.LATERAL_SITES`, the finding's `site`): a small
pleural effusion is a meniscus in the posterior costophrenic sulcus ("posterior sulcus": wide
across the chest, thin front to back, about 2.5-3 cm high); consolidation or atelectasis placed
"retrocardiac" (left lower lobe behind the heart), "posterior basal" (the lower lobe behind the
diaphragm dome) or, for consolidation, "retrosternal" (anterior upper lobe behind the sternum,
next to the mediastinum). Each is wide along the lateral view's rays and thin along the
frontal's (version 2.1: half-thickness 0.45-0.6 cm, an airless core, 1.6x wider and 1.25x taller than
in 2.0; a small effusion's meniscus 3.4-4.4 cm high), and lies where the frontal sees it through the
heart, the dome or the mediastinum: on
the frontal a faint broad haze (below the visibility threshold; the radiograph processing flattens
broad changes), on the lateral a compact dense opacity. These are the test bed's own geometry,
chosen so that the two views carry different information, as they do in practice. With a lateral
view, 60% of consolidations, 50% of atelectases and every small effusion take such a site
(`SITE_RATE`): about 30% of the finding-positive studies with a lateral hold a lateral-needed
finding. Studies without a lateral get none (a small effusion is drawn moderate), so their reports
still mention only what a view shows. *Frontal-favoured* kinds: rib fractures (always) and apical
pneumothoraces (when the lateral measurably misses the rim, mostly small ones at 128 px).

*Visibility per view* is measured, not assumed: each finding's own contribution is rendered as a
separate layer, and a finding is visible in a view when removing it changes at least 0.4 cm^2 of
the displayed image by more than 8% of the grey range (a rib break, a small sharp edge: 0.12 cm^2
by 3.5%); each view's bounding box (pixels of the written image, `bbox_frontal`, `bbox_lateral`)
covers where it changes that view by more than a quarter of its peak change. One rule overrides the measurement: a rib
fracture is never marked visible on the lateral view, where the ribs of both sides overlap (the
measurement cannot see clutter). In an archive, a finding that no view of its study shows is
redrawn one grade more severe (at most twice), since its report describes it.

*Reports* come from `reports.write_report` (FINDINGS/IMPRESSION with varied wording, negations,
hedges) and the label files follow the report, not the truth: a hedged finding is -1.0. A positive
sentence carries the finding's side, zone/site and size words ("small right posterior pleural
effusion", "moderate retrocardiac left lower lobe consolidation", "left 7th posterior rib
fracture", "large left apical pneumothorax"). About a third of the reports that name a finding's
word negate it (most name it because it is there), about 10% of reports hedge one, and 99.9% fit
in 96 tokens of the `small` preset's tokenizer (median about 42).
`synth_truth.jsonl` keeps what was drawn: label, side, zone, site, severity, visible_frontal,
visible_lateral, `lateral_needed` (placed at a lateral-needed site AND measured visible on the
lateral only), `frontal_favoured` (a fracture or pneumothorax measured visible on the frontal
only), `bbox_frontal`, `bbox_lateral` (null where that view does not show it), `bboxes_frontal` per
side, `rib`, and the study's `view_position`.

*Probe* (`probe.py`, `tools/probe_views.py`): a linear probe (L2 logistic regression on local-contrast
features, cross-fitted by patient) per view setting (frontal, lateral, both) checks whether the
lateral-needed findings are detectable from the lateral and not the frontal, before any contrastive
training; `generate_archive(mix="probe")` writes an archive with enough studies of each stratum.
Measured (synth 2.1, probe mix, 1,500 studies at 128 px): lateral-needed from the lateral AUROC 0.80
[0.78, 0.83], from the frontal 0.56; at 64 px 0.69 vs 0.54 (the lateral band is thin). The
frontal-favoured stratum is not shown by this probe (about 0.6 from either view; it cannot see rib
breaks). See probe.py for the numbers and tests/test_probe_views.py for the bars.

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
