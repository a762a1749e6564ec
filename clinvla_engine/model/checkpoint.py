"""ClinVLA checkpoints: safe to open, self-describing, written atomically.

A checkpoint is one safetensors file whose metadata carries the full config (``clinvla_config``)
and the tokenizer (``clinvla_tokenizer``), so it rebuilds the model without any other file and
without guessing. ``clinvla train`` writes ``<out>/model.safetensors`` (plus ``config.json`` for
people to read). A ``.pt`` file is accepted too, opened only with ``torch.load(weights_only=True)``:
``{"clinvla_config": <json str>, "clinvla_tokenizer": <json str>, "state_dict": {...}}``; a pickle
that would need to run code is refused.

Integrity: the metadata carries ``content_sha256``, a SHA-256 over the other metadata and every
tensor (name, dtype, shape, bytes), so a flipped bit anywhere in the weights or the config is
refused at load with the file named, instead of loading silently. A checkpoint written before
this digest existed still loads, with a ``CheckpointWarning`` that says it was not verified and
how to add the digest (load it and save it again).

Every file is written to a unique temporary name in the target folder, flushed to disk and
renamed into place (``atomic_output``), so two writers never share a temporary file and a crash
never leaves a half-written file under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..config import ClinVLAConfig, ConfigError
from ..files import atomic_path as atomic_output
from ..files import atomic_write_text
from .clinvla import ClinVLA
from .text import Tokenizer

CHECKPOINT_FORMAT = "clinvla-checkpoint"
WEIGHTS_NAME = "model.safetensors"
DIGEST_KEY = "content_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but could not be fully verified (written before content_sha256)."""


def content_digest(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over the metadata (without the digest itself) and every tensor's name, dtype,
    shape and raw bytes, in name order: independent of how the file lays them out."""
    h = hashlib.sha256(b"clinvla-content-v1\0")
    h.update(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_for_saving(model: ClinVLA) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def checkpoint_metadata(model: ClinVLA, extra: dict | None = None) -> dict[str, str]:
    meta = {
        "format": CHECKPOINT_FORMAT,
        "clinvla_config": model.config.to_json(),
        "clinvla_tokenizer": json.dumps(model.tokenizer.state()),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_checkpoint(model: ClinVLA, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Writes `path` (a .safetensors or .pt file, or a directory that gets model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix not in (".safetensors", ".pt"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = checkpoint_metadata(model, extra)
    state = state_for_saving(model)
    meta[DIGEST_KEY] = content_digest(state, meta)
    # atomic: a crash never leaves a half-written checkpoint under the real name
    with atomic_output(path) as tmp:
        if path.suffix == ".pt":
            torch.save({**meta, "state_dict": state}, tmp)
        else:
            save_file(state, str(tmp), metadata=meta)
    if path.name == WEIGHTS_NAME:  # a readable copy beside the weights; the weights carry their own
        atomic_write_text(path.parent / "config.json", model.config.to_json())
    return path


def _resolve(path: Path) -> Path:
    if path.is_dir():
        candidate = path / WEIGHTS_NAME
        if not candidate.is_file():
            raise CheckpointError(f"checkpoint directory {path} has no {WEIGHTS_NAME}; give the file or the training output folder")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[ClinVLAConfig, dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tokenizer state, state dict, metadata) of a checkpoint, without building the model.

    The content digest is checked: CheckpointError when it differs, CheckpointWarning when the
    checkpoint predates it."""
    path = _resolve(Path(path))
    if path.suffix == ".pt":
        try:
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {path} cannot be opened with torch.load(weights_only=True): it is not a plain "
                f"tensor file (a pickle that would run code is refused). Details: {str(exc).splitlines()[0][:300]}"
            ) from None
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise CheckpointError(f"checkpoint {path} is not a ClinVLA checkpoint (no state_dict entry)")
        meta = {k: v for k, v in blob.items() if isinstance(v, str)}
        state = blob["state_dict"]
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    if "clinvla_config" not in meta:
        raise CheckpointError(
            f"checkpoint {path} is not a ClinVLA checkpoint: it has no clinvla_config metadata "
            "(expected a file written by `clinvla train` or clinvla_engine.model.save_checkpoint)"
        )
    _verify(path, state, meta)
    try:
        config = ClinVLAConfig.from_dict(json.loads(meta["clinvla_config"]), where=f"checkpoint {path}")
        tokenizer = json.loads(meta["clinvla_tokenizer"])
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad metadata ({exc})") from None
    return config, tokenizer, state, meta


def _verify(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        warnings.warn(
            f"checkpoint {path} has no {DIGEST_KEY} (written by an older clinvla-engine): its weights were "
            "loaded without an integrity check. Load it and save it again with "
            "clinvla_engine.model.save_checkpoint to add one.",
            CheckpointWarning,
            stacklevel=3,
        )
        return
    actual = content_digest(state, meta)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content SHA-256 is {actual[:16]}..., the one recorded when it "
            f"was written is {expected[:16]}... (a changed byte in the weights or metadata: disk or copy "
            "error, or an edited file); restore it from a backup or from the training run's checkpoints"
        )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClinVLA:
    """Rebuilds the model from a checkpoint's own config and loads its weights (strict).

    The model remembers where it came from (``model.checkpoint_path``), so that evaluation can
    name the checkpoint when its outputs are unusable (NaN)."""
    config, tok_state, state, _ = read_checkpoint(path)
    model = ClinVLA(config, pretrained=False, tokenizer=Tokenizer.from_state(tok_state))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"checkpoint {path} does not match its own config: {len(missing)} missing "
            f"({', '.join(missing[:5])}), {len(unexpected)} unexpected ({', '.join(unexpected[:5])}), "
            f"{len(bad_shape)} of another shape ({', '.join(bad_shape[:5])})"
        )
    model.load_state_dict(state)
    model.checkpoint_path = str(_resolve(Path(path)))
    return model.to(map_location)
