"""View fusion: how a study's frontal and (when present) lateral outputs become its global feature.

``vision.fusion`` picks one of three modules; all take the ViT outputs of one batch of views and
return the study features (B, W):

* ``mean`` (the original recipe): the mean of the present views' CLS tokens. No parameters, so a
  checkpoint written before fusion existed loads as this.
* ``gate``: a softmax gate over the present views' CLS tokens,
  ``pooled = sum_v w_v cls_v`` with ``w = softmax_v(g(LN(cls_v)))`` over the present views only.
  With two views the softmax is ``w_lat = present * sigmoid(s_lat - s_front)``, ``w_front = 1 - w_lat``:
  a missing lateral gets weight exactly 0 and the frontal exactly 1 (no -inf, nothing to export but
  elementwise ops). ``g`` starts at zero, so the gate starts as the mean.
* ``attention``: the mean plus a learned attention read-out over the CLS and patch tokens of the
  present views: ``pooled = mean + W_o MHA(q = LN(mean), k = v = LN(tokens))``, the tokens of a
  missing lateral masked out of the attention. ``W_o`` starts at zero (as the adapters' up
  projections do), so it too starts as the mean and learns what to add. With one query per study
  the key and value projections are folded into it instead of applied to every token (the same
  function and parameters: ``AttentionFusion.read_out``).

Inputs, as ``ClinVLA._views`` produces them: ``cls`` (B + n, W) and ``patches`` (B + n, L, W), the
B frontal views first, then the laterals: all B of them with ``static_views`` (export: a missing
lateral's slot holds anything and is masked out), else only the n present ones, in batch order.
Either way a study without a lateral gives the same feature as a frontal-only forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _laterals_per_study(x: torch.Tensor, present: torch.Tensor, b: int, static_views: bool) -> torch.Tensor:
    """(B, ...) lateral rows in study order: x[b:] as is (static) or scattered into zeros (dynamic)."""
    lat = x[b:]
    if static_views:
        return lat
    full = x.new_zeros((b,) + tuple(x.shape[1:]))
    if lat.shape[0]:
        full = full.index_copy(0, present.nonzero().squeeze(1), lat)
    return full


def mean_of_views(cls: torch.Tensor, present: torch.Tensor, b: int, static_views: bool) -> torch.Tensor:
    """The mean of the present views' CLS tokens, (B, W)."""
    f_cls = cls[:b]
    n_lat = cls.shape[0] - b
    weights = present.to(cls.dtype)
    if static_views and n_lat:
        summed = f_cls + cls[b:] * weights[:, None]
    elif n_lat:
        summed = f_cls.index_add(0, present.nonzero().squeeze(1), cls[b:])
    else:
        summed = f_cls
    return summed / (1.0 + weights)[:, None]


class MeanFusion(nn.Module):
    def forward(self, cls, patches, present, b: int, static_views: bool) -> torch.Tensor:
        return mean_of_views(cls, present, b, static_views)


class GateFusion(nn.Module):
    """Softmax gate over the present views' CLS tokens (see the module docstring)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.score = nn.Linear(width, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def view_weights(self, cls, present, b: int, static_views: bool) -> torch.Tensor:
        """(B, 2) weights of (frontal, lateral): sum to 1, the lateral's exactly 0 where it is missing."""
        n_lat = cls.shape[0] - b
        w_lat = cls.new_zeros(b)
        if n_lat:
            s = self.score(self.norm(cls)).squeeze(-1)  # (B + n,)
            s_lat = _laterals_per_study(s, present, b, static_views)
            w_lat = torch.sigmoid(s_lat - s[:b]) * present.to(cls.dtype)
        return torch.stack([1.0 - w_lat, w_lat], dim=1)

    def forward(self, cls, patches, present, b: int, static_views: bool) -> torch.Tensor:
        if cls.shape[0] == b:  # no lateral in the batch: the frontal's CLS, weight 1
            return cls
        w = self.view_weights(cls, present, b, static_views)
        lat = _laterals_per_study(cls, present, b, static_views)
        return w[:, :1] * cls[:b] + w[:, 1:] * lat


