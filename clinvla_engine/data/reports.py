"""Radiology report text for synthetic studies, and the CheXpert-style labels that follow from it.

A report is built from mentions. Each mention is one sentence about one or more CheXpert
observations with a value that the sentence itself carries:

* a present finding is described positively (1.0) with its severity and location words
  ("small right pleural effusion", "moderate cardiomegaly", "patchy opacity in the right lower
  lobe consistent with pneumonia"), or, now and then, with a hedge ("possible", "cannot exclude",
  "may represent", "concerning for") that makes it uncertain (-1.0);
* some absent findings are negated (0.0): "No pneumothorax.", "No focal consolidation, pleural
  effusion, or pneumothorax.", "Heart size is normal.";
* normal statements that name no observation ("The lungs are clear.", "No acute cardiopulmonary
  process.") leave every column blank.

The labels are read off the mentions, so they follow the text by construction: positive 1.0,
negated 0.0, uncertain -1.0, not mentioned blank (NaN); "No Finding" is 1.0 only when no
observation is positive or uncertain. The wording avoids the cross-talk a rule-based labeller
would trip on (a pneumonia sentence never says "consolidation", a hedge word never appears in a
positive sentence), so a model that learns text-image alignment learns the classes, not the
templates' accidents.

The evaluation's text queries and zero-shot prompts live with evaluation
(clinvla_engine/eval_prompts.py), not here: evaluation owns its prompts.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .study import CHEXPERT_COLUMNS, CLASSES

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
BLANK = math.nan

# Column order of MIMIC-CXR's mimic-cxr-2.0.0-chexpert.csv (alphabetical), after subject_id, study_id.
MIMIC_LABEL_COLUMNS = tuple(sorted(CHEXPERT_COLUMNS))

# Words that mark a sentence as uncertain; a positive or negated sentence never contains one.
UNCERTAIN_CUES = ("possible", "possibly", "cannot exclude", "may represent", "may reflect",
                  "concerning for", "questionable", "borderline")


class FindingLike(Protocol):
    """What the report writer needs of a finding (synth.Finding satisfies it)."""

    label: str
    side: str | None  # "left" | "right" | "bilateral" | None
    zone: str | None  # "upper" | "middle" | "lower" | None
    severity: str  # small|moderate|large or mild|moderate|severe
    rib: int | None  # rib number for fractures
    # optional: "retrocardiac" | "posterior basal" | "retrosternal" | "posterior sulcus" | "apical" |
    # "posterior" | None (read with getattr, so objects without it are described without a site)


@dataclass(frozen=True)
class Mention:
    """One sentence of a report and the value it gives to each observation it names."""

    text: str
    section: str  # "findings" | "impression"
    values: tuple[tuple[str, float], ...] = ()  # ((CheXpert column, 1.0 | 0.0 | -1.0), ...)


@dataclass(frozen=True)
class Report:
    """FINDINGS and IMPRESSION prose, the mentions they are made of, and the labels they imply."""

    findings: str
    impression: str
    mentions: tuple[Mention, ...]
    labels: dict  # all 14 CHEXPERT_COLUMNS -> 1.0 | 0.0 | -1.0 | NaN (blank)

    def text(self) -> str:
        """The report as the DICOM loader rebuilds it from a Basic Text SR."""
        return f"FINDINGS: {self.findings}\nIMPRESSION: {self.impression}"


# ---- vocabulary -------------------------------------------------------------------------------
_LOBES = {
    ("right", "upper"): ("right upper lobe", "right upper lung", "right apex"),
    ("right", "middle"): ("right middle lobe", "right mid lung"),
    ("right", "lower"): ("right lower lobe", "right lung base", "right base"),
    ("left", "upper"): ("left upper lobe", "left upper lung", "left apex"),
    ("left", "middle"): ("left lingula", "left mid lung"),  # the side word always appears
    ("left", "lower"): ("left lower lobe", "left lung base", "left base"),
}
_BILATERAL_ZONE = {"upper": "both upper lungs", "middle": "both mid lungs", "lower": "both lung bases"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def _ordinal(n: int) -> str:
    return _ORDINAL.get(n, f"{n}th")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _location(rng: np.random.Generator, side: str | None, zone: str | None) -> str:
    if side == "bilateral":
        return _BILATERAL_ZONE.get(zone or "lower", "both lungs")
    return _pick(rng, _LOBES[(side or "right", zone or "lower")])


# Lateral-needed sites of an opacity: the words that place it (the side fills in)
_SITE_WHERE = {"retrocardiac": "retrocardiac {side} lower lobe", "posterior basal": "posterior basal {side} lower lobe",
               "retrosternal": "retrosternal {side} upper lobe"}


def _site(f: FindingLike) -> str | None:
    return getattr(f, "site", None)


def _severity_word(rng: np.random.Generator, severity: str, label: str = "") -> str:
    if severity == "small":
        return _pick(rng, {"Pleural Effusion": ("small", "small", "trace"),
                           "Pneumothorax": ("small", "small", "tiny")}.get(label, ("small",)))
    if severity == "large":
        return _pick(rng, ("large", "large", "sizable"))
    return severity


# ---- sentences per finding ----------------------------------------------------------------------
def _positive(f: FindingLike, rng: np.random.Generator, has_lateral: bool) -> tuple[str, str]:
    """(findings sentence, impression sentence) that state the finding as present."""
    sev, side = f.severity, f.side
    sevw = _severity_word(rng, sev, f.label)
    loc = _location(rng, side, f.zone)
    if f.label == "Pleural Effusion":
        if side == "bilateral":
            body = _pick(rng, (f"There are {sevw} bilateral pleural effusions.",
                               f"{_cap(sevw)} bilateral pleural effusions are present.",
                               f"{_cap(sevw)} bilateral pleural effusions, right greater than left."))
            return body, f"{_cap(sevw)} bilateral pleural effusions."
        if _site(f) == "posterior sulcus":  # seen only on the lateral: a meniscus in the posterior sulcus
            body = _pick(rng, (f"{_cap(sevw)} {side} posterior pleural effusion in the posterior costophrenic "
                               "sulcus on the lateral view.",
                               f"A {sevw} {side} pleural effusion layers in the posterior costophrenic sulcus on "
                               "the lateral view.",
                               f"There is a {sevw} {side} posterior pleural effusion, seen only on the lateral view."))
            return body, _pick(rng, (f"{_cap(sevw)} {side} posterior pleural effusion.",
                                     f"{_cap(side)} posterior pleural effusion, {sevw}."))
        options = [f"There is a {sevw} {side} pleural effusion.", f"{_cap(sevw)} {side} pleural effusion.",
                   f"A {sevw} {side} pleural effusion is present."]
        if sev == "small":
            options.append(f"Blunting of the {side} costophrenic angle reflects a {sevw} pleural effusion.")
        else:
            options.append(f"{_cap(sevw)} {side} pleural effusion with a meniscus along the lateral chest wall.")
        return _pick(rng, options), _pick(rng, (f"{_cap(sevw)} {side} pleural effusion.",
                                                f"{_cap(side)} pleural effusion, {sevw}."))
    if f.label == "Cardiomegaly":
        adv = _ADVERB[sev]
        body = _pick(rng, (f"{_cap(sev)} cardiomegaly.", f"The heart is {adv} enlarged.",
                           f"The cardiac silhouette is {adv} enlarged.",
                           f"There is {sev} enlargement of the cardiac silhouette."))
        return body, _pick(rng, (f"{_cap(sev)} cardiomegaly.", f"{_cap(sev)} enlargement of the cardiac silhouette."))
    if f.label == "Edema":
        body = {
            "mild": ("Mild pulmonary edema.", "Mild interstitial edema with prominent interstitial markings.",
                     "Mild pulmonary vascular congestion and interstitial edema."),
            "moderate": ("Moderate pulmonary edema with perihilar haziness and Kerley B lines.",
                         "Perihilar haziness and interstitial lines consistent with moderate pulmonary edema.",
                         "There is moderate interstitial pulmonary edema."),
            "severe": ("Severe pulmonary edema with bilateral perihilar airspace opacities.",
                       "Diffuse perihilar haziness and interstitial lines consistent with severe pulmonary edema."),
        }[sev]
        return _pick(rng, body), _pick(rng, (f"{_cap(sev)} pulmonary edema.", f"{_cap(sev)} pulmonary edema."))
    if f.label == "Consolidation":
        if _site(f) in _SITE_WHERE:
            where = _SITE_WHERE[_site(f)].format(side=side)
            body = _pick(rng, (f"{_cap(sevw)} {where} opacity consistent with consolidation on the lateral view.",
                               f"There is a {sevw} {where} consolidation, seen on the lateral view."))
            return body, _pick(rng, (f"{_cap(sevw)} {where} consolidation.", f"{_cap(where)} consolidation, {sevw}."))
        size = {"small": f"{sevw} focal", "moderate": "moderate focal", "large": f"{sevw} dense"}[sev]
        extra = " with air bronchograms" if sev != "small" and rng.random() < 0.5 else ""
        body = _pick(rng, (f"There is {size} consolidation in the {loc}{extra}.",
                           f"{_cap(size)} consolidation of the {loc}{extra}.",
                           f"{_cap(size)} airspace consolidation in the {loc}{extra}."))
        return body, _pick(rng, (f"{_cap(sevw)} {loc} consolidation.", f"{_cap(size)} consolidation in the {loc}."))
    if f.label == "Pneumonia":
        if side == "bilateral":
            body = _pick(rng, (f"{_cap(sev)} patchy airspace opacities in {loc} consistent with multifocal pneumonia.",
                               f"Bilateral patchy opacities compatible with {sev} multifocal pneumonia."))
            return body, _pick(rng, (f"{_cap(sev)} multifocal pneumonia.", f"{_cap(sev)} bilateral pneumonia."))
        body = _pick(rng, (f"{_cap(sev)} patchy opacity in the {loc} consistent with pneumonia.",
                           f"{_cap(sev)} patchy airspace opacities in the {loc} compatible with pneumonia.",
                           f"There is {sev} patchy opacification of the {loc} consistent with pneumonia."))
        return body, _pick(rng, (f"{_cap(sev)} {loc} pneumonia.", f"Findings consistent with {sev} {loc} pneumonia."))
    if f.label == "Atelectasis":
        if _site(f) in _SITE_WHERE:
            where = _SITE_WHERE[_site(f)].format(side=side)
            body = _pick(rng, (f"{_cap(sev)} {where} opacity consistent with atelectasis on the lateral view.",
                               f"There is {sev} {where} atelectasis, seen on the lateral view."))
            return body, _pick(rng, (f"{_cap(sev)} {where} atelectasis.", f"{_cap(where)} atelectasis, {sev}."))
        lift = ""
        if sev in ("moderate", "severe") and f.zone == "lower":  # the raised dome the renderer draws
            amount = "mild" if sev == "moderate" else "moderate"
            where = "both hemidiaphragms" if side == "bilateral" else f"the {side} hemidiaphragm"
            lift = f" with {amount} elevation of {where}"
        if side == "bilateral":
            body = _pick(rng, (f"{_cap(sev)} bibasilar atelectasis{lift}.",
                               f"{_cap(sev)} bibasilar plate-like atelectasis{lift}."))
            return body, f"{_cap(sev)} bibasilar atelectasis."
        if f.zone == "lower":
            body = _pick(rng, (f"{_cap(sev)} plate-like atelectasis at the {side} lung base{lift}.",
                               f"{_cap(sev)} {side} basilar atelectasis{lift}.",
                               f"{_cap(sev)} linear atelectasis in the {loc}{lift}."))
        else:
            body = _pick(rng, (f"{_cap(sev)} linear atelectasis in the {loc}.",
                               f"{_cap(sev)} subsegmental atelectasis in the {loc}."))
        first = f"{_cap(sev)} {side} basilar atelectasis." if f.zone == "lower" else f"{_cap(sev)} atelectasis, {loc}."
        return body, _pick(rng, (first, f"{_cap(sev)} atelectasis in the {loc}."))
    if f.label == "Pneumothorax":
        # the renderer drops the lung from the apex and the lateral wall: always an apical pneumothorax
        body = _pick(rng, (f"There is a {sevw} {side} apical pneumothorax.",
                           f"{_cap(sevw)} {side} apical pneumothorax with a visible pleural line.",
                           f"A {sevw} {side} apical pneumothorax is noted."))
        return body, _pick(rng, (f"{_cap(sevw)} {side} apical pneumothorax.", f"{_cap(side)} apical pneumothorax, {sevw}."))
    if f.label == "Fracture":
        rib = _ordinal(f.rib or 7)
        kind = {"mild": "Nondisplaced", "moderate": "Minimally displaced", "severe": "Displaced"}[sev]
        step = " with a step-off" if sev == "severe" else ""
        # the renderer breaks the posterior arc
        body = _pick(rng, (f"{kind} fracture of the {side} {rib} posterior rib{step}.",
                           f"{kind} {side} {rib} posterior rib fracture{step}."))
        return body, _pick(rng, (f"{kind} {side} {rib} posterior rib fracture.",
                                 f"{_cap(side)} {rib} posterior rib fracture, {kind.lower()}."))
    raise ValueError(f"no report template for finding label {f.label!r}; expected one of {', '.join(CLASSES[1:])}")


def _uncertain(f: FindingLike, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression sentence) that hedge: the label becomes -1.0."""
    side, loc = f.side, _location(rng, f.side, f.zone)
    side_w = "bilateral" if side == "bilateral" else side
    if f.label == "Pleural Effusion":
        body = _pick(rng, (f"Possible small {side_w} pleural effusion.",
                           f"Blunting of the {side_w} costophrenic angle may represent a small effusion.",
                           f"Cannot exclude a small {side_w} pleural effusion."))
        return body, f"Possible {side_w} pleural effusion."
    if f.label == "Cardiomegaly":
        return (_pick(rng, ("The heart size is borderline enlarged.", "Possible mild cardiomegaly.")),
                "Borderline heart size; possible mild cardiomegaly.")
    if f.label == "Edema":
        return (_pick(rng, ("Mild interstitial prominence may reflect mild pulmonary edema.",
                            "Possible mild interstitial edema.")), "Possible mild pulmonary edema.")
    if f.label == "Consolidation":
        return (_pick(rng, (f"An opacity in the {loc} may represent consolidation.",
                            f"Possible focal consolidation in the {loc}.")),
                f"Possible consolidation in the {loc}.")
    if f.label == "Pneumonia":
        return (_pick(rng, (f"Patchy opacity in the {loc} concerning for pneumonia.",
                            f"Subtle opacity in the {loc} may represent early pneumonia.")),
                _pick(rng, (f"Opacity in the {loc} concerning for pneumonia.", "Possible early pneumonia.")))
    if f.label == "Atelectasis":
        return (f"Linear opacity in the {loc} may reflect atelectasis.", f"Possible atelectasis in the {loc}.")
    if f.label == "Pneumothorax":
        return (_pick(rng, (f"Cannot exclude a tiny {side} apical pneumothorax.",
                            f"Possible small {side} apical pneumothorax.")),
                f"Possible small {side} pneumothorax.")
    if f.label == "Fracture":
        rib = _ordinal(f.rib or 7)
        return (_pick(rng, (f"Questionable nondisplaced fracture of the {side} {rib} rib.",
                            f"Possible {side} {rib} rib fracture.")), f"Possible {side} {rib} rib fracture.")
    raise ValueError(f"no report template for finding label {f.label!r}")


