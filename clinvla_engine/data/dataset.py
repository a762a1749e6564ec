"""PyTorch datasets over ``Study`` records: preprocessed views, report text, labels.

Bad images: a study whose image cannot be decoded (missing, truncated, not an image, a
decompression bomb, an unreadable DICOM) must not stop a run of hours, and must not be hidden
either. ``StudyDataset(on_bad=...)`` chooses what happens to it:

* ``"raise"`` (default): the decoding error propagates, as for any single-file use;
* ``"skip"`` (evaluation): the item is a marker ``{"bad": [...], "index": i}`` that ``Collate``
  drops, so the batch is smaller and the caller learns which studies were left out;
* ``"replace"`` (training): the next decodable study (i+1, i+2, ...) fills the slot, so every
  batch keeps its size (the contrastive losses and the ranks of a multi-process run need equal
  batches); the item lists the studies it stands in for under ``"bad"``.

Either way each skipped study travels with its batch to the main process (loader workers are
separate processes and cannot share a counter), where ``BadStudyLog`` logs it once (study, path,
reason) and stops the run only when the share of bad studies passes ``max_bad_fraction``.
"""
from __future__ import annotations

import logging
import random
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .study import CLASSES, DatasetError, Study
from .transforms import augment, normalize, resize_center_crop, shuffle_sentences, to_unit_float

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.01  # 1%: a few broken files in a real archive are normal, a tenth is not
# how many neighbours a training item tries before giving up: a long run of undecodable studies
# in a row means the archive (or a mount) is broken, which the threshold should report instead
MAX_REPLACEMENT_TRIES = 32


