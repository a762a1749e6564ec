"""``clinvla train``: trains ClinVLA on an archive of image-report pairs.

AdamW (betas 0.9/0.95, weight decay 0.05 except on norms, biases, embeddings and temperatures),
linear warm-up then cosine decay, gradient clipping, gradient accumulation, AMP (bf16 on CUDA),
periodic evaluation on the validation split, and checkpoints that resume exactly: the output
folder holds ``model.safetensors`` (the latest weights + config + tokenizer), ``checkpoints/step-N/``
(the latest checkpoint as one atomic unit: weights and ``train_state.pt``, i.e. optimizer,
scheduler, position, RNG), ``config.json`` and ``metrics.jsonl``; see run_dir.py. Every write goes
to a unique temporary name and is renamed into place.

Bad input: a study whose image cannot be decoded is skipped (its batch slot goes to the next
study), logged to stderr and to metrics.jsonl with its path and reason, and counted; the run stops
when more than ``max_bad_fraction`` (``--max-bad-fraction``, default 1%) of the studies are bad.

Recipe knobs (config.py has the details): ``train.lateral_dropout`` (a present lateral is left out
of a training step with this probability), ``vision.fusion`` (mean | gate | attention),
``loss.local_words`` (all | content: the local loss over content words only, the mask made once
per text in the collate, collate.py), ``loss.local_start_step`` / ``local_ramp_steps`` (the local
weight ramped in), ``train.locked_text_heads`` (the text heads train during the locked phase),
``vision.init_from`` + ``vision.frozen`` (start from a pretrained image tower, frozen or not).

``clinvla pretrain`` (pretrain.py): MAE pre-training of the image tower on the archive's images
alone, both views, with the same run folder, checkpoints and resume as training.

Locked-text warm-up (``train.locked_text_steps``, LiT-style): the first steps train the image side
against a frozen text tower whose outputs are computed once per training report; then the text
adapters, norms and heads join, on a learning-rate schedule of their own over the remaining steps.
An image encoder trained from scratch needs this: see the ``locked_text_steps`` comment in config.py.

Multi-GPU: launch with ``torchrun --nproc_per_node N -m clinvla_engine.cli train ...``; each
process takes a slice of every global batch and the losses see the whole batch.

Modules: schedule.py (sampler, parameter groups, learning-rate curve), locked_text.py (the
locked-text forward and features), run_dir.py (the output folder: checkpoints, resume, metrics)
and trainer.py (the Trainer: setup, train_step, optimizer_step, evaluate, save, fit).
"""
from .collate import TrainCollate
from .locked_text import LockedTextFeatures, LockedTextForward
from .run_dir import CHECKPOINTS_DIR, STATE_NAME, RunDirectory, TrainError
from .schedule import (
    TEXT_HEAD_PREFIXES,
    TEXT_PREFIXES,
    GlobalBatchSampler,
    autocast_dtype,
    drop_laterals,
    lr_lambda,
    param_groups,
    seed_everything,
)
from .trainer import Trainer, TrainResult, check_settings, train
from .pretrain import PretrainTrainer, mae_visible_tokens, pretrain

__all__ = [
    "CHECKPOINTS_DIR",
    "GlobalBatchSampler",
    "LockedTextFeatures",
    "LockedTextForward",
    "RunDirectory",
    "STATE_NAME",
    "TEXT_HEAD_PREFIXES",
    "TEXT_PREFIXES",
    "TrainCollate",
    "PretrainTrainer",
    "TrainError",
    "TrainResult",
    "Trainer",
    "autocast_dtype",
    "drop_laterals",
    "mae_visible_tokens",
    "pretrain",
    "check_settings",
    "lr_lambda",
    "param_groups",
    "seed_everything",
    "train",
]
