"""The capture self-check: captured rows against the gradients they claim to be.

Run on the first batch of every capture session (``check="always"``: every batch; and on any
later batch where a tracked module's input layout had to be read anew, capture.layout). Two
comparisons per tracked block, both against plain autograd on the same forward:

* **rows**: the captured row of a few examples of the batch (the first, the middle and the last)
  against the same compression of that example's own gradient, ∂ loss_b / ∂θ (see below). This
  is what sees rows given to the wrong example (a sequence-first input read batch-first, a table
  shared by the batch) — a sum cannot.
* **sum**: Σ_b of every captured row against the compression of the plain batch gradient, which
  covers the examples the row check did not pick (fused blocks).

The examples' own gradients come from a forward and backward of each example alone when slicing
the batch along dim 0 reproduces that example's loss in the batch (little memory, after the
batch's own backward), and otherwise from one backward of loss_b through the batch's graph (which
needs no slicing: sequence-first batches, tensors shared by the batch).

A block passes when ‖got − want‖ ≤ tol · ‖want‖ for each compared vector (tol 2e-3; 3e-2 when the
forward ran in bfloat16/float16, e.g. under autocast). What happens to a block that fails is the
engine's business (capture.engine): a fused block is read with another layout or moved to the
torch.func path; a torch.func block is refused with a CaptureCheckError naming the cause.

Every batch's rows are also checked for NaN/inf (``nonfinite``; one host sync when all are
finite), and the pass ends with a NonFiniteGradientError naming every bad example
(``raise_nonfinite``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import NonFiniteGradientError
from .functional import densify, flatten_block, slice_batch
from .layers import LayerSpec

TOL = 2e-3
TOL_LOW = 3e-2      # bfloat16 / float16 forward (autocast or half weights)
LOW = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Failure:
    block: str
    kind: str          # "rows" (some example's row) or "sum" (the batch sum)
    error: float       # relative error ‖got − want‖ / ‖want‖
    tol: float
    examples: tuple    # positions in the batch whose rows differ ("rows")


def rows_to_check(B: int) -> list[int]:
    """The examples whose rows are compared with their own gradients: first, middle, last."""
    return sorted({0, B // 2, B - 1})


def compress_grads(grads: dict[str, torch.Tensor], blocks: list[LayerSpec], compressors: dict,
                   params: dict) -> dict[str, torch.Tensor]:
    """{block: (r,) float64}: one gradient ({param: tensor}, absent = zero) compressed as its block's rows
    are — done at once, so that no more than one full gradient is alive during the check."""
    out = {}
    for block in blocks:
        gs = {n: (grads[n] if grads.get(n) is not None else torch.zeros_like(params[n])).unsqueeze(0)
              for n in block.param_names}
        flat = flatten_block(gs, block.param_names)
        out[block.name] = compressors[block.name].from_flat(flat.float() if flat.dtype in LOW else flat)[0].double()
    return out


# ------------------------------------------------------------------ the references
def sliced_references(model: nn.Module, loss_fn, batch, losses: torch.Tensor, low: bool,
                      grads_of: Callable[[torch.Tensor], dict]) -> dict | None:
    """{b: {block: (r,)}}: the checked examples' own gradients, compressed, each from a forward and
    backward of that example alone (the batch sliced along dim 0: little memory) — or None when
    slicing does not reproduce the example's loss in the batch (a batch tensor that is not
    batch-first, examples that interact). Then the capture session takes them from the batch's
    own graph instead (one backward of losses[b] each, the graph kept meanwhile; no slicing).
    ``grads_of(loss)``: the compressed gradient of one loss (example_grads, as the engine runs it)."""
    tol = 3e-2 if low else 1e-4
    floor = 1e-3 * float(losses.abs().mean())
    out = {}
    for b in rows_to_check(losses.shape[0]):
        try:
            with torch.enable_grad():
                one = loss_fn(model, slice_batch(batch, b))
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return None
        if not (isinstance(one, torch.Tensor) and one.shape == (1,) and one.requires_grad
                and abs(float(one.detach()[0]) - float(losses[b])) <= tol * max(abs(float(losses[b])), floor) + 1e-12):
            return None
        out[b] = grads_of(one[0])
    return out


def example_grads(model: nn.Module, params: dict, target: torch.Tensor, blocks: list[LayerSpec], compressors: dict,
                  retain: bool, restrict: bool, reached: set | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
    """{block: (r,)}: the gradient of ``target`` (one example's loss, or the batch's summed loss),
    each block compressed as soon as autograd has accumulated its parameters' gradients and then
    released, so that no full gradient of the model is ever held. ``.grad`` fields are restored.
    restrict: pass the tracked parameters as ``inputs=`` (re-entrant checkpointing refuses it).
    ``reached`` collects the names of the parameters whose gradient arrived; keep=False drops the
    gradients without compressing them (a backward run only for the hooks). A failing backward
    raises as torch raised it (the engine explains it)."""
    owner = {}
    for block in blocks:
        for n in block.param_names:
            owner.setdefault(id(params[n]), []).append((block, n))
    tracked = list({id(params[n]): params[n] for b in blocks for n in b.param_names}.values())
    pending: dict[str, dict] = {}
    out: dict[str, torch.Tensor] = {}

    def make(p):
        def hook(param):
            g = densify(param.grad) if keep else None
            param.grad = None
            for block, n in owner[id(p)]:
                if reached is not None:
                    reached.add(n)
                if not keep:
                    continue
                got = pending.setdefault(block.name, {})
                got[n] = g
                if len(got) == len(block.param_names):
                    out.update(compress_grads(pending.pop(block.name), [block], compressors, params))
        return hook

    every = [p for p in model.parameters() if p.requires_grad]
    old = [p.grad for p in every]
    handles = []
    try:
        for p in every:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(make(p)) for p in tracked]
        target.backward(retain_graph=retain, inputs=tracked if restrict else None)
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(every, old):
            p.grad = g
    for block in blocks:            # parameters the graph did not reach: zero gradient
        if keep and block.name not in out:
            out.update(compress_grads(pending.get(block.name, {}), [block], compressors, params))
    return out


# ------------------------------------------------------------------ the comparison
def _rel(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    diff = float((got - want).norm())
    scale = max(float(want.norm()), float(got.norm()), floor)
    return 0.0 if scale == 0.0 else diff / scale


def check_blocks(fused: list[LayerSpec], func: list[LayerSpec], feats: dict[str, torch.Tensor],
                 want_sum: dict[str, torch.Tensor], want_rows: dict[int, dict[str, torch.Tensor]],
                 low_precision: bool) -> list[Failure]:
    """Every block's failures (empty when all pass). ``want_rows[b][block]``: example b's own gradient,
    compressed; ``want_sum[block]``: the batch gradient, compressed (both from compress_grads). The sum
    is checked for fused blocks only: torch.func computes each example alone, and for some modules
    the batch gradient is not the sum of the examples' own (Embedding(scale_grad_by_freq=True))."""
    tol = TOL_LOW if low_precision else TOL
    failures = []
    summed = {b.name for b in fused}
    for block in fused + func:
        rows = feats[block.name].double()
        wants = {b: w[block.name] for b, w in want_rows.items()}
        # a floor so that an example whose gradient is ~0 for this block is not judged on rounding noise
        floor = 1e-6 * max([float(w.norm()) for w in wants.values()] + [float(rows.norm(dim=1).max())] + [0.0])
        bad, worst = [], 0.0
        for b, want in wants.items():
            err = _rel(rows[b], want, floor)
            worst = max(worst, err)
            if err > tol:
                bad.append(b)
        if want_sum and block.name in summed:    # a wrong sum says more about the cause: check it first
            err = _rel(rows.sum(0), want_sum[block.name], 1e-6 * float(rows.norm(dim=1).sum()))
            if err > tol:
                failures.append(Failure(block.name, "sum", err, tol, tuple(bad)))
                continue
        if bad:
            failures.append(Failure(block.name, "rows", worst, tol, tuple(bad)))
    return failures