# What a negation calls each class; several join into one sentence ("No A, B, or C.").
_NEGATABLE = {
    "Consolidation": ("focal consolidation", "consolidation"),
    "Pleural Effusion": ("pleural effusion",),
    "Pneumothorax": ("pneumothorax",),
    "Edema": ("pulmonary edema",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis",),
}
# Per absent class. Set so that about a third of the reports that name a finding negate it (most
# name it because it is there); a report writer that negated every usual suspect would teach the
# text tower that a finding's word mostly means its absence.
_NEGATION_RATE = {"Pleural Effusion": 0.12, "Pneumothorax": 0.06, "Consolidation": 0.06, "Edema": 0.075,
                  "Pneumonia": 0.075, "Atelectasis": 0.085, "Cardiomegaly": 0.4, "Fracture": 0.05}
_LUNG_LABELS = {"Atelectasis", "Consolidation", "Edema", "Pneumonia", "Pneumothorax", "Pleural Effusion"}


def _join(nouns: list[str]) -> str:
    if len(nouns) == 1:
        return nouns[0]
    if len(nouns) == 2:
        return f"{nouns[0]} or {nouns[1]}"
    return ", ".join(nouns[:-1]) + f", or {nouns[-1]}"


def _negations(absent: list[str], rng: np.random.Generator) -> dict[str, list[Mention]]:
    """Negations of some absent classes, by the report part they belong to (heart, lungs, bones)."""
    chosen = [c for c in absent if c in _NEGATION_RATE and rng.random() < _NEGATION_RATE[c]]
    out: dict[str, list[Mention]] = {"heart": [], "lungs": [], "bones": []}
    if "Cardiomegaly" in chosen:
        text = _pick(rng, ("Heart size is normal.", "The heart is normal in size.", "The heart is not enlarged."))
        out["heart"].append(Mention(text, "findings", (("Cardiomegaly", NEGATIVE),)))
    lung = [c for c in chosen if c in _NEGATABLE]
    rng.shuffle(lung)
    while lung:
        group, lung = lung[:3], lung[3:]
        nouns = [_pick(rng, _NEGATABLE[c]) for c in group]
        text = _pick(rng, (f"No {_join(nouns)}.", f"There is no {_join(nouns)}."))
        out["lungs"].append(Mention(text, "findings", tuple((c, NEGATIVE) for c in group)))
    if "Fracture" in chosen:
        out["bones"].append(Mention(_pick(rng, ("No acute rib fracture.", "No displaced rib fracture is seen.")),
                                    "findings", (("Fracture", NEGATIVE),)))
    return out


# ---- the report ---------------------------------------------------------------------------------
# The order of FINDINGS: heart and mediastinum, lungs, pleura, then bones.
_PART = {"Cardiomegaly": "heart", "Edema": "lungs", "Consolidation": "lungs", "Pneumonia": "lungs",
         "Atelectasis": "lungs", "Pleural Effusion": "pleura", "Pneumothorax": "pleura", "Fracture": "bones"}
_ORDER = {label: i for i, label in enumerate(_PART)}


def labels_from_mentions(mentions: Sequence[Mention]) -> dict:
    """CheXpert-style labels: every column blank, then the value each mention gives."""
    labels = {c: BLANK for c in CHEXPERT_COLUMNS}
    for m in mentions:
        for col, value in m.values:
            labels[col] = value
    observations = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")]
    flagged = any(labels[c] in (POSITIVE, UNCERTAIN) for c in observations)
    labels["No Finding"] = BLANK if flagged else POSITIVE
    return labels


def write_report(findings: Sequence[FindingLike], rng: np.random.Generator, *, has_lateral: bool = True,
                 uncertain_rate: float = 0.1) -> Report:
    """FINDINGS/IMPRESSION text for these findings (all of them are described), with varied wording.

    Each present finding is hedged with probability `uncertain_rate` (higher for small or mild
    ones), which makes its label -1.0; some absent classes are negated (0.0).
    """
    present = {f.label for f in findings}
    unknown = present - set(CLASSES[1:])
    if unknown:
        raise ValueError(f"findings have unknown label(s) {sorted(unknown)}; expected labels from {CLASSES[1:]}")
    parts: dict[str, list[Mention]] = {"heart": [], "lungs": [], "pleura": [], "bones": []}
    impression: list[Mention] = []
    for f in sorted(findings, key=lambda f: _ORDER[f.label]):
        rate = uncertain_rate * {"small": 1.5, "mild": 1.5, "large": 0.3, "severe": 0.3}.get(f.severity, 1.0)
        hedged = rng.random() < rate
        sentence, summary = _uncertain(f, rng) if hedged else _positive(f, rng, has_lateral)
        value = ((f.label, UNCERTAIN if hedged else POSITIVE),)
        parts[_PART[f.label]].append(Mention(sentence, "findings", value))
        impression.append(Mention(summary, "impression", value))

    negated = _negations([c for c in CLASSES[1:] if c not in present], rng)
    if "Cardiomegaly" not in present:  # a heart statement opens the report
        parts["heart"] = negated["heart"] or [Mention(_pick(rng, (
            "The cardiomediastinal silhouette is normal.", "The cardiomediastinal silhouette is within normal limits.",
            "Mediastinal and hilar contours are normal.")), "findings")]
    if not present & _LUNG_LABELS:
        parts["lungs"].insert(0, Mention(_pick(rng, ("The lungs are clear.", "The lungs are well expanded and clear.")),
                                         "findings"))
    parts["pleura"] += negated["lungs"]
    if "Fracture" not in present:
        parts["bones"] = negated["bones"] or ([Mention(_pick(rng, (
            "The osseous structures are unremarkable.", "No acute osseous abnormality.")), "findings")]
            if rng.random() < 0.4 else [])
    findings_mentions = [m for part in ("heart", "lungs", "pleura", "bones") for m in parts[part]]
    if not impression:
        impression = [Mention(_pick(rng, ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                          "No acute intrathoracic process.")), "impression")]
    elif len(impression) > 1 and rng.random() < 0.5:  # MIMIC-style numbered impression
        impression = [Mention(f"{i}. {m.text}", m.section, m.values) for i, m in enumerate(impression, 1)]
    mentions = tuple(findings_mentions + impression)
    return Report(
        findings=" ".join(m.text for m in findings_mentions),
        impression=" ".join(m.text for m in impression),
        mentions=mentions,
        labels=labels_from_mentions(mentions),
    )


