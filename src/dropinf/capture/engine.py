"""Capture: one batch in, compressed per-example gradients of every tracked block out.

Fused blocks, compressed inside the backward pass: a forward hook on each module that uses a
tracked weight keeps the call's input and registers a tensor hook on the call's *output* (the
model always gets back a tensor of the shape its module returned). During the backward, that
hook receives the output-gradient δ of this call — the gradient with respect to the output as
the module returned it, so an in-place op that follows the layer (``ReLU(inplace=True)``) cannot
change it — moves the batch to dim 0 (capture.layout: sequence-first and flattened inputs are
read as such, a table shared by the whole batch has no per-example rows and goes to torch.func),
and the block's compressor turns (input, δ) into (B, r_l) numbers right there (capture.modules);
the saved input and δ are released at once. Because the batch loss is the *sum* of the
per-example losses and examples do not interact, δ[b] is exactly example b's output-gradient. A
module called several times in one forward, or a weight tied between modules, adds up every call.
The backward itself is ``torch.autograd.grad`` with respect to the tracked weights (no ``.grad``
field is touched). Where autograd.grad cannot reach a tracked weight — re-entrant gradient
checkpointing hides the weights inside a segment — capture switches to ``.backward()`` for the
session, saving and restoring every parameter's ``.grad``.

Self-check (capture.check; first batch of each capture session, every batch with
``check="always"``, and any batch where a module's layout had to be read anew): the rows of the
first, middle and last example against their own gradients, and the batch sum against the plain
batch gradient. A fused block that fails is read with the next candidate layout, or else moved to
the torch.func path with a warning that names the module and the reason (the weight used without
calling the module, a loss term using it directly, rows mixed between examples, an input
modified in place, a hook that could not handle the call); a torch.func block that fails is
refused with a CaptureCheckError. The capture session keeps what it learned (layouts, routes).

Modules whose weights are used without calling the module (``nn.MultiheadAttention.out_proj``)
are routed to the torch.func fallback at layer selection (capture.layers); every other tracked
block without a fused hook goes there too, with the same compressor.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import CaptureCheckError, CaptureError, ConfigError, DropinfError, LossShapeError, NonFiniteGradientError
from .check import LOW, Failure, cause, check_blocks, compress_grads, func_refusal, rows_to_check
from .functional import LossFn, PerExampleGrads, densify, flatten_block, slice_batch
from .layers import LayerSpec
from .layout import ALL, NoBatchDim, batch_first, resolve
from .modules import Use, prepare, prepare_delta

_MAX_ROUNDS = 8      # forward+backward rounds for one batch while layouts and routes settle


def _reentrant_refusal(exc: RuntimeError) -> bool:
    """torch's refusal of autograd.grad under re-entrant checkpointing (wording varies by version)."""
    msg = str(exc)
    return ".grad()" in msg and ("reentrant" in msg.lower() or "Checkpointing" in msg)


