"""Preprocessing, augmentation, report handling and the training dataset."""
import random

import numpy as np
import pytest
import torch

from clinvla_engine.data import DatasetError, Study
from clinvla_engine.data.dataset import Collate, StudyDataset, report_text
from clinvla_engine.data.transforms import augment, preprocess, shuffle_sentences, split_sentences, to_unit_float


def test_preprocess_resizes_crops_normalises():
    img = np.zeros((100, 60), dtype=np.uint8)
    img[:, 20:40] = 255  # a bright vertical band in the middle
    x = preprocess(img, 32, mean=0.5, std=0.25)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # the centre crop keeps the band centred: bright middle columns, dark edges
    assert x[0, :, 16].mean() > 1.5 and x[0, :, 0].mean() < -1.5
    assert torch.allclose(preprocess(img.astype(np.float32) / 255.0, 32, 0.5, 0.25), x, atol=1e-5)
    assert preprocess(img.astype(np.uint16) * 257, 32, 0.5, 0.25).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="too small"):
        to_unit_float(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8, uint16 or float"):
        to_unit_float(np.zeros((16, 16), np.int32))


def test_augment_is_seeded_small_and_in_range():
    img = torch.rand(64, 64)
    a = augment(img, torch.Generator().manual_seed(1))
    b = augment(img, torch.Generator().manual_seed(1))
    c = augment(img, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == img.shape


def test_reports_lose_headers_and_shuffle_whole_sentences():
    text = report_text("FINDINGS: Small right effusion.  No pneumothorax.\nIMPRESSION: Effusion.")
    assert text == "Small right effusion. No pneumothorax. Effusion."
    shuffled = shuffle_sentences(text, random.Random(3))
    assert sorted(split_sentences(shuffled)) == sorted(split_sentences(text))


def _studies(tmp_path, n=4, with_reports=True):
    from PIL import Image

    out = []
    for i in range(n):
        f = tmp_path / f"f{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(f)
        lat = None
        if i % 2 == 0:
            lat = tmp_path / f"l{i}.png"
            Image.fromarray(np.full((40, 40), 50 * i, np.uint8)).save(lat)
        out.append(Study(f"s{i}", f, lat, "FINDINGS: Clear lungs. IMPRESSION: Normal." if with_reports else None,
                         {"Pleural Effusion": 1.0 if i == 1 else 0.0}))
    return out


def test_dataset_items_and_collate(tmp_path):
    from clinvla_engine.model import create_model

    studies = _studies(tmp_path)
    ds = StudyDataset(studies, 32, 0.5, 0.25, train=True, seed=0)
    item = ds[0]
    assert item["frontal"].shape == (3, 32, 32) and bool(item["lateral_present"])
    assert not bool(ds[1]["lateral_present"]) and torch.equal(ds[1]["lateral"], torch.zeros(3, 32, 32))
    assert item["labels"].shape == (9,) and ds[1]["labels"][5] == 1.0 and torch.isnan(ds[1]["labels"][0])
    torch.testing.assert_close(ds[2]["frontal"], ds[2]["frontal"])  # same epoch: same augmentation
    first = ds[2]["frontal"]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[2]["frontal"])  # a new epoch: new augmentation
    eval_ds = StudyDataset(studies, 32, 0.5, 0.25, train=False)
    before = eval_ds[3]["frontal"]
    eval_ds.preload(progress=False)
    torch.testing.assert_close(eval_ds[3]["frontal"], before, atol=3 / 255 / 0.25, rtol=0)
    tok = create_model("tiny").tokenizer
    batch = Collate(tok)([eval_ds[i] for i in range(4)])
    assert batch["frontal"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    assert batch["lateral_present"].tolist() == [True, False, True, False]


def test_dataset_refuses_missing_reports_and_empty_sets(tmp_path):
    with pytest.raises(DatasetError, match="have no report"):
        StudyDataset(_studies(tmp_path, with_reports=False), 32, 0.5, 0.25)
    with pytest.raises(DatasetError, match="no studies"):
        StudyDataset([], 32, 0.5, 0.25)
    StudyDataset(_studies(tmp_path, with_reports=False), 32, 0.5, 0.25, need_reports=False)
