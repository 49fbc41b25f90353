"""LiSSA (Agarwal et al. 2017; paper App. B, eq. 7–8): iterative iHVP.

With A = H̃ + λI and v a query gradient, the recursion

    s_0 = v,   s_{j+1} = v + (I − A/scale) s_j

converges to scale · A⁻¹ v whenever scale ≥ λ_max(A); the iHVP is s_J / scale and
I(q, i) = − (s_J/scale)ᵀ g̃_i (eq. 8). scale = 1 is the paper's recursion verbatim; the default
estimates λ_max(A) by power iteration and takes 1.1× that, which guarantees convergence. The
paper's setting is 10 iterations (the default): far from converged on ill-conditioned problems,
which is why LiSSA scores near chance in the paper's Table 1.

hvp="gauss-newton": A v on the captured features, per layer (1/n)G_lᵀG_l v + λ_l v.
hvp="model":        A v by autograd on the model's mean train loss (true Hessian, all tracked
                    layers jointly; Identity or Dropout features only) + λ_l v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch.func import functional_call

from ..capture.functional import _LossModule
from ..errors import ConfigError
from ..store.features import Features
from .base import FitContext, SolveScores, layer_dampings, require_kind
from .linalg import times_g, times_gt

Op = Callable[[dict], dict]


def lissa_recursion(apply_a: Op, v: dict, scale: float, iterations: int) -> dict:
    """s_J/scale with s_0 = v, s_{j+1} = v + s_j − A s_j / scale."""
    s = {k: t.clone() for k, t in v.items()}
    for _ in range(iterations):
        a = apply_a(s)
        s = {k: v[k] + s[k] - a[k] / scale for k in s}
    return {k: t / scale for k, t in s.items()}


def power_max_eig(apply_a: Op, shapes: dict, iters: int = 30, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(1, r, generator=g, dtype=torch.float64) for k, r in shapes.items()}
    est = 0.0
    for _ in range(iters):
        norm = sum(float((t ** 2).sum()) for t in x.values()) ** 0.5
        x = {k: t / norm for k, t in x.items()}
        y = apply_a(x)
        est = sum(float((x[k] * y[k]).sum()) for k in x)
        x = y
    return est


def gauss_newton_op(train: Features, lams: dict[str, float]) -> Op:
    n = train.n

    def apply_a(s: dict) -> dict:
        return {k: times_g(times_gt(s[k], train.data[k]), train.data[k]) / n + lams[k] * s[k] for k in s}
    return apply_a


def model_op(train: Features, ctx: FitContext, lams: dict[str, float]) -> Op:
    """A v with the true Hessian of the mean train loss over the tracked parameters."""
    require_kind("LiSSA(hvp='model')", ctx.compressor, {"identity", "dropout"})
    if ctx.train_loader is None:
        raise ConfigError("LiSSA(hvp='model') needs the train loader; call Attributor.featurize(loader).")
    names = [pn for l in ctx.layers for pn in l.param_names]
    pm = dict(ctx.model.named_parameters(remove_duplicate=False))
    leaves = [pm[nm].detach().clone().requires_grad_(True) for nm in names]
    keyed = {f"model.{nm}": t for nm, t in zip(names, leaves)}
    wrapper = _LossModule(ctx.model, ctx.loss_fn)
    idx, fac, off, sl = [], [], 0, {}
    for l in ctx.layers:
        comp = ctx.compressors[l.name]
        li = getattr(comp, "indices", torch.arange(l.dim))
        sl[l.name] = slice(sum(t.numel() for t in idx), sum(t.numel() for t in idx) + li.numel())
        idx.append(li + off)
        fac.append(float(getattr(comp, "factor", 1.0)))
        off += l.dim
    gidx = torch.cat(idx)
    gfac = torch.cat([torch.full((t.numel(),), f, dtype=torch.float64) for t, f in zip(idx, fac)])
    d_full, n = off, train.n

    def apply_a(s: dict) -> dict:
        v = torch.cat([s[l.name] for l in ctx.layers], 1)          # (m, r_total)
        full = torch.zeros(v.shape[0], d_full, dtype=torch.float64)
        full[:, gidx] = v * gfac
        hv = torch.zeros_like(full)
        for batch in ctx.train_loader:
            loss = functional_call(wrapper, keyed, (batch,)).sum()
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            outs = torch.autograd.grad(flat, leaves, grad_outputs=full.to(flat.dtype),
                                       is_grads_batched=True)
            hv += torch.cat([o.reshape(v.shape[0], -1) for o in outs], 1).double()
        res = (hv / n)[:, gidx] * gfac
        return {l.name: res[:, sl[l.name]] + lams[l.name] * s[l.name] for l in ctx.layers}
    return apply_a


@dataclass(frozen=True)
class LiSSA:
    """iterations: recursion steps (paper: 10).  scale: None → 1.1 × power-iteration λ_max(A);
    a number uses that scale (1.0 = the paper's unscaled recursion).  hvp: "gauss-newton" or
    "model".  damping_factor / damping: λ_l as in GaussNewton."""

    iterations: int = 10
    scale: float | None = None
    hvp: Literal["gauss-newton", "model"] = "gauss-newton"
    damping_factor: float = 0.1
    damping: float | None = None
    power_iters: int = 30
    name: str = "lissa"

    def fit(self, train: Features, ctx: FitContext | None = None) -> SolveScores:
        if self.iterations < 0:
            raise ConfigError("LiSSA iterations must be ≥ 0")
        lams = layer_dampings(train, self.damping_factor, self.damping)
        if self.hvp == "gauss-newton":
            op = gauss_newton_op(train, lams)
        elif self.hvp == "model":
            if ctx is None:
                raise ConfigError("LiSSA(hvp='model') needs the model; use it through Attributor.")
            op = model_op(train, ctx, lams)
        else:
            raise ConfigError(f"LiSSA hvp must be 'gauss-newton' or 'model', got {self.hvp!r}")
        scale = self.scale
        if scale is None:
            scale = 1.1 * power_max_eig(op, {k: v.shape[1] for k, v in train.data.items()}, self.power_iters)
        if not scale > 0:
            raise ConfigError(f"LiSSA scale must be > 0 (got {scale}); all train gradients are zero?")

        def solve(q: dict) -> dict:
            return lissa_recursion(op, q, scale, self.iterations)

        fitted = SolveScores(solve, train)
        fitted.scale = scale  # the scale actually used (reported by experiments, checked by tests)
        return fitted
