"""The two inference graphs every backend compiles, and their input/output specs.

* ``image``: the study image encoder. Inputs ``frontal`` (B, 3, S, S) float32 and, for a two-view
  model, ``lateral`` (B, 3, S, S) float32 with ``lateral_present`` (B,) float32 (1 = the study has a
  lateral view, 0 = it has not; the lateral slot then holds anything, e.g. zeros, and is masked out
  exactly as the eager model skips it). Outputs ``image_emb`` (B, E) L2-normalised and ``regions``
  (B, M, E): the local features for re-ranking (M = P, or 2P frontal-then-lateral).
* ``text``: the report encoder. Inputs ``input_ids`` and ``attention_mask`` (B, T) int64 as the
  bundled tokenizer writes them; outputs ``text_emb`` (B, E) L2-normalised and ``words`` (B, T-1, E).

The masks that go with the local features (``region_mask``, ``word_mask``) follow from the inputs
and are rebuilt by the runtime, so the graphs carry no boolean outputs. Graph inputs and outputs are
float32 at every precision: the wrappers cast to the compute dtype inside, so callers never see it.
Training-only parts (token masking, the MIM decoder, the losses, the temperatures) are not traced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..model import ClinVLA
# The graph wrappers and token rules live in the runtime (a deployment needs them without the
# builder); they are re-exported here for the builder's modules and the benchmarks.
from ..runtime.graphs import MIN_TOKENS, graph_modules, truncate_tokens, two_views  # noqa: F401


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    shape: list  # ints, or names of dynamic dimensions ("batch", "tokens", "tokens - 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraphSpec:
    name: str  # "image" | "text"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def image_spec(model: ClinVLA) -> GraphSpec:
    s, e = model.config.vision.image_size, model.config.embed_dim
    p = model.visual.num_patches
    inputs = [TensorSpec("frontal", "float32", ["batch", 3, s, s])]
    if two_views(model):
        inputs += [TensorSpec("lateral", "float32", ["batch", 3, s, s]), TensorSpec("lateral_present", "float32", ["batch"])]
    m = 2 * p if two_views(model) else p
    outputs = [TensorSpec("image_emb", "float32", ["batch", e]), TensorSpec("regions", "float32", ["batch", m, e])]
    return GraphSpec("image", inputs, outputs)


def text_spec(model: ClinVLA) -> GraphSpec:
    e = model.config.embed_dim
    inputs = [TensorSpec("input_ids", "int64", ["batch", "tokens"]), TensorSpec("attention_mask", "int64", ["batch", "tokens"])]
    outputs = [TensorSpec("text_emb", "float32", ["batch", e]), TensorSpec("words", "float32", ["batch", "tokens - 1", e])]
    return GraphSpec("text", inputs, outputs)


def specs(model: ClinVLA) -> dict[str, GraphSpec]:
    return {"image": image_spec(model), "text": text_spec(model)}


SAMPLE_REPORTS = (
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent basilar atelectasis. Heart size is normal.",
    "Moderate cardiomegaly. Mild pulmonary edema.",
    "Right upper lobe consolidation concerning for pneumonia.",
)


def example_inputs(model: ClinVLA, graph: str, batch: int = 4, device: str | torch.device = "cpu",
                   seed: int = 0, max_tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: random images with a mix of one- and two-view studies, real token ids."""
    g = torch.Generator().manual_seed(seed)
    if graph == "image":
        s = model.config.vision.image_size
        frontal = torch.randn(batch, 3, s, s, generator=g)
        if not two_views(model):
            return (frontal.to(device),)
        lateral = torch.randn(batch, 3, s, s, generator=g)
        present = (torch.arange(batch) % 3 != 1).float()  # some studies without a lateral view
        return frontal.to(device), lateral.to(device), present.to(device)
    texts = [SAMPLE_REPORTS[i % len(SAMPLE_REPORTS)] for i in range(batch)]
    ids, mask = model.tokenizer(texts)
    ids, mask = truncate_tokens(ids, mask, max_tokens or ids.shape[1], model.tokenizer.sep_id, model.tokenizer.pad_id)
    return ids.to(device), mask.to(device)


def text_limit(model: ClinVLA, max_text_len: int) -> int:
    """The longest token sequence the text graph takes: asked, capped by the model and tokenizer."""
    cap = min(int(model.config.text.bert.get("max_position_embeddings", max_text_len)), model.tokenizer.max_length)
    return max(MIN_TOKENS, min(int(max_text_len), cap))


def dynamic_shapes(graph: str, spec: GraphSpec, max_batch: int, max_tokens: int):
    """torch.export dynamic_shapes for a graph: a dynamic batch (and token count for text)."""
    batch = torch.export.Dim("batch", min=1, max=max(2, int(max_batch)))
    if graph == "image":
        return tuple({0: batch} for _ in spec.inputs)
    tokens = torch.export.Dim("tokens", min=MIN_TOKENS, max=max(MIN_TOKENS + 1, int(max_tokens)))
    return ({0: batch, 1: tokens}, {0: batch, 1: tokens})
