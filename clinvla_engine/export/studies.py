"""The studies a build checks parity and calibrates with, and the record of which were used.

A hospital's engine should be checked (and, for FP8, calibrated) on its own studies: pass a folder
that ``clinvla_engine.data.open_dataset`` reads (MIMIC-CXR-JPG, CheXpert, a DICOM tree) as
``--parity-data DIR`` / ``--calibration DIR``. Only where the user gives none does the build fall
back to a synthetic archive (parity) or random graph inputs (calibration). Either way the manifest
says which: ``parity.data`` and ``calibration`` hold ``{"source": "user" | "synthetic" | "random",
...}``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.graphs import truncate_tokens
from ..runtime.inputs import preprocess_items

CALIBRATION_BATCH = 8  # graph inputs per ONNX Runtime run while collecting activation ranges


def open_user_studies(path: str | Path, limit: int, option: str) -> tuple[list, dict]:
    """(the first `limit` studies of the folder, in its file order; the manifest record).

    limit <= 0 takes them all. Raises DatasetError (from open_dataset) for a folder that holds no
    studies, naming the folder and the formats read."""
    from ..data import open_dataset
    from ..data.study import DatasetError

    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{option} {path}: no such folder; give a folder of studies (MIMIC-CXR-JPG, CheXpert, "
                           "RSNA or a DICOM tree)")
    dataset = open_dataset(root)
    studies = list(dataset)[:limit] if limit > 0 else list(dataset)
    record = {"source": "user", "path": str(root.resolve()), "format": dataset.format, "studies": len(studies)}
    return studies, record


def study_feeds(model, graph: str, studies: list, tokens: int, batch: int = CALIBRATION_BATCH) -> list[dict]:
    """Graph inputs (NumPy, by input name) made from real studies, in batches, preprocessed as the
    runtime does; the text graph gets the studies' reports. Raises ValueError when the studies
    have nothing for that graph (no report text)."""
    from ..data.dataset import report_text

    v = model.config.vision
    two = v.num_views == 2
    feeds = []
    if graph == "image":
        for start in range(0, len(studies), batch):
            chunk = studies[start:start + batch]
            frontal, _ = preprocess_items([s.frontal for s in chunk], v.image_size, v.pixel_mean, v.pixel_std,
                                          "frontal")
            feed = {"frontal": frontal.numpy()}
            if two:
                lateral, present = preprocess_items([s.lateral for s in chunk], v.image_size, v.pixel_mean,
                                                    v.pixel_std, "lateral")
                feed.update(lateral=lateral.numpy(), lateral_present=present.numpy())
            feeds.append(feed)
        return feeds
    reports = [report_text(s.report) for s in studies if s.report and report_text(s.report).strip()]
    if not reports:
        raise ValueError("the studies given have no report text, which the text graph needs; give a folder whose "
                         "studies carry reports")
    tok = model.tokenizer
    for start in range(0, len(reports), batch):
        ids, mask = tok(reports[start:start + batch])
        ids, mask = truncate_tokens(ids, mask, tokens, tok.sep_id, tok.pad_id)
        feeds.append({"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)})
    return feeds
