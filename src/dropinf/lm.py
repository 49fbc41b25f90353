"""Language-model tasks: which training documents made a causal LM say this?

    from dropinf import Attributor, Dropout, lm
    train = lm.documents(tokenizer, texts, max_length=512).loader(batch_size=8)       # training text
    query = lm.prompts(tokenizer, prompts, completions).loader(batch_size=8)          # what it said
    attr = Attributor(model, lm.lm_loss(), compressor=Dropout(r=512))
    attr.featurize(train)
    top = attr.topk(query, k=10, measure=lm.completion_loss)                          # documents out

Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (−100 where a token does not
count: padding, and the prompt of a query), right-padded, for an HF causal LM (any model whose
``forward(input_ids=, attention_mask=)`` returns ``.logits``).

* ``lm_loss(reduction="sum")`` — the training side: each document's next-token NLL over its
  counted tokens, summed (the loss of the whole document, the default) or averaged ("mean").
* ``completion_loss`` — the query side: −log p(completion | prompt), the summed NLL of the
  completion's tokens (``dropinf.measures.completion_nll(causal_lm)``); ``token_losses`` its
  per-token form for ``Attributor.token_scores`` (which completion tokens each document drove).
* ``documents`` / ``prompts`` — map-style datasets that tokenize, pad and mask; ``.loader(B)``.

Only a tokenizer object is needed (transformers' or anything with the same call); nothing here
loads from a hub.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import ConfigError
from .measures import causal_lm, completion_nll, lm_targets, token_nll

completion_loss = completion_nll(causal_lm)
token_losses = token_nll(causal_lm)


def lm_loss(reduction: str = "sum") -> Callable:
    """loss_fn(model, batch) -> (B,): each document's next-token NLL over its counted tokens
    (``labels`` when the batch has them, else every attended token), summed or averaged."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

    def loss(model, batch):
        nll = token_losses(model, batch)                     # (B, T-1), 0 where not counted
        if reduction == "sum":
            return nll.sum(1)
        counted = (lm_targets(batch) != -100).sum(1).clamp_min(1)
        return nll.sum(1) / counted
    loss.__name__ = loss.__qualname__ = f"lm_loss_{reduction}"
    return loss


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class _Tokenized(torch.utils.data.Dataset):
    """Rows of (input_ids, labels) token lists; ``collate`` right-pads them into one dict batch."""

    def __init__(self, tokenizer, rows: list[tuple[list[int], list[int]]]):
        self.tokenizer, self.rows, self.pad = tokenizer, rows, _pad_id(tokenizer)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]

    def collate(self, items) -> dict:
        T = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), T), self.pad, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for b, (x, y) in enumerate(items):
            ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            labels[b, :len(y)] = torch.tensor(y, dtype=torch.long)
            mask[b, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loader(self, batch_size: int = 8) -> torch.utils.data.DataLoader:
        """A DataLoader in dataset order (stores and reports index rows by dataset id)."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=False, collate_fn=self.collate)


def documents(tokenizer, texts: Sequence[str], max_length: int = 512) -> _Tokenized:
    """Training documents: each text tokenized (with the tokenizer's special tokens), cut to
    ``max_length`` tokens, every token counted."""
    if not len(texts):
        raise ConfigError("documents(): no texts given")
    rows = []
    for t in texts:
        ids = _ids(tokenizer, str(t), True)[:max_length]
        rows.append((ids, list(ids)))
    return _Tokenized(tokenizer, rows)


def prompts(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int = 512) -> _Tokenized:
    """Prompt/completion pairs: the prompt (with the tokenizer's special tokens) then the
    completion's tokens; only the completion counts (labels −100 on the prompt and padding). A
    pair longer than ``max_length`` loses tokens from the start of its prompt."""
    if len(prompts) != len(completions):
        raise ConfigError(f"{len(prompts)} prompts but {len(completions)} completions: give one completion per prompt")
    if not len(prompts):
        raise ConfigError("prompts(): no prompt/completion pairs given")
    rows = []
    for p, c in zip(prompts, completions):
        p_ids, c_ids = _ids(tokenizer, str(p), True), _ids(tokenizer, str(c), False)
        if not c_ids:
            raise ConfigError(f"the completion {c!r} (of prompt {str(p)[:40]!r}) has no tokens: nothing to attribute")
        c_ids = c_ids[:max_length - 1]
        p_ids = p_ids[max(0, len(p_ids) + len(c_ids) - max_length):]
        rows.append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    return _Tokenized(tokenizer, rows)


__all__ = ["lm_loss", "completion_loss", "token_losses", "documents", "prompts"]
