"""The locked-text warm-up (``train.locked_text_steps``, LiT-style): the training forward with the
text side given, and the frozen text tower's outputs (cached per report or computed per batch)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.dataset import report_text
from ..data.study import Study
from ..model import ClinVLA, ClinVLAOutput


class LockedTextForward(torch.nn.Module):
    """ClinVLA.forward with the text side given: the training forward of the locked-text phase
    (train.locked_text_steps). Only the image side runs with autograd; the text embeddings, words
    and word mask come from the frozen text tower (cached or computed without autograd)."""

    def __init__(self, model: ClinVLA):
        super().__init__()
        self.model = model

    def forward(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        lateral: torch.Tensor | None,  # (B, 3, H, W)
        lateral_present: torch.Tensor | None,  # (B,) bool
        text_emb: torch.Tensor,  # (B, E) L2-normalised
        words: torch.Tensor,  # (B, T, E)
        word_mask: torch.Tensor,  # (B, T) bool
    ) -> ClinVLAOutput:
        m = self.model
        image_emb, regions, region_mask, cls, patches, keep_idx = m._encode_images(
            frontal, lateral, lateral_present, m.config.vision.mask_ratio, False
        )
        logit_scale, tau = m.temperatures()
        mim = None
        if m.decoder is not None and keep_idx is not None and m.config.loss.mim_weight > 0:
            b = frontal.shape[0]
            mim = m.decoder(cls[:b], patches[:b], keep_idx[:b], frontal)
        return ClinVLAOutput(image_emb, text_emb.to(image_emb.dtype), regions, region_mask,
                             words.to(regions.dtype), word_mask, logit_scale, tau, mim)


class LockedTextFeatures:
    """The outputs of the frozen text tower during the locked-text phase: either computed once for
    every training report (cache=True; the report as written) and looked up by dataset index, or
    computed for each batch without autograd (its texts as the loader gives them, shuffled)."""

    def __init__(self, model: ClinVLA, studies: Sequence[Study], cache: bool, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_size: int = 64):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.cache = None
        if cache:
            texts = [report_text(s.report) for s in studies]
            width = model.config.text.max_length - 1  # word positions ([CLS] excluded)
            embs, words, masks = [], [], []
            for i in range(0, len(texts), batch_size):
                e, w, wm = self._encode(*model.tokenizer(texts[i:i + batch_size]))
                embs.append(e.cpu())
                words.append(F.pad(w.cpu(), (0, 0, 0, width - w.shape[1])))
                masks.append(F.pad(wm.cpu(), (0, width - wm.shape[1]), value=False))
            self.cache = (torch.cat(embs), torch.cat(words), torch.cat(masks))

    @torch.no_grad()
    def _encode(self, ids: torch.Tensor, mask: torch.Tensor):
        text = self.model.text
        was_training = text.training
        text.eval()  # a locked tower is deterministic: no dropout
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                e, w, wm = self.model.encode_text((ids.to(self.device), mask.to(self.device)), return_local=True)
        finally:
            text.train(was_training)
        return e.float(), w.float(), wm

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_emb (B, E), words (B, T, E), word_mask (B, T)) for a collated batch."""
        if self.cache is None:
            return self._encode(batch["input_ids"], batch["attention_mask"])
        idx = batch["index"]
        emb, words, mask = (t[idx] for t in self.cache)
        real = mask.any(dim=0).nonzero()
        t = int(real.max()) + 1 if real.numel() else 1  # drop the columns that are padding in every row
        dev = self.device
        return emb.to(dev), words[:, :t].to(dev), mask[:, :t].to(dev)
