"""An engine bundle seen through the part of ClinVLA's interface that evaluation uses, so that a
deployed engine is scored by the same protocols, on the same sets, as the checkpoint it came from
(``clinvla eval ENGINE_DIR``; issue 15: the retrieval change of a quantized engine against fp32).

Global embeddings only: the claims protocols read the model's local heads and temperatures, which
an engine does not carry, so they take checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..config import load_config
from .engine import Engine
from .graphs import truncate_tokens


def is_engine_dir(path: str | Path) -> bool:
    """Whether `path` is an engine bundle folder (a manifest.json naming a backend)."""
    import json

    p = Path(path) / "manifest.json"
    if not p.is_file():
        return False
    try:
        return "backend" in json.loads(p.read_text())
    except (OSError, ValueError):
        return False


class EngineModel(torch.nn.Module):
    """Wraps a loaded Engine: ``config``, ``tokenizer``, ``tokenize``, ``encode_images`` and
    ``encode_text`` as ClinVLA has them, run by the engine's graphs (float32 CPU results)."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.config = load_config(engine.manifest["config"])
        self.tokenizer = engine.tokenizer
        self.engine_dir = str(engine.directory)
        # evaluation asks next(model.parameters()) for the device the inputs go to
        self._device_anchor = torch.nn.Parameter(torch.empty(0, device=engine.device), requires_grad=False)
        spec = engine.manifest["graphs"]
        self._image_inputs = [t["name"] for t in spec["image"]["inputs"]]
        self._text_inputs = [t["name"] for t in spec["text"]["inputs"]]

    @classmethod
    def load(cls, directory: str | Path, **load_options) -> "EngineModel":
        return cls(Engine.load(directory, **load_options))

    def tokenize(self, texts: Sequence[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # as the checkpoint tokenizes (texts as given), cut to what the text graph takes
        ids, mask = self.tokenizer(list(texts))
        t = self.tokenizer
        ids, mask = truncate_tokens(ids, mask, self.engine.max_text_len, t.sep_id, t.pad_id)
        return ids.to(device or self.engine.device), mask.to(device or self.engine.device)

    def encode_images(self, frontal: torch.Tensor, lateral: torch.Tensor | None = None,
                      lateral_present: torch.Tensor | None = None, return_local: bool = False,
                      mask_ratio: float = 0.0, static_views: bool = False) -> torch.Tensor:
        if return_local or mask_ratio:
            raise ValueError(f"engine {self.engine_dir} gives global embeddings to evaluation; "
                             "local features and masking take the checkpoint")
        b = frontal.shape[0]
        feeds = {"frontal": frontal.float()}
        if "lateral" in self._image_inputs:
            present = (torch.ones(b) if lateral_present is None else lateral_present.reshape(-1).float())
            feeds["lateral"] = (torch.zeros_like(frontal) if lateral is None else lateral).float()
            feeds["lateral_present"] = present if lateral is not None else torch.zeros(b)
        elif lateral is not None:
            raise ValueError(f"engine {self.engine_dir} encodes the frontal view only: pass lateral=None")
        return self.engine.run_graph("image", feeds, ["image_emb"])["image_emb"]

    def encode_text(self, texts, attention_mask: torch.Tensor | None = None, return_local: bool = False):
        if return_local:
            raise ValueError(f"engine {self.engine_dir} gives global embeddings to evaluation; "
                             "word features take the checkpoint")
        if isinstance(texts, tuple):
            ids, mask = texts
        elif isinstance(texts, torch.Tensor):
            ids, mask = texts, attention_mask
        else:
            ids, mask = self.tokenize(texts)
        if mask is None:
            mask = (ids != self.tokenizer.pad_id).long()
        return self.engine.run_graph("text", {"input_ids": ids.long(), "attention_mask": mask.long()},
                                     ["text_emb"])["text_emb"]

    def close(self) -> None:
        self.engine.close()
