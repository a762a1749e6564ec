"""ClinVLA's losses: global (symmetric InfoNCE) and local (GLoRIA word-to-region) alignment."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .local_align import (
    check_local_inputs,
    local_alignment_loss_from_scores,
    local_alignment_scores_ref,
)


def global_alignment_loss(
    image_emb: torch.Tensor,  # (B, E) L2-normalised
    text_emb: torch.Tensor,  # (B, E) L2-normalised
    logit_scale: "torch.Tensor | float",  # the scale itself (already exp'd and clamped), not its log
) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, diagonal as target."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be (B, E), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


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
    """GLoRIA's local similarity S (B_img, B_txt); see clinvla_engine.losses.local_align.

    fused=None runs the fused Triton kernel on CUDA tensors (when Triton is available) and the
    PyTorch reference elsewhere; fused=True / False forces one (True on CPU tensors is an error,
    except under TRITON_INTERPRET=1, which is how the tests run the kernel without a GPU).
    """
    if use_fused_local(regions, fused):
        from ..kernels.local_align import local_align

        return local_align(regions, words, word_mask, region_mask, tau1, tau2, tau3)
    return local_alignment_scores_ref(regions, words, word_mask, region_mask, tau1, tau2, tau3)


def use_fused_local(regions: torch.Tensor, fused: bool | None) -> bool:
    """Whether local_alignment_scores takes the kernel for these inputs (see its docstring)."""
    if fused is not None:
        return bool(fused)
    if not isinstance(regions, torch.Tensor) or not regions.is_cuda:
        return False
    if regions.dtype not in (torch.float32, torch.bfloat16):
        return False
    from ..backends import triton

    return bool(triton())


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
    "check_local_inputs",
    "global_alignment_loss",
    "local_alignment_loss",
    "local_alignment_loss_from_scores",
    "local_alignment_scores",
    "local_alignment_scores_ref",
    "use_fused_local",
]
