"""Capture: one batch in, compressed per-example gradients of every tracked block out.

Fused blocks: a forward hook on each using module keeps the call's input (prepared per module
type, see capture.modules) and its output y. After the forward,
``torch.autograd.grad(Σ_b ℓ_b, [y, ...])`` returns the output-gradients δ directly — no
parameter gradient is computed and no ``.grad`` field is touched — and the block's compressor
turns every (input, δ) pair into (B, r_l) numbers. Because the batch loss is the *sum* of the
per-example losses and examples do not interact, δ[b] is exactly example b's output-gradient.
A module called several times in one forward, or a weight tied between modules, adds up every
call. A module whose input has leading dimension 1 while the batch has B > 1 (position ids
shared by the batch and broadcast later) has its output expanded to B rows by the hook — the
same values, as a view — so that each example's output-gradient stays separate.

Gradient checkpointing: the recorded outputs are not enough (re-entrant checkpointing runs the
first forward without grad and recomputes it during backward), so when a module of the model
has ``gradient_checkpointing`` on, the hooks instead register a tensor hook on each output and
the backward is run with respect to the tracked parameters (their gradient is discarded).

Every other tracked block goes through the torch.func fallback with the same compressor.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import LossShapeError, NonFiniteGradientError
from .functional import LossFn, PerExampleGrads, batch_size, flatten_block
from .layers import LayerSpec
from .modules import Use, UseSpec, prepare, prepare_delta


def uses_checkpointing(model: nn.Module) -> bool:
    """True if any module has HF-style ``gradient_checkpointing`` switched on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some wrappers forward this name to deprecated properties
        return any(m.__dict__.get("gradient_checkpointing", False) is True for m in model.modules())


class BatchCapture:
    def __init__(self, model: nn.Module, loss_fn: LossFn, layers: list[LayerSpec], compressors: dict,
                 mode: str = "auto"):
        self.model, self.loss_fn, self.layers, self.compressors = model, loss_fn, layers, compressors
        modules = dict(model.named_modules())
        self.fused = [l for l in layers if l.kind == "fused"]
        self.hooked = [(l, u, modules[u.module]) for l in self.fused for u in l.uses]
        self.func = [l for l in layers if l.kind == "func"]
        names = [n for l in self.func for n in l.param_names]
        self.per_example = PerExampleGrads(model, loss_fn, names) if names else None
        # decided once per capture session, not per batch (it walks every module)
        self.tensor_hooks = mode == "tensor-hooks" or (mode == "auto" and uses_checkpointing(model))
        pm = dict(model.named_parameters(remove_duplicate=False))
        self.fused_params = [pm[n] for l in self.fused for n in l.param_names]

    def _losses(self, batch) -> torch.Tensor:
        losses = self.loss_fn(self.model, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise LossShapeError(
                f"loss_fn(model, batch) must return per-example losses of shape (B,), got {shape}. "
                f"Use reduction='none' (and sum over tokens per example for sequence losses).")
        return losses

    def _run(self, batch) -> tuple[list[tuple[LayerSpec, UseSpec, torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Forward + backward; returns [(block, use, prepared input, output-grad)] and the losses."""
        tensor_hooks = self.tensor_hooks
        records: list = []
        done: list = []
        handles = []

        try:
            B = batch_size(batch)
        except TypeError:
            B = None

        def make_hook(block: LayerSpec, use: UseSpec):
            def hook(mod, inputs, output):
                if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                    return None
                x = inputs[0].detach()
                if B is not None and B > 1 and x.shape[0] == 1:
                    # shared across the batch and broadcast later (e.g. position ids of shape
                    # (1, T)): expand so that each example's output-gradient stays separate
                    x = x.expand(B, *x.shape[1:])
                    output = output.expand(B, *output.shape[1:])
                a = prepare(use, x, x.shape[0])
                if tensor_hooks:
                    output.register_hook(lambda g, a=a: done.append((block, use, a, g.detach())))
                else:
                    records.append((block, use, a, output))
                return output
            return hook

        try:
            for block, use, mod in self.hooked:
                handles.append(mod.register_forward_hook(make_hook(block, use)))
            with torch.enable_grad():
                losses = self._losses(batch)
                if tensor_hooks and self.fused_params:
                    torch.autograd.grad(losses.sum(), self.fused_params, allow_unused=True)
                elif records:
                    outs = [r[3] for r in records]
                    deltas = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
                    done = [(b, u, a, torch.zeros_like(y) if d is None else d.detach())
                            for (b, u, a, y), d in zip(records, deltas)]
        finally:
            for h in handles:
                h.remove()
        return done, losses

    def __call__(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({block name: (B, r_l) float32}, per-example losses (B,))."""
        done, losses = self._run(batch)
        B = losses.shape[0]
        uses: dict[str, list[Use]] = {}
        for block, use, a, d in done:
            if a.shape[0] != B:
                raise LossShapeError(
                    f"module {use.module!r} saw an input with leading dimension {a.shape[0]} but "
                    f"loss_fn returned {B} losses; the fused capture needs batch-first inputs.")
            d3 = prepare_delta(use, d, B)
            uses.setdefault(block.name, []).append(Use(use, a, d3 if use.kind == "embedding" else d3.to(a.dtype)))
        feats: dict[str, torch.Tensor] = {}
        for block in self.fused:
            comp = self.compressors[block.name]
            if block.name in uses:
                feats[block.name] = comp.from_uses(uses[block.name])
            else:  # tracked but not reached by this batch: zero gradient
                feats[block.name] = torch.zeros(B, comp.r, device=losses.device)
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