def _bad_image_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this file cannot be decoded", never a bug of ours: DatasetError
    (what load_image raises), OSError (missing, truncated, PIL's UnidentifiedImageError),
    ValueError and SyntaxError (decoders reporting corrupt data), PIL's DecompressionBombError."""
    errors: list[type[BaseException]] = [DatasetError, OSError, ValueError, SyntaxError]  # not MemoryError: the machine's
    try:
        from PIL import Image

        errors.append(Image.DecompressionBombError)
    except ImportError:  # pragma: no cover - Pillow is a hard dependency
        pass
    return tuple(errors)


class BadImage(Exception):
    """An undecodable view of a study: which file and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


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
        on_bad: str = "raise",
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
        if on_bad not in ("raise", "skip", "replace"):
            raise ValueError(f"on_bad must be 'raise', 'skip' or 'replace', got {on_bad!r}")
        self.on_bad = on_bad
        self._bad: dict[int, BadImage] = {}  # known-bad studies of this process: not decoded twice
        self.studies = list(studies)
        self.size, self.mean, self.std = image_size, mean, std
        self.train, self.seed, self.two_views = train, seed, two_views
        self.epoch = 0
        self._cache: dict[tuple[int, int], np.ndarray] | None = None
        if loader is None:
            from .io import ImageDecodeError, load_image

            # load_image raises ImageDecodeError for every problem of one file; anything else it
            # raises (pydicom missing, say) is the environment's fault and must stop the run
            loader, self._bad_errors = load_image, (ImageDecodeError,)
        else:  # a caller's decoder: the exceptions decoders commonly raise for a bad file
            self._bad_errors = _bad_image_errors()
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
        if self.on_bad == "raise":
            return resize_center_crop(to_unit_float(self._load(path)), self.size)
        try:
            image = resize_center_crop(to_unit_float(self._load(path)), self.size)
        except self._bad_errors as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            raise BadImage(path, reason) from None
        if not torch.isfinite(image).all():  # a decoder that "succeeds" with NaN pixels
            raise BadImage(path, "the decoded image has NaN or infinite pixels")
        return image

    def preload(self, progress: bool = True) -> list[dict]:
        """Decodes every image once; returns the studies that could not be decoded (as
        ``bad_entry`` dicts; with on_bad="raise" the first one raises instead)."""
        from tqdm import tqdm

        cache = {}
        bad = []
        for idx in tqdm(range(len(self)), desc="decoding images", unit="study", disable=not progress,
                        mininterval=1.0):
            try:
                for which in (0, 1) if self.two_views else (0,):
                    if which == 1 and self.studies[idx].lateral is None:
                        continue
                    img = self._view(idx, which)
                    cache[(idx, which)] = (img * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
            except BadImage as exc:
                self._bad[idx] = exc
                cache.pop((idx, 0), None)
                bad.append(self.bad_entry(idx, exc))
        self._cache = cache
        return bad

    def bad_entry(self, idx: int, exc: BadImage) -> dict:
        return {"study_id": self.studies[idx].study_id, "path": exc.path, "reason": exc.reason}

    def __getitem__(self, idx: int) -> dict:
        if self.on_bad == "raise":
            return self._item(idx)
        if self.on_bad == "skip":
            try:
                return self._item(idx)
            except BadImage as exc:
                return {"bad": [self.bad_entry(idx, exc)], "index": torch.tensor(idx)}
        skipped = []
        for k in range(min(MAX_REPLACEMENT_TRIES, len(self))):
            j = (idx + k) % len(self)
            try:
                item = self._item(j)
            except BadImage as exc:
                skipped.append(self.bad_entry(j, exc))
                continue
            if skipped:
                item["bad"] = skipped
            return item
        raise DatasetError(
            f"{len(skipped)} studies in a row ({skipped[0]['study_id']} onwards) have images that cannot be "
            f"decoded (first: {skipped[0]['path']}: {skipped[0]['reason']}); the archive or its mount looks "
            "broken: check the files"
        )

    def _item(self, idx: int) -> dict:
        if idx in self._bad:
            raise self._bad[idx]
        try:
            return self._decode_item(idx)
        except BadImage as exc:
            self._bad[idx] = exc
            raise

    def _decode_item(self, idx: int) -> dict:
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
    """Stacks items and tokenizes their texts with the model's tokenizer (in the loader workers).

    Items that stand for undecodable studies (``"bad"`` markers, see StudyDataset) are left out
    of the tensors; every bad study of the batch is listed under ``batch["bad"]`` (absent when
    there is none). A batch whose studies were all bad holds only ``"bad"``.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        bad = [entry for it in items for entry in it.get("bad", ())]
        items = [it for it in items if "frontal" in it]
        if not items:
            return {"bad": bad}
        batch = {k: torch.stack([it[k] for it in items]) for k in ("frontal", "lateral", "lateral_present", "labels", "index")}
        if bad:
            batch["bad"] = bad
        if "text" in items[0]:
            batch["texts"] = [it["text"] for it in items]
            if self.tokenizer is not None:
                batch["input_ids"], batch["attention_mask"] = self.tokenizer(batch["texts"])
        return batch


class BadStudyLog:
    """The undecodable studies of a run (training, or one evaluation): logs each study once (id,
    path, reason) and raises DatasetError when their share of the studies the run uses passes
    ``max_fraction``.

    ``expect(ids)`` adds studies to the run's total before they are read, so the share is of the
    whole set and a bad first batch does not count as 100%. ``sink`` receives every new entry
    (training writes them to metrics.jsonl). ``state()`` / ``load_state()`` carry the count across
    a resumed training run.
    """

    def __init__(self, max_fraction: float = DEFAULT_MAX_BAD_FRACTION, where: str = "the dataset",
                 sink: Callable[[dict], None] | None = None, verbose: bool = True):
        check_max_bad_fraction(max_fraction)
        self.max_fraction, self.where, self.sink, self.verbose = max_fraction, where, sink, verbose
        self.expected: set[str] = set()
        self.bad: dict[str, dict] = {}

    def expect(self, study_ids: Iterable[str]) -> None:
        self.expected.update(study_ids)

    def record(self, entries: Iterable[dict], **context) -> list[dict]:
        """Notes `entries` (``{"study_id", "path", "reason"}``); returns those not seen before."""
        new = []
        for e in entries:
            if e["study_id"] in self.bad:
                continue
            e = {**e, **context}
            self.bad[e["study_id"]] = e
            new.append(e)
            if self.verbose:
                log.warning("skipped study %s: cannot decode %s (%s)", e["study_id"], e["path"], e["reason"])
            if self.sink is not None:
                self.sink(e)
        if new:
            self.check()
        return new

    def check(self) -> None:
        total = max(len(self.expected), len(self.bad), 1)
        share = len(self.bad) / total
        if share > self.max_fraction:
            first = next(iter(self.bad.values()))
            raise DatasetError(
                f"{len(self.bad)} of {total} studies ({share:.1%}) in {self.where} have images that cannot be "
                f"decoded, more than max_bad_fraction {self.max_fraction:.1%} allows (first: study "
                f"{first['study_id']}, {first['path']}: {first['reason']}); fix or remove those files, or "
                "raise --max-bad-fraction"
            )

    def entries(self) -> list[dict]:
        return list(self.bad.values())

    def state(self) -> list[dict]:
        return [{k: str(v) for k, v in e.items()} for e in self.bad.values()]

    def load_state(self, entries: Sequence[dict]) -> None:
        self.bad = {e["study_id"]: dict(e) for e in entries}


def check_max_bad_fraction(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"max_bad_fraction must be a share between 0 and 1 (0.01 = stop when more than 1% of the studies "
            f"cannot be decoded), got {value!r}"
        )
    return float(value)
