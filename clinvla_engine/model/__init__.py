"""The ClinVLA model: ``create_model(name_or_config)`` and checkpoint I/O."""
from __future__ import annotations

from pathlib import Path

from ..config import ClinVLAConfig, load_config
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .clinvla import ClinVLA, ClinVLAOutput
from .text import Tokenizer


def create_model(
    name_or_config: "str | Path | dict | ClinVLAConfig",
    pretrained: bool = True,
    verbose: bool = False,
    **overrides,
) -> ClinVLA:
    """A ClinVLA model from a preset name ("tiny", "small", "base"), a JSON file, a dict or a config.

    pretrained=True loads the configured text checkpoint (and vision.weights when set);
    pretrained=False builds the same architecture with random weights. Keyword overrides are
    top-level config sections, e.g. ``create_model("small", train={"max_steps": 10})``.
    """
    config = load_config(name_or_config)
    if overrides:
        merged = config.to_dict()
        for key, value in overrides.items():
            if key not in merged:
                raise ValueError(f"unknown config section {key!r}; valid: {', '.join(sorted(merged))}")
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        config = ClinVLAConfig.from_dict(merged)
    model = ClinVLA(config, pretrained=pretrained, verbose=verbose)
    if verbose:
        print(model.describe_parameters())
    return model


__all__ = [
    "CheckpointError",
    "ClinVLA",
    "ClinVLAOutput",
    "Tokenizer",
    "create_model",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
