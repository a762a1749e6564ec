"""The training collate: the data package's Collate, plus the content-word mask of each text
(loss.local_words = "content"), computed once per text in the loader workers, off the training step."""
from __future__ import annotations

from ..data.dataset import Collate


class TrainCollate(Collate):
    """Stacks items and tokenizes their texts; with content=True also ``content_mask`` (B, T+1)
    bool, aligned with ``input_ids`` (see Tokenizer(..., content_mask=True))."""

    def __init__(self, tokenizer, content: bool = False):
        super().__init__(None)  # tokenized here, once, with or without the content mask
        self.text_tokenizer, self.content = tokenizer, content
        # False while the locked text tower's outputs come from its per-report cache (the trainer
        # sets it): nothing reads a batch's tokens then, and the content masks cost a quarter of
        # the loader's time
        self.tokenize = True

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        return self.add_tokens(batch) if self.tokenize else batch

    def add_tokens(self, batch: dict) -> dict:
        """Adds input_ids, attention_mask (and content_mask) for the batch's texts, if missing."""
        if "texts" in batch and self.text_tokenizer is not None and "input_ids" not in batch:
            out = self.text_tokenizer(batch["texts"], content_mask=self.content)
            batch["input_ids"], batch["attention_mask"] = out[0], out[1]
            if self.content:
                batch["content_mask"] = out[2]
        return batch
