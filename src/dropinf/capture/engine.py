"""Capture: one batch in, compressed per-example gradients of every tracked layer out.

Fused path (``nn.Linear``): a forward hook keeps each call's input ``a`` and output ``y``; after
the forward, ``torch.autograd.grad(Σ_b ℓ_b, [y...])`` returns the output-gradients δ directly
(no parameter gradient is computed and no ``.grad`` field is touched), and the layer's
compressor turns (a, δ) into (B, r_l) numbers. Because the batch loss is the *sum* of the
per-example losses and examples do not interact, δ[b] is exactly example b's output-gradient.
A module called several times in one forward adds up every call.

Every other tracked block goes through the torch.func fallback with the same compressor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LossShapeError, NonFiniteGradientError
from .functional import LossFn, PerExampleGrads, flatten_block
from .layers import LayerSpec


class BatchCapture:
    def __init__(self, model: nn.Module, loss_fn: LossFn, layers: list[LayerSpec], compressors: dict):
        self.model, self.loss_fn, self.layers, self.compressors = model, loss_fn, layers, compressors
        modules = dict(model.named_modules())
        self.fused = [(l, modules[l.name]) for l in layers if l.kind == "linear"]
        self.func = [l for l in layers if l.kind == "func"]
        names = [n for l in self.func for n in l.param_names]
        self.per_example = PerExampleGrads(model, loss_fn, names) if names else None

    def _losses(self, batch) -> torch.Tensor:
        losses = self.loss_fn(self.model, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise LossShapeError(
                f"loss_fn(model, batch) must return per-example losses of shape (B,), got {shape}. "
                f"Use reduction='none' (and sum over tokens per example for sequence losses).")
        return losses

    def __call__(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({layer name: (B, r_l) float32}, per-example losses (B,))."""
        feats: dict[str, torch.Tensor] = {}
        records: list[tuple[LayerSpec, torch.Tensor, torch.Tensor]] = []
        handles = []

        def make_hook(spec: LayerSpec):
            def hook(mod, inputs, output):
                if torch.is_grad_enabled() and output.requires_grad:
                    records.append((spec, inputs[0].detach(), output))
            return hook

        try:
            for spec, mod in self.fused:
                handles.append(mod.register_forward_hook(make_hook(spec)))
            with torch.enable_grad():
                losses = self._losses(batch)
                B = losses.shape[0]
                if records:
                    deltas = torch.autograd.grad(losses.sum(), [r[2] for r in records], allow_unused=True)
                else:
                    deltas = []
        finally:
            for h in handles:
                h.remove()
        for (spec, a, y), d in zip(records, deltas):
            if d is None:
                d = torch.zeros_like(y)
            if a.shape[0] != B:
                raise LossShapeError(
                    f"module {spec.name!r} saw an input with leading dimension {a.shape[0]} but "
                    f"loss_fn returned {B} losses; the fused capture needs batch-first inputs.")
            a3 = a.reshape(B, -1, a.shape[-1])
            d3 = d.detach().reshape(B, -1, d.shape[-1]).to(a3.dtype)
            part = self.compressors[spec.name].from_linear(a3, d3, spec.has_bias)
            feats[spec.name] = feats[spec.name] + part if spec.name in feats else part
        for spec, _ in self.fused:  # tracked but not reached by this batch: zero gradient
            if spec.name not in feats:
                feats[spec.name] = torch.zeros(B, self.compressors[spec.name].r, device=losses.device)
        if self.per_example is not None:
            grads = self.per_example(batch)
            for spec in self.func:
                feats[spec.name] = self.compressors[spec.name].from_flat(flatten_block(grads, spec.param_names))
        return {l.name: feats[l.name].detach().float() for l in self.layers}, losses.detach()


def nonfinite(feats: dict[str, torch.Tensor], first_id: int) -> tuple[list[int], list[str]]:
    """(example ids, layer names) whose features hold NaN/inf."""
    bad_rows = None
    bad_layers = []
    for name, f in feats.items():
        ok = torch.isfinite(f).all(dim=1)
        if not bool(ok.all()):
            bad_layers.append(name)
            bad_rows = ~ok if bad_rows is None else (bad_rows | ~ok)
    if bad_rows is None:
        return [], []
    return (torch.nonzero(bad_rows).flatten().cpu() + first_id).tolist(), bad_layers


def raise_nonfinite(ids: list[int], bad_layers: list[str]) -> None:
    if ids:
        raise NonFiniteGradientError(
            f"NaN/inf in the gradients of example ids {ids[:20]}{' ...' if len(ids) > 20 else ''} "
            f"(ids count examples in loader order from 0), layers {bad_layers[:5]}. Check those "
            f"examples' inputs/labels and that the loss is finite there (e.g. log(0)).")
