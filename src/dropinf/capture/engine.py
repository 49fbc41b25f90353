"""Capture: one batch in, compressed per-example gradients of every tracked block out.

Fused blocks, compressed inside the backward pass: a forward hook on each module that uses a
tracked weight keeps the call's input and registers a tensor hook on the call's *output*. During
the backward, that hook receives the output-gradient δ of this call — the gradient with respect
to the output as the module returned it, so an in-place op that follows the layer
(``ReLU(inplace=True)``) cannot change it — and the block's compressor turns (input, δ) into
(B, r_l) numbers right there (see capture.modules); the saved input and δ are released at once.
Because the batch loss is the *sum* of the per-example losses and examples do not interact, δ[b]
is exactly example b's output-gradient. A module called several times in one forward, or a weight
tied between modules, adds up every call. The backward itself is ``torch.autograd.grad`` with
respect to the tracked weights (what a plain backward computes; no ``.grad`` field is touched):
it also returns the batch gradient that the self-check compares against. Where autograd.grad
cannot reach a tracked weight — re-entrant gradient checkpointing hides the weights inside a
segment, and torch refuses or prunes it — capture switches to ``.backward()`` for the session,
saving and restoring every parameter's ``.grad``.

Self-check (first batch of each capture session, and on demand): the sum over the batch of each
block's compressed entries must equal the same compression of the plain batch gradient. A block
that differs — its weight used outside the module's call, a term of ``loss_fn`` that depends on
the parameter directly (weight decay written into the loss), an input modified in place — is
refused with a CaptureCheckError naming it and the likely cause, instead of giving wrong scores.

Modules whose weights are used without calling the module (``nn.MultiheadAttention.out_proj``)
are routed to the torch.func fallback at layer selection (capture.layers); every other tracked
block without a fused hook goes there too, with the same compressor.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import CaptureCheckError, ConfigError, LossShapeError, NonFiniteGradientError
from .functional import LossFn, PerExampleGrads, batch_size, flatten_block
from .layers import LayerSpec
from .modules import Use, prepare, prepare_delta


def _reentrant_refusal(exc: RuntimeError) -> bool:
    """torch's refusal of autograd.grad under re-entrant checkpointing (wording varies by version)."""
    msg = str(exc)
    return ".grad()" in msg and ("reentrant" in msg.lower() or "Checkpointing" in msg)


