"""GLoRIA's local (word-to-region) alignment as a loss: the dispatch between the fused kernel and
the PyTorch reference, and the symmetric cross-entropy on the scores.

For image k (regions r_m, m < M) and text i (words e_j, j < T), exactly as GLoRIA's public
``local_loss`` / ``attention_fn`` compute it::

    a[m, j]     = r_m . e_j                                   raw dot products
    p[m, j]     = softmax_j a[m, j]        over the real words of text i
    alpha[j, m] = softmax_m (tau1 * p[m, j])  over the real regions of image k
    c_j         = sum_m alpha[j, m] r_m                       context of word j
    cos_j       = c_j . e_j / max(|c_j| |e_j|, 1e-8)          (torch.cosine_similarity, GLoRIA's eps)
    S[k, i]     = tau3 * log sum_j exp(tau2 * cos_j)          over the real words of text i

Shapes: regions (B_img, M, D), words (B_txt, T, D), word_mask (B_txt, T) bool, region_mask
(B_img, M) bool or None (all real); S is (B_img, B_txt). B_img may differ from B_txt (one query
text against many candidate studies is the re-ranking case). A pair with no real word or no real
region has S = 0 (and gradient 0), never NaN.

The implementations live in clinvla_engine.kernels.local_align: ``local_align`` (fused Triton,
never materialises the B_img x B_txt x M x T attention), ``local_align_ref`` (chunked PyTorch as
GLoRIA writes it, any device: the oracle) and ``local_align_gram`` (the same function from the
kernels' per-word statistics in PyTorch, without the B_img x B_txt x T x D contexts: the path for
tensors the kernel does not take, in float32 / float64 when M < D). This module imports that one,
never the other way round.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.local_align import COS_EPS, check_local_inputs, local_align_gram, local_align_ref, unsupported

# The reference under the losses' naming (rerank, benchmarks and tests use this name).
local_alignment_scores_ref = local_align_ref


def use_fused_local(regions: torch.Tensor, fused: bool | None, words: torch.Tensor | None = None) -> bool:
    """Whether local_alignment_scores takes the kernel for these inputs (see its docstring)."""
    if fused is not None:
        return bool(fused)
    if not isinstance(regions, torch.Tensor) or not regions.is_cuda or regions.dim() != 3:
        return False
    t = words.shape[1] if isinstance(words, torch.Tensor) and words.dim() == 3 else 0
    if unsupported(t, regions.shape[2], regions.dtype) is not None:  # e.g. float32 at D = 768
        return False
    from ..backends import triton

    return bool(triton())


def local_alignment_scores(
    regions: torch.Tensor,  # (B_img, M, D) float
    words: torch.Tensor,  # (B_txt, T, D) float
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
    fused: bool | None = None,
) -> torch.Tensor:
    """GLoRIA's local similarity S (B_img, B_txt).

    fused=None runs the fused Triton kernel on CUDA tensors (when Triton is available) and PyTorch
    elsewhere, and for shapes the kernel does not take (kernels.local_align.unsupported: float32
    beyond D = 256, more than 256 words): for float32 / float64 inputs with fewer regions than
    feature dimensions (M < D, the training shapes) local_align_gram, which never forms the
    B_img x B_txt x T x D contexts, else local_align_ref; the two agree to float64 rounding (half
    precision keeps the reference: the Gram form is tested in float32 and float64 only).
    fused=True / False forces the kernel or PyTorch (True on CPU tensors is an error, except under
    TRITON_INTERPRET=1, which is how the tests run the kernel without a GPU).
    """
    if use_fused_local(regions, fused, words):
        from ..kernels.local_align import local_align

        return local_align(regions, words, word_mask, region_mask, tau1, tau2, tau3)
    # the contexts cost M x D per word and pair, the Gram form M x M: the smaller one
    if (isinstance(regions, torch.Tensor) and regions.dim() == 3 and regions.shape[1] < regions.shape[2]
            and regions.dtype in (torch.float32, torch.float64)):
        return local_align_gram(regions, words, word_mask, region_mask, tau1, tau2, tau3)
    return local_align_ref(regions, words, word_mask, region_mask, tau1, tau2, tau3)


def local_alignment_loss_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mean of cross-entropy over the rows and over the columns of S, the diagonal as target."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"the local loss needs a square S (B_img == B_txt), got {tuple(scores.shape)}")
    labels = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(scores, labels) + F.cross_entropy(scores.t(), labels))


def local_alignment_loss(
    regions: torch.Tensor,  # (B, M, D)
    words: torch.Tensor,  # (B, T, D)
    word_mask: torch.Tensor,  # (B, T) bool
    region_mask: torch.Tensor | None = None,  # (B, M) bool
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
    fused: bool | None = None,
) -> torch.Tensor:
    """Mean of the cross-entropy over rows (image -> text) and columns (text -> image) of S."""
    scores = local_alignment_scores(regions, words, word_mask, region_mask, tau1, tau2, tau3, fused=fused)
    return local_alignment_loss_from_scores(scores)


__all__ = [
    "COS_EPS",
    "check_local_inputs",
    "local_alignment_loss",
    "local_alignment_loss_from_scores",
    "local_alignment_scores",
    "local_alignment_scores_ref",
    "use_fused_local",
]