def _first_arg_name(module: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


@dataclass
class _Round:
    """What one forward+backward of a batch saw."""

    B: int | None = None
    active: bool = True
    acc: dict = field(default_factory=dict)        # block -> (B, r)
    fired: set = field(default_factory=set)        # modules whose hook compressed a call
    calls: dict = field(default_factory=dict)      # module -> calls so far this forward
    layouts: dict = field(default_factory=dict)    # (module, call) -> layout read this round, not yet verified
    shapes: dict = field(default_factory=dict)     # (module, call) -> (kind, input shape)
    reroute: dict = field(default_factory=dict)    # block -> why it cannot be fused
    low: set = field(default_factory=set)          # reduced-precision dtypes the hooked calls ran in


class BatchCapture:
    """``capture(batch)`` → ({block: (B, r_l) float32}, per-example losses (B,)).

    check: "first" (self-check the first batch, and any batch where a layout is read anew),
    "always", or "never"."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, layers: list[LayerSpec], compressors: dict,
                 check: str = "first"):
        if check not in ("first", "always", "never"):
            raise ConfigError(f"check must be 'first', 'always' or 'never', got {check!r}")
        self.model, self.loss_fn, self.layers, self.compressors = model, loss_fn, layers, compressors
        self._modules = dict(model.named_modules())
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self.check = check
        self._checked = False
        self._backward_mode = "grad"        # "backward" once re-entrant checkpointing refused .grad()
        self.layouts: dict[tuple, Any] = {}  # (module, call index in the forward) -> verified layout
        self._tried: dict[tuple, set] = {}   # (module, call) -> layouts that failed the per-example check
        self.routed: dict[str, str] = {}    # block -> why it went from the fused hooks to torch.func
        self._arg_names = {}
        self._reference = "slice"           # how the check gets examples' own gradients (_references)
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
        warnings.warn(f"layer {block!r} ({type(mod).__name__}) is captured through torch.func per-example "
                      f"gradients instead of its fused hook (exact, slower): {reason}.", stacklevel=4)
        self._set_routes([l for l in self.fused if l.name != block])

    # ------------------------------------------------------------------ the hooks
    def _losses(self, batch) -> torch.Tensor:
        losses = self.loss_fn(self.model, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise LossShapeError(
                f"loss_fn(model, batch) must return per-example losses of shape (B,), got {shape}. "
                f"Use reduction='none' (and sum over tokens per example for sequence losses).")
        return losses

    def _input_of(self, use, mod, args, kwargs):
        if args:
            return args[0]
        if use.module not in self._arg_names:
            self._arg_names[use.module] = _first_arg_name(mod)
        return kwargs.get(self._arg_names[use.module]) if kwargs else None

    def _make_hook(self, block: LayerSpec, use, rnd: _Round, keep: bool = False):
        """Forward hook (with kwargs) of one use of a fused block: on the call's output-gradient,
        compress (input, δ) into (B, r) and add it to ``rnd.acc[block]``. keep=True holds the saved
        input for several backward passes through one forward (token-level capture); otherwise it
        is released at once."""
        comp = self.compressors[block.name]

        def hook(mod, args, kwargs, output):
            if not (rnd.active and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return None
            src = self._input_of(use, mod, args, kwargs)
            if not isinstance(src, torch.Tensor):
                rnd.reroute.setdefault(block.name, f"module {use.module!r} was called without a tensor input")
                return None
            if output.dtype in LOW or src.dtype in LOW:
                rnd.low.add(str(output.dtype if output.dtype in LOW else src.dtype).replace("torch.", ""))
            version = src._version
            saved = [src.detach()]
            key = (use.module, rnd.calls.get(use.module, 0))
            rnd.calls[use.module] = key[1] + 1
            if output._is_view():
                # a view (HF Conv1D returns x.view(...)) that is then modified in place gets a new
                # grad_fn and a hook on it never fires; the same storage and shape as a non-view
                # tensor keeps the hook on the output the module returned
                output = torch.ops.aten._unsafe_view(output, output.shape)

            def on_grad(g):
                if not saved or not rnd.active:
                    return None
                x = saved[0] if keep else saved.pop()   # released as soon as this call is compressed
                if src._version != version:
                    rnd.reroute.setdefault(block.name, f"the input of module {use.module!r} was modified in place "
                                                       f"after the call, so the saved input is not what it saw")
                    return None
                try:
                    self._compress(block, use, key, comp, x, g.detach(), rnd)
                except NoBatchDim as exc:
                    rnd.reroute.setdefault(block.name, f"module {use.module!r}: {exc.reason}")
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:           # any call the fused math cannot read
                    rnd.reroute.setdefault(block.name, f"the fused hook of module {use.module!r} could not read "
                                                       f"this call ({type(exc).__name__}: {str(exc)[:160]})")
                return None

            output.register_hook(on_grad)
            return output
        return hook

    def _compress(self, block: LayerSpec, use, key: tuple, comp, x: torch.Tensor, g: torch.Tensor,
                  rnd: _Round) -> None:
        B = rnd.B
        known = self.layouts.get(key)
        layout = resolve(use.kind, tuple(x.shape), B, known, self._tried.get(key, ()))
        rnd.shapes[key] = (use.kind, tuple(x.shape))
        if layout != known and layout != ALL:
            rnd.layouts[key] = layout
        x, g = batch_first(layout, x, g, use.kind)
        a = prepare(use, x, B)
        d3 = prepare_delta(use, g, B)
        if a.shape[0] != B or d3.shape[0] != B:
            raise NoBatchDim(f"its input (shape {list(x.shape)}) could not be read as {B} examples")
        val = comp.from_uses([Use(use, a, d3 if use.kind == "embedding" else d3.to(a.dtype))])
        rnd.acc[block.name] = val if block.name not in rnd.acc else rnd.acc[block.name] + val
        rnd.fired.add(use.module)

    @contextlib.contextmanager
    def _hooked(self, keep: bool = False):
        """The compressing forward hooks on every tracked use, for one forward: yields the _Round
        that the backward fills, and removes the hooks on exit."""
        rnd = _Round()
        handles = []
        try:
            for block, use, mod in self.hooked:
                handles.append(mod.register_forward_hook(self._make_hook(block, use, rnd, keep), with_kwargs=True))
            yield rnd
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ one round
    def _run(self, batch, check: bool):
        """Forward + backward with the compressing hooks. With ``check``, also the checked examples' own
        gradients (_references) and the batch gradient of every tracked block. Returns (round, losses,
        compressed batch gradient, {b: compressed gradient of example b}) — the last two only with
        ``check``."""
        want_sum: dict[str, torch.Tensor] = {}
        want_rows: dict[int, dict[str, torch.Tensor]] = {}
        blocks = self.fused + self.func
        with self._hooked() as rnd, torch.enable_grad():
            losses = self._losses(batch)
            rnd.B = losses.shape[0]
            check = check and losses.requires_grad
            if check and self._reference == "graph":
                # from the batch's own graph, before the main backward (which then frees it as it goes)
                rnd.active = False
                want_rows = {b: self._example_grads(losses[b], blocks, retain=True) for b in rows_to_check(rnd.B)}
                rnd.active = True
            names = self.all_names if check else self.fused_names
            if names and losses.requires_grad:
                grads = self._backward(losses.sum(), names)
                if check:
                    want_sum = compress_grads(grads, blocks, self.compressors, self._params)
                del grads
            rnd.active = False       # nothing after the main backward may add calls
            if check and self._reference == "slice":
                # after the main backward, once the batch's graph is gone: one example at a time
                want_rows = self._sliced_references(batch, losses.detach(), blocks, bool(rnd.low))
                if want_rows is None:
                    self._reference = "graph"    # the batch does not slice into its examples
                    raise _Retry()
        return rnd, losses, want_sum, want_rows

    def _sliced_references(self, batch, losses: torch.Tensor, blocks: list[LayerSpec], low: bool) -> dict | None:
        """{b: {block: (r,)}}: the checked examples' own gradients, compressed, each from a forward and
        backward of that example alone (the batch sliced along dim 0: little memory) — or None when
        slicing does not reproduce the example's loss in the batch (a batch tensor that is not
        batch-first, examples that interact). Then the capture session takes them from the batch's
        own graph instead (one backward of losses[b] each, the graph kept meanwhile; no slicing)."""
        tol = 3e-2 if low else 1e-4
        floor = 1e-3 * float(losses.abs().mean())
        out = {}
        for b in rows_to_check(losses.shape[0]):
            try:
                with torch.enable_grad():
                    one = self.loss_fn(self.model, slice_batch(batch, b))
            except torch.OutOfMemoryError:
                raise
            except Exception:
                return None
            if not (isinstance(one, torch.Tensor) and one.shape == (1,) and one.requires_grad
                    and abs(float(one.detach()[0]) - float(losses[b])) <= tol * max(abs(float(losses[b])), floor) + 1e-12):
                return None
            out[b] = self._example_grads(one[0], blocks, retain=False)
        return out

    def _example_grads(self, target: torch.Tensor, blocks: list[LayerSpec], retain: bool) -> dict[str, torch.Tensor]:
        """{block: (r,)}: the gradient of ``target`` (one example's loss), each block compressed as soon
        as autograd has accumulated its parameters' gradients and then released, so that the check
        never holds a full gradient of the model beside the kept graph. ``.grad`` fields are restored."""
        owner = {}
        for block in blocks:
            for n in block.param_names:
                owner.setdefault(id(self._params[n]), []).append((block, n))
        tracked = list({id(self._params[n]): self._params[n] for b in blocks for n in b.param_names}.values())
        pending: dict[str, dict] = {}
        out: dict[str, torch.Tensor] = {}

        def make(p):
            def hook(param):
                g = densify(param.grad)
                param.grad = None
                for block, n in owner[id(p)]:
                    got = pending.setdefault(block.name, {})
                    got[n] = g
                    if len(got) == len(block.param_names):
                        out.update(compress_grads(pending.pop(block.name), [block], self.compressors, self._params))
            return hook

        every = [p for p in self.model.parameters() if p.requires_grad]
        old = [p.grad for p in every]
        handles = []
        try:
            for p in every:
                p.grad = None
            handles = [p.register_post_accumulate_grad_hook(make(p)) for p in tracked]
            try:
                # inputs= spares untracked parameters, but re-entrant checkpointing refuses it
                target.backward(retain_graph=retain, inputs=tracked if self._backward_mode == "grad" else None)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                if not _reentrant_refusal(exc):
                    raise _backward_failed(exc) from exc
                self._backward_mode = "backward"
                raise _Retry() from exc
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(every, old):
                p.grad = g
        for block in blocks:            # parameters the graph did not reach: zero gradient
            if block.name not in out:
                out.update(compress_grads(pending.get(block.name, {}), [block], self.compressors, self._params))
        return out

    def _backward(self, target: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """The batch backward that runs the hooks: {param name: batch gradient} of ``names``."""
        params = [self._params[n] for n in names]
        if self._backward_mode == "grad":
            try:
                gs = torch.autograd.grad(target, params, allow_unused=True)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                if not _reentrant_refusal(exc):
                    raise _backward_failed(exc) from exc
                self._backward_mode = "backward"
                warnings.warn("re-entrant gradient checkpointing refuses torch.autograd.grad; capturing with "
                              ".backward() instead (parameter .grad fields are saved and restored).", stacklevel=5)
                raise _Retry() from exc   # the first backward already ran the hooks for nothing
            fused = set(self.fused_names)
            if any(g is None and n in fused for n, g in zip(names, gs)):
                # a tracked weight the graph does not reach: unused this batch, or hidden inside a
                # re-entrant checkpoint segment that autograd.grad prunes (its hooks never run).
                # .backward() runs every node, so the batch is redone that way from now on.
                self._backward_mode = "backward"
                raise _Retry()
            return {n: densify(g) for n, g in zip(names, gs) if g is not None}
        # re-entrant checkpointing: .backward(), with every .grad saved and restored around it
        every = [p for p in self.model.parameters() if p.requires_grad]
        old = [p.grad for p in every]
        for p in every:
            p.grad = None
        try:
            try:
                target.backward()
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                raise _backward_failed(exc) from exc
            return {n: densify(p.grad) for n, p in zip(names, params) if p.grad is not None}
        finally:
            for p, g in zip(every, old):
                p.grad = g

    def _assemble(self, rnd: _Round, losses: torch.Tensor, batch) -> dict[str, torch.Tensor]:
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
        return {l.name: feats[l.name].detach().float() for l in self.layers}

    # ------------------------------------------------------------------ the entry
    def __call__(self, batch: Any, check: bool | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns ({block name: (B, r_l) float32}, per-example losses (B,))."""
        due = check if check is not None else (self.check == "always" or
                                               (self.check == "first" and not self._checked))
        for _ in range(_MAX_ROUNDS):
            try:
                rnd, losses, want_sum, want_rows = self._run(batch, due)
            except _Retry:
                continue
            if rnd.reroute:                      # calls the fused math cannot read: torch.func, redo
                for block, reason in rnd.reroute.items():
                    self._route(block, reason)
                continue
            if rnd.layouts and not due and self.check != "never":
                due = True                       # a layout read anew is verified before it is used
                continue
            feats = self._assemble(rnd, losses, batch)
            if due and want_rows:
                failures = check_blocks(self.fused, self.func, feats, want_sum, want_rows,
                                        bool(rnd.low) or self._low_weights())
                if failures:
                    self._handle(failures, rnd)
                    continue
            self.layouts.update(rnd.layouts)
            if due:
                self._checked = True
            return feats, losses.detach()
        raise CaptureCheckError(f"capture could not settle on a correct way to capture this batch in {_MAX_ROUNDS} "
                                f"rounds (routes: {self.routed}). Please report this model.")

    def _low_weights(self) -> bool:
        return any(self._params[n].dtype in LOW for n in self.all_names)

    def _handle(self, failures: list[Failure], rnd: _Round) -> None:
        """A fused block that failed: the next candidate layout, else torch.func. A func block: refuse."""
        low = ", ".join(sorted(rnd.low)) or (str(next(self._params[n].dtype for n in self.all_names
                                                      if self._params[n].dtype in LOW)).replace("torch.", "")
                                             if self._low_weights() else None)
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
                    self._tried.setdefault(k, set()).add(rnd.layouts[k])
                if all(self._has_next(k, rnd) for k in pending):
                    continue                     # read those inputs with the next layout, then check again
            note = "".join(self._layout_note(k, rnd) for k in pending[:1])
            self._route(f.block, cause(f, mtype, any(u.module in rnd.fired for u in block.uses), note, low))

    @staticmethod
    def _layout_note(key: tuple, rnd: _Round) -> str:
        module = key[0]
        shape, layout = list(rnd.shapes[key][1]), rnd.layouts[key]
        where = f"dim {layout}" if isinstance(layout, int) else "a flattened dim 0"
        if shape and shape[0] == 1:
            return (f" — module {module!r}'s input (shape {shape}) is shared by the whole batch, and its {where} "
                    f"only happens to have the batch size")
        return f" — module {module!r}'s input (shape {shape}) read with the batch in {where}, and no other reading fits"

    def _has_next(self, key: tuple, rnd: _Round) -> bool:
        kind, shape = rnd.shapes[key]
        try:
            resolve(kind, shape, rnd.B, None, self._tried.get(key, ()))
            return True
        except NoBatchDim:
            return False

    def _module_type(self, block: str) -> str:
        spec = next((l for l in self.layers if l.name == block), None)
        name = spec.uses[0].module if spec is not None and spec.uses else block
        mod = self._modules.get(name)
        return type(mod).__name__ if mod is not None else "?"

    # ------------------------------------------------------------------ token-level capture
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
        with self._hooked(keep=True) as rnd, torch.enable_grad():
            values = _token_values(self.loss_fn(self.model, batch))
            rnd.B = values.shape[0]
            for t in range(values.shape[1]):
                rnd.acc.clear()
                col = values[:, t].sum()
                if col.requires_grad:
                    torch.autograd.grad(col, self.fused_params, retain_graph=t + 1 < values.shape[1],
                                        allow_unused=True)
                if rnd.reroute:
                    block, reason = next(iter(rnd.reroute.items()))
                    raise ConfigError(f"token-level scores need the fused hook of layer {block!r}, which cannot "
                                      f"capture this model: {reason}. Leave it out of track=.")
                cols.append({l.name: (rnd.acc[l.name] if l.name in rnd.acc else
                                      torch.zeros(values.shape[0], self.compressors[l.name].r,
                                                  device=values.device)).detach().float()
                             for l in self.fused})
        feats = {l.name: torch.stack([c[l.name] for c in cols], 1) for l in self.fused}
        return feats, values.detach(), bool(rnd.layouts)


def _token_values(values) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise LossShapeError(f"a token-level measure must return (B, T) values (one per example and "
                             f"token), got {shape}. See dropinf.measures.token_nll.")
    return values


def _backward_failed(exc: RuntimeError) -> CaptureError:
    hint = ""
    if "inplace" in str(exc) or "in-place" in str(exc):
        hint = (" An in-place operation in the model or loss_fn modified a tensor that the backward needs (often "
                "the input of a layer, modified after the call): clone it first or use the out-of-place op.")
    return CaptureError(f"the backward pass through loss_fn failed ({type(exc).__name__}: {str(exc)[:300]}). A plain "
                        f"loss_fn(model, batch).sum().backward() fails the same way, so the model or loss_fn must "
                        f"change before any gradient of it can be taken.{hint}")


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