class BatchCapture:
    """``capture(batch)`` → ({block: (B, r_l) float32}, per-example losses (B,)).

    check: "first" (self-check the first batch), "always", or "never"."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, layers: list[LayerSpec], compressors: dict,
                 check: str = "first"):
        self.model, self.loss_fn, self.layers, self.compressors = model, loss_fn, layers, compressors
        modules = dict(model.named_modules())
        self.fused = [l for l in layers if l.kind == "fused"]
        self.hooked = [(l, u, modules[u.module]) for l in self.fused for u in l.uses]
        self.func = [l for l in layers if l.kind == "func"]
        names = [n for l in self.func for n in l.param_names]
        self.per_example = PerExampleGrads(model, loss_fn, names) if names else None
        pm = dict(model.named_parameters(remove_duplicate=False))
        self.fused_names = [n for l in self.fused for n in l.param_names]
        self.fused_params = [pm[n] for n in self.fused_names]
        self.check = check
        self._checked = False
        self._backward_mode = "grad"        # "backward" once re-entrant checkpointing refused .grad()

    def _losses(self, batch) -> torch.Tensor:
        losses = self.loss_fn(self.model, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise LossShapeError(
                f"loss_fn(model, batch) must return per-example losses of shape (B,), got {shape}. "
                f"Use reduction='none' (and sum over tokens per example for sequence losses).")
        return losses

    def _make_hook(self, block: LayerSpec, use, B, acc: dict, fired: set, problems: list, keep: bool = False):
        """Forward hook of one use of a fused block: on the call's output-gradient, compress (input,
        δ) into (B, r) and add it to ``acc[block]``. keep=True holds the saved input for several
        backward passes through one forward (token-level capture); otherwise it is released at once."""
        comp = self.compressors[block.name]

        def hook(mod, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            src = inputs[0]
            version = src._version
            x = src.detach()
            if B is not None and B > 1 and x.shape[0] == 1:
                # shared across the batch and broadcast later (e.g. position ids of shape
                # (1, T)): expand so that each example's output-gradient stays separate
                x = x.expand(B, *x.shape[1:])
                output = output.expand(B, *output.shape[1:])
            if output._is_view():
                # a view (HF Conv1D returns x.view(...)) that is then modified in place gets a
                # new grad_fn and a hook on it never fires; the same storage as a non-view
                # tensor keeps the hook on the output the module returned
                output = torch.ops.aten._unsafe_view(output, output.shape)
            saved = [x]

            def on_grad(g):
                if not saved:
                    return None
                xx = saved[0] if keep else saved.pop()   # released as soon as this call is compressed
                if src._version != version:
                    problems.append(f"the input of module {use.module!r} was modified in place after "
                                    f"the call (version {version} → {src._version})")
                    return None
                n = xx.shape[0]
                a = prepare(use, xx, n)
                d3 = prepare_delta(use, g.detach(), n)
                val = comp.from_uses([Use(use, a, d3 if use.kind == "embedding" else d3.to(a.dtype))])
                acc[block.name] = val if block.name not in acc else acc[block.name] + val
                fired.add(use.module)
                return None

            output.register_hook(on_grad)
            return output
        return hook

    @contextlib.contextmanager
    def _hooked(self, batch, keep: bool = False):
        """The compressing forward hooks on every tracked use, for one batch: yields (acc, fired) —
        {block: (B, r)} filled during the backward, names of modules whose hooks fired — removes the
        hooks on exit, and refuses the capture if a tracked module's input was modified in place."""
        acc: dict[str, torch.Tensor] = {}
        fired: set[str] = set()
        problems: list[str] = []
        handles = []
        try:
            B = batch_size(batch)
        except TypeError:
            B = None
        try:
            for block, use, mod in self.hooked:
                handles.append(mod.register_forward_hook(self._make_hook(block, use, B, acc, fired, problems, keep)))
            yield acc, fired
        finally:
            for h in handles:
                h.remove()
        if problems:
            raise CaptureCheckError("; ".join(problems[:3]) + ". The captured gradients would be wrong: "
                                    "avoid the in-place op (or clone the input) for tracked modules.")

    def _run(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], set]:
        """Forward + backward with the compressing hooks. Returns ({block: (B, r)} for the blocks
        whose hooks fired, losses, {param name: batch gradient}, names of modules that fired)."""
        grads: dict[str, torch.Tensor] = {}
        with self._hooked(batch) as (acc, fired), torch.enable_grad():
            losses = self._losses(batch)
            if self.fused_params:
                grads = self._backward(losses)
        return acc, losses, grads, fired

    def tokens(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token-level capture: ``loss_fn`` (here a measurement) returns (B, T) values, one per token;
        one forward, then one backward per column t with the saved inputs kept, so row (b, t) is the
        compressed gradient of value[b, t] alone. Returns ({block: (B, T, r_l)}, values (B, T)).
        Only fused blocks (the torch.func fallback has no per-token form)."""
        if self.func:
            raise ConfigError(f"token-level scores need fused capture for every tracked layer; "
                              f"{[l.name for l in self.func][:4]} go through torch.func. Leave them out of track=.")
        cols = []
        with self._hooked(batch, keep=True) as (acc, _), torch.enable_grad():
            values = self.loss_fn(self.model, batch)
            if not isinstance(values, torch.Tensor) or values.dim() != 2:
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise LossShapeError(f"a token-level measure must return (B, T) values (one per example and "
                                     f"token), got {shape}. See dropinf.measures.token_nll.")
            for t in range(values.shape[1]):
                acc.clear()
                col = values[:, t].sum()
                if col.requires_grad:
                    torch.autograd.grad(col, self.fused_params, retain_graph=t + 1 < values.shape[1],
                                        allow_unused=True)
                cols.append({l.name: (acc[l.name] if l.name in acc else
                                      torch.zeros(values.shape[0], self.compressors[l.name].r,
                                                  device=values.device)).detach().float()
                             for l in self.fused})
        feats = {l.name: torch.stack([c[l.name] for c in cols], 1) for l in self.fused}
        return feats, values.detach()

    def _backward(self, losses: torch.Tensor) -> dict[str, torch.Tensor]:
        total = losses.sum()
        if self._backward_mode == "grad":
            try:
                gs = torch.autograd.grad(total, self.fused_params, allow_unused=True)
                if any(g is None for g in gs):
                    # a tracked weight the graph does not reach: unused this batch, or hidden inside a
                    # re-entrant checkpoint segment that autograd.grad prunes (its hooks never run).
                    # .backward() runs every node, so the batch is redone that way from now on.
                    self._backward_mode = "backward"
                    raise _Retry()
                return dict(zip(self.fused_names, gs))
            except RuntimeError as exc:
                if not _reentrant_refusal(exc):
                    raise
                self._backward_mode = "backward"
                warnings.warn("re-entrant gradient checkpointing refuses torch.autograd.grad; capturing with "
                              ".backward() instead (parameter .grad fields are saved and restored).", stacklevel=4)
                # the first backward already ran the hooks for nothing: the caller retries
                raise _Retry() from exc
        # re-entrant checkpointing: .backward(), with every .grad saved and restored around it
        params = [p for p in self.model.parameters() if p.requires_grad]
        old = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            total.backward()
            by_id = {id(p): p.grad for p in params}
            return {n: by_id[id(p)] for n, p in zip(self.fused_names, self.fused_params) if by_id.get(id(p)) is not None}
        finally:
            for p, g in zip(params, old):
                p.grad = g

    def __call__(self, batch: Any, check: bool | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({block name: (B, r_l) float32}, per-example losses (B,))."""
        try:
            acc, losses, grads, fired = self._run(batch)
        except _Retry:
            acc, losses, grads, fired = self._run(batch)
        B = losses.shape[0]
        feats: dict[str, torch.Tensor] = {}
        for block in self.fused:
            v = acc.get(block.name)
            if v is not None and v.shape[0] != B:
                raise LossShapeError(
                    f"module {block.uses[0].module!r} saw a batch of {v.shape[0]} rows but loss_fn returned "
                    f"{B} losses; the fused capture needs batch-first inputs.")
            # tracked but not reached by this batch: zero gradient (the self-check verifies it is)
            feats[block.name] = v if v is not None else torch.zeros(B, self.compressors[block.name].r,
                                                                     device=losses.device)
        if self.per_example is not None:
            pe = self.per_example(batch)
            for spec in self.func:
                feats[spec.name] = self.compressors[spec.name].from_flat(flatten_block(pe, spec.param_names))
        out = {l.name: feats[l.name].detach().float() for l in self.layers}
        do_check = check if check is not None else (self.check == "always" or
                                                    (self.check == "first" and not self._checked))
        if do_check and self.fused:
            self.self_check(out, grads, fired)
            self._checked = True
        return out, losses.detach()

    def self_check(self, feats: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], fired: set,
                   rtol: float = 2e-3) -> None:
        """Σ_b captured entries == the compressor applied to the plain batch gradient, per fused block."""
        modules = dict(self.model.named_modules())
        for block in self.fused:
            comp = self.compressors[block.name]
            if any(n not in grads for n in block.param_names):
                present = {n: grads.get(n) for n in block.param_names}
                pm = dict(self.model.named_parameters(remove_duplicate=False))
                for n in block.param_names:
                    if present[n] is None:
                        present[n] = torch.zeros_like(pm[n])
                gsum = flatten_block({n: g.unsqueeze(0) for n, g in present.items()}, block.param_names)
            else:
                gsum = flatten_block({n: grads[n].unsqueeze(0) for n in block.param_names}, block.param_names)
            low = gsum.dtype in (torch.float16, torch.bfloat16)   # half-precision models: looser check
            want = comp.from_flat(gsum.to(feats[block.name].dtype))[0].double()
            got = feats[block.name].double().sum(0)
            scale = float(want.abs().max().clamp_min(got.abs().max()))
            err = float((got - want).abs().max())
            if err <= (5e-2 if low else rtol) * scale + 1e-12:
                continue
            mtype = type(modules[block.uses[0].module]).__name__ if block.uses else "?"
            never = not any(u.module in fired for u in block.uses)
            if never:
                cause = (f"its module never ran in the forward while its weight took part in the loss: the "
                         f"weight is used without calling the module (e.g. nn.MultiheadAttention applies "
                         f"out_proj functionally). Track it through torch.func with CaptureOptions(fused=False), "
                         f"or leave it out of track=")
            else:
                cause = ("the loss depends on the weight other than through the module's output. Most often a "
                         "term of loss_fn that uses the parameter directly — weight decay written into the "
                         "loss (move it out of loss_fn and pass it as damping to the estimator) — or a "
                         "second, functional use of the weight")
            raise CaptureCheckError(
                f"capture self-check failed for layer {block.name!r} ({mtype}): the batch sum of its captured "
                f"per-example gradient entries differs from the plain batch gradient (max abs error {err:.3g}, "
                f"scale {scale:.3g}). Likely cause: {cause}. Refusing rather than returning wrong scores.")


class _Retry(Exception):
    """Internal: re-run the batch with .backward() (re-entrant checkpointing)."""


def nonfinite(feats: dict[str, torch.Tensor], first_id: int) -> tuple[list[int], list[str]]:
    """(example ids, layer names) whose features hold NaN/inf — one host sync when all are finite."""
    if not feats:
        return [], []
    flags = torch.stack([torch.isfinite(f).all() for f in feats.values()])
    if bool(flags.all()):
        return [], []
    bad_rows, bad_layers = None, []
    for name, f in feats.items():
        ok = torch.isfinite(f).all(dim=1)
        if not bool(ok.all()):
            bad_layers.append(name)
            bad_rows = ~ok if bad_rows is None else (bad_rows | ~ok)
    return (torch.nonzero(bad_rows).flatten().cpu() + first_id).tolist(), bad_layers


def raise_nonfinite(ids: list[int], bad_layers: list[str]) -> None:
    if ids:
        raise NonFiniteGradientError(
            f"NaN/inf in the gradients of example ids {ids[:20]}{' ...' if len(ids) > 20 else ''} "
            f"(dataset indices), layers {bad_layers[:5]}. Check those "
            f"examples' inputs/labels and that the loss is finite there (e.g. log(0)).")
