"""The output folder of a training run, and the one place that writes, checks and resumes its
checkpoints.

Layout::

    out/config.json                          the run's config (written once the run has started)
    out/metrics.jsonl                        one JSON record per line: losses, validation, skipped studies
    out/model.safetensors                    the latest checkpoint's weights (what `clinvla eval out` loads)
    out/checkpoints/step-000000120/          the latest checkpoint, one atomic unit:
        model.safetensors                    weights, config, tokenizer, step, checkpoint_id, content_sha256
        train_state.pt                       optimizer, scheduler, position, RNG, skipped studies, step, checkpoint_id

Why a folder: the weights and the training state are two files, and two renames are never atomic
together (a SIGKILL between them left weights at step N and state at N-1, and resume accepted
it). A checkpoint is therefore written complete into a hidden temporary folder, flushed, and
renamed to ``step-N`` in one rename; a folder named ``step-N`` is complete or absent. Both files
also carry the step and a random checkpoint id, which resume checks against each other and the
folder name. ``out/model.safetensors`` is then pointed at the new weights (a hard link, or a copy,
renamed into place) and older checkpoint folders are removed (renamed away first, so a half-deleted
folder is never mistaken for a checkpoint).

Resume (``open_for_resume``) only reads; ``begin`` then makes the folder match the checkpoint:
leftover temporary files go, ``metrics.jsonl`` is cut back to the checkpoint's step (the records
after it are about to be produced again), ``config.json`` is written, and ``out/model.safetensors``
is re-pointed in case the run died between the rename and that step. A fresh run refuses a folder
that holds any file of a run: it never appends to a dead run's log.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_path as atomic_output
from ..files import TMP_MARK, atomic_write_text, fsync_dir, temp_name
from ..model.checkpoint import WEIGHTS_NAME, save_checkpoint

STATE_NAME = "train_state.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
RUN_FILES = (WEIGHTS_NAME, STATE_NAME, CONFIG_NAME, METRICS_NAME, CHECKPOINTS_DIR)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message names the folder and the fix."""


@dataclass
class Resumed:
    step: int
    weights: Path  # the checkpoint's model.safetensors
    state: dict  # the checkpoint's train_state.pt


