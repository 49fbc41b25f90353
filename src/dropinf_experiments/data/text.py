"""Tokenised text batches and per-example losses for HF classifiers and causal LMs."""

from __future__ import annotations

import torch
from torch import nn


class TokenDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples (padded to the longest of each batch by `collate`)."""

    def __init__(self, tokenizer, texts: list[str], labels=None, max_length: int = 64):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids = enc["input_ids"]
        self.labels = None if labels is None else torch.as_tensor(labels)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def collate(self, items: list[dict]) -> dict:
        T = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for i, it in enumerate(items):
            L = len(it["input_ids"])
            ids[i, :L] = torch.tensor(it["input_ids"])
            mask[i, :L] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            out["labels"] = torch.stack([torch.as_tensor(it["labels"]) for it in items])
        return out

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                                           generator=g)


def classifier_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-example cross-entropy of a sequence classifier, shape (B,)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-example next-token loss summed over real tokens (padding ignored), shape (B,)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits, labels = out.logits[:, :-1], labels[:, 1:]
    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                      reduction="none", ignore_index=-100)
    return tok.reshape(labels.shape).sum(1)
