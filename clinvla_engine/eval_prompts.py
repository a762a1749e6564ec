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