_INDICATIONS = ("cough", "shortness of breath", "chest pain", "fever", "dyspnea on exertion", "hypoxia",
                "follow-up", "pre-operative evaluation", "weakness", "tachycardia")


def mimic_report_text(report: Report, rng: np.random.Generator, *, examination: str, sex: str) -> str:
    """The report as a MIMIC-CXR .txt file (FORMATS.md): header lines, then FINDINGS and IMPRESSION,
    each section wrapped at 78 columns with a leading space as in the original files."""
    who = "man" if sex == "Male" else "woman" if sex == "Female" else "patient"
    indication = f"___-year-old {who} with {_pick(rng, _INDICATIONS)}."
    comparison = _pick(rng, ("None.", "___.", "Chest radiograph from ___."))

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=78, initial_indent=" ", subsequent_indent=" ")

    return ("                                 FINAL REPORT\n"
            f" EXAMINATION:  {examination}\n \n"
            f" INDICATION:  {indication}\n \n"
            f" COMPARISON:  {comparison}\n \n"
            f" FINDINGS: \n \n{wrap(report.findings)}\n \n"
            f" IMPRESSION: \n \n{wrap(report.impression)}\n")


def format_label(value: float) -> str:
    """A label as the CSV files write it: "1.0", "0.0", "-1.0", or "" for blank."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.1f}"


