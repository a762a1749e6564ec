"""Image preprocessing and training augmentation (the paper's recipe), and report sentence shuffling.

Preprocessing, identical in training, evaluation and the deployed engine:
grey image in [0, 1] -> resize so the shorter side is ``size`` (bilinear, antialiased) -> centre
crop to ``size`` x ``size`` -> ``(x - mean) / std`` -> three identical channels (the ViT takes RGB).

Training augmentation, applied to the [0, 1] image before normalisation: a small random affine
(rotation up to 7 degrees, translation up to 4%, scale 0.93-1.07) and brightness/contrast jitter
(+-0.1, x0.85-1.15). Reports: sentences shuffled within the text.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F


def to_unit_float(image) -> torch.Tensor:
    """(H, W) uint8 / uint16 / float array or tensor -> float32 tensor in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            t = torch.from_numpy(image.astype(np.float32) / 255.0)
        elif image.dtype == np.uint16:
            t = torch.from_numpy(image.astype(np.float32) / 65535.0)
        elif np.issubdtype(image.dtype, np.floating):
            t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        else:
            raise ValueError(f"image must be uint8, uint16 or float, got {image.dtype}")
    elif isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            t = image.float() / 255.0
        elif image.is_floating_point():
            t = image.float()
        else:
            raise ValueError(f"image must be uint8 or float, got {image.dtype}")
    else:
        raise TypeError(f"image must be a NumPy array or a tensor, got {type(image).__name__}")
    if t.dim() == 3 and t.shape[0] in (1, 3):  # (C, H, W): take the grey level
        t = t.mean(dim=0)
    elif t.dim() == 3 and t.shape[-1] in (1, 3):  # (H, W, C)
        t = t.mean(dim=-1)
    if t.dim() != 2:
        raise ValueError(f"image must be a grey (H, W) picture, got shape {tuple(t.shape)}")
    if t.shape[0] < 8 or t.shape[1] < 8:
        raise ValueError(f"image of {tuple(t.shape)} pixels is too small to be a radiograph")
    return t


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) -> (size, size): shorter side to `size`, then the central square."""
    h, w = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(image[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[top:top + size, left:left + size]


def normalize(image: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(S, S) in [0, 1] -> (3, S, S) normalised."""
    return ((image - mean) / std).unsqueeze(0).expand(3, -1, -1).contiguous()


def preprocess(image, size: int, mean: float, std: float) -> torch.Tensor:
    """Evaluation / deployment preprocessing: any grey image -> (3, size, size) float32."""
    return normalize(resize_center_crop(to_unit_float(image), size), mean, std)


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(S, S) in [0, 1] -> randomly transformed (S, S) in [0, 1]."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    angle = math.radians(uniform(-7.0, 7.0))
    scale = uniform(0.93, 1.07)
    tx, ty = uniform(-0.04, 0.04) * 2, uniform(-0.04, 0.04) * 2  # affine_grid works in [-1, 1]
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=image.dtype)[None]
    grid = F.affine_grid(theta, [1, 1, *image.shape], align_corners=False)
    x = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    contrast = uniform(0.85, 1.15)
    brightness = uniform(-0.1, 0.1)
    mean = x.mean()
    return ((x - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def shuffle_sentences(text: str, rng: random.Random) -> str:
    """The report's sentences in a random order (section headers stay attached to their sentence)."""
    sentences = split_sentences(text)
    rng.shuffle(sentences)
    return " ".join(sentences)