class AttentionFusion(nn.Module):
    """Mean of the CLS tokens plus an attention read-out over every present token (module docstring)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width, eps=1e-6)
        self.norm_kv = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, cls, patches, present, b: int, static_views: bool) -> torch.Tensor:
        base, keys, keep = self.inputs(cls, patches, present, b, static_views)
        return base + self.out(self.read_out(base, keys, keep))

    @staticmethod
    def inputs(cls, patches, present, b: int, static_views: bool):
        """(the mean (B, W), every study's tokens (B, N, W), which of them it attends to: (B, 1, N)
        bool, or None when no study of the batch has a lateral)."""
        base = mean_of_views(cls, present, b, static_views)
        tokens = torch.cat([cls[:, None], patches], dim=1)  # (B + n, 1 + L, W)
        n_tok = tokens.shape[1]
        keys, keep = tokens[:b], None
        if cls.shape[0] > b:
            keys = torch.cat([keys, _laterals_per_study(tokens, present, b, static_views)], dim=1)
            keep = torch.cat([torch.ones(b, n_tok, dtype=torch.bool, device=cls.device),
                              present[:, None].expand(b, n_tok)], dim=1)[:, None, :]
        return base, keys, keep

    def read_out(self, base, keys, keep) -> torch.Tensor:
        """Multi-head attention of one query per study, softmax(q.k / sqrt(d)) v with k, v =
        kv(LN(keys)), the heads concatenated (B, W); the op ``attention_read_out`` of
        benchmarks/bench_fusion.py. The key and value projections are folded into the query rather
        than applied to every token: q.(W_k x + b_k) = (W_k^T q).x + q.b_k, where q.b_k is the same
        for all of a study's tokens and cancels in the softmax; and sum_n a_n (W_v x_n + b_v) =
        W_v (sum_n a_n x_n) + b_v, as the weights sum to 1. So two (B, h, W) products replace a
        (B, N, W) x (W, 2W) projection. ``plain_read_out`` is the unfolded form it is tested against."""
        b, w = base.shape
        h = self.heads
        d = w // h
        x = self.norm_kv(keys)  # (B, N, W)
        q = self.q(self.norm_q(base)).view(b, h, d)
        w_k, w_v = self.kv.weight[:w].view(h, d, w), self.kv.weight[w:].view(h, d, w)
        q_x = torch.einsum("bhd,hdw->bhw", q, w_k) * d ** -0.5  # the query in token space
        scores = torch.einsum("bhw,bnw->bhn", q_x, x)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        pooled = torch.einsum("bhn,bnw->bhw", scores.softmax(dim=-1), x)  # per head: sum_n a_n x_n
        read = torch.einsum("bhw,hdw->bhd", pooled, w_v) + self.kv.bias[w:].view(h, d)
        return read.reshape(b, w)


def plain_read_out(fusion: AttentionFusion, base, keys, keep) -> torch.Tensor:
    """AttentionFusion.read_out computed the plain way (every token projected to keys and values,
    then scaled_dot_product_attention): the reference for tests and the benchmark's baseline."""
    b, w = base.shape
    h = fusion.heads
    q = fusion.q(fusion.norm_q(base)).view(b, 1, h, w // h).transpose(1, 2)  # (B, h, 1, d)
    k, v = fusion.kv(fusion.norm_kv(keys)).view(b, keys.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)
    read = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keep is None else keep[:, None])
    return read.transpose(1, 2).reshape(b, w)


def create_fusion(kind: str, width: int, heads: int, num_views: int) -> nn.Module:
    if kind == "mean" or (kind == "gate" and num_views == 1):  # one view: nothing to weigh
        return MeanFusion()
    if kind == "gate":
        return GateFusion(width)
    if kind == "attention":
        return AttentionFusion(width, heads)
    raise ValueError(f"vision.fusion must be mean, gate or attention, got {kind!r}")
