"""``clinvla pretrain``: MAE pre-training of the image tower on an archive's images, reports unused.

Each training study gives its frontal and, when present, its lateral view. A random share of every
view's patches is hidden (``decoder.pretrain_mask_ratio``, 75%; at least ``decoder.min_visible``
patches stay visible, so with few tokens the ratio is lowered and the one used is printed and
logged as ``mask_ratio`` in every record), the shared ViT encodes the visible ones (with its view
embedding), and the model's own MIM decoder (``decoder.*``, switched on here) reconstructs the hidden
patches; the loss is the mean squared error on per-patch-normalised grey pixels over hidden
patches only (He et al. 2022). The backbone and the decoder train; the adapters stay at their
identity init (they are for the later, adapted training), and the text tower and heads are unused.

It is the training loop of ``clinvla train`` (the Trainer) with another model setup and step, so
the run folder, atomic checkpoints, ``--resume`` and metrics.jsonl are the same. The checkpoint is a
ClinVLA checkpoint (config + tokenizer + weights, marked ``clinvla_stage: mae-pretrain``); a
training run starts its image tower from it with ``vision.init_from: <run>/model.safetensors``,
then ``vision.frozen`` picks frozen backbone + adapters (true) or full fine-tuning (false).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ClinVLAConfig
from ..data.dataset import StudyDataset
from ..data.study import Study
from ..model import ClinVLA, load_checkpoint
from ..model.vit import is_adapter_key, load_image_tower, load_vit_weights
from .collate import TrainCollate
from .run_dir import Resumed, TrainError
from .trainer import Trainer, TrainResult

STAGE = "mae-pretrain"


def mae_visible_tokens(num_patches: int, ratio: float, min_visible: int) -> tuple[int, float]:
    """(visible patches per view, mask ratio used): `ratio` of the patches hidden, unless that
    leaves fewer than `min_visible`; at least one patch is always hidden."""
    if num_patches < 2:
        raise TrainError(f"MAE pre-training needs at least 2 patches per view, the config gives {num_patches}; "
                         "lower vision.patch_size or raise vision.image_size")
    keep = max(1, int(round(num_patches * (1.0 - ratio))))
    if keep < min_visible:
        keep = min(min_visible, num_patches - 1)
    return keep, 1.0 - keep / num_patches


def _study_views(model: ClinVLA, frontal, lateral, present):
    """Every view of the batch as one (N, 3, S, S) stack with its view ids (frontal 0, lateral 1)."""
    b, dev = frontal.shape[0], frontal.device
    ids = torch.zeros(b, dtype=torch.long, device=dev)
    if lateral is None or model.config.vision.num_views == 1:
        return frontal, ids
    idx = present.nonzero().squeeze(1)
    return (torch.cat([frontal, lateral.index_select(0, idx)]),
            torch.cat([ids, torch.ones(idx.numel(), dtype=torch.long, device=dev)]))


class MAEForward(nn.Module):
    """The MAE loss of one batch of studies (a module, so that DDP can wrap it)."""

    def __init__(self, model: ClinVLA, mask_ratio: float):
        super().__init__()
        self.model, self.mask_ratio = model, mask_ratio

    def forward(self, frontal, lateral=None, present=None, generator: torch.Generator | None = None):
        images, view_ids = _study_views(self.model, frontal, lateral, present)
        cls, patches, keep_idx = self.model.visual(images, view_ids, self.mask_ratio, generator)
        return self.model.decoder(cls, patches, keep_idx, images)


class PretrainTrainer(Trainer):
    """The Trainer with MAE as its step (see the module docstring)."""

    def __init__(self, config, data, out_dir, **kwargs):
        super().__init__(config, data, out_dir, **kwargs)
        cfg = self.cfg
        cfg.decoder.enabled = True
        cfg.train.locked_text_steps = 0  # no text in this stage
        cfg.train.center_heads = False
        cfg.train.lateral_dropout = 0.0
        p = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
        self.visible, self.mask_ratio = mae_visible_tokens(p, cfg.decoder.pretrain_mask_ratio, cfg.decoder.min_visible)
        self.num_patches = p

    def _build_model(self, cfg: ClinVLAConfig, resumed: Resumed | None) -> ClinVLA:
        if resumed is not None:
            model = load_checkpoint(resumed.weights)
        else:
            # the text tower is never run here: random weights of its architecture, nothing downloaded
            model = ClinVLA(cfg, pretrained=False)
            if cfg.vision.weights:
                load_vit_weights(model.visual, cfg.vision.weights)
            if cfg.vision.init_from:
                load_image_tower(model.visual, cfg.vision.init_from)
        for name, p in model.named_parameters():
            trains = name.startswith("decoder.") or (name.startswith("visual.") and not is_adapter_key(name[7:]))
            p.requires_grad_(trains)
        if self.main:
            print(f"MAE pre-training: {self.num_patches - self.visible} of {self.num_patches} patches hidden per view "
                  f"(mask ratio {self.mask_ratio:.3f}"
                  + ("" if math.isclose(self.mask_ratio, cfg.decoder.pretrain_mask_ratio) else
                     f", not {cfg.decoder.pretrain_mask_ratio}: at least decoder.min_visible = "
                     f"{cfg.decoder.min_visible} patches stay visible") + "); " + model.describe_parameters())
        return model

    def _make_collate(self, model: ClinVLA):
        return TrainCollate(None)  # images only: the reports are not read into the batch's tensors

    def setup(self) -> None:
        super().setup()
        self.run.meta_extra = {"clinvla_stage": STAGE}
        self.forward_module = None

    def _center_heads(self) -> None:  # nothing to centre: the heads are not trained here
        return

    def _step_info(self, step: int) -> dict:
        return {"mask_ratio": self.mask_ratio}

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        dev = self.dev
        if self.forward_module is None:
            self.forward_module = self._wrap(MAEForward(self.model, self.mask_ratio))
        frontal = batch["frontal"].to(dev, non_blocking=True)
        lateral = batch["lateral"].to(dev, non_blocking=True) if self.two_views else None
        present = batch["lateral_present"].to(dev, non_blocking=True) if self.two_views else None
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            mim = self.forward_module(frontal, lateral, present)
        loss = mim / self.tc.grad_accum
        if not torch.isfinite(loss):
            raise TrainError(f"MAE loss became {loss.item()} at step {self.step}; lower train.lr or check the images")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return {"loss": mim.detach(), "mim": mim.detach()}

    @torch.no_grad()
    def evaluate(self) -> None:
        """val_mim: the MAE loss on up to 64 validation studies, with a fixed mask (comparable across steps)."""
        if not self.main or not self.val_studies:
            return
        if self.evaluate_fn is not None:
            return super().evaluate()
        v = self.cfg.vision
        val = StudyDataset(self.val_studies[:64], v.image_size, v.pixel_mean, v.pixel_std, train=False,
                           two_views=self.two_views, loader=self.loader_fn, on_bad="replace")
        batch = TrainCollate(None)([val[i] for i in range(len(val))])
        if "frontal" not in batch:
            return
        model = self.model
        model.eval()
        try:
            lateral = batch["lateral"].to(self.dev) if self.two_views else None
            present = batch["lateral_present"].to(self.dev) if self.two_views else None
            g = torch.Generator(device=self.dev).manual_seed(0)
            loss = float(MAEForward(model, self.mask_ratio)(batch["frontal"].to(self.dev), lateral, present, g))
        finally:
            model.train()
        self.log({"step": self.step, "val_mim": loss})
        print(f"\nstep {self.step}: val_mim {loss:.4f}")


def pretrain(
    config: "str | Path | dict | ClinVLAConfig",
    data: "str | Path | Sequence[Study]",
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    preload: bool = False,
    loader_fn: Callable | None = None,
    max_bad_fraction: float | None = None,
) -> TrainResult:
    """MAE pre-training of the image tower; the checkpoint is ``out_dir/model.safetensors``."""
    trainer = PretrainTrainer(config, data, out_dir, max_steps=max_steps, resume=resume, device=device,
                              progress=progress, preload=preload, loader_fn=loader_fn,
                              max_bad_fraction=max_bad_fraction)
    trainer.setup()
    return trainer.fit()