class RunDirectory:
    """One training run's output folder. `main` is False on the ranks > 0 of a multi-process run,
    which read checkpoints but never write."""

    def __init__(self, out: str | os.PathLike, main: bool = True):
        self.out = Path(out)
        self.main = main
        self.checkpoints = self.out / CHECKPOINTS_DIR
        self.metrics_path = self.out / METRICS_NAME
        self._pending: list[dict] | None = []  # records logged before begin(): written by begin()
        self.meta_extra: dict[str, str] = {}  # more checkpoint metadata (e.g. the pretraining stage)

    # ---- starting -------------------------------------------------------------------------------
    def check_fresh(self) -> None:
        """TrainError when the folder holds a run (finished, running or dead); nothing is changed."""
        found = [name for name in RUN_FILES if (self.out / name).exists()]
        if not found:
            return
        if self.latest() is not None or (self.out / WEIGHTS_NAME).exists():
            raise TrainError(
                f"{self.out} already holds a training run ({', '.join(found)}); pass --resume to continue it "
                "or choose another --out (nothing was overwritten)"
            )
        raise TrainError(
            f"{self.out} already holds a training run that stopped before its first checkpoint "
            f"({', '.join(found)}); delete those files or choose another --out (nothing was overwritten)"
        )

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or None."""
        if not self.checkpoints.is_dir():
            return None
        steps = [(int(m.group(1)), d) for d in self.checkpoints.iterdir() if (m := _STEP_DIR.match(d.name)) and d.is_dir()]
        return max(steps)[1] if steps else None

    def open_for_resume(self) -> Resumed:
        """The latest checkpoint after checking that its weights and state belong together; reads only."""
        ckpt = self.latest()
        if ckpt is None:
            legacy_w, legacy_s = self.out / WEIGHTS_NAME, self.out / STATE_NAME
            if legacy_w.is_file() and legacy_s.is_file():  # written by clinvla-engine before checkpoint folders
                return self._check_pair(legacy_w, legacy_s, None)
            raise TrainError(
                f"--resume: {self.out} has no checkpoint to resume from ({CHECKPOINTS_DIR}/step-N/ with "
                f"{WEIGHTS_NAME} and {STATE_NAME}); if the run died before its first checkpoint, start it again "
                "without --resume in an empty --out"
            )
        step = int(_STEP_DIR.match(ckpt.name).group(1))
        weights, state = ckpt / WEIGHTS_NAME, ckpt / STATE_NAME
        missing = [p.name for p in (weights, state) if not p.is_file()]
        if missing:
            raise TrainError(
                f"--resume: checkpoint {ckpt} lacks {', '.join(missing)} (files removed by hand?); delete that "
                "folder to resume from an older checkpoint, or start a new run"
            )
        return self._check_pair(weights, state, step)

    def _check_pair(self, weights: Path, state_file: Path, step: int | None) -> Resumed:
        from safetensors import safe_open

        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainError(f"--resume: training state {state_file} cannot be read ({str(exc).splitlines()[0][:200]})") from None
        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as exc:
            raise TrainError(f"--resume: weights {weights} cannot be read ({exc})") from None
        w_step, s_step = meta.get("step"), state.get("step") if isinstance(state, dict) else None
        w_id, s_id = meta.get("checkpoint_id"), state.get("checkpoint_id") if isinstance(state, dict) else None
        # the legacy two-file layout has no checkpoint id: only its step stamps can be compared
        consistent = s_step is not None and w_step == str(s_step) and (step is None or (s_step == step and w_id == s_id))
        if not consistent:
            raise TrainError(
                f"--resume: the weights {weights} (step {w_step}) and the training state {state_file} (step "
                f"{s_step}) do not belong to the same checkpoint, so the run cannot continue exactly; "
                "start a new run (its weights can be loaded with clinvla eval, but not resumed)"
            )
        return Resumed(int(s_step), weights, state)

    def begin(self, config_json: str, resumed_step: int | None) -> None:
        """Called once every check has passed: from here on the folder belongs to this run."""
        if not self.main:
            self._pending = None
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        if resumed_step is not None:
            self._truncate_metrics(resumed_step)
            latest = self.latest()
            if latest is not None:
                self._publish(latest / WEIGHTS_NAME)
        atomic_write_text(self.out / CONFIG_NAME, config_json)
        pending, self._pending = self._pending or [], None
        for record in pending:
            self.log(record)

    def _remove_leftovers(self) -> None:
        """Temporary files and folders of writers that were killed (only names this module makes)."""
        for folder in (self.out, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(".") and TMP_MARK in p.name or p.name.startswith(".trash-"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    # ---- during the run ---------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Appends one record to metrics.jsonl. Appending (not rewriting) is the exception to
        "write to a temporary name": a record cut short by a kill is dropped at resume, which
        rewrites the file atomically."""
        if not self.main:
            return
        if self._pending is not None:
            self._pending.append(record)
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, model, state: dict, step: int) -> Path:
        """Writes checkpoint `step` (weights + `state`) as one unit; returns its folder."""
        if not self.main:
            return self.checkpoints / f"step-{step:09d}"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:09d}"
        checkpoint_id = uuid.uuid4().hex
        tmp = temp_name(final)
        tmp.mkdir()
        try:
            save_checkpoint(model, tmp / WEIGHTS_NAME,
                            extra={**self.meta_extra, "step": str(step), "checkpoint_id": checkpoint_id})
            with atomic_output(tmp / STATE_NAME) as f:
                torch.save({**state, "step": step, "checkpoint_id": checkpoint_id}, f)
            fsync_dir(tmp)
            old = None
            if final.exists():  # the same step saved again: set the old one aside, delete it only
                old = final.with_name(f".trash-{uuid.uuid4().hex[:12]}")  # once the new one is in place
                os.rename(final, old)
            os.rename(tmp, final)  # the commit: the checkpoint exists from here on, complete
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.checkpoints)
        self._publish(final / WEIGHTS_NAME)
        for d in self.checkpoints.iterdir():
            if d != final and _STEP_DIR.match(d.name):
                self._discard(d)
        return final

    def _publish(self, weights: Path) -> None:
        """Points out/model.safetensors at `weights` atomically (hard link; copy where links fail)."""
        target = self.out / WEIGHTS_NAME
        if target.exists() and os.path.samefile(weights, target):
            return  # already published (and rename() of two links to one file would do nothing)
        tmp = temp_name(target)
        try:
            os.link(weights, tmp)
        except OSError:
            shutil.copyfile(weights, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp.unlink(missing_ok=True)  # still there only when target was another link to the same file
        fsync_dir(self.out)

    def _discard(self, folder: Path) -> None:
        trash = folder.with_name(f".trash-{uuid.uuid4().hex[:12]}")
        os.rename(folder, trash)  # gone from the checkpoint names at once; deleting may be cut short
        shutil.rmtree(trash, ignore_errors=True)
