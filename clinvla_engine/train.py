"""``clinvla train``: trains ClinVLA on an archive of image-report pairs.

AdamW (betas 0.9/0.95, weight decay 0.05 except on norms, biases, embeddings and temperatures),
linear warm-up then cosine decay, gradient clipping, gradient accumulation, AMP (bf16 on CUDA),
periodic evaluation on the validation split, and checkpoints that resume exactly: the output
folder holds ``model.safetensors`` (weights + config + tokenizer), ``train_state.pt`` (optimizer,
scheduler, step, RNG), ``config.json`` and ``metrics.jsonl``. Every write is atomic.

Locked-text warm-up (``train.locked_text_steps``, LiT-style): the first steps train the image side
against a frozen text tower whose outputs are computed once per training report; then the text
adapters, norms and heads join, on a learning-rate schedule of their own over the remaining steps.
An image encoder trained from scratch needs this: see the ``locked_text_steps`` comment in config.py.

Multi-GPU: launch with ``torchrun --nproc_per_node N -m clinvla_engine.cli train ...``; each
process takes a slice of every global batch and the losses see the whole batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from . import distributed as dist_utils
from .config import ClinVLAConfig, load_config
from .data.dataset import Collate, StudyDataset, report_text
from .data.study import DatasetError, Study
from .losses.objective import training_losses
from .model import ClinVLA, ClinVLAOutput, create_model, load_checkpoint, save_checkpoint
from .model.checkpoint import WEIGHTS_NAME

STATE_NAME = "train_state.pt"


class TrainError(RuntimeError):
    pass


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


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, text_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings (token, position, CLS, view) and
    temperatures; the text tower (adapters, norms, heads) at lr * text_lr_scale."""
    groups: dict[tuple[bool, bool], list] = {}
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
        groups.setdefault((no_decay, name.startswith(TEXT_PREFIXES)), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
         "lr": lr * (text_lr_scale if text else 1.0), "tower": "text" if text else "image"}
        for (no_decay, text), params in sorted(groups.items())
    ]


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


class LockedTextForward(torch.nn.Module):
    """ClinVLA.forward with the text side given: the training forward of the locked-text phase
    (train.locked_text_steps). Only the image side runs with autograd; the text embeddings, words
    and word mask come from the frozen text tower (cached or computed without autograd)."""

    def __init__(self, model: ClinVLA):
        super().__init__()
        self.model = model

    def forward(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        lateral: torch.Tensor | None,  # (B, 3, H, W)
        lateral_present: torch.Tensor | None,  # (B,) bool
        text_emb: torch.Tensor,  # (B, E) L2-normalised
        words: torch.Tensor,  # (B, T, E)
        word_mask: torch.Tensor,  # (B, T) bool
    ) -> ClinVLAOutput:
        m = self.model
        image_emb, regions, region_mask, cls, patches, keep_idx = m._encode_images(
            frontal, lateral, lateral_present, m.config.vision.mask_ratio, False
        )
        logit_scale, tau = m.temperatures()
        mim = None
        if m.decoder is not None and keep_idx is not None and m.config.loss.mim_weight > 0:
            b = frontal.shape[0]
            mim = m.decoder(cls[:b], patches[:b], keep_idx[:b], frontal)
        return ClinVLAOutput(image_emb, text_emb.to(image_emb.dtype), regions, region_mask,
                             words.to(regions.dtype), word_mask, logit_scale, tau, mim)


