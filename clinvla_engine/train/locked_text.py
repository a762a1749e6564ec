"""The locked-text warm-up (``train.locked_text_steps``, LiT-style): the training forward with the
text side given, and the frozen text tower's outputs (cached per report or computed per batch)."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.dataset import report_text
from ..data.study import Study
from ..model import ClinVLA, ClinVLAOutput


class LockedTextForward(torch.nn.Module):
    """ClinVLA.forward with the locked text tower's outputs given: the training forward of the
    locked-text phase (train.locked_text_steps). The image side runs with autograd, and so do the
    text projection heads on the tower's hidden states (they train from step 1 when
    train.locked_text_heads is on; otherwise their parameters are frozen and nothing flows)."""

    def __init__(self, model: ClinVLA):
        super().__init__()
        self.model = model

    def forward(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        lateral: torch.Tensor | None,  # (B, 3, H, W)
        lateral_present: torch.Tensor | None,  # (B,) bool
        cls_hidden: torch.Tensor,  # (B, W_text) the tower's [CLS] output
        word_hidden: torch.Tensor,  # (B, T, W_text) its word outputs
        word_mask: torch.Tensor,  # (B, T) bool: the words the local loss sees
    ) -> ClinVLAOutput:
        m = self.model
        image_emb, regions, region_mask, cls, patches, keep_idx = m._encode_images(
            frontal, lateral, lateral_present, m.config.vision.mask_ratio, False
        )
        text_emb = F.normalize(m.text_global_head(cls_hidden), dim=-1)
        words = m.text_local_head(word_hidden)
        logit_scale, tau = m.temperatures()
        mim = None
        if m.decoder is not None and keep_idx is not None and m.config.loss.mim_weight > 0:
            b = frontal.shape[0]
            mim = m.decoder(cls[:b], patches[:b], keep_idx[:b], frontal)
        return ClinVLAOutput(image_emb, text_emb.to(image_emb.dtype), regions, region_mask,
                             words.to(regions.dtype), word_mask, logit_scale, tau, mim)


class LockedTextFeatures:
    """The locked text tower's hidden states during the locked-text phase: either computed once for
    every training report (cache=True; the report as written) and looked up by dataset index, or
    computed for each batch without autograd (its texts as the loader gives them, shuffled).

    content=True narrows the word mask to the content words (loss.local_words = "content"): from
    the cached reports' own tokenization, or from the batch's ``content_mask`` (the collate's)."""

    def __init__(self, model: ClinVLA, studies: Sequence[Study], cache: bool, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_size: int = 64, content: bool = False):
        self.model, self.device, self.amp_dtype, self.content = model, device, amp_dtype, content
        self.cache = None
        self.reused = False
        if cache:
            texts = [report_text(s.report) for s in studies]
            # the hidden states and both word masks (all words; content words) are kept, so runs
            # that differ only in loss.local_words share them too
            key = _cache_key(model, texts, device, amp_dtype, batch_size)
            if _MEMO.get("key") == key:  # a run before this one, in this process, built the same cache
                heads, words, all_words, content_words = _MEMO["cache"]
                self.reused = True
            else:
                width = model.config.text.max_length - 1  # word positions ([CLS] excluded)
                parts: list[list[torch.Tensor]] = [[], [], [], []]
                for i in range(0, len(texts), batch_size):
                    ids, att, content_mask = model.tokenizer(texts[i:i + batch_size], content_mask=True)
                    c, w, wm = self._encode(ids, att, None)
                    pad = width - w.shape[1]
                    parts[0].append(c.cpu())
                    parts[1].append(F.pad(w.cpu(), (0, 0, 0, pad)))
                    parts[2].append(F.pad(wm.cpu(), (0, pad), value=False))
                    parts[3].append(F.pad((wm & content_mask[:, 1:].to(wm.device)).cpu(), (0, pad), value=False))
                heads, words, all_words, content_words = (torch.cat(p) for p in parts)
                _MEMO.clear()
                _MEMO.update(key=key, cache=(heads, words, all_words, content_words))
            self.cache = (heads, words, content_words if content else all_words)

    @torch.no_grad()
    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, content_mask: torch.Tensor | None):
        model = self.model
        text = model.text
        was_training = text.training
        text.eval()  # a locked tower is deterministic: no dropout
        ids, mask = ids.to(self.device), mask.to(self.device)
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                hidden = text(ids, mask)
        finally:
            text.train(was_training)
        word_mask = model._word_mask(ids, mask)
        if content_mask is not None:
            word_mask = word_mask & content_mask[:, 1:].to(self.device)
        return hidden[:, 0].float(), hidden[:, 1:].float(), word_mask

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cls_hidden (B, W_text), word_hidden (B, T, W_text), word_mask (B, T)) for a collated batch."""
        if self.cache is None:
            if self.content and "content_mask" not in batch:
                raise ValueError("loss.local_words = 'content' needs the batch's content_mask (collate with "
                                 "clinvla_engine.train.TrainCollate)")
            return self._encode(batch["input_ids"], batch["attention_mask"],
                                batch["content_mask"] if self.content else None)
        idx = batch["index"]
        cls_hidden, words, mask = (t[idx] for t in self.cache)
        real = mask.any(dim=0).nonzero()
        t = int(real.max()) + 1 if real.numel() else 1  # drop the columns that are padding in every row
        dev = self.device
        return cls_hidden.to(dev), words[:, :t].to(dev), mask[:, :t].to(dev)


# The last cache built in this process and what determines it (one entry): the claims study and the
# demo train several arms and seeds on the same reports, and a locked tower whose adapters are still
# at their init (zero up-projection: the identity) computes the same hidden states in every one of
# them, which take a while to compute (about 40 s for the demo's 1,799 reports on 2 cores).
_MEMO: dict = {}


def _tower_digest(text: torch.nn.Module) -> str:
    """SHA-256 of what the text tower computes with: every parameter and buffer, except those of
    adapters whose up-projection is all zero. Such an adapter returns its input (skip=True, the
    residual adapter after attention) or exactly zero (skip=False, added to the MLP's output in
    model/text.py), whatever its down-projection holds; that init is the only seed-dependent part
    of a locked pretrained tower before training."""
    from ..model.adapters import Adapter

    identity = set()
    for name, mod in text.named_modules():
        if isinstance(mod, Adapter) and not mod.up.weight.any() and not mod.up.bias.any():
            identity.update(f"{name}.{p}" if name else p for p, _ in mod.named_parameters())
    h = hashlib.sha256()
    for k, v in text.state_dict().items():
        if k in identity:
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_key(model: ClinVLA, texts: Sequence[str], device, amp_dtype, batch_size: int) -> tuple:
    tok = hashlib.sha256(json.dumps(model.tokenizer.state(), sort_keys=True, default=str).encode()).hexdigest()
    txt = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return (_tower_digest(model.text), tok, txt, len(texts), model.config.text.max_length, str(device),
            str(amp_dtype), batch_size)
