"""torch.func fallback: per-example gradients of any parameter block by vmap(grad(.)).

Used for every tracked block that no fused hook covers (and, with ``fused=False``, for all
blocks). If vmap cannot trace the model (data-dependent control flow), it falls back to a loop
of single-example backward passes and says so once.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LossModule(nn.Module):
    """(model, loss_fn) as one module: ``forward(batch)`` is ``loss_fn(model, batch)``, so that
    torch.func.functional_call can swap the model's parameters (keys ``model.<name>``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def per_example_values(values, what: str = "loss_fn") -> torch.Tensor:
    """``values`` if it is a (B,) tensor, else a LossShapeError that says what was returned and the
    fix (``what``: "loss_fn" or "measure")."""
    if isinstance(values, torch.Tensor) and values.dim() == 1:
        return values
    from ..errors import LossShapeError
    shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
    msg = f"{what}(model, batch) must return one value per example, shape (B,); got {shape}."
    if isinstance(values, (tuple, list)) and len(values) == 2:
        msg += (" A pair looks like a forward (logits, targets) such as dropinf.measures.causal_lm, which is what a "
                "measure builder takes, not a loss: the training loss of a causal LM is dropinf.lm.lm_loss(), and a "
                "completion's measure dropinf.measures.completion_nll(causal_lm).")
    elif isinstance(values, torch.Tensor) and values.dim() == 2 and what == "measure":
        msg += (" Per-token values (B, T) are for token-level scores: attr.token_scores(query, measure). For one "
                "score per query, sum over tokens (dropinf.measures.completion_nll(causal_lm)).")
    elif isinstance(values, torch.Tensor) and values.dim() == 0:
        msg += " A scalar is a batch mean: use reduction='none' (and sum over tokens per example)."
    else:
        msg += (" Use reduction='none' and sum over tokens per example (dropinf.lm.lm_loss() does that for a "
                "causal LM).")
    raise LossShapeError(msg)


def batch_size(batch) -> int:
    sizes = []
    tree_map(lambda t: sizes.append(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else None, batch)
    if not sizes:
        raise TypeError("batch holds no tensor with a batch dimension")
    return sizes[0]


def densify(g):
    """A sparse gradient (``nn.Embedding(sparse=True)``) as a dense tensor; others unchanged."""
    return g.to_dense() if isinstance(g, torch.Tensor) and g.is_sparse else g


def slice_batch(batch, i: int):
    return tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() else t, batch)


class PerExampleGrads:
    """Flat per-example gradients (B, Σ numel) of the named parameters, in the given order."""

    _warned = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, param_names: Sequence[str]):
        self.wrapper = LossModule(model, loss_fn)
        self.model = model
        self.names = list(param_names)

    def _params(self) -> dict[str, torch.Tensor]:
        pm = dict(self.model.named_parameters(remove_duplicate=False))
        return {n: pm[n].detach() for n in self.names}

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        params = self._params()
        try:
            return self._vmap(params, batch)
        except Exception as exc:  # vmap cannot trace this model: loop instead
            if not PerExampleGrads._warned:
                warnings.warn(f"torch.func.vmap failed on this model ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); using a loop of single-example backward passes "
                              f"for the fallback blocks instead (slower, same result).", stacklevel=2)
                PerExampleGrads._warned = True
            return self._loop(params, batch)

    def _vmap(self, params, batch):
        keyed = {f"model.{n}": p for n, p in params.items()}

        def one(p, example):
            b1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            return functional_call(self.wrapper, p, (b1,)).sum()

        g = vmap(grad(one), in_dims=(None, 0))(keyed, batch)
        return {n: densify(g[f"model.{n}"]) for n in params}

    def _loop(self, params, batch):
        B = batch_size(batch)
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        keyed = {f"model.{n}": t for n, t in zip(params, leaves)}
        out = {n: [] for n in params}
        for i in range(B):
            loss = functional_call(self.wrapper, keyed, (slice_batch(batch, i),)).sum()
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            for n, p, gi in zip(params, leaves, gs):
                out[n].append(torch.zeros_like(p) if gi is None else densify(gi))
        return {n: torch.stack(v) for n, v in out.items()}


def flatten_block(grads: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Concatenate per-example grads of a block's parameters into (B, d_l)."""
    first = grads[names[0]]
    if len(names) == 1:                 # no copy of a one-parameter block (a Linear without bias)
        return first.reshape(first.shape[0], -1)
    return torch.cat([grads[n].reshape(first.shape[0], -1) for n in names], dim=1)
