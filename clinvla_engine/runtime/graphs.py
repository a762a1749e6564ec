"""What the builder and the runtime both need to know about the two inference graphs.

The builder (``clinvla_engine.export``) traces these wrappers; the runtime's ``compile`` backend
runs them, and the engine truncates token ids the way the graphs expect. They live here, below
both, so that a deployed runtime never imports the builder (``export/`` imports this module, never
the other way round).

* ``image``: ``frontal`` (B, 3, S, S) float32 and, for a two-view model, ``lateral`` (B, 3, S, S)
  float32 with ``lateral_present`` (B,) float32 -> ``image_emb`` (B, E), ``regions`` (B, M, E).
* ``text``: ``input_ids``, ``attention_mask`` (B, T) int64 -> ``text_emb`` (B, E),
  ``words`` (B, T-1, E).
"""
from __future__ import annotations

import torch
from torch import nn

# Shortest token sequence a graph accepts: [CLS] word [SEP]. torch.export needs a lower bound > 2
# because the word features are the sequence minus [CLS] (a length of 1 would be specialised).
MIN_TOKENS = 3

# The one map from the dtype names written in a bundle's graph specs to torch dtypes.
SPEC_DTYPES = {"float32": torch.float32, "int64": torch.int64}
# The one map from a bundle's (or build's) precision to the compute dtype of a torch-run graph.
# fp8 has none: only TensorRT builds it, from Q/DQ nodes in the ONNX graph.
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def two_views(model) -> bool:
    return model.config.vision.num_views == 2


class ImageGraph(nn.Module):
    """frontal, lateral, lateral_present -> (image_emb, regions); see the module docstring."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.two = two_views(model)

    def forward(self, frontal: torch.Tensor, lateral: torch.Tensor | None = None,
                lateral_present: torch.Tensor | None = None):
        # frontal, lateral: (B, 3, S, S) float32; lateral_present: (B,) float32 1/0
        frontal = frontal.to(self.dtype)
        if self.two:
            lateral = lateral.to(self.dtype)
            present = lateral_present > 0.5
        else:
            lateral, present = None, None
        emb, regions, _ = self.model.encode_images(frontal, lateral, present, return_local=True, static_views=True)
        return emb.float(), regions.float()


class TextGraph(nn.Module):
    """input_ids, attention_mask -> (text_emb, words); see the module docstring."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # input_ids, attention_mask: (B, T) int64
        emb, words, _ = self.model.encode_text((input_ids, attention_mask), return_local=True)
        return emb.float(), words.float()


def graph_modules(model, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    return {"image": ImageGraph(model, dtype).eval(), "text": TextGraph(model, dtype).eval()}


def truncate_tokens(ids: torch.Tensor, mask: torch.Tensor, length: int, sep_id: int, pad_id: int):
    """(ids, mask) (B, T) int64 cut to `length` tokens, each cut row still ending in [SEP]; padded
    to >= MIN_TOKENS."""
    if ids.shape[1] > length:
        cut = mask[:, length:].any(dim=1)
        ids, mask = ids[:, :length].clone(), mask[:, :length]
        ids[cut, length - 1] = sep_id
    if ids.shape[1] < MIN_TOKENS:
        pad = MIN_TOKENS - ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), pad_id)], 1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
    return ids, mask
