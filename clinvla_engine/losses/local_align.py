"""GLoRIA's local (word-to-region) alignment, vectorised and chunked: the reference implementation.

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
text against many candidate studies is the re-ranking case).

Empty rows: a pair whose text has no real word or whose image has no real region has no defined
similarity; S is 0.0 there (and its gradient 0), never NaN.

Cost: B_img x B_txt x M x T x D multiply-adds, twice. Memory is bounded by processing the images
in chunks of ``chunk_elements`` attention entries; with gradients, each chunk is recomputed in the
backward pass (activation checkpointing), so the quadratic intermediates of only one chunk are
alive at a time. The fused Triton kernel (clinvla_engine.kernels.local_align) never materialises
them at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

COS_EPS = 1e-8  # GLoRIA uses torch's cosine_similarity eps: |c||e| clamped to at least 1e-8
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # attention entries per chunk (64 MiB in float32)

TemperatureLike = "float | torch.Tensor"


def check_local_inputs(regions, words, word_mask, region_mask) -> torch.Tensor:
    """Validates shapes, dtypes and devices; returns the region mask (all True when None)."""
    if not isinstance(regions, torch.Tensor) or regions.dim() != 3:
        raise ValueError(f"regions must be (B_img, M, D) float, got {_desc(regions)}")
    if not isinstance(words, torch.Tensor) or words.dim() != 3:
        raise ValueError(f"words must be (B_txt, T, D) float, got {_desc(words)}")
    if regions.shape[2] != words.shape[2]:
        raise ValueError(
            f"regions and words must share D: regions is {tuple(regions.shape)}, words is {tuple(words.shape)}"
        )
    if regions.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"regions must be float32, float64, bfloat16 or float16, got {regions.dtype}")
    if words.dtype != regions.dtype:
        raise ValueError(f"words must have the dtype of regions ({regions.dtype}), got {words.dtype}")
    if words.device != regions.device:
        raise ValueError(f"words are on {words.device} but regions are on {regions.device}")
    b_img, m, _ = regions.shape
    b_txt, t, _ = words.shape
    if not isinstance(word_mask, torch.Tensor) or word_mask.shape != (b_txt, t) or word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be ({b_txt}, {t}) bool (True = real word), got {_desc(word_mask)}")
    if region_mask is None:
        return torch.ones(b_img, m, dtype=torch.bool, device=regions.device)
    if not isinstance(region_mask, torch.Tensor) or region_mask.shape != (b_img, m) or region_mask.dtype != torch.bool:
        raise ValueError(f"region_mask must be ({b_img}, {m}) bool (True = real region) or None, got {_desc(region_mask)}")
    if word_mask.device != regions.device or region_mask.device != regions.device:
        raise ValueError(f"masks must be on {regions.device} like regions")
    return region_mask


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def _as_tensor(tau, like: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return tau.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(tau), device=like.device, dtype=like.dtype)


def _chunk_scores(
    regions: torch.Tensor,  # (b, M, D) one chunk of images
    words: torch.Tensor,  # (B_txt, T, D)
    word_ok: torch.Tensor,  # (B_txt, T) bool, no all-False rows
    region_ok: torch.Tensor,  # (b, M) bool, no all-False rows
    tau1: torch.Tensor,
    tau2: torch.Tensor,
    tau3: torch.Tensor,
) -> torch.Tensor:
    neg = torch.finfo(regions.dtype).min
    a = torch.einsum("kmd,itd->kimt", regions, words)  # (b, B_txt, M, T)
    a = a.masked_fill(~word_ok[None, :, None, :], neg)
    p = torch.softmax(a, dim=-1) * tau1  # over words
    p = p.masked_fill(~region_ok[:, None, :, None], neg)
    alpha = torch.softmax(p, dim=2)  # over regions
    context = torch.einsum("kimt,kmd->kitd", alpha, regions)  # (b, B_txt, T, D)
    dot = (context * words[None]).sum(-1)
    norms = context.norm(dim=-1) * words.norm(dim=-1)[None]
    cos = dot / norms.clamp_min(COS_EPS)  # (b, B_txt, T)
    z = (tau2 * cos).masked_fill(~word_ok[None], neg)
    return tau3 * torch.logsumexp(z, dim=-1)  # (b, B_txt)


def local_alignment_scores_ref(
    regions: torch.Tensor,  # (B_img, M, D) float
    words: torch.Tensor,  # (B_txt, T, D) float
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """S (B_img, B_txt) in the input dtype; differentiable in every tensor input and temperature."""
    region_mask = check_local_inputs(regions, words, word_mask, region_mask)
    b_img, m, d = regions.shape
    b_txt, t, _ = words.shape
    if b_img == 0 or b_txt == 0:
        return regions.new_zeros(b_img, b_txt) + 0.0 * (regions.sum() + words.sum())
    t1, t2, t3 = (_as_tensor(x, regions) for x in (tau1, tau2, tau3))
    has_word = word_mask.any(dim=1)  # (B_txt,)
    has_region = region_mask.any(dim=1)  # (B_img,)
    # Rows with nothing real get an all-True mask for the arithmetic (so no NaN can form, in the
    # forward or the backward pass) and are zeroed at the end.
    word_ok = word_mask | ~has_word[:, None]
    region_ok = region_mask | ~has_region[:, None]
    per_image = b_txt * max(m * t, t * d, 1)
    step = max(1, min(b_img, chunk_elements // per_image))
    grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (regions, words, t1, t2, t3)
    )
    out = []
    for k0 in range(0, b_img, step):
        args = (regions[k0:k0 + step], words, word_ok, region_ok[k0:k0 + step], t1, t2, t3)
        if grad and step < b_img:
            out.append(checkpoint(_chunk_scores, *args, use_reentrant=False))
        else:
            out.append(_chunk_scores(*args))
    scores = torch.cat(out, dim=0)
    valid = has_region[:, None] & has_word[None, :]
    return scores.masked_fill(~valid, 0.0)


def local_alignment_loss_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mean of cross-entropy over the rows and over the columns of S, the diagonal as target."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"the local loss needs a square S (B_img == B_txt), got {tuple(scores.shape)}")
    labels = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(scores, labels) + F.cross_entropy(scores.t(), labels))