def cause(f: Failure, fired: bool, layout_note: str, low_dtype: str | None) -> str:
    """Why a fused block failed, in words a user can act on."""
    if f.kind == "rows":
        why = (f"the captured rows of examples {list(f.examples)} of the batch differ from those examples' own "
               f"gradients (relative error {f.error:.2g}) while their sum matches the batch gradient: the rows "
               f"mixed the examples{layout_note}")
    elif not fired:
        why = ("its module never ran in the forward while its weight took part in the loss: the weight is used "
               "without calling the module (e.g. read as module.weight inside another module's forward)")
    else:
        why = (f"the batch sum of its captured rows differs from the plain batch gradient (relative error "
               f"{f.error:.2g}): the loss depends on the weight other than through the module's output — most "
               f"often a term of loss_fn that uses the parameter directly (weight decay written into the loss: "
               f"better passed as damping to the estimator), or a second, functional use of the weight")
    if low_dtype:
        why += (f" (the forward ran in {low_dtype}; the error exceeds even the reduced-precision tolerance "
                f"{f.tol:g})")
    return why


def func_refusal(f: Failure, module_type: str, low_dtype: str | None) -> str:
    """The CaptureCheckError message for a torch.func block whose rows are wrong."""
    what = (f"the rows of examples {list(f.examples)}" if f.kind == "rows" else "the batch sum of the rows")
    msg = (f"capture self-check failed for layer {f.block!r} ({module_type}, torch.func per-example gradients): "
           f"{what} differ from the plain autograd gradients of the same forward (relative error {f.error:.2g}, "
           f"tolerance {f.tol:g}). The torch.func path computes each example alone, slicing every tensor of the "
           f"batch along dim 0, so this happens when the batch holds a tensor whose first dimension is not the "
           f"batch (sequence-first inputs: yield batch-first tensors and transpose inside the model), when "
           f"examples interact within the batch (BatchNorm in training mode, a loss normalised over the batch), "
           f"or when loss_fn does not return each example's own loss.")
    if low_dtype:
        msg += f" The forward ran in {low_dtype}: a larger rounding error than the tolerance is possible too."
    return msg + " Refusing rather than returning wrong scores."


