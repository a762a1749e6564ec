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

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        if "texts" in batch and self.text_tokenizer is not None:
            out = self.text_tokenizer(batch["texts"], content_mask=self.content)
            batch["input_ids"], batch["attention_mask"] = out[0], out[1]
            if self.content:
                batch["content_mask"] = out[2]
        return batch
