"""Local re-ranking: the second stage of retrieval.

The global embeddings find the top candidates fast (exact top-k over the archive); the local
(word-to-region) similarity then re-orders those candidates by how well each word of the query
finds a region in the study. Scores are GLoRIA's S (clinvla_engine.losses.local_align); on CUDA
tensors they come from the fused forward kernel, elsewhere from the PyTorch reference.
"""
from __future__ import annotations

import torch

from .losses import local_alignment_scores


@torch.no_grad()
def rerank(
    text_words: torch.Tensor,  # (Q, T, D) float: local word features of Q query texts
    text_mask: torch.Tensor,  # (Q, T) bool: True = real word
    candidate_regions: torch.Tensor,  # (K, M, D) float: local region features of K candidate studies
    candidate_region_mask: torch.Tensor | None,  # (K, M) bool or None (all real)
    top_k: int,
    tau: "tuple[float, float, float] | torch.Tensor" = (4.0, 5.0, 10.0),
    fused: bool | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k), indices (Q, k)) of the k best candidates per query, best first.

    k = min(top_k, K). Candidates are scored in chunks of `chunk` studies so memory stays bounded
    for any K. Ties keep the smaller candidate index first.
    """
    if text_words.dim() == 2:
        raise ValueError(
            f"text_words must be (Q, T, D); got {tuple(text_words.shape)} — add a leading query axis "
            "(text_words[None]) for one query"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    k_total = candidate_regions.shape[0]
    if k_total == 0:
        q = text_words.shape[0]
        return (text_words.new_empty(q, 0, dtype=torch.float32),
                torch.empty(q, 0, dtype=torch.long, device=text_words.device))
    tau1, tau2, tau3 = (tau[0], tau[1], tau[2])
    parts = []
    for k0 in range(0, k_total, chunk):
        regions = candidate_regions[k0:k0 + chunk]
        mask = None if candidate_region_mask is None else candidate_region_mask[k0:k0 + chunk]
        s = local_alignment_scores(regions, text_words, text_mask, mask, tau1, tau2, tau3, fused=fused)
        parts.append(s.float())  # (chunk, Q)
    scores = torch.cat(parts).t()  # (Q, K)
    k = min(top_k, k_total)
    # stable descending order: ties broken by the smaller candidate index
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order
