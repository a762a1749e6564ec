"""The training loop as the steps of a small trainer: ``setup`` (settings, data, model, optimizer,
resume), ``train_step`` (one micro-batch), ``optimizer_step``, ``evaluate`` and ``save``; every
checkpoint read and write goes through ``RunDirectory`` (run_dir.py)."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist_utils
from ..backends import resolve_device
from ..config import ClinVLAConfig, load_config
from ..data.dataset import BadStudyLog, StudyDataset, check_max_bad_fraction
from ..data.study import DatasetError, Study
from ..losses.objective import training_losses
from ..model import ClinVLA, create_model, load_checkpoint
from ..losses.objective import local_weight_at
from .collate import TrainCollate
from .locked_text import LockedTextFeatures, LockedTextForward
from .watch import LocalChanceWatch
from .run_dir import Resumed, RunDirectory, TrainError
from .schedule import (TEXT_HEAD_PREFIXES, TEXT_PREFIXES, GlobalBatchSampler, autocast_dtype, drop_laterals,
                       lr_lambda, param_groups, seed_everything)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    samples_per_s: float
    final_loss: float
    history: list[dict] = field(default_factory=list)
    skipped_studies: list[dict] = field(default_factory=list)  # undecodable images, with path and reason


def _split(studies: Sequence[Study], name: str) -> list[Study]:
    if name == "train":
        return [s for s in studies if s.split in (None, "train")]
    return [s for s in studies if s.split == name]


def check_settings(tc) -> None:
    """Refuses settings that would train nothing or silently mean something else (a run of 0 steps
    writes an untrained checkpoint that looks like a trained one)."""
    def whole(name: str, flag: str, value, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TrainError(
                f"train.{name}{f' ({flag})' if flag else ''} must be a whole number >= {low}, got {value!r}"
                + ("; a run of no steps would write an untrained checkpoint" if name in ("max_steps", "epochs") else "")
            )

    whole("max_steps", "--max-steps", tc.max_steps, 1)
    if tc.epochs is not None:
        whole("epochs", "--epochs", tc.epochs, 1)
    whole("batch_size", "--batch-size", tc.batch_size, 1)
    whole("grad_accum", "", tc.grad_accum, 1)
    whole("log_every", "", tc.log_every, 1)
    whole("save_every", "", tc.save_every, 0)
    whole("eval_every", "", tc.eval_every, 0)
    whole("num_workers", "", tc.num_workers, 0)


def _list_state(state):
    """random.getstate() as nested lists (torch.load(weights_only=True) rejects some tuples)."""
    return [state[0], list(state[1]), state[2]]


def _tuple_state(state):
    return (state[0], tuple(state[1]), state[2])


class Trainer:
    def __init__(
        self,
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
        max_bad_fraction: float | None = None,
    ):
        cfg = load_config(config)
        if max_steps is not None:
            cfg.train.max_steps = max_steps
        if epochs is not None:
            cfg.train.epochs = epochs
        check_settings(cfg.train)
        if max_bad_fraction is None:
            max_bad_fraction = cfg.train.max_bad_fraction
        self.max_bad_fraction = check_max_bad_fraction(max_bad_fraction)
        self.cfg, self.tc = cfg, cfg.train
        self._out = Path(out_dir)
        self.data, self.resume, self.device_name = data, resume, device
        self.progress, self.preload, self.evaluate_fn, self.loader_fn = progress, preload, evaluate_fn, loader_fn
        self.step = self.epoch = self.batch_in_epoch = 0
        self.history: list[dict] = []

    # ---- set up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before step 1, in an order that changes no file until every check has passed:
        the folder, data, model, optimizer and resume state are checked first; RunDirectory.begin
        (config.json, metrics cut back to the checkpoint) comes last."""
        cfg, tc = self.cfg, self.tc
        dist_utils.init_from_env()
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.main = self.rank == 0
        dev = resolve_device(self.device_name)
        if dev.type == "cuda" and self.world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.dev = dev
        self.run = RunDirectory(self.out_dir, main=self.main)
        resumed: Resumed | None = self.run.open_for_resume() if self.resume else None
        if not self.resume:
            self.run.check_fresh()

        # data
        if isinstance(self.data, (str, Path)):
            from ..data import open_dataset

            studies = list(open_dataset(self.data))
        else:
            studies = list(self.data)
        train_studies = _split(studies, "train")
        self.val_studies = _split(studies, "validate")
        self.two_views = cfg.vision.num_views == 2
        v = cfg.vision
        # a bad image is replaced by its neighbour so that every batch keeps its size (see dataset.py)
        self.train_set = StudyDataset(train_studies, v.image_size, v.pixel_mean, v.pixel_std, train=tc.augment,
                                      seed=tc.seed, two_views=self.two_views, loader=self.loader_fn,
                                      on_bad="replace")
        self.bad = BadStudyLog(self.max_bad_fraction, where="the training split", sink=self._log_bad,
                               verbose=self.main)
        self.bad.expect(s.study_id for s in train_studies)
        self.val_bad = BadStudyLog(self.max_bad_fraction, where="the validation split", sink=self._log_bad,
                                   verbose=self.main)
        if resumed is not None:
            self.bad.load_state(resumed.state.get("bad_studies", []))
        if self.preload:
            self.bad.record(self.train_set.preload(progress=self.progress and self.main), step=self.step)

        # model, optimizer, schedule
        seed_everything(tc.seed + self.rank)
        model = self._build_model(cfg, resumed)
        model.config.train = cfg.train
        self.cfg = cfg = model.config  # now with the text encoder's BertConfig recorded
        model.to(dev)
        model.train()
        if self.main and resumed is not None:
            print(model.describe_parameters())
        self.model = model
        self.locked_steps = tc.locked_text_steps
        # the text heads train during the locked phase (train.locked_text_heads), on the image schedule
        heads_apart = bool(self.locked_steps and tc.locked_text_heads)
        self.optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.text_lr_scale, heads_apart),
                                           lr=tc.lr, betas=tuple(tc.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [lr_lambda(tc, self.locked_steps if g["tower"] == "text" else 0) for g in self.optimizer.param_groups],
        )
        locked_prefixes = TEXT_PREFIXES if not heads_apart else tuple(p for p in TEXT_PREFIXES if p not in TEXT_HEAD_PREFIXES)
        self.text_params = [p for n, p in model.named_parameters() if n.startswith(locked_prefixes) and p.requires_grad]
        if resumed is not None:
            self._load_state(resumed.state)

        self.sampler = GlobalBatchSampler(len(self.train_set), tc.batch_size, tc.seed, self.rank, self.world)
        steps_per_epoch = self.sampler.batches_per_epoch // tc.grad_accum
        if steps_per_epoch == 0:
            raise DatasetError(
                f"one epoch has {self.sampler.batches_per_epoch} batches, fewer than train.grad_accum={tc.grad_accum}"
            )
        self.total_steps = tc.max_steps
        if tc.epochs is not None:
            self.total_steps = min(self.total_steps, tc.epochs * steps_per_epoch)
        self.collate = self._make_collate(model)
        self.amp_dtype = autocast_dtype(tc.amp, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if tc.center_heads and resumed is None:
            self._center_heads()
        if self.world > 1:  # every rank has passed its checks (check_fresh included) before rank 0 writes
            torch.distributed.barrier()
        self.run.begin(cfg.to_json(), resumed.step if resumed is not None else None)

    @property
    def out_dir(self) -> Path:
        return Path(self._out)

    # ---- what a subclass (the MAE pretrainer) replaces ------------------------------------------
    def _build_model(self, cfg: ClinVLAConfig, resumed: Resumed | None) -> ClinVLA:
        if resumed is not None:
            return load_checkpoint(resumed.weights)  # the model is the checkpoint's; training settings may change
        return create_model(cfg, verbose=self.main)

    def _make_collate(self, model: ClinVLA):
        return TrainCollate(model.tokenizer, content=self.cfg.loss.local_words == "content")

    def _center_heads(self) -> None:
        model, dev, two = self.model, self.dev, self.two_views
        items = [self.train_set[i] for i in range(min(len(self.train_set), 64))]
        self.bad.record([e for it in items for e in it.get("bad", ())], step=0)
        probe = self.collate(items)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            cos = model.center_projection_heads(
                probe["frontal"].to(dev), probe["input_ids"].to(dev), probe["attention_mask"].to(dev),
                probe["lateral"].to(dev) if two else None,
                probe["lateral_present"].to(dev) if two else None,
            )
        if self.world > 1:  # every rank must start from rank 0's weights (DDP broadcasts them only at wrap time)
            for p in model.parameters():
                torch.distributed.broadcast(p.data, src=0)
        if self.main:
            print("centred the projection heads: mean pairwise cosine "
                  + ", ".join(f"{k} {cos[f'{k}_cos_before']:.3f} -> {cos[f'{k}_cos_after']:.3f}" for k in ("image", "text")))

    # ---- checkpoint and resume (the files themselves: RunDirectory) ----------------------------------
    def _state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "torch_rng": torch.get_rng_state(),
            "python_rng": _list_state(random.getstate()),
            "bad_studies": self.bad.state(),
        }

    def _load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuple_state(state["python_rng"]))

    def save(self) -> None:
        self.run.save(self.model, self._state(), self.step)
        self._last_saved = self.step

    # ---- logging ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.history.append(record)
        self.run.log(record)

    def _log_bad(self, entry: dict) -> None:
        self.log({"step": int(entry.get("step", self.step)), "skipped_study": entry["study_id"],
                  "path": entry["path"], "reason": entry["reason"]})

    # ---- steps -----------------------------------------------------------------------------------
    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.dev.index] if self.dev.type == "cuda" else None, find_unused_parameters=False
        )

    def _set_phase(self, locked: bool) -> None:
        """Sets up the forward of the locked-text phase or of the whole model (first batch, unlock)."""
        self.forward_module = None  # a DDP wrapper of the other phase lets go of its hooks
        for p in self.text_params:
            p.requires_grad_(not locked)
        if locked:
            self.text_features = LockedTextFeatures(self.model, self.train_set.studies, self.tc.locked_text_cache,
                                                    self.dev, self.amp_dtype,
                                                    content=self.cfg.loss.local_words == "content")
            self.forward_module = self._wrap(LockedTextForward(self.model))
        else:
            self.text_features = None
            self.forward_module = self._wrap(self.model)
        if isinstance(self.collate, TrainCollate):
            self.collate.tokenize = not (locked and self.tc.locked_text_cache)
        if self.main and self.locked_steps:
            print(f"\nstep {self.step}: text tower {'locked' if locked else 'unlocked'}"
                  + ((" (hidden states cached for every training report"
                      + ("; reused from an earlier run in this process: same tower and reports)"
                         if self.text_features.reused else ")")) if locked and self.tc.locked_text_cache else "")
                  + ("; its projection heads train" if locked and self.tc.locked_text_heads else ""))
        self.phase_locked = locked

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns its losses."""
        dev, tc = self.dev, self.tc
        locked = self.step < self.locked_steps
        if locked != self.phase_locked:
            self._set_phase(locked)
        frontal = batch["frontal"].to(dev, non_blocking=True)
        lateral = batch["lateral"].to(dev, non_blocking=True) if self.two_views else None
        present = None
        if self.two_views:  # train.lateral_dropout: some present laterals are left out for this step
            present = drop_laterals(batch["lateral_present"], tc.lateral_dropout).to(dev, non_blocking=True)
        content = batch.get("content_mask") if self.cfg.loss.local_words == "content" else None
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            if locked:
                output = self.forward_module(frontal, lateral, present, *self.text_features(batch))
            else:
                if "input_ids" not in batch and isinstance(self.collate, TrainCollate):
                    # collated before the unlock (the loader fetches a batch before its step sets the
                    # phase; a loader worker may hold several)
                    self.collate.add_tokens(batch)
                    content = batch.get("content_mask") if self.cfg.loss.local_words == "content" else None
                if self.cfg.loss.local_words == "content" and content is None:
                    raise TrainError("loss.local_words = 'content' needs a content_mask in every batch "
                                     "(clinvla_engine.train.TrainCollate makes it)")
                output = self.forward_module(
                    frontal,
                    batch["input_ids"].to(dev, non_blocking=True),
                    batch["attention_mask"].to(dev, non_blocking=True),
                    lateral,
                    present,
                    loss_word_mask=None if content is None else content[:, 1:].to(dev, non_blocking=True),
                )
            losses = training_losses(output, self.cfg.loss, step=self.step)
        loss = losses["loss"] / tc.grad_accum
        if not torch.isfinite(loss):
            raise TrainError(f"loss became {loss.item()} at step {self.step}; lower train.lr or check the data")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return losses

    def _step_info(self, step: int) -> dict:
        """Extra fields of a log record about optimizer step `step` (0-based)."""
        return {"local_weight": local_weight_at(self.cfg.loss, step)}

    def optimizer_step(self) -> float:
        """Clips, steps the optimizer and the schedule; returns the gradient norm."""
        opt, scaler = self.optimizer, self.scaler
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        if not scaler and not torch.isfinite(grad_norm):
            # without a GradScaler to skip it, this step would write NaN into every weight, and the
            # next save would replace the last good checkpoint with them
            raise TrainError(f"{self._out}: the gradients of optimizer step {self.step + 1} are NaN or infinite "
                             f"(norm {grad_norm.item()}); the weights were not changed. Resume from the last "
                             "checkpoint with a lower learning rate (or train.amp = \"fp32\" in the config)")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return float(grad_norm)

    def evaluate(self) -> None:
        """Validation on rank 0 (evaluate_fn or quick_validation); logged as val_* records."""
        if not self.main or not self.val_studies:
            return
        model = self.model
        model.eval()
        try:
            if self.evaluate_fn is not None:
                metrics = self.evaluate_fn(model, self.step)
            else:
                from ..evaluate import quick_validation

                metrics = quick_validation(model, self.val_studies, device=self.dev, bad=self.val_bad,
                                           source=f"the model being trained in {self.out_dir} (step {self.step})")
        finally:
            model.train()
        self.log({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}})
        print(f"\nstep {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _loader(self) -> DataLoader:
        tc = self.tc
        self.sampler.set_position(self.epoch, self.batch_in_epoch)
        self.train_set.set_epoch(self.epoch)
        return DataLoader(
            self.train_set, batch_size=tc.batch_size, sampler=self.sampler, collate_fn=self.collate,
            num_workers=tc.num_workers, persistent_workers=False, drop_last=True,
            pin_memory=self.dev.type == "cuda",
            # its own generator: a loader drawing its base seed from the global RNG would shift the
            # masking noise of every later step, and a resumed run would no longer match
            generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + self.epoch),
        )

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        from tqdm import tqdm

        tc, world, total = self.tc, self.world, self.total_steps
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and self.main), dynamic_ncols=True, mininterval=1.0)
        t_start = time.perf_counter()
        samples_seen = 0
        last_loss = float("nan")
        window: dict[str, float] = {}
        counts: dict[str, int] = {}  # per loss: a step with local weight 0 has no "local"
        window_samples = 0
        window_t = time.perf_counter()
        self.phase_locked: bool | None = None  # the phase the forward module was set up for
        self.forward_module = self.text_features = None
        self._last_saved = self.step if self.resume else None
        watch = LocalChanceWatch(tc.batch_size * world, self.cfg.loss.local_weight)
        while self.step < total:
            micro = 0
            self.optimizer.zero_grad(set_to_none=True)
            for batch in self._loader():
                self.batch_in_epoch += 1
                if batch.get("bad"):  # studies replaced in this batch: logged once, threshold checked
                    self.bad.record(batch["bad"], step=self.step + 1)
                losses = self.train_step(batch)
                micro += 1
                for k, val in losses.items():
                    window[k] = window.get(k, 0.0) + float(val.detach())
                    counts[k] = counts.get(k, 0) + 1
                samples_seen += tc.batch_size * world
                window_samples += tc.batch_size * world
                if micro < tc.grad_accum:
                    continue
                micro = 0
                grad_norm = self.optimizer_step()
                step = self.step
                last_loss = window["loss"] / counts["loss"]
                bar.update(1)
                if step % tc.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - window_t
                    lrs = self.scheduler.get_last_lr()
                    rec = {"step": step, "epoch": self.epoch, "lr": lrs[0],
                           "text_lr": next((lr for lr, g in zip(lrs, self.optimizer.param_groups)
                                            if g.get("tower") == "text"), 0.0),
                           "grad_norm": grad_norm, "samples_per_s": window_samples / max(elapsed, 1e-9),
                           "logit_scale": float(self.model.temperatures()[0].detach()),
                           "time_s": time.perf_counter() - t_start, **self._step_info(step - 1)}
                    rec.update({k: dist_utils.all_reduce_mean(val / counts[k]) for k, val in window.items()})
                    self.log(rec)
                    warning = watch.update(step, rec.get("local_weight", 0.0), rec.get("local"))
                    if warning and self.main:
                        print(f"\nstep {step}: warning: {warning}")
                        self.log({"step": step, "warning": warning})
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.1f}")
                    window, counts, window_t, window_samples = {}, {}, time.perf_counter(), 0
                # the last evaluation comes before the last save, so that a resumed finished run has
                # nothing left to do and its log holds the final validation once
                if tc.eval_every and (step % tc.eval_every == 0 or step == total):
                    self.evaluate()
                if tc.save_every and step % tc.save_every == 0:
                    self.save()
                if step >= total:
                    break
            if self.step < total:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        seconds = time.perf_counter() - t_start
        if self._last_saved != self.step:  # the last save step may be the last step: nothing new to write
            self.save()
        if world > 1:
            torch.distributed.barrier()
        return TrainResult(self.out_dir, self.step, seconds, samples_seen / max(seconds, 1e-9), last_loss,
                           self.history, self.bad.entries() + self.val_bad.entries())


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
    max_bad_fraction: float | None = None,
) -> TrainResult:
    """Trains and returns a summary; the checkpoint is ``out_dir/model.safetensors`` (the latest of
    ``out_dir/checkpoints/``). Studies whose images cannot be decoded are skipped and logged; more
    than `max_bad_fraction` of them (default 0.01) stops the run (DatasetError)."""
    trainer = Trainer(config, data, out_dir, max_steps=max_steps, epochs=epochs, resume=resume, device=device,
                      progress=progress, preload=preload, evaluate_fn=evaluate_fn, loader_fn=loader_fn,
                      max_bad_fraction=max_bad_fraction)
    trainer.setup()
    return trainer.fit()
