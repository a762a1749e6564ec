"""The training objective: weighted global + local (+ masked-image-modelling) losses over the global batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..distributed import gather_with_grad, rank, world_size


def _pad_to(x: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    if x.shape[dim] == length:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, length - x.shape[dim]]
    return F.pad(x, pad, value=value)


def local_weight_at(cfg: LossConfig, step: int | None) -> float:
    """The local loss weight at optimizer step `step` (0-based; None = after any ramp): 0 before
    loss.local_start_step, then a linear ramp over loss.local_ramp_steps steps up to local_weight."""
    if step is None:
        return float(cfg.local_weight)
    if step < cfg.local_start_step:
        return 0.0
    if cfg.local_ramp_steps > 0:
        return float(cfg.local_weight) * min(1.0, (step - cfg.local_start_step + 1) / cfg.local_ramp_steps)
    return float(cfg.local_weight)


def training_losses(out, cfg: LossConfig, step: int | None = None) -> dict[str, torch.Tensor]:
    """{"loss", "global", "local", "mim"} for a ClinVLAOutput. In a multi-process run each rank
    scores its own rows and columns against the gathered batch (see clinvla_engine.distributed).

    `step` (the 0-based optimizer step) sets the local weight (local_weight_at); a step whose
    weight is 0 does not compute the local loss, and its losses hold no "local"."""
    from . import local_alignment_scores  # the dispatching entry point (fused kernel or reference)

    b = out.image_emb.shape[0]
    world = world_size()
    labels = torch.arange(b, device=out.image_emb.device) + rank() * b
    losses: dict[str, torch.Tensor] = {}
    total = out.image_emb.new_zeros(())
    tau1, tau2, tau3 = out.tau[0], out.tau[1], out.tau[2]

    if cfg.global_weight > 0:
        img_all = gather_with_grad(out.image_emb)
        txt_all = gather_with_grad(out.text_emb)
        logits_img = out.logit_scale * out.image_emb @ txt_all.t()  # (b, world*b)
        logits_txt = out.logit_scale * out.text_emb @ img_all.t()
        losses["global"] = 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))
        total = total + cfg.global_weight * losses["global"]

    local_weight = local_weight_at(cfg, step)
    if local_weight == 0 and cfg.local_weight > 0 and world > 1:
        # DDP (find_unused_parameters=False) needs every trainable parameter in the graph: the
        # local heads join with a zero contribution instead of a B x B x M x T score they would waste
        total = total + 0.0 * (out.regions.sum() + out.words.sum())
    if local_weight > 0:
        if world == 1:
            s = local_alignment_scores(out.regions, out.words, out.word_mask, out.region_mask, tau1, tau2, tau3,
                                       fused=cfg.local_fused)
            rows, cols = s, s.t()
        else:
            # texts of different ranks may be padded to different lengths: pad to the longest
            t_max = int(gather_with_grad(torch.tensor([out.words.shape[1]], device=out.words.device)).max())
            words = _pad_to(out.words, t_max, 1)
            word_mask = _pad_to(out.word_mask, t_max, 1, value=False)
            words_all = gather_with_grad(words)
            word_mask_all = gather_with_grad(word_mask.to(torch.uint8)).bool()
            regions_all = gather_with_grad(out.regions)
            region_mask_all = gather_with_grad(out.region_mask.to(torch.uint8)).bool()
            rows = local_alignment_scores(out.regions, words_all, word_mask_all, out.region_mask, tau1, tau2, tau3,
                                          fused=cfg.local_fused)
            cols = local_alignment_scores(regions_all, words, word_mask, region_mask_all, tau1, tau2, tau3,
                                          fused=cfg.local_fused).t()
        losses["local"] = 0.5 * (F.cross_entropy(rows, labels) + F.cross_entropy(cols, labels))
        total = total + local_weight * losses["local"]

    if cfg.mim_weight > 0 and out.mim_loss is not None:
        losses["mim"] = out.mim_loss
        total = total + cfg.mim_weight * out.mim_loss

    losses["loss"] = total
    return losses
