"""Capture: one batch in, compressed per-example gradients of every tracked block out.

Fused blocks are compressed inside the backward pass by the hooks of capture.hooks (the batch
read from any dimension of a module's input: capture.layout); every other tracked block goes
through torch.func per-example gradients (capture.functional) with the same compressor. On every
batch that is not self-checked the backward is ``torch.autograd.grad`` with respect to one
leaf that every hooked output taps (capture.hooks): the hooks fire and no weight gradient is
computed — the forward, the input-gradient backward and the gathers, about half a training step.
A self-checked batch (and the first batch of a session) runs the full backward with respect to
the tracked weights, each block's batch gradient compressed and released as autograd accumulates
it (check.example_grads; every ``.grad`` field saved and restored); the check compares it, and
the modules it reaches are what later capture-only rounds must reach too — one that misses any
goes back to the full backward for the session. Where the tracked weights cannot be named as the
backward's inputs — re-entrant gradient checkpointing hides them inside a segment — capture
switches to a plain ``.backward()`` for the session.

Self-check (capture.check; first batch of each capture session, every batch with
``check="always"``, and any batch where a module's layout had to be read anew): the rows of the
first, middle and last example against their own gradients, and the batch sum against the plain
batch gradient. A fused block that fails is read with the next candidate layout, or else moved to
the torch.func path with a warning that names the module and the reason (the weight used without
calling the module, a loss term using it directly, rows mixed between examples, an input with no
batch dimension or modified in place, a call the fused math cannot read); a torch.func block
that fails is refused with a CaptureCheckError. The capture session keeps what it learned
(layouts, routes); the batch is redone until every block passes.

Modules whose weights are used without calling the module (``nn.MultiheadAttention.out_proj``)
are routed to the torch.func fallback at layer selection (capture.layers).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..errors import CaptureCheckError, CaptureError, ConfigError, DropinfError
from .check import (LOW, Failure, cause, check_blocks, example_grads, func_refusal, rows_to_check,
                    sliced_references)
from .functional import LossFn, PerExampleGrads, flatten_block, per_example_values
from .hooks import FusedHooks, Round, row_buffer
from .layers import LayerSpec

_MAX_ROUNDS = 16     # forward+backward rounds for one batch while layouts and routes settle


def _reentrant_refusal(exc: RuntimeError) -> bool:
    """torch's refusal of autograd.grad under re-entrant checkpointing (wording varies by version)."""
    msg = str(exc)
    return ".grad()" in msg and ("reentrant" in msg.lower() or "Checkpointing" in msg)


