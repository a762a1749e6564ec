"""The multi-view ViT image encoder.

Parameter names follow timm's / MAE's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so MAE or
MRM chest X-ray checkpoints load directly (see ``load_vit_weights``). ClinVLA adds ``view_embed``
(one learnable vector per view, added to every token of that view) and the AIM adapters
(``blocks.N.adapter_attn``, ``blocks.N.adapter_mlp``).

One encoder is shared by all views. Training drops a random 75% of each view's patch tokens
(MAE-style, independently per view and per study), which makes a step about 4x cheaper; evaluation
keeps every token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, VisionConfig
from .adapters import Adapter
from .capture import capturing


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, width)
        if not capturing() and x.shape[1] == 3 and bool((x[:, 1:] == x[:, :1]).all()):
            # a grey image repeated over the three channels (how every chest X-ray is preprocessed):
            # the same convolution with the channels' weights summed, on one channel: a third of
            # the work, forward and backward (tests/test_model.py)
            p = self.proj
            y = F.conv2d(x[:, :1], p.weight.sum(1, keepdim=True), p.bias, stride=p.stride)
        else:
            y = self.proj(x)
        return y.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, width)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with AIM adapters (series after attention, parallel to the MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, adapter: AdapterConfig | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.mlp_scale = adapter.mlp_scale if adapter else 0.0
        self.adapter_attn = Adapter(width, adapter.ratio, skip=True) if adapter else None
        self.adapter_mlp = Adapter(width, adapter.ratio, skip=False) if adapter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, width)
        a = self.attn(self.norm1(x))
        x = x + (self.adapter_attn(a) if self.adapter_attn is not None else a)
        n = self.norm2(x)
        out = self.mlp(n)
        if self.adapter_mlp is not None:
            out = out + self.mlp_scale * self.adapter_mlp(n)
        return x + out


class MultiViewViT(nn.Module):
    def __init__(self, cfg: VisionConfig, adapter: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, w)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, w))
        self.view_embed = nn.Parameter(torch.zeros(cfg.num_views, w))
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio, adapter if adapter.enabled else None) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.view_embed, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and ".adapter_" not in f".{name}":
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(
        self,
        images: torch.Tensor,  # (N, 3, H, W) float: views of several studies, any order
        view_ids: torch.Tensor,  # (N,) long: 0 = frontal, 1 = lateral
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (cls (N, width), patch tokens (N, L, width), kept patch indices (N, L) or None).

        L = num_patches without masking, round(num_patches * (1 - mask_ratio)) with it.
        """
        size = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(
                f"images must be (N, 3, {size}, {size}) float, got {tuple(images.shape)} {images.dtype}"
            )
        view = self.view_embed[view_ids].unsqueeze(1)  # (N, 1, width)
        x = self.patch_embed(images) + self.pos_embed[:, 1:] + view
        keep_idx = None
        if mask_ratio > 0:
            x, keep_idx = random_masking(x, mask_ratio, generator)
        cls = self.cls_token + self.pos_embed[:, :1] + view
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:], keep_idx


def random_masking(
    x: torch.Tensor,  # (N, P, width)
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps a random subset of round(P * (1 - mask_ratio)) tokens per row, in their original order."""
    n, p, w = x.shape
    keep = max(1, int(round(p * (1.0 - mask_ratio))))
    noise = torch.rand(n, p, device=x.device, generator=generator)
    keep_idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (N, keep)
    return x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, w)), keep_idx


def load_vit_weights(vit: MultiViewViT, path: str) -> tuple[list[str], list[str]]:
    """Loads a timm / MAE / MRM ViT checkpoint into `vit`; returns (missing, unexpected) keys.

    Accepts safetensors or a torch file opened with ``weights_only=True``; state dicts nested
    under "model" or "state_dict" (MAE, MRM) are unwrapped, "module." / "encoder." prefixes
    stripped, and the position embedding is resized when the grid differs.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image-weights {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle that needs code execution, or not a torch file
            raise ValueError(
                f"--image-weights {path}: cannot be opened safely with torch.load(weights_only=True) "
                f"({type(exc).__name__}); convert it to safetensors or a plain state dict"
            ) from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--image-weights {path}: expected a state dict, got {type(state).__name__}")
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "encoder.", "visual.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        cleaned[k] = v
    pos = cleaned.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape:
        cleaned["pos_embed"] = resize_pos_embed(pos, vit.patch_embed.grid)
    if "fc_norm.weight" in cleaned and "norm.weight" not in cleaned:  # MAE fine-tune layout
        cleaned["norm.weight"] = cleaned.pop("fc_norm.weight")
        cleaned["norm.bias"] = cleaned.pop("fc_norm.bias")
    own = vit.state_dict()
    usable = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in cleaned.items() if k in own and own[k].shape != v.shape]
    vit.load_state_dict(usable, strict=False)
    missing = sorted(k for k in own if k not in usable)
    unexpected = sorted([k for k in cleaned if k not in own] + [f"{k} (shape)" for k in mismatched])
    return missing, unexpected


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic resize of the patch part, CLS kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = int(math.isqrt(patches.shape[1]))
    if g * g != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=1)


def is_adapter_key(name: str) -> bool:
    return ".adapter_" in f".{name}"


def load_image_tower(vit: MultiViewViT, path: str) -> list[str]:
    """Loads the image backbone of a ClinVLA checkpoint (e.g. one `clinvla pretrain` wrote) into
    `vit` (``vision.init_from``); returns the names loaded.

    Every backbone tensor (patch, position, CLS and view embeddings, the blocks, the final norm) is
    required with this model's shape: a checkpoint of another vision architecture is refused with
    the keys that differ, never loaded in part. The adapters are not loaded: they start fresh
    (zero up-projection), so the adapted tower starts as exactly the pretrained one.

    One exception to "this model's shape": a one-view model (``num_views`` 1) takes the frontal row
    of a two-view checkpoint's view embeddings (row 0 is the frontal in both), so that a frontal-only
    model can start from a pretraining run over both views; more views than the checkpoint has are
    refused."""
    from .checkpoint import CheckpointError, read_checkpoint

    try:
        _, _, state, _ = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"vision.init_from: {exc}") from None
    own = {k: v for k, v in vit.state_dict().items() if not is_adapter_key(k)}
    tower = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.") and not is_adapter_key(k[7:])}
    views, want = tower.get("view_embed"), own["view_embed"].shape
    if views is not None and views.shape[0] > want[0] and views.shape[1:] == want[1:]:
        tower["view_embed"] = views[:want[0]]  # the frontal row (view 0) first
    missing = sorted(set(own) - set(tower))
    bad_shape = sorted(f"{k} {tuple(tower[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(tower)
                       if tower[k].shape != own[k].shape)
    if missing or bad_shape:
        raise CheckpointError(
            f"vision.init_from {path}: its image tower does not fit this model's vision config "
            f"({len(missing)} missing: {', '.join(missing[:4])}; {len(bad_shape)} of another shape: "
            f"{', '.join(bad_shape[:4])}); use the same vision.image_size, patch_size, width, depth, heads, "
            "mlp_ratio and num_views as the pretraining run"
        )
    vit.load_state_dict({k: tower[k] for k in own}, strict=False)
    return sorted(own)
