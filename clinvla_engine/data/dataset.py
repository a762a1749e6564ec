"""PyTorch datasets over ``Study`` records: preprocessed views, report text, labels."""
from __future__ import annotations

import random
import re
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .study import CLASSES, DatasetError, Study
from .transforms import augment, normalize, resize_center_crop, shuffle_sentences, to_unit_float

_HEADER = re.compile(r"\b[A-Z][A-Z /&-]{2,}:\s*")


def report_text(report: str) -> str:
    """The words of a report without its section headers ("FINDINGS:", "IMPRESSION:") and extra space."""
    return " ".join(_HEADER.sub(" ", report).split())


def label_vector(study: Study, classes: Sequence[str] = CLASSES) -> torch.Tensor:
    """(len(classes),) float: 1 positive, 0 negative, -1 uncertain, NaN not mentioned."""
    return torch.tensor([study.labels.get(c, float("nan")) for c in classes], dtype=torch.float32)


class StudyDataset(Dataset):
    """Items: frontal (3, S, S), lateral (3, S, S) (zeros when absent), lateral_present (bool),
    text (str), labels (9,), index. Augments images and shuffles report sentences when train=True.

    ``preload()`` decodes every image once into a uint8 cache at the model's size, so epochs
    after the first cost no decoding (the demo does this; an archive-sized set streams instead).
    """

    def __init__(
        self,
        studies: Sequence[Study],
        image_size: int,
        mean: float,
        std: float,
        train: bool = False,
        seed: int = 0,
        two_views: bool = True,
        need_reports: bool = True,
        loader: Callable | None = None,
    ):
        if len(studies) == 0:
            raise DatasetError("no studies to load: the dataset (or the requested split) is empty")
        if need_reports:
            missing = [s.study_id for s in studies if not s.report or not s.report.strip()]
            if missing:
                raise DatasetError(
                    f"{len(missing)} of {len(studies)} studies have no report (e.g. {', '.join(missing[:3])}); "
                    "training and text retrieval need image-report pairs (CheXpert and RSNA have no reports)"
                )
        self.studies = list(studies)
        self.size, self.mean, self.std = image_size, mean, std
        self.train, self.seed, self.two_views = train, seed, two_views
        self.epoch = 0
        self._cache: dict[tuple[int, int], np.ndarray] | None = None
        if loader is None:
            from .io import load_image

            loader = load_image
        self._load = loader

    def __len__(self) -> int:
        return len(self.studies)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _view(self, idx: int, which: int) -> torch.Tensor:
        """(S, S) float in [0, 1] for view 0 (frontal) or 1 (lateral)."""
        if self._cache is not None and (idx, which) in self._cache:
            return torch.from_numpy(self._cache[(idx, which)]).float() / 255.0
        s = self.studies[idx]
        path = s.frontal if which == 0 else s.lateral
        return resize_center_crop(to_unit_float(self._load(path)), self.size)

    def preload(self, progress: bool = True) -> None:
        from tqdm import tqdm

        cache = {}
        for idx in tqdm(range(len(self)), desc="decoding images", unit="study", disable=not progress,
                        mininterval=1.0):
            for which in (0, 1) if self.two_views else (0,):
                if which == 1 and self.studies[idx].lateral is None:
                    continue
                img = self._view(idx, which)
                cache[(idx, which)] = (img * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
        self._cache = cache

    def __getitem__(self, idx: int) -> dict:
        s = self.studies[idx]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + idx)
        frontal = self._view(idx, 0)
        has_lateral = self.two_views and s.lateral is not None
        lateral = self._view(idx, 1) if has_lateral else None
        if self.train:
            frontal = augment(frontal, g)
            lateral = augment(lateral, g) if lateral is not None else None
        item = {
            "frontal": normalize(frontal, self.mean, self.std),
            "lateral": normalize(lateral, self.mean, self.std) if lateral is not None
            else torch.zeros(3, self.size, self.size),
            "lateral_present": torch.tensor(has_lateral),
            "labels": label_vector(s),
            "index": torch.tensor(idx),
        }
        if s.report:
            text = report_text(s.report)
            if self.train:
                text = shuffle_sentences(text, random.Random(int(torch.randint(0, 2**31, (), generator=g))))
            item["text"] = text
        return item


class Collate:
    """Stacks items and tokenizes their texts with the model's tokenizer (in the loader workers)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        batch = {k: torch.stack([it[k] for it in items]) for k in ("frontal", "lateral", "lateral_present", "labels", "index")}
        if "text" in items[0]:
            batch["texts"] = [it["text"] for it in items]
            if self.tokenizer is not None:
                batch["input_ids"], batch["attention_mask"] = self.tokenizer(batch["texts"])
        return batch
