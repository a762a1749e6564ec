"""The texts the evaluation protocols embed: retrieval queries and zero-shot prompts per class.

``QUERY_TEXTS``: 10 short radiologist-style phrases per class, the text queries of the 8x200
text-to-image protocol. ``PROMPTS``: phrases per class whose mean embedding is the class
embedding of zero-shot classification (5x200, RSNA). They belong to evaluation, not to the
synthetic-report generator: a protocol must not change when the test-bed's templates do. They are
written in plain radiology wording (no hedge words such as "possible", which would read as
uncertain findings).
"""
from __future__ import annotations

QUERY_TEXTS: dict[str, list[str]] = {
    "No Finding": ["no acute cardiopulmonary process", "normal chest radiograph", "the lungs are clear",
                   "no acute cardiopulmonary abnormality", "normal heart size and clear lungs",
                   "no focal consolidation, effusion, or pneumothorax", "unremarkable chest x-ray",
                   "lungs are well expanded and clear", "cardiomediastinal silhouette is normal",
                   "no acute intrathoracic process"],
    "Atelectasis": ["plate-like atelectasis at the left lung base", "right basilar atelectasis",
                    "bibasilar atelectasis", "linear atelectasis in the lingula", "subsegmental atelectasis",
                    "left basilar atelectasis with elevation of the hemidiaphragm", "mild bibasilar atelectasis",
                    "plate-like atelectasis at the right base", "linear atelectasis in the right middle lobe",
                    "left lower lobe atelectasis"],
    "Cardiomegaly": ["moderate cardiomegaly", "mild cardiomegaly", "severe cardiomegaly",
                     "the heart is enlarged", "enlarged cardiac silhouette", "the heart is mildly enlarged",
                     "marked enlargement of the cardiac silhouette", "cardiac silhouette is moderately enlarged",
                     "cardiomegaly", "enlargement of the cardiac silhouette"],
    "Consolidation": ["left lower lobe consolidation", "right upper lobe consolidation",
                      "focal consolidation in the right lower lobe", "dense lobar consolidation",
                      "consolidation with air bronchograms", "small focal consolidation in the left base",
                      "airspace consolidation of the right middle lobe", "focal consolidation",
                      "consolidation in the lingula", "left upper lobe consolidation"],
    "Edema": ["mild pulmonary edema", "moderate pulmonary edema", "severe pulmonary edema",
              "interstitial edema with Kerley B lines", "perihilar haziness consistent with edema",
              "pulmonary vascular congestion and interstitial edema", "bilateral perihilar airspace opacities",
              "moderate interstitial pulmonary edema", "pulmonary edema", "prominent interstitial markings"],
    "Pleural Effusion": ["small right pleural effusion", "small left pleural effusion",
                         "moderate right pleural effusion", "large left pleural effusion",
                         "bilateral pleural effusions", "blunting of the left costophrenic angle",
                         "blunting of the right costophrenic angle", "pleural effusion with a meniscus",
                         "small effusion in the posterior costophrenic sulcus", "moderate bilateral pleural effusions"],
    "Pneumonia": ["right lower lobe pneumonia", "left lower lobe pneumonia", "multifocal pneumonia",
                  "patchy opacity in the right lower lobe consistent with pneumonia",
                  "patchy airspace opacities compatible with pneumonia", "left upper lobe pneumonia",
                  "pneumonia in the lingula", "findings consistent with pneumonia", "bilateral pneumonia",
                  "patchy opacification consistent with pneumonia"],
    "Pneumothorax": ["small right apical pneumothorax", "small left apical pneumothorax",
                     "moderate right pneumothorax", "large left pneumothorax", "pneumothorax",
                     "right pneumothorax with a visible pleural line", "left apical pneumothorax",
                     "small pneumothorax", "moderate left pneumothorax", "apical pneumothorax"],
    "Fracture": ["right rib fracture", "left rib fracture", "displaced rib fracture",
                 "nondisplaced fracture of the left 7th rib", "minimally displaced right rib fracture",
                 "fracture of the right posterior 6th rib", "rib fracture with a step-off",
                 "left posterior rib fracture", "acute rib fracture", "displaced fracture of the right 8th rib"],
}