class LockedTextFeatures:
    """The outputs of the frozen text tower during the locked-text phase: either computed once for
    every training report (cache=True; the report as written) and looked up by dataset index, or
    computed for each batch without autograd (its texts as the loader gives them, shuffled)."""

    def __init__(self, model: ClinVLA, studies: Sequence[Study], cache: bool, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_size: int = 64):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.cache = None
        if cache:
            texts = [report_text(s.report) for s in studies]
            width = model.config.text.max_length - 1  # word positions ([CLS] excluded)
            embs, words, masks = [], [], []
            for i in range(0, len(texts), batch_size):
                e, w, wm = self._encode(*model.tokenizer(texts[i:i + batch_size]))
                embs.append(e.cpu())
                words.append(F.pad(w.cpu(), (0, 0, 0, width - w.shape[1])))
                masks.append(F.pad(wm.cpu(), (0, width - wm.shape[1]), value=False))
            self.cache = (torch.cat(embs), torch.cat(words), torch.cat(masks))

    @torch.no_grad()
    def _encode(self, ids: torch.Tensor, mask: torch.Tensor):
        text = self.model.text
        was_training = text.training
        text.eval()  # a locked tower is deterministic: no dropout
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                e, w, wm = self.model.encode_text((ids.to(self.device), mask.to(self.device)), return_local=True)
        finally:
            text.train(was_training)
        return e.float(), w.float(), wm

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_emb (B, E), words (B, T, E), word_mask (B, T)) for a collated batch."""
        if self.cache is None:
            return self._encode(batch["input_ids"], batch["attention_mask"])
        idx = batch["index"]
        emb, words, mask = (t[idx] for t in self.cache)
        real = mask.any(dim=0).nonzero()
        t = int(real.max()) + 1 if real.numel() else 1  # drop the columns that are padding in every row
        dev = self.device
        return emb.to(dev), words[:, :t].to(dev), mask[:, :t].to(dev)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    samples_per_s: float
    final_loss: float
    history: list[dict] = field(default_factory=list)


def _split(studies: Sequence[Study], name: str) -> list[Study]:
    if name == "train":
        return [s for s in studies if s.split in (None, "train")]
    return [s for s in studies if s.split == name]


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    config: "str | Path | dict | ClinVLAConfig",
    data: "str | Path | Sequence[Study]",
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    epochs: int | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    preload: bool = False,
    evaluate_fn: Callable[[ClinVLA, int], dict] | None = None,
    loader_fn: Callable | None = None,
) -> TrainResult:
    """Trains and returns a summary; the checkpoint is ``out_dir/model.safetensors``."""
    cfg = load_config(config)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if epochs is not None:
        cfg.train.epochs = epochs
    tc = cfg.train
    out = Path(out_dir)
    dist_utils.init_from_env()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    weights_file, state_file = out / WEIGHTS_NAME, out / STATE_NAME
    if weights_file.exists() and not resume:
        raise TrainError(
            f"{out} already holds a training run ({WEIGHTS_NAME}); pass --resume to continue it "
            "or choose another --out (nothing was overwritten)"
        )
    if resume and not (weights_file.exists() and state_file.exists()):
        raise TrainError(f"--resume: {out} has no {WEIGHTS_NAME} and {STATE_NAME} to resume from")

    # data
    if isinstance(data, (str, Path)):
        from .data import open_dataset

        studies = list(open_dataset(data))
    else:
        studies = list(data)
    train_studies = _split(studies, "train")
    val_studies = _split(studies, "validate")
    two_views = cfg.vision.num_views == 2
    v = cfg.vision
    train_set = StudyDataset(train_studies, v.image_size, v.pixel_mean, v.pixel_std, train=tc.augment,
                             seed=tc.seed, two_views=two_views, loader=loader_fn)
    if preload:
        train_set.preload(progress=progress and main)

    # model, optimizer, schedule
    seed_everything(tc.seed + rank)
    if resume:
        model = load_checkpoint(weights_file)  # the model is the checkpoint's; training settings may change
    else:
        model = create_model(cfg, verbose=main)
    model.config.train = cfg.train
    cfg = model.config  # now with the text encoder's BertConfig recorded
    model.to(dev)
    model.train()
    if main and resume:
        print(model.describe_parameters())
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.text_lr_scale), lr=tc.lr,
                                  betas=tuple(tc.betas))
    locked_steps = tc.locked_text_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_lambda(tc, locked_steps if g["tower"] == "text" else 0) for g in optimizer.param_groups]
    )
    text_params = [p for n, p in model.named_parameters() if n.startswith(TEXT_PREFIXES) and p.requires_grad]
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuple_state(state["python_rng"]))

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False
        )

    sampler = GlobalBatchSampler(len(train_set), tc.batch_size, tc.seed, rank, world)
    steps_per_epoch = sampler.batches_per_epoch // tc.grad_accum
    if steps_per_epoch == 0:
        raise DatasetError(
            f"one epoch has {sampler.batches_per_epoch} batches, fewer than train.grad_accum={tc.grad_accum}"
        )
    total_steps = tc.max_steps
    if tc.epochs is not None:
        total_steps = min(total_steps, tc.epochs * steps_per_epoch)
    collate = Collate(model.tokenizer)
    amp_dtype = autocast_dtype(tc.amp, dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    if tc.center_heads and not resume:
        probe = collate([train_set[i] for i in range(min(len(train_set), 64))])
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            cos = model.center_projection_heads(
                probe["frontal"].to(dev), probe["input_ids"].to(dev), probe["attention_mask"].to(dev),
                probe["lateral"].to(dev) if two_views else None,
                probe["lateral_present"].to(dev) if two_views else None,
            )
        if world > 1:  # every rank must start from rank 0's weights (DDP broadcasts them only at wrap time)
            for p in model.parameters():
                torch.distributed.broadcast(p.data, src=0)
        if main:
            print("centred the projection heads: mean pairwise cosine "
                  + ", ".join(f"{k} {cos[f'{k}_cos_before']:.3f} -> {cos[f'{k}_cos_after']:.3f}" for k in ("image", "text")))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []

    def save(final: bool = False) -> None:
        if not main:
            return
        save_checkpoint(model, weights_file, extra={"step": str(step)})
        _atomic_torch_save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "torch_rng": torch.get_rng_state(),
                "python_rng": _list_state(random.getstate()),
            },
            state_file,
        )

    def log(record: dict) -> None:
        history.append(record)
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True, mininterval=1.0)
    t_start = time.perf_counter()
    samples_seen = 0
    last_loss = float("nan")
    window: dict[str, float] = {}
    window_n = 0
    window_t = time.perf_counter()
    window_samples = 0
    phase_locked: bool | None = None  # the phase the forward module below was set up for
    forward_module: torch.nn.Module | None = None
    text_features: LockedTextFeatures | None = None
    while step < total_steps:
        sampler.set_position(epoch, batch_in_epoch)
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=tc.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=tc.num_workers, persistent_workers=False, drop_last=True,
            pin_memory=dev.type == "cuda",
            # its own generator: a loader drawing its base seed from the global RNG would shift the
            # masking noise of every later step, and a resumed run would no longer match
            generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch),
        )
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            batch_in_epoch += 1
            locked = step < locked_steps
            if locked != phase_locked:  # first batch, or the text tower unlocks
                forward_module = None  # a DDP wrapper of the other phase lets go of its hooks
                for p in text_params:
                    p.requires_grad_(not locked)
                if locked:
                    text_features = LockedTextFeatures(model, train_set.studies, tc.locked_text_cache, dev, amp_dtype)
                    forward_module = wrap(LockedTextForward(model))
                else:
                    text_features = None
                    forward_module = wrap(model)
                if main and locked_steps:
                    print(f"\nstep {step}: text tower {'locked' if locked else 'unlocked'}"
                          + (" (outputs cached for every training report)" if locked and tc.locked_text_cache else ""))
                phase_locked = locked
            frontal = batch["frontal"].to(dev, non_blocking=True)
            lateral = batch["lateral"].to(dev, non_blocking=True) if two_views else None
            present = batch["lateral_present"].to(dev, non_blocking=True) if two_views else None
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                if locked:
                    output = forward_module(frontal, lateral, present, *text_features(batch))
                else:
                    output = forward_module(
                        frontal,
                        batch["input_ids"].to(dev, non_blocking=True),
                        batch["attention_mask"].to(dev, non_blocking=True),
                        lateral,
                        present,
                    )
                losses = training_losses(output, cfg.loss)
            loss = losses["loss"] / tc.grad_accum
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at step {step}; lower train.lr or check the data")
            (scaler.scale(loss) if scaler else loss).backward()
            micro += 1
            for k, val in losses.items():
                window[k] = window.get(k, 0.0) + float(val.detach())
            window_n += 1
            samples_seen += tc.batch_size * world
            window_samples += tc.batch_size * world
            if micro < tc.grad_accum:
                continue
            micro = 0
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            last_loss = window["loss"] / window_n
            bar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_t
                rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                       "text_lr": next((lr for lr, g in zip(scheduler.get_last_lr(), optimizer.param_groups)
                                        if g.get("tower") == "text"), 0.0),
                       "grad_norm": float(grad_norm), "samples_per_s": window_samples / max(elapsed, 1e-9),
                       "logit_scale": float(model.temperatures()[0].detach()), "time_s": time.perf_counter() - t_start}
                rec.update({k: dist_utils.all_reduce_mean(val / window_n) for k, val in window.items()})
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.1f}")
                window, window_n, window_t, window_samples = {}, 0, time.perf_counter(), 0
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps:
                _periodic_eval(model, val_studies, cfg, dev, evaluate_fn, step, log, main)
            if tc.save_every and step % tc.save_every == 0:
                save()
            if step >= total_steps:
                break
        if step < total_steps:
            epoch += 1
            batch_in_epoch = 0
    bar.close()
    seconds = time.perf_counter() - t_start
    if tc.eval_every and val_studies:
        _periodic_eval(model, val_studies, cfg, dev, evaluate_fn, step, log, main)
    save(final=True)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(out, step, seconds, samples_seen / max(seconds, 1e-9), last_loss, history)


def _periodic_eval(model, val_studies, cfg, dev, evaluate_fn, step, log, main) -> None:
    if not main or not val_studies:
        return
    model.eval()
    try:
        if evaluate_fn is not None:
            metrics = evaluate_fn(model, step)
        else:
            from .evaluate import quick_validation

            metrics = quick_validation(model, val_studies, device=dev)
    finally:
        model.train()
    log({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
    print(f"\nstep {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _list_state(state):
    """random.getstate() as nested lists (torch.load(weights_only=True) rejects some tuples)."""
    return [state[0], list(state[1]), state[2]]


def _tuple_state(state):
    return (state[0], tuple(state[1]), state[2])