class BatchCapture:
    """``capture(batch)`` → ({block: (B, r_l) float32}, per-example losses (B,)).

    check: "first" (self-check the first batch, and any batch where a layout is read anew),
    "always", or "never"."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, layers: list[LayerSpec], compressors: dict,
                 check: str = "first", what: str = "loss_fn"):
        if check not in ("first", "always", "never"):
            raise ConfigError(f"check must be 'first', 'always' or 'never', got {check!r}")
        self.model, self.loss_fn, self.layers, self.compressors = model, loss_fn, layers, compressors
        self._modules = dict(model.named_modules())
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self.check, self.what = check, what     # what: "loss_fn" or "measure" (for error messages)
        self._checked = False
        self._backward_mode = "grad"        # "backward" once re-entrant checkpointing refused .grad()
        self.hooks = FusedHooks(compressors)  # the hooks, and the layouts this session verified
        self.routed: dict[str, str] = {}    # block -> why it went from the fused hooks to torch.func
        self._reference = "slice"           # how the check gets examples' own gradients (check.sliced_references)
        self._reached: set | None = None    # modules whose hooks the last full backward fired
        self._lean = True                   # capture-only backward allowed (see the module docstring)
        self._set_routes([l for l in layers if l.kind == "fused"])

    def _set_routes(self, fused: list[LayerSpec]) -> None:
        names = {l.name for l in fused}
        self.fused = list(fused)
        self.func = [l if l.kind == "func" else replace(l, kind="func") for l in self.layers if l.name not in names]
        self.hooked = [(l, u, self._modules[u.module]) for l in self.fused for u in l.uses]
        self.fused_names = [n for l in self.fused for n in l.param_names]
        self.fused_params = [self._params[n] for n in self.fused_names]
        self.all_names = self.fused_names + [n for l in self.func for n in l.param_names]
        names = [n for l in self.func for n in l.param_names]
        self.per_example = PerExampleGrads(self.model, self.loss_fn, names) if names else None

    def _route(self, block: str, reason: str) -> None:
        """Move a fused block to the torch.func path for the rest of this capture session."""
        spec = next(l for l in self.fused if l.name == block)
        mod = self._modules.get(spec.uses[0].module) if spec.uses else None
        self.routed[block] = reason
        self._reached = None            # a full backward learns anew which modules the hooks reach
        warnings.warn(f"layer {block!r} ({type(mod).__name__}) is captured through torch.func per-example "
                      f"gradients instead of its fused hook (exact, slower): {reason}.", stacklevel=4)
        self._set_routes([l for l in self.fused if l.name != block])

    # ------------------------------------------------------------------ the hooks
    def _losses(self, batch) -> torch.Tensor:
        return per_example_values(self.loss_fn(self.model, batch), self.what)

    def _run(self, batch, check: bool, out: dict | None = None):
        """Forward + backward with the compressing hooks. With ``check``, also the checked examples' own
        gradients (check.sliced_references, or the batch's graph) and the batch gradient of every fused
        block. Returns (round, losses,
        compressed batch gradient, {b: compressed gradient of example b}) — the last two only with
        ``check``."""
        want_sum: dict[str, torch.Tensor] = {}
        want_rows: dict[int, dict[str, torch.Tensor]] = {}
        blocks = self.fused + self.func
        lean = self._lean_allowed(check)
        with self.hooks.attached(self.hooked) as rnd, torch.enable_grad():
            rnd.leaves, rnd.lean, rnd.out = ({} if lean else None), lean, out
            losses = self._losses(batch)
            rnd.B = losses.shape[0]
            check = check and losses.requires_grad
            if check and self._reference == "graph":
                # from the batch's own graph, before the main backward (which then frees it as it goes)
                rnd.active = False
                want_rows = {b: self._example_grads(losses[b], blocks, retain=True) for b in rows_to_check(rnd.B)}
                rnd.active = True
            if lean:
                self._lean_backward(losses, rnd)
            elif self.fused_names and losses.requires_grad:
                # the batch sum is checked for fused blocks only (capture.check)
                want_sum = self._backward(losses.sum(), keep=check)
            rnd.active = False       # nothing after the main backward may add calls
            if check and self._reference == "slice":
                # after the main backward, once the batch's graph is gone: one example at a time
                want_rows = sliced_references(self.model, self.loss_fn, batch, losses.detach(),
                                              self._low_dtype(rnd) is not None,
                                              lambda loss: self._example_grads(loss, blocks, retain=False))
                if want_rows is None:
                    self._reference = "graph"    # the batch does not slice into its examples
                    raise _Retry()
        return rnd, losses, want_sum, want_rows

    def _lean_allowed(self, check: bool) -> bool:
        """Capture-only backward for this round: not on a checked batch (the check needs the weights'
        batch gradient), not under re-entrant checkpointing, and only once a full backward has shown
        which modules the hooks must reach."""
        return (self._lean and not check and self._backward_mode == "grad" and self._reached is not None
                and bool(self.fused_names))

    def _lean_backward(self, losses: torch.Tensor, rnd: Round) -> None:
        """The capture-only backward: the gradient of the tapped leaves alone (capture.hooks). Hooks
        that should have fired and did not (a module this path cannot reach) send the batch, and the
        rest of the session, back to the full backward."""
        leaves, rnd.leaves = list(rnd.leaves.values()), None     # no leaves from recomputed forwards
        if leaves and losses.requires_grad:
            with self._autograd_errors():
                torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        if not self._lean_reached(rnd):
            raise _Retry()

    def _lean_reached(self, rnd: Round) -> bool:
        """Whether a capture-only round fired every hook the last full backward fired; if not, the
        session goes back to the full backward."""
        if not self._reached <= rnd.fired:
            self._lean = False
        return self._lean

    @contextlib.contextmanager
    def _autograd_errors(self):
        """Around every backward: re-entrant checkpointing's refusal of autograd.grad (or of inputs=)
        switches this session to .backward() and redoes the batch (_Retry); any other failure is a
        CaptureError that says why."""
        try:
            yield
        except (torch.OutOfMemoryError, CaptureError):
            raise
        except RuntimeError as exc:
            if self._backward_mode == "backward" or not _reentrant_refusal(exc):
                raise _backward_failed(exc) from exc
            self._backward_mode = "backward"
            warnings.warn("re-entrant gradient checkpointing refuses torch.autograd.grad; capturing with "
                          ".backward() instead (parameter .grad fields are saved and restored).", stacklevel=6)
            raise _Retry() from exc   # the hooks may have run for nothing: the batch is redone

    def _example_grads(self, target: torch.Tensor, blocks: list[LayerSpec], retain: bool, **kw) -> dict:
        """check.example_grads under this session's backward mode."""
        with self._autograd_errors():
            return example_grads(self.model, self._params, target, blocks, self.compressors, retain,
                                 restrict=self._backward_mode == "grad", **kw)

    def _backward(self, target: torch.Tensor, keep: bool) -> dict[str, torch.Tensor]:
        """The full batch backward that runs the hooks; with ``keep`` it also returns every fused
        block's batch gradient, compressed (check.example_grads: each block compressed and released
        as autograd accumulates it, so no full gradient of the model is held). A tracked weight the
        graph does not reach — unused this batch, or hidden inside a re-entrant checkpoint segment
        that autograd prunes (its hooks never run) — sends the session to .backward(), which runs
        every node, and the batch is redone."""
        reached: set = set()
        grads = self._example_grads(target, self.fused, retain=False, reached=reached, keep=keep)
        if self._backward_mode == "grad" and not set(self.fused_names) <= reached:
            self._backward_mode = "backward"
            raise _Retry()
        return grads

    def _assemble(self, rnd: Round, losses: torch.Tensor, batch, out: dict | None) -> dict[str, torch.Tensor]:
        B = losses.shape[0]
        feats: dict[str, torch.Tensor] = {}
        for block in self.fused:
            v = rnd.acc.get(block.name)
            # tracked but not reached by this batch: zero gradient (the self-check verifies it is)
            feats[block.name] = v if v is not None else torch.zeros(B, self.compressors[block.name].r,
                                                                     device=losses.device)
        if self.per_example is not None:
            try:
                pe = self.per_example(batch)
            except (DropinfError, torch.OutOfMemoryError):
                raise
            except Exception as exc:
                raise CaptureCheckError(
                    f"the torch.func path for layers {[l.name for l in self.func][:4]} could not compute per-example "
                    f"gradients ({type(exc).__name__}: {str(exc)[:300]}). It runs loss_fn on each example alone, "
                    f"slicing every tensor of the batch along dim 0, which fails when a tensor of the batch is not "
                    f"batch-first (yield batch-first tensors and transpose inside the model) or when examples "
                    f"interact within the batch (BatchNorm in training mode: keep CaptureOptions(eval_mode=True)). "
                    f"Otherwise leave these layers out of track=.") from exc
            for spec in self.func:
                rows = flatten_block(pe, spec.param_names)
                if rows.shape[0] != B:
                    raise CaptureCheckError(
                        f"the torch.func path for layer {spec.name!r} gave {rows.shape[0]} per-example gradients "
                        f"for a batch of {B} losses: it slices the batch's tensors along dim 0, so every tensor of "
                        f"the batch must be batch-first. Yield batch-first tensors (transpose inside the model).")
                feats[spec.name] = self.compressors[spec.name].from_flat(rows)
        rows = {}
        for l in self.layers:
            v = feats[l.name].detach().float()
            dst = row_buffer(out, l.name, B, v)
            if dst is not None and not (v.data_ptr() == dst.data_ptr() and v.stride() == dst.stride()):
                v = dst.copy_(v)            # not written there by the hooks (torch.func, several uses, ...)
            rows[l.name] = v
        return rows

    # ------------------------------------------------------------------ the entry
    def __call__(self, batch: Any, check: bool | None = None, out: dict | None = None) \
            -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({block name: (B, r_l) float32}, per-example losses (B,)).

        out: {block name: float32 tensor (≥ B, r_l)}, the caller's row buffers (a store's batch
        buffer, the rows of an in-memory array): the batch's rows are written to their first B rows
        — by the hooks themselves where the compressor can (Dropout), so they are not allocated
        and copied again — and the returned rows are those views. A buffer with fewer than B rows
        or on another device is not used."""
        for name, buf in (out or {}).items():
            r = self.compressors[name].r if name in self.compressors else None
            if r is None or buf.dim() != 2 or buf.shape[1] != r or buf.dtype != torch.float32:
                raise ConfigError(f"out[{name!r}] must be a float32 (rows, {r}) buffer of a tracked block, got "
                                  f"{tuple(buf.shape)} {buf.dtype}")
        due = check if check is not None else (self.check == "always" or
                                               (self.check == "first" and not self._checked))
        for _ in range(_MAX_ROUNDS):
            try:
                rnd, losses, want_sum, want_rows = self._run(batch, due, out)
            except _Retry:
                continue
            if rnd.reroute:                      # calls the fused math cannot read: torch.func, redo
                for block, reason in rnd.reroute.items():
                    self._route(block, reason)
                continue
            if rnd.layouts and not due and self.check != "never":
                due = True                       # a layout read anew is verified before it is used
                continue
            feats = self._assemble(rnd, losses, batch, out)
            if due and want_rows:
                failures = check_blocks(self.fused, self.func, feats, want_sum, want_rows,
                                        self._low_dtype(rnd) is not None)
                if failures:
                    self._handle(failures, rnd)
                    continue
            self.hooks.layouts.update(rnd.layouts)
            if due:
                self._checked = True
            if not rnd.lean:
                self._reached = set(rnd.fired)
            return feats, losses.detach()
        raise CaptureCheckError(f"capture could not settle on a correct way to capture this batch in {_MAX_ROUNDS} "
                                f"rounds (routes: {self.routed}). Please report this model.")

    def _low_dtype(self, rnd: Round) -> str | None:
        """The reduced precision the forward ran in (autocast outputs, or half-precision weights)."""
        if rnd.low:
            return ", ".join(sorted(rnd.low))
        low = next((self._params[n].dtype for n in self.all_names if self._params[n].dtype in LOW), None)
        return None if low is None else str(low).replace("torch.", "")

    def _handle(self, failures: list[Failure], rnd: Round) -> None:
        """A fused block that failed: the next candidate layout, else torch.func. A func block: refuse."""
        low = self._low_dtype(rnd)
        fused = {l.name: l for l in self.fused}
        for f in failures:
            block = fused.get(f.block)
            mtype = self._module_type(f.block)
            if block is None:
                raise CaptureCheckError(func_refusal(f, mtype, low))
            mods = {u.module for u in block.uses}
            pending = [k for k in rnd.layouts if k[0] in mods]
            if f.kind == "rows" and pending:
                for k in pending:
                    self.hooks.tried.setdefault(k, set()).add(rnd.layouts[k])
                if all(self.hooks.has_next(k, rnd) for k in pending):
                    continue                     # read those inputs with the next layout, then check again
            note = "".join(self.hooks.layout_note(k, rnd) for k in pending[:1])
            self._route(f.block, cause(f, any(u.module in rnd.fired for u in block.uses), note, low))

    def _module_type(self, block: str) -> str:
        spec = next((l for l in self.layers if l.name == block), None)
        name = spec.uses[0].module if spec is not None and spec.uses else block
        mod = self._modules.get(name)
        return type(mod).__name__ if mod is not None else "?"


def _backward_failed(exc: RuntimeError) -> CaptureError:
    hint = ""
    if "inplace" in str(exc) or "in-place" in str(exc):
        hint = (" An in-place operation in the model or loss_fn modified a tensor that the backward needs (often "
                "the input of a layer, modified after the call): clone it first or use the out-of-place op.")
    return CaptureError(f"the backward pass through loss_fn failed ({type(exc).__name__}: {str(exc)[:300]}). A plain "
                        f"loss_fn(model, batch).sum().backward() fails the same way, so the model or loss_fn must "
                        f"change before any gradient of it can be taken.{hint}")


class _Retry(Exception):
    """Internal: run the batch again (now with .backward() under re-entrant checkpointing, or with the
    examples' own gradients taken from the batch's graph)."""
