"""Token-level capture: one compressed row per (example, token) of a measurement that returns
(B, T) values (dropinf.measures.token_nll) — which training examples drove each generated token.

One forward with the fused hooks, then one backward per token column t with the saved inputs
kept, so row (b, t) is the compressed gradient of value[b, t] alone. Only fused blocks: the
torch.func path has no per-token form. The layouts the hooks read are verified as for
sequence-level capture (capture.check) with the measure summed over tokens, on the first batch
and on any batch whose inputs are read anew.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, LossShapeError
from .engine import BatchCapture


class TokenCapture(BatchCapture):
    """``tokens(batch)`` → ({block: (B, T, r_l) float32}, values (B, T))."""

    def tokens(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token-level capture: ``loss_fn`` (here a measurement) returns (B, T) values, one per token;
        one forward, then one backward per column t with the saved inputs kept, so row (b, t) is the
        compressed gradient of value[b, t] alone. Returns ({block: (B, T, r_l)}, values (B, T)).
        Only fused blocks (the torch.func fallback has no per-token form). Layouts are verified as for
        sequence-level capture: on the first batch, and on a batch that reads an input anew, the
        summed measure is captured and self-checked first."""
        if self.func:
            raise ConfigError(f"token-level scores need fused capture for every tracked layer; "
                              f"{[l.name for l in self.func][:4]} go through torch.func. Leave them out of track=.")
        if self.check != "never" and not self._checked:
            self._verify_tokens(batch)
        feats, values, fresh = self._tokens(batch)
        if fresh and self.check != "never":
            self._verify_tokens(batch)
            feats, values, _ = self._tokens(batch)
        return feats, values

    def _verify_tokens(self, batch) -> None:
        """Self-check this batch with the measure summed over tokens (the same hooks and layouts)."""
        measure = self.loss_fn

        def summed(model, b):
            return _token_values(measure(model, b)).sum(1)

        self.loss_fn = summed
        try:
            self(batch, check=True)
        finally:
            self.loss_fn = measure
        if self.func:
            block = self.func[0].name
            raise ConfigError(f"token-level scores need the fused hook of layer {block!r}, which cannot capture this "
                              f"model: {self.routed.get(block, 'it has no fused hook')}. Leave it out of track=.")

    def _tokens(self, batch):
        cols = []
        lean = self._lean_allowed(False)
        with self.hooks.attached(self.hooked, keep=True) as rnd, torch.enable_grad():
            rnd.leaves = {} if lean else None
            values = _token_values(self.loss_fn(self.model, batch))
            rnd.B = values.shape[0]
            # capture-only backward (capture.hooks): the gradient of the tapped leaves, not of the weights
            targets = list(rnd.leaves.values()) if lean else self.fused_params
            rnd.leaves = None
            for t in range(values.shape[1]):
                rnd.acc.clear()
                col = values[:, t].sum()
                if col.requires_grad and targets:
                    torch.autograd.grad(col, targets, retain_graph=t + 1 < values.shape[1], allow_unused=True)
                if rnd.reroute:
                    block, reason = next(iter(rnd.reroute.items()))
                    raise ConfigError(f"token-level scores need the fused hook of layer {block!r}, which cannot "
                                      f"capture this model: {reason}. Leave it out of track=.")
                cols.append({l.name: (rnd.acc[l.name] if l.name in rnd.acc else
                                      torch.zeros(values.shape[0], self.compressors[l.name].r,
                                                  device=values.device)).detach().float()
                             for l in self.fused})
        if lean and not self._lean_reached(rnd):       # a module the leaves did not reach: in full
            return self._tokens(batch)
        feats = {l.name: torch.stack([c[l.name] for c in cols], 1) for l in self.fused}
        return feats, values.detach(), bool(rnd.layouts)


def _token_values(values) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise LossShapeError(f"a token-level measure must return (B, T) values (one per example and "
                             f"token), got {shape}. See dropinf.measures.token_nll.")
    return values
