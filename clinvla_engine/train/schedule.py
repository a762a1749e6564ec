"""The optimisation schedule of a training run: the sampler of global batches, AdamW's parameter
groups, the learning-rate curve and the precision choice."""
from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Sampler

from ..data.study import DatasetError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GlobalBatchSampler(Sampler):
    """Yields this rank's indices, global batch by global batch, from a per-epoch permutation.

    Global batch g of epoch e is permutation(seed, e)[g*B : (g+1)*B] with B = batch * world; rank r
    takes the r-th slice, so one process with batch B sees exactly what W processes see together.
    Resuming starts at a given global batch without touching the skipped data.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.global_batch = batch * world
        if n < self.global_batch:
            raise DatasetError(
                f"the training split has {n} studies, fewer than one global batch ({self.global_batch}); "
                "lower train.batch_size or add data"
            )
        self.batches_per_epoch = n // self.global_batch  # the last partial batch is dropped
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.batches_per_epoch):
            lo = b * self.global_batch + self.rank * self.batch
            yield from perm[lo:lo + self.batch]


TEXT_PREFIXES = ("text.", "text_global_head.", "text_local_head.")
TEXT_HEAD_PREFIXES = ("text_global_head.", "text_local_head.")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, text_lr_scale: float = 1.0,
                 text_heads_apart: bool = False) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings (token, position, CLS, view) and
    temperatures; the text tower (adapters, norms, heads) at lr * text_lr_scale. Each group says
    its "tower": "image", "text", or with text_heads_apart "text_head" for the text projection
    heads (which then follow the image side's schedule: they train during the locked phase)."""
    groups: dict[tuple[bool, str], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (
            p.dim() < 2
            or "norm" in name.lower()
            or "embed" in name
            or "cls_token" in name
            or "mask_token" in name
            or name in ("logit_scale", "log_tau")
        )
        tower = "image"
        if text_heads_apart and name.startswith(TEXT_HEAD_PREFIXES):
            tower = "text_head"
        elif name.startswith(TEXT_PREFIXES):
            tower = "text"
        groups.setdefault((no_decay, tower), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
         "lr": lr * (1.0 if tower == "image" else text_lr_scale), "tower": tower}
        for (no_decay, tower), params in sorted(groups.items())
    ]


def drop_laterals(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool: `present` with each present lateral dropped with probability p (train.lateral_dropout).
    The draw is made on the CPU (global RNG unless `generator`), so a resumed run repeats it."""
    if p <= 0:
        return present
    keep = torch.rand(present.shape[0], generator=generator) >= p
    return present & keep.to(present.device)


def lr_lambda(cfg, start: int = 0) -> Callable[[int], float]:
    """Linear warm-up to lr, then cosine to min_lr at max_steps (as a factor of lr).

    start > 0 is the schedule of a tower that unlocks at step `start` (train.locked_text_steps):
    0 before it, then the same curve (warm-up of warmup_steps, cosine to min_lr at max_steps) over
    the steps that remain, so that a tower joining late still trains at the full rate.
    """
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < start:
            return 0.0
        step -= start
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - start - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16
