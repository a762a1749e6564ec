"""Turning what a caller has (pixel arrays, file paths, report text) into graph inputs.

Images go through exactly the training/evaluation preprocessing
(``clinvla_engine.data.transforms.preprocess``: grey [0, 1] -> shorter side to S -> centre crop ->
``(x - mean) / std`` -> three channels); files are decoded with ``clinvla_engine.data.io.load_image``
(JPEG, PNG, DICOM with its display conventions). Texts lose their section headers as in training
(``report_text``) and are tokenised by the bundle's own WordPiece vocabulary.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.transforms import preprocess

PathLike = (str, os.PathLike)


def _is_picture(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def as_items(images: Any, what: str, allow_none: bool = False) -> list:
    """A list of pictures (arrays/tensors/paths, or None where allowed) from what the caller gave.

    Accepted: a list or tuple of pictures or paths; one path; a (N, H, W) or (N, H, W, C) /
    (N, C, H, W) array or tensor (N pictures); one (H, W) picture (one study).
    """
    if isinstance(images, PathLike):
        return [images]
    if _is_picture(images):
        if images.ndim == 2:
            return [images]
        if images.ndim in (3, 4):
            return [images[i] for i in range(images.shape[0])]
        raise ValueError(
            f"{what} must be a list of pictures, one (H, W) picture or an (N, H, W) batch, "
            f"got an array of shape {tuple(images.shape)}"
        )
    if isinstance(images, (list, tuple)):
        items = list(images)
        for i, item in enumerate(items):
            if item is None and allow_none:
                continue
            if not (isinstance(item, PathLike) or _is_picture(item)):
                raise TypeError(
                    f"{what}[{i}] must be a pixel array, a tensor or a file path, got {type(item).__name__}"
                )
        return items
    raise TypeError(f"{what} must be a list of pictures or file paths, or an array batch, got {type(images).__name__}")


def _one(item: Any, size: int, mean: float, std: float, where: str) -> torch.Tensor:
    if isinstance(item, PathLike):
        from ..data.io import load_image

        item = load_image(Path(item))
    try:
        return preprocess(item, size, mean, std)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def preprocess_items(items: Sequence, size: int, mean: float, std: float, what: str,
                     workers: int = 1, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) float32 (zeros where an item is None) and the (N,) float32 present mask.

    `out` may be a preallocated (pinned) buffer to write into.
    """
    n = len(items)
    batch = out if out is not None else torch.zeros(n, 3, size, size, dtype=torch.float32)
    present = torch.zeros(n, dtype=torch.float32)

    def work(i: int) -> None:
        if items[i] is None:
            batch[i].zero_()
            return
        batch[i].copy_(_one(items[i], size, mean, std, f"{what}[{i}]"))
        present[i] = 1.0

    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(n)))
    else:
        for i in range(n):
            work(i)
    return batch, present


def check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str; wrap it in a list")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}] is empty or not a string ({t!r}); every text needs words")
    return texts
