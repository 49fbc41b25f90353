"""Measurement functions: what the *query* side differentiates, when it is not the training loss.

Influence is I(q, i) = − ∇f(q)ᵀ H̃⁻¹ ∇L(i): the train side is always the training loss L (the
``loss_fn`` the model was trained on), the query side any differentiable f. Pass one as
``measure=`` to ``Attributor.score`` / ``topk`` / ``report`` (or ``measure`` in a CLI entry point).

Every measure here is *loss-like* — lower is better for the query — so the sign reads as for the
loss everywhere: **I > 0: up-weighting train example i raises f(q), i.e. i works against the
query; I < 0: i supports it.** A measure is a function ``measure(model, batch) -> (B,)`` (one
value per example), exactly like ``loss_fn``; a token-level measure returns (B, T) and goes to
``Attributor.token_scores``.

The builders take ``forward(model, batch) -> (logits, targets)``:

    classification  logits (B, C), targets (B,) class ids
    sequences       logits (B, T, V), targets (B, T) token ids with −100 where a token does not
                    count (prompt, padding); shift for causal LMs yourself (logits[:, :-1],
                    ids[:, 1:]) — see ``causal_lm``.

    margin(forward)          −(z_y − logsumexp_{c≠y} z_c): the negated margin of the target
                             class (kronfluence's classification measurement, negated to be
                             loss-like): I > 0 means i pushes the query towards another class
    completion_nll(forward)  −log p(completion | prompt) = Σ of the NLL of the counted tokens:
                             which training examples made the model generate this completion
    token_nll(forward)       (B, T) per-token NLL (0 where not counted): for token_scores, which
                             training examples drove each generated token; its sum over tokens is
                             completion_nll, and token scores add up to the completion's score
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.nn.Module, object], tuple]


def lm_targets(batch) -> torch.Tensor:
    """(B, T-1): the token each position of a causal LM's dict batch predicts, −100 where it does not
    count — ``labels`` when the batch has them, else every attended token of ``input_ids``."""
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return labels[:, 1:]


def causal_lm(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` for an HF causal LM on a dict batch with input_ids, attention_mask and
    optionally labels (−100 = not counted; default: every attended token): shifted logits and
    targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return logits[:, :-1], lm_targets(batch)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast to float32 (a softmax in fp16 loses the small tokens)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _nll(forward: Forward, model, batch) -> torch.Tensor:
    logits, targets = forward(model, batch)
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        from .errors import LossShapeError
        raise LossShapeError(f"sequence measures need forward(model, batch) -> (logits (B, T, V), targets (B, T)); "
                             f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}")
    return F.cross_entropy(_wide(logits).transpose(1, 2), targets, ignore_index=-100, reduction="none")


_EXAMPLES = {"margin": "margin(lambda m, b: (m(b[0]), b[1]))  # forward -> (logits, labels)",
             "completion_nll": "completion_nll(causal_lm), or dropinf.lm.completion_loss",
             "token_nll": "token_nll(causal_lm), or dropinf.lm.token_losses"}


def _builder(name: str, forward, misuse: tuple) -> None:
    """A measure builder used as the measure itself (``measure=completion_nll``) is a ConfigError."""
    if misuse or isinstance(forward, torch.nn.Module) or not callable(forward):
        from .errors import ConfigError
        raise ConfigError(f"{name} is a measure *builder*: call it with a forward(model, batch) first and pass "
                          f"what it returns, e.g. measure={_EXAMPLES[name]}.")


def margin(forward: Forward, *misuse) -> Callable:
    """f = −(z_y − logsumexp_{c≠y} z_c) per example, from forward(model, batch) -> (logits (B, C), y (B,))."""
    _builder("margin", forward, misuse)

    def measure(model, batch):
        logits, y = forward(model, batch)
        logits = _wide(logits)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).logsumexp(1)
        return other - true
    measure.__name__ = measure.__qualname__ = "margin"
    return measure


def completion_nll(forward: Forward, *misuse) -> Callable:
    """f = −log p(counted tokens) per sequence: the summed NLL of the tokens whose target is not −100."""
    _builder("completion_nll", forward, misuse)

    def measure(model, batch):
        return _nll(forward, model, batch).sum(1)
    measure.__name__ = measure.__qualname__ = "completion_nll"
    return measure


def token_nll(forward: Forward, *misuse) -> Callable:
    """(B, T) NLL of each counted token (0 elsewhere): the measure of ``Attributor.token_scores``."""
    _builder("token_nll", forward, misuse)

    def measure(model, batch):
        return _nll(forward, model, batch)
    measure.__name__ = measure.__qualname__ = "token_nll"
    return measure


__all__ = ["causal_lm", "lm_targets", "margin", "completion_nll", "token_nll"]
