"""The ClinVLA dual encoder: multi-view image encoder, report encoder, projection heads, temperatures.

Shapes used throughout (B studies, V present views, P patches per view, L kept patches per view,
T word positions, E = config.embed_dim):

* ``encode_images``: frontal (B, 3, H, W) + optional lateral (B, 3, H, W) with a present mask (B,)
  -> global (B, E), L2-normalised; with ``return_local``: regions (B, M, E) and region_mask (B, M)
  where M = L (one view configured) or 2L (frontal then lateral; a missing lateral is masked).
* ``encode_text``: texts or (input_ids, attention_mask) (B, T+1) -> global (B, E), L2-normalised;
  with ``return_local``: words (B, T, E) and word_mask (B, T) (no [CLS], [SEP] or padding).

The global image feature comes from the views through ``vision.fusion`` (model/fusion.py: the
mean of the present views' CLS tokens, a gate over them, or attention over their tokens).
``forward(..., loss_word_mask=...)`` narrows the words the local loss sees (loss.local_words =
"content"); ``vision.init_from`` starts the image tower from a (pretraining) checkpoint.

A missing lateral view is skipped, never faked: only present laterals go through the ViT. The
``static_views=True`` path (used for export) runs every lateral slot and masks the missing ones
out of the mean and the regions, which gives the same numbers with static shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClinVLAConfig
from .fusion import create_fusion
from .text import BERT_FIELDS, TextEncoder, Tokenizer, text_architecture
from .vit import Block, MultiViewViT, load_image_tower, load_vit_weights


class ProjectionHead(nn.Module):
    """Linear - GELU - LayerNorm - Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(in_dim)
        self.fc2 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class MIMDecoder(nn.Module):
    """MAE-style decoder that reconstructs the masked patches of the frontal view (grey pixels,
    normalised per patch); the loss is the mean squared error over masked patches only."""

    def __init__(self, enc_width: int, num_patches: int, patch_size: int, width: int, depth: int, heads: int):
        super().__init__()
        self.patch_size = patch_size
        self.decoder_embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.decoder_blocks = nn.ModuleList(Block(width, heads, 4.0, None) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, patch_size * patch_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def forward(
        self,
        cls: torch.Tensor,  # (B, W) frontal CLS output
        visible: torch.Tensor,  # (B, L, W) frontal kept-patch outputs
        keep_idx: torch.Tensor,  # (B, L) long: which patches were kept
        image: torch.Tensor,  # (B, 3, H, W) the frontal input
    ) -> torch.Tensor:
        b, n_keep, _ = visible.shape
        p = self.patch_size
        num_patches = self.decoder_pos_embed.shape[1] - 1
        x = self.decoder_embed(visible)
        # Under autocast the Linear above returns bf16/fp16 while the mask token stays fp32, and
        # scatter demands one dtype: the mask token takes the dtype of the decoder's tokens.
        full = self.mask_token.to(x.dtype).expand(b, num_patches, -1).clone()
        full = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        x = torch.cat([self.decoder_embed(cls).unsqueeze(1), full], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, P, p*p)
        grey = image.mean(dim=1, keepdim=True)  # the three channels carry the same grey image
        target = F.unfold(grey, kernel_size=p, stride=p).transpose(1, 2)  # (B, P, p*p)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(b, num_patches, device=image.device)
        masked.scatter_(1, keep_idx, 0.0)
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


def narrow_word_mask(mask: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """`mask` (B, T') bool checked against the word positions (B, T) and cut to T columns (a
    collated mask may be padded wider than the texts of its batch)."""
    if mask.dim() != 2 or mask.shape[0] != word_mask.shape[0] or mask.shape[1] < word_mask.shape[1]:
        raise ValueError(
            f"loss_word_mask must be (B, T) = {tuple(word_mask.shape)} bool over the word positions (token "
            f"columns 1.. of input_ids), got {tuple(mask.shape)}"
        )
    return mask[:, : word_mask.shape[1]].to(device=word_mask.device, dtype=torch.bool)


@dataclass
class ClinVLAOutput:
    image_emb: torch.Tensor  # (B, E) L2-normalised
    text_emb: torch.Tensor  # (B, E) L2-normalised
    regions: torch.Tensor  # (B, M, E)
    region_mask: torch.Tensor  # (B, M) bool
    words: torch.Tensor  # (B, T, E)
    word_mask: torch.Tensor  # (B, T) bool
    logit_scale: torch.Tensor  # () clamped exp of the learnable log scale
    tau: torch.Tensor  # (3,) tau1, tau2, tau3
    mim_loss: torch.Tensor | None = None


class ClinVLA(nn.Module):
    def __init__(self, config: ClinVLAConfig, pretrained: bool = True, tokenizer: Tokenizer | None = None,
                 verbose: bool = False):
        super().__init__()
        config = config.copy()
        self.tokenizer = tokenizer or Tokenizer.from_config(config.text)
        if config.text.model == "random" or not pretrained:
            # random weights of text.model's architecture: without this, 'minilm' with an empty
            # text.bert would become BertConfig's defaults (BERT-base, 110M parameters); a
            # checkpoint's config already records every field, so its model directory is not read
            config.text.bert = dict(config.text.bert)
            if not set(BERT_FIELDS) <= set(config.text.bert):
                config.text.bert = {**text_architecture(config.text.model), **config.text.bert}
            config.text.bert.setdefault("vocab_size", len(self.tokenizer.vocab))
            config.text.bert.setdefault("pad_token_id", self.tokenizer.pad_id)
        self.visual = MultiViewViT(config.vision, config.adapter)
        # outside `visual`: the fusion always trains, also when the backbone is frozen
        self.fusion = create_fusion(config.vision.fusion, config.vision.width, config.vision.heads,
                                    config.vision.num_views)
        self.text = TextEncoder(config.text, config.adapter, pretrained=pretrained)
        config.text.bert = dict(self.text.bert_config)  # recorded so a checkpoint rebuilds without guessing
        if len(self.tokenizer.vocab) > config.text.bert["vocab_size"]:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer.vocab)} tokens but the text model's vocab_size is "
                f"{config.text.bert['vocab_size']}; use the tokenizer that belongs to text.model"
            )
        self.config = config
        e, wv, wt = config.embed_dim, config.vision.width, self.text.width
        self.image_global_head = ProjectionHead(wv, e)
        self.text_global_head = ProjectionHead(wt, e)
        self.image_local_head = ProjectionHead(wv, e)
        self.text_local_head = ProjectionHead(wt, e)
        lc = config.loss
        self.logit_scale = nn.Parameter(torch.tensor(math.log(lc.logit_scale_init)))
        self.log_tau = nn.Parameter(
            torch.tensor([math.log(lc.tau1), math.log(lc.tau2), math.log(lc.tau3)]),
            requires_grad=lc.learn_local_temperatures,
        )
        self.decoder = None
        if config.decoder.enabled:
            d = config.decoder
            self.decoder = MIMDecoder(wv, self.visual.num_patches, config.vision.patch_size, d.width, d.depth, d.heads)
        self.image_weights_report: tuple[list[str], list[str]] | None = None
        if pretrained and config.vision.weights:
            self.image_weights_report = load_vit_weights(self.visual, config.vision.weights)
            if verbose:
                missing, unexpected = self.image_weights_report
                print(f"image weights {config.vision.weights}: {len(missing)} missing keys "
                      f"({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}), "
                      f"{len(unexpected)} unexpected ({', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''})")
        if pretrained and config.vision.init_from:
            loaded = load_image_tower(self.visual, config.vision.init_from)
            if verbose:
                print(f"image tower from {config.vision.init_from}: {len(loaded)} backbone tensors loaded "
                      f"(adapters start fresh); backbone {'frozen' if config.vision.frozen else 'fine-tuned'}")
        self.apply_freezing()

    # ---- parameters ---------------------------------------------------------------------------
    def apply_freezing(self) -> None:
        """Freezes the backbones as configured: adapters, norms, CLS/view embeddings, heads and the
        global temperature always train; the local temperatures train when configured."""
        cfg = self.config
        for name, p in self.visual.named_parameters():
            trainable = (not cfg.vision.frozen) or any(
                key in name for key in ("adapter_", "norm", "cls_token", "view_embed")
            )
            p.requires_grad_(trainable)
        for name, p in self.text.named_parameters():
            trainable = (not cfg.text.frozen) or name.startswith("adapter_") or "LayerNorm" in name
            p.requires_grad_(trainable)
        self.log_tau.requires_grad_(cfg.loss.learn_local_temperatures)

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total

    def describe_parameters(self) -> str:
        trainable, total = self.parameter_counts()
        return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.1f}%)"

    def temperatures(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit_scale, tau (3,)): the clamped global scale and the local tau1, tau2, tau3."""
        max_log = math.log(self.config.loss.logit_scale_max)
        return self.logit_scale.clamp(max=max_log).exp(), self.log_tau.exp()

    @torch.no_grad()
    def center_projection_heads(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, T+1)
        attention_mask: torch.Tensor,  # (B, T+1)
        lateral: torch.Tensor | None = None,
        lateral_present: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Data-dependent init: shifts the last bias of every projection head so that its outputs
        on this batch have zero mean. Freshly initialised heads on top of pretrained (or random)
        features give strongly anisotropic embeddings (mean pairwise cosine ~0.83 for MiniLM's
        [CLS] in the demo); contrastive training from there tends to collapse both towers onto one vector.
        Returns the mean pairwise cosine of the global embeddings before and after.

        Always computed in fp32, also inside an autocast region (train() calls it under its amp
        setting): autocast keeps its low-precision copy of each weight for the whole region, so the
        shifted biases would be invisible to the "after" figures, and a bf16 mean is coarse."""
        with torch.autocast(frontal.device.type, enabled=False):
            return self._center_projection_heads(frontal, input_ids, attention_mask, lateral, lateral_present)

    def _center_projection_heads(self, frontal, input_ids, attention_mask, lateral, lateral_present):
        was_training = self.training
        self.eval()
        cls, patches, _, present, b = self._views(frontal, lateral, lateral_present, 0.0)
        img_feat = self.fusion(cls, patches, present, b, False)
        hidden = self.text(input_ids, attention_mask)
        word_mask = self._word_mask(input_ids, attention_mask)

        def mean_cos(x):
            x = F.normalize(x, dim=-1)
            n = x.shape[0]
            return float(((x @ x.t()).sum() - n) / max(1, n * (n - 1)))

        before = {"image": mean_cos(self.image_global_head(img_feat)), "text": mean_cos(self.text_global_head(hidden[:, 0]))}
        for head, feats in ((self.image_global_head, img_feat), (self.text_global_head, hidden[:, 0]),
                            (self.image_local_head, patches.reshape(-1, patches.shape[-1])),
                            (self.text_local_head, hidden[:, 1:][word_mask])):
            head.fc2.bias -= head(feats).mean(dim=0)
        after = {"image": mean_cos(self.image_global_head(img_feat)), "text": mean_cos(self.text_global_head(hidden[:, 0]))}
        self.train(was_training)
        return {f"{k}_cos_before": v for k, v in before.items()} | {f"{k}_cos_after": v for k, v in after.items()}

    # ---- encoders -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts)
        device = device or self.logit_scale.device
        return ids.to(device), mask.to(device)

    def _views(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        lateral: torch.Tensor | None,  # (B, 3, H, W) or None
        lateral_present: torch.Tensor | None,  # (B,) bool or None (= all present)
        mask_ratio: float,
        static_views: bool = False,
    ):
        b = frontal.shape[0]
        device = frontal.device
        two = self.config.vision.num_views == 2
        if lateral is not None and not two:
            raise ValueError("this model was configured with vision.num_views = 1: pass lateral=None")
        if lateral is not None and lateral.shape != frontal.shape:
            raise ValueError(
                f"lateral must have the frontal's shape {tuple(frontal.shape)}, got {tuple(lateral.shape)}"
            )
        if lateral is None:
            present = torch.zeros(b, dtype=torch.bool, device=device)
        elif lateral_present is None:
            present = torch.ones(b, dtype=torch.bool, device=device)
        else:
            present = lateral_present.to(device=device, dtype=torch.bool).reshape(-1)
            if present.shape[0] != b:
                raise ValueError(f"lateral_present must be (B,) = ({b},) bool, got {tuple(lateral_present.shape)}")
        if lateral is not None and static_views:
            images = torch.cat([frontal, lateral])
            view_ids = torch.cat([torch.zeros(b, dtype=torch.long, device=device),
                                  torch.ones(b, dtype=torch.long, device=device)])
        elif lateral is not None:
            lat_idx = present.nonzero().squeeze(1)
            images = torch.cat([frontal, lateral.index_select(0, lat_idx)])
            view_ids = torch.cat([torch.zeros(b, dtype=torch.long, device=device),
                                  torch.ones(lat_idx.numel(), dtype=torch.long, device=device)])
        else:
            images = frontal
            view_ids = torch.zeros(b, dtype=torch.long, device=device)
        cls, patches, keep_idx = self.visual(images, view_ids, mask_ratio)
        return cls, patches, keep_idx, present, b

    def encode_images(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W) float, preprocessed
        lateral: torch.Tensor | None = None,  # (B, 3, H, W) float or None
        lateral_present: torch.Tensor | None = None,  # (B,) bool; None = all present
        return_local: bool = False,
        mask_ratio: float = 0.0,
        static_views: bool = False,
    ):
        out = self._encode_images(frontal, lateral, lateral_present, mask_ratio, static_views, return_local)
        return out[:3] if return_local else out[0]

    def _pool_views(self, cls: torch.Tensor, patches: torch.Tensor, present: torch.Tensor, b: int,
                    static_views: bool) -> torch.Tensor:
        """The study's global feature (B, W) from its views (vision.fusion; see model/fusion.py).
        `cls` (B + n, W) and `patches` (B + n, L, W) hold the B frontal views, then the laterals
        (all B with static_views, else the n present ones)."""
        return self.fusion(cls, patches, present, b, static_views)

    def _word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the real words after [CLS] (no padding, no [SEP])."""
        return attention_mask[:, 1:].bool() & (input_ids[:, 1:] != self.tokenizer.sep_id)

    def _encode_images(self, frontal, lateral, lateral_present, mask_ratio, static_views, local=True):
        cls, patches, keep_idx, present, b = self._views(frontal, lateral, lateral_present, mask_ratio, static_views)
        n_lat = cls.shape[0] - b
        weights = present.to(cls.dtype)
        image_emb = F.normalize(self.image_global_head(self._pool_views(cls, patches, present, b, static_views)), dim=-1)
        if not local:
            return image_emb, None, None, cls, patches, keep_idx
        local_feats = self.image_local_head(patches)  # (B + n_lat, L, E)
        n_tok = local_feats.shape[1]
        f_mask = torch.ones(b, n_tok, dtype=torch.bool, device=frontal.device)
        if self.config.vision.num_views == 2:
            if static_views and n_lat:
                lat = local_feats[b:] * weights[:, None, None]
            else:
                lat = local_feats.new_zeros(b, n_tok, local_feats.shape[-1])
                if n_lat:
                    lat = lat.index_copy(0, present.nonzero().squeeze(1), local_feats[b:])
            regions = torch.cat([local_feats[:b], lat], dim=1)
            region_mask = torch.cat([f_mask, present[:, None].expand(b, n_tok)], dim=1)
        else:
            regions, region_mask = local_feats, f_mask
        return image_emb, regions, region_mask, cls, patches, keep_idx

    def encode_text(
        self,
        texts: Sequence[str] | tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_local: bool = False,
    ):
        """texts: a list of strings, or token ids (B, T+1) with attention_mask (or as a tuple)."""
        if isinstance(texts, tuple):
            input_ids, attention_mask = texts
        elif isinstance(texts, torch.Tensor):
            input_ids = texts
            if attention_mask is None:
                attention_mask = (input_ids != self.tokenizer.pad_id).long()
        else:
            input_ids, attention_mask = self.tokenize(texts)
        hidden = self.text(input_ids, attention_mask)
        text_emb = F.normalize(self.text_global_head(hidden[:, 0]), dim=-1)
        if not return_local:
            return text_emb
        words = self.text_local_head(hidden[:, 1:])
        return text_emb, words, self._word_mask(input_ids, attention_mask)

    def forward(
        self,
        frontal: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, T+1) long
        attention_mask: torch.Tensor,  # (B, T+1)
        lateral: torch.Tensor | None = None,  # (B, 3, H, W)
        lateral_present: torch.Tensor | None = None,  # (B,) bool
        mask_ratio: float | None = None,
        loss_word_mask: torch.Tensor | None = None,  # (B, T) bool, e.g. the content words; None = all
    ) -> ClinVLAOutput:
        """Everything the losses need. mask_ratio defaults to the config's in training, 0 in eval.

        loss_word_mask narrows the word positions the local loss sees (loss.local_words =
        "content": Tokenizer(..., content_mask=True) gives it, column 0 being [CLS]: pass [:, 1:]);
        it is and-ed with the real words, so it can only remove positions."""
        if mask_ratio is None:
            mask_ratio = self.config.vision.mask_ratio if self.training else 0.0
        image_emb, regions, region_mask, cls, patches, keep_idx = self._encode_images(
            frontal, lateral, lateral_present, mask_ratio, False
        )
        text_emb, words, word_mask = self.encode_text((input_ids, attention_mask), return_local=True)
        if loss_word_mask is not None:
            word_mask = word_mask & narrow_word_mask(loss_word_mask, word_mask)
        logit_scale, tau = self.temperatures()
        mim = None
        if self.decoder is not None and keep_idx is not None and self.config.loss.mim_weight > 0:
            b = frontal.shape[0]
            mim = self.decoder(cls[:b], patches[:b], keep_idx[:b], frontal)
        return ClinVLAOutput(image_emb, text_emb, regions, region_mask, words, word_mask, logit_scale, tau, mim)
