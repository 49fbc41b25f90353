"""The fused hooks: a forward hook on every module that uses a tracked weight keeps the call's
input and registers a tensor hook on the call's *output* (the model always gets back a tensor of
the shape its module returned). During the backward that hook receives the output-gradient δ of
this call — the gradient of the output as the module returned it, so an in-place op that follows
the layer (``ReLU(inplace=True)``) cannot change it — moves the batch to dim 0 (capture.layout),
and the block's compressor turns (input, δ) into (B, r_l) numbers right there (capture.modules);
the saved input and δ are released at once. Because the batch loss is the *sum* of the
per-example losses and examples do not interact, δ[b] is exactly example b's output-gradient.

Capture-only backward (``Round.leaves``): the hooks need each call's δ, not the weights' batch
gradients. When the engine asks for it, every hooked call's output is passed, in place, through
``_Tap`` — an identity that also takes ``leaf``, a 0-dim tensor that requires grad — and the
backward asks autograd for the gradient of ``leaf`` alone: every hooked output lies on the path to
it, so every hook fires with the same δ (the tap passes δ through untouched, so the rows are the
same bit for bit), while no weight gradient (a third of a training step's FLOPs, and the memory
of every tracked weight's gradient) is ever computed, and no output-gradient is summed into the
leaf either (the tap gives it none).

A call the fused math cannot read — no batch dimension, an input modified in place after the
call, anything the math raises — is not passed through: its block is named in ``Round.reroute``
with the reason, and the capture engine moves that block to torch.func.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .check import LOW
from .layers import LayerSpec
from .layout import ALL, NoBatchDim, batch_first, resolve
from .modules import Use, prepare, prepare_delta


def _first_arg_name(module: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


@dataclass
class Round:
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
    leaves: dict | None = None                     # device -> leaf tapped by hooked outputs (None: off)
    lean: bool = False                             # this round's backward was the capture-only one
    out: dict | None = None                        # block -> the caller's (≥B, r) float32 row buffer


def row_buffer(out: dict | None, block: str, B: int, like: torch.Tensor) -> torch.Tensor | None:
    """The first B rows of the caller's buffer for ``block`` (capture's ``out=``), when it can take
    this batch's rows as computed: enough rows, on the same device, and the rows computed in float32
    (a reduced-precision forward's rows are computed in its dtype, then converted)."""
    buf = None if out is None else out.get(block)
    if buf is None or buf.shape[0] < B or buf.device != like.device or like.dtype != torch.float32 \
            or buf.dtype != torch.float32:
        return None
    return buf[:B]


class _Tap(torch.autograd.Function):
    """``output`` itself (in place, marked dirty), with the capture-only leaf as a second input: its
    backward passes δ through unchanged and gives the leaf no gradient, so reaching the leaf costs
    no reduction of any output-gradient (``output + leaf`` would sum each one into the leaf's)."""

    @staticmethod
    def forward(ctx, output, leaf):
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, g):
        return g, None


class FusedHooks:
    """The compressing hooks of one capture session, and what it learned: the verified layout of
    each (module, call index in the forward), and the layouts that failed the per-example check."""

    def __init__(self, compressors: dict):
        self.compressors = compressors
        self.layouts: dict[tuple, object] = {}
        self.tried: dict[tuple, set] = {}
        self._arg_names: dict[str, str | None] = {}

    def _input_of(self, use, mod, args, kwargs):
        if args:
            return args[0]
        if use.module not in self._arg_names:
            self._arg_names[use.module] = _first_arg_name(mod)
        return kwargs.get(self._arg_names[use.module]) if kwargs else None

    def _make_hook(self, block: LayerSpec, use, rnd: Round, keep: bool = False):
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
            saved = [src.detach()]      # shares src's version counter; the closure keeps no reference to src
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
                if x._version != version:
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

            if rnd.leaves is not None:                 # capture-only backward (module docstring)
                leaf = rnd.leaves.get(output.device)
                if leaf is None:
                    leaf = rnd.leaves[output.device] = torch.full((), -0.0, device=output.device,
                                                                  requires_grad=True)
                # in place, before anything reads the output (no copy of it); the hook then sits on
                # the tap's node, which lies on the path to leaf
                output = _Tap.apply(output, leaf)
            output.register_hook(on_grad)
            return output
        return hook

    def _compress(self, block: LayerSpec, use, key: tuple, comp, x: torch.Tensor, g: torch.Tensor,
                  rnd: Round) -> None:
        B = rnd.B
        known = self.layouts.get(key)
        layout = resolve(use.kind, tuple(x.shape), B, known, self.tried.get(key, ()))
        rnd.shapes[key] = (use.kind, tuple(x.shape))
        if layout != known and layout != ALL:
            rnd.layouts[key] = layout
        x, g = batch_first(layout, x, g, use.kind)
        a = prepare(use, x, B)
        d3 = prepare_delta(use, g, B)
        if a.shape[0] != B or d3.shape[0] != B:
            raise NoBatchDim(f"its input (shape {list(x.shape)}) could not be read as {B} examples")
        d3 = d3 if use.kind == "embedding" or d3.dtype == a.dtype else d3.to(a.dtype)
        first = block.name not in rnd.acc
        val = comp.from_uses([Use(use, a, d3)], out=row_buffer(rnd.out, block.name, B, d3) if first else None)
        rnd.acc[block.name] = val if first else rnd.acc[block.name] + val
        rnd.fired.add(use.module)

    @contextlib.contextmanager
    def attached(self, hooked: list, keep: bool = False):
        """The compressing forward hooks on every (block, use, module) of ``hooked``, for one forward:
        yields the Round that the backward fills, and removes the hooks on exit."""
        rnd = Round()
        handles = []
        try:
            for block, use, mod in hooked:
                handles.append(mod.register_forward_hook(self._make_hook(block, use, rnd, keep), with_kwargs=True))
            yield rnd
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def layout_note(key: tuple, rnd: Round) -> str:
        module = key[0]
        shape, layout = list(rnd.shapes[key][1]), rnd.layouts[key]
        where = f"dim {layout}" if isinstance(layout, int) else "a flattened dim 0"
        if shape and shape[0] == 1:
            return (f" — module {module!r}'s input (shape {shape}) is shared by the whole batch, and its {where} "
                    f"only happens to have the batch size")
        return f" — module {module!r}'s input (shape {shape}) read with the batch in {where}, and no other reading fits"

    def has_next(self, key: tuple, rnd: Round) -> bool:
        kind, shape = rnd.shapes[key]
        try:
            resolve(kind, shape, rnd.B, None, self.tried.get(key, ()))
            return True
        except NoBatchDim:
            return False
