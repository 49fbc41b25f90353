"""Estimators that re-run the model: the Hessian of the train loss by autograd, for ExactHessian
(the whole Hessian over the tracked parameters) and LiSSA(hvp="model") (its restriction to the
kept coordinates, from Hessian-vector products). Both go through ``LossModule`` (the model and
its loss_fn as one module, so torch.func.functional_call can swap the parameters) over the train
loader that FitContext carries.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian
from tqdm.auto import tqdm

from ..capture.functional import LossModule, batch_size
from ..errors import ConfigError, EmptyDataError
from .base import FitContext


def kept_coordinates(ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices (into the concatenated tracked parameters) of the kept coordinates, their
    compressor factors, and the total parameter count."""
    idx, fac, off = [], [], 0
    for l in ctx.layers:
        comp = ctx.compressors[l.name]
        li = getattr(comp, "indices", torch.arange(l.dim))
        idx.append(li + off)
        fac.append(torch.full((li.numel(),), float(getattr(comp, "factor", 1.0)), dtype=torch.float64))
        off += l.dim
    return torch.cat(idx), torch.cat(fac), off


def restricted_hessian(ctx: FitContext, columns: int = 256) -> tuple[torch.Tensor, int]:
    """(R × R) mean train-loss Hessian at the kept coordinates (times the compressors' factors),
    from R autograd HVPs per train batch, ``columns`` at a time; and n."""
    if ctx.train_loader is None or ctx.model is None:
        raise ConfigError("LiSSA(hvp='model') needs the model and the train loader: use it through "
                          "Attributor.featurize(loader) (or from_store(..., train_loader=loader)).")
    names = [pn for l in ctx.layers for pn in l.param_names]
    pm = dict(ctx.model.named_parameters(remove_duplicate=False))
    leaves = [pm[nm].detach().clone().requires_grad_(True) for nm in names]
    keyed = {f"model.{nm}": t for nm, t in zip(names, leaves)}
    wrapper = LossModule(ctx.model, ctx.loss_fn)
    gidx, gfac, d_full = kept_coordinates(ctx)
    R = gidx.numel()
    dev = leaves[0].device
    h = torch.zeros(R, R, dtype=torch.float64)
    n = 0
    for batch in tqdm(ctx.train_loader, desc="hessian columns", leave=False, disable=not ctx.progress):
        batch = ctx.to_device(batch)
        losses = functional_call(wrapper, keyed, (batch,))
        n += losses.shape[0]
        grads = torch.autograd.grad(losses.sum(), leaves, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for c0 in range(0, R, columns):
            cols = torch.arange(c0, min(R, c0 + columns))
            e = torch.zeros(cols.numel(), d_full, dtype=flat.dtype, device=dev)
            e[torch.arange(cols.numel()), gidx[cols].to(dev)] = gfac[cols].to(dev, flat.dtype)
            outs = torch.autograd.grad(flat, leaves, grad_outputs=e, is_grads_batched=True, retain_graph=True)
            hv = torch.cat([o.reshape(cols.numel(), -1) for o in outs], 1).double().cpu()
            h[cols] += hv[:, gidx] * gfac
    if n == 0:
        raise ConfigError("the train loader yielded no batches; cannot build the Hessian")
    return (h + h.T) / (2 * n), n


def full_hessian(ctx: FitContext, names: list[str]) -> tuple[torch.Tensor, int]:
    """Σ_i ∇²ℓ_i over the flat vector of the named parameters, and n. (d × d, float64)"""
    pm = dict(ctx.model.named_parameters(remove_duplicate=False))
    params = [pm[n].detach() for n in names]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.reshape(-1) for p in params])
    wrapper = LossModule(ctx.model, ctx.loss_fn)

    def f(flat, batch):
        chunks = torch.split(flat, sizes)
        p = {f"model.{n}": c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(wrapper, p, (batch,)).sum()

    h, n = None, 0
    for batch in tqdm(ctx.train_loader, desc="exact hessian", disable=not ctx.progress, leave=False):
        batch = ctx.to_device(batch)
        hb = hessian(f)(flat0, batch).double()
        h = hb if h is None else h + hb
        n += batch_size(batch)
    if h is None:
        raise EmptyDataError("the train loader yielded no batches; cannot build the Hessian")
    return h, n
