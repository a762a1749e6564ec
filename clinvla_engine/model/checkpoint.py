"""ClinVLA checkpoints: safe to open, self-describing, written atomically.

A checkpoint is one safetensors file whose metadata carries the full config (``clinvla_config``)
and the tokenizer (``clinvla_tokenizer``), so it rebuilds the model without any other file and
without guessing. ``clinvla train`` writes ``<out>/model.safetensors`` (plus ``config.json`` for
people to read). A ``.pt`` file is accepted too, opened only with ``torch.load(weights_only=True)``:
``{"clinvla_config": <json str>, "clinvla_tokenizer": <json str>, "state_dict": {...}}``; a pickle
that would need to run code is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ClinVLAConfig, ConfigError
from .clinvla import ClinVLA
from .text import Tokenizer

CHECKPOINT_FORMAT = "clinvla-checkpoint"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


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
    tmp = path.with_name(path.name + ".tmp")
    meta = checkpoint_metadata(model, extra)
    state = state_for_saving(model)
    if path.suffix == ".pt":
        torch.save({**meta, "state_dict": state}, tmp)
    else:
        save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint under the real name
    if path.name == WEIGHTS_NAME:  # a readable copy beside the weights; the weights carry their own
        (path.parent / "config.json").write_text(model.config.to_json())
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
    """(config, tokenizer state, state dict, metadata) of a checkpoint, without building the model."""
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
    try:
        config = ClinVLAConfig.from_dict(json.loads(meta["clinvla_config"]), where=f"checkpoint {path}")
        tokenizer = json.loads(meta["clinvla_tokenizer"])
    except (ConfigError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad metadata ({exc})") from None
    return config, tokenizer, state, meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClinVLA:
    """Rebuilds the model from a checkpoint's own config and loads its weights (strict)."""
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
    return model.to(map_location)
