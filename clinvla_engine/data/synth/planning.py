"""The plan of an archive: which studies, patients, classes, views, splits, dates and identifiers.

Everything here is drawn from the seed alone, before any image is rendered, so that the same
arguments give the same archive whichever process renders which study.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from ..archive import FORMATS  # the generator writes every format the loaders read
from .records import CLASS_MIX, FINDING_LABELS, PAIRS

GENERATOR = "clinvla synth"  # in the manifest, and hashed into every DICOM UID
SPLITS = ("train", "validate", "test")
# "archive": CLASS_MIX (the default). "probe": an archive for the per-view probe (probe.py) with many
# studies of each stratum: normal studies, single findings of the kinds that take a lateral-needed
# site (placed at one whenever the study has a lateral: records.sample_findings(lateral_site=True)),
# the frontal-favoured kinds, and a few of the others. Shares of the studies, by stratified counts.
MIXES = ("archive", "probe")
PROBE_MIX = ((0.30, ()), (0.40, ("Consolidation", "Atelectasis", "Pleural Effusion")),
             (0.20, ("Fracture", "Pneumothorax")), (0.10, ("Cardiomegaly", "Edema", "Pneumonia")))


@dataclass
class Planned:
    index: int
    subject: int  # index of the patient
    labels: tuple[str, ...]
    has_lateral: bool
    view_position: str  # of the frontal view: "PA" | "AP"
    split: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS.fff
    ids: dict = field(default_factory=dict)
    lateral_site: bool = False  # place site-able findings at a lateral-needed site (the probe mix)


def check_arguments(studies, fmt, size, lateral_fraction, split_fractions, mix="archive") -> tuple[float, float, float]:
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r} is not a class mix; use one of {', '.join(MIXES)}")
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


def _probe_combos(studies: int) -> list[tuple[str, ...]]:
    """PROBE_MIX by stratified counts: each kind of a group gets an even share of the group's studies."""
    combos: list[tuple[str, ...]] = []
    for k, (share, kinds) in enumerate(PROBE_MIX):
        n = studies - len(combos) if k == len(PROBE_MIX) - 1 else min(int(round(share * studies)),
                                                                      studies - len(combos))
        combos += [(kinds[i % len(kinds)],) if kinds else () for i in range(n)]
    return combos


def plan_studies(studies: int, seed: int, fmt: str, lateral_fraction: float, fractions,
                 mix: str = "archive") -> list[Planned]:
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
    if mix == "probe":
        combos = _probe_combos(studies)
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
        plan.append(Planned(k, subject, tuple(combos[k]), bool(lateral[k]), view, SPLITS[split_of_subject[subject]],
                             str(day).replace("-", ""),
                             f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{millis:03d}",
                             lateral_site=mix == "probe"))
    _assign_ids(plan, len(counts), seed, fmt)
    return plan


def _assign_ids(plan: list[Planned], subjects: int, seed: int, fmt: str) -> None:
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
            p.ids["study_id"] = dicom_uid(seed, study, "study")


def dicom_uid(seed: int, *parts: str) -> str:
    from pydicom.uid import generate_uid  # deterministic: a hash of the seed and the parts

    return str(generate_uid(entropy_srcs=[GENERATOR, str(seed), *parts]))