PROMPTS: dict[str, list[str]] = {
    "No Finding": ["no acute cardiopulmonary process", "normal chest radiograph", "the lungs are clear",
                   "no acute cardiopulmonary abnormality", "heart size is normal and the lungs are clear"],
    "Atelectasis": ["atelectasis", "plate-like atelectasis", "basilar atelectasis", "bibasilar atelectasis",
                    "linear atelectasis at the lung base"],
    "Cardiomegaly": ["cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette",
                     "moderate cardiomegaly", "enlargement of the cardiac silhouette"],
    "Consolidation": ["consolidation", "focal consolidation", "lobar consolidation",
                      "airspace consolidation", "consolidation with air bronchograms"],
    "Edema": ["pulmonary edema", "interstitial edema", "perihilar haziness consistent with edema",
              "pulmonary vascular congestion", "edema with Kerley B lines"],
    "Pleural Effusion": ["pleural effusion", "small pleural effusion", "blunting of the costophrenic angle",
                         "bilateral pleural effusions", "pleural effusion with a meniscus"],
    "Pneumonia": ["pneumonia", "patchy opacity consistent with pneumonia", "multifocal pneumonia",
                  "lower lobe pneumonia", "patchy airspace opacities compatible with pneumonia"],
    "Pneumothorax": ["pneumothorax", "apical pneumothorax", "pneumothorax with a visible pleural line",
                     "small pneumothorax", "large pneumothorax"],
    "Fracture": ["rib fracture", "displaced rib fracture", "nondisplaced rib fracture",
                 "fracture of the rib", "acute rib fracture"],
}

# ---- laterality-aware retrieval and the pointing game (clinvla_engine.eval_claims) -------------
SIDES = ("left", "right")

# Side-bearing query templates per lateralised class ("{side}" = left | right): the text queries of
# laterality-aware retrieval, whose hit needs the class AND the side. They name no zone or lobe:
# the hit rule does not check the zone, so a zone word in the query would only add noise.
LATERALITY_QUERIES: dict[str, list[str]] = {
    "Atelectasis": ["{side} basilar atelectasis", "plate-like atelectasis in the {side} lung",
                    "atelectasis of the {side} lung"],
    "Consolidation": ["{side} lung consolidation", "focal consolidation in the {side} lung",
                      "airspace consolidation of the {side} lung"],
    "Pleural Effusion": ["{side} pleural effusion", "blunting of the {side} costophrenic angle",
                         "{side} pleural effusion with a meniscus"],
    "Pneumonia": ["{side} lung pneumonia", "patchy opacity in the {side} lung consistent with pneumonia",
                  "pneumonia in the {side} lung"],
    "Pneumothorax": ["{side} pneumothorax", "{side} apical pneumothorax", "{side} pneumothorax with a visible pleural line"],
    "Fracture": ["{side} rib fracture", "fracture of a {side} rib", "{side} posterior rib fracture"],
}

# The word whose attention the pointing game scores, per class: the class's own word as reports
# and queries write it (a multi-piece word is scored by the mean attention of its pieces).
FINDING_WORDS: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Pleural Effusion": "effusion",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Fracture": "fracture",
}

# The phrase the pointing game grounds when a finding has no left/right side (or a class has no
# side template); phrase grounding as MS-CXR-style benchmarks do it. Each holds FINDING_WORDS[class].
FINDING_PHRASES: dict[str, str] = {
    "Atelectasis": "bibasilar atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "bilateral consolidation",
    "Edema": "pulmonary edema",
    "Pleural Effusion": "bilateral pleural effusion",
    "Pneumonia": "bilateral pneumonia",
    "Pneumothorax": "bilateral pneumothorax",
    "Fracture": "bilateral rib fracture",
}


def laterality_queries(label: str, side: str) -> list[str]:
    """The query texts for (class, side); KeyError naming the classes that have templates."""
    if label not in LATERALITY_QUERIES:
        raise KeyError(f"no laterality query templates for class {label!r}; classes with templates: "
                       f"{', '.join(LATERALITY_QUERIES)} (add templates in clinvla_engine/eval_prompts.py)")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return [t.format(side=side) for t in LATERALITY_QUERIES[label]]


def finding_phrase(label: str, side: str | None) -> str:
    """The phrase the pointing game grounds for one drawn finding: the first side template with
    its side ("right pleural effusion"), else the class's side-less phrase."""
    if side in SIDES and label in LATERALITY_QUERIES:
        return laterality_queries(label, side)[0]
    if label not in FINDING_PHRASES:
        raise KeyError(f"no pointing-game phrase for class {label!r}; classes with one: {', '.join(FINDING_PHRASES)} "
                       "(add it in clinvla_engine/eval_prompts.py)")
    return FINDING_PHRASES[label]
