"""ClinVLA's losses: global (symmetric InfoNCE) and local (GLoRIA word-to-region) alignment."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .local_align import (
    check_local_inputs,
    local_alignment_loss,
    local_alignment_loss_from_scores,
    local_alignment_scores,
    local_alignment_scores_ref,
    use_fused_local,
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
    # float32 logits even under bf16 autocast: at a logit scale near 100, bf16 rounds the logits in
    # steps of about 0.5, which blunts the contrast between near-duplicates (B x B, so it costs nothing)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        dtype = torch.promote_types(image_emb.dtype, torch.float32)  # float64 stays float64
        logits = logit_scale * (image_emb.to(dtype) @ text_emb.to(dtype).t())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


__all__ = [
    "check_local_inputs",
    "global_alignment_loss",
    "local_alignment_loss",
    "local_alignment_loss_from_scores",
    "local_alignment_scores",
    "local_alignment_scores_ref",
    "use_fused_local",
]
