"""Watches a training run for a local alignment loss that learns nothing.

The local (word-to-region) loss is a cross-entropy over the global batch, so ln(B) is what it
scores when its similarities do not depend on the pairing. Stuck there, it is not harmless: on the
demo's test bed with GLoRIA's tau3 = 10 the loss started near 2 ln(B) on random patch features and
fell to exactly ln(B) by making every study's region features alike, which also flattened the
two-view model's global features (benchmarks/recipe_search.md). The watch says so once, while the
run can still be stopped, instead of leaving it to a retrieval table at the end.
"""
from __future__ import annotations

import math


class LocalChanceWatch:
    """Feed it each logged window (step, local weight, mean local loss over the window); once the
    local loss has had its full weight for `patience` steps and the steps since then average
    within `margin` of ln(global batch) or above, `update` returns a warning (once per run)."""

    def __init__(self, global_batch: int, full_weight: float, patience: int = 200, margin: float = 0.03):
        if global_batch < 2:
            raise ValueError(f"global_batch must be >= 2 for a contrastive loss, got {global_batch}")
        self.chance = math.log(global_batch)
        self.full_weight = float(full_weight)
        self.patience, self.margin = int(patience), float(margin)
        self.start: int | None = None  # first step at full weight
        self.values: list[tuple[int, float]] = []  # (step, mean local loss) since `start`
        self.warned = False

    def update(self, step: int, local_weight: float, local_loss: float | None) -> str | None:
        if self.warned or self.full_weight <= 0 or local_loss is None:
            return None
        if local_weight < self.full_weight:  # still ramping in (or not started): not judged yet
            self.start, self.values = None, []
            return None
        if not math.isfinite(local_loss):
            return None  # a non-finite loss stops the run elsewhere
        if self.start is None:
            self.start = step
        self.values.append((step, float(local_loss)))
        if step - self.start < self.patience:
            return None
        recent = [v for s, v in self.values if s > step - self.patience]
        mean = sum(recent) / len(recent)
        if mean < self.chance - self.margin:
            return None
        self.warned = True
        return (f"the local alignment loss has averaged {mean:.3f} over the last {self.patience} steps at full "
                f"weight, at or above chance (ln {round(math.exp(self.chance))} = {self.chance:.3f}): its word-to-region "
                f"scores do not separate matched pairs. Stuck there, the loss can make every study's region features "
                f"alike and drag the global features with them (tools/local_diagnostics.py shows whether it did). "
                f"Lower loss.tau3 (1 on the demo's test bed), lower loss.local_weight or ramp it in later "
                f"(loss.local_start_step, loss.local_ramp_steps)")