def _tiled(fs: list[torch.Tensor]) -> torch.Tensor | None:
    """The one contiguous (B, W) tensor whose numbers are exactly those of ``fs``, when they are the
    column blocks of one row-major buffer that tile it side by side (the store's reused row buffer,
    store.writer.BatchRows): one reduction over it reads each number once, in order."""
    f0 = fs[0]
    if f0.dim() != 2 or f0.dtype != torch.float32:
        return None
    B, W, ptr = f0.shape[0], f0.stride(0), f0.untyped_storage().data_ptr()
    for f in fs:
        if (f.dim() != 2 or f.dtype != f0.dtype or f.shape[0] != B or (B > 1 and f.stride(0) != W)
                or (f.shape[1] > 1 and f.stride(1) != 1) or f.untyped_storage().data_ptr() != ptr):
            return None
    spans = sorted((f.storage_offset(), f.shape[1]) for f in fs)
    start = end = spans[0][0]
    for offset, width in spans:
        if offset != end:
            return None
        end += width
    if end - start != W:
        return None
    return f0.as_strided((B, W), (W, 1), start)


def nonfinite(feats: dict[str, torch.Tensor], first_id: int) -> tuple[list[int], list[str]]:
    """(example ids, layer names) whose features hold NaN/inf — one host sync when all are finite.

    A NaN or an inf anywhere makes a layer's sum non-finite, so the sums of the rows sort out the
    common case in one vectorized pass (``isfinite(f).all()`` builds a bool tensor of every entry:
    a quarter of an MLP's in-memory featurize); a non-finite sum (or one that overflowed, from
    finite rows past 1e38) is then checked entry by entry."""
    if not feats:
        return [], []
    whole = _tiled(list(feats.values()))
    sums = [whole.sum(dtype=torch.float32)] if whole is not None else [f.sum(dtype=torch.float32) for f in feats.values()]
    if math.isfinite(float(torch.stack(sums).sum()) if len(sums) > 1 else float(sums[0])):
        return [], []
    bad_rows, bad_layers = None, []
    for name, f in feats.items():
        ok = torch.isfinite(f).all(dim=1)
        if not bool(ok.all()):
            bad_layers.append(name)
            bad_rows = ~ok if bad_rows is None else (bad_rows | ~ok)
    if bad_rows is None:             # finite rows whose sum overflowed
        return [], []
    return (torch.nonzero(bad_rows).flatten().cpu() + first_id).tolist(), bad_layers


def raise_nonfinite(ids: list[int], bad_layers: list[str]) -> None:
    if ids:
        raise NonFiniteGradientError(
            f"NaN/inf in the gradients of example ids {ids[:20]}{' ...' if len(ids) > 20 else ''} "
            f"(dataset indices), layers {bad_layers[:5]}. Check those "
            f"examples' inputs/labels and that the loss is finite there (e.g. log(0)).")
