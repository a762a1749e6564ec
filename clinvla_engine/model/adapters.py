"""AIM-style bottleneck adapters (Yang et al., ICLR 2023), as ClinVLA places them.

In every transformer block of both encoders:

* one adapter in series after attention, with its own skip:  ``h = a + up(gelu(down(a)))``;
* one adapter in parallel with the MLP, scaled by 0.5 and without a skip:
  ``x = x + mlp(n) + 0.5 * up(gelu(down(n)))`` where ``n`` is the MLP's (normed) input.

The up-projection starts at zero, so a freshly adapted network computes exactly what the frozen
backbone computed: training starts from the pretrained function, not from noise.
"""
from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True):
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., dim)
        out = self.up(self.act(self.down(x)))
        return x + out if self.skip else out
