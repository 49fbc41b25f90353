"""Per-layer damped Gauss-Newton influence in the compressed space (paper eq. 3).

For each tracked layer l with train features G_l ∈ R^{n×r_l}:

    H̃_l = (1/n) G_lᵀ G_l + λ_l I,   λ_l = damping_factor · Σ_i ‖g̃_il‖² / (n·D_l)  (paper App. D.1)
    I(q, i) = − Σ_l g̃_qlᵀ H̃_l⁻¹ g̃_il

D_l = r_l for Identity/Dropout (λ_l is 0.1 × the mean squared compressed entry) and D_l = d_l
for the norm-preserving projections Gaussian/LoGra (so λ_l estimates the paper's rule on full
gradients; with the plain mean over r_l entries, Gaussian with r ≫ d would be damped d/r times
less than Orig and would not approach it).

M_l = H̃_l⁻¹ by Cholesky in r_l dims when r_l ≤ n, and otherwise in the kernel form given by the
Woodbury identity: H̃⁻¹ = (1/λ)(I − Gᵀ (GGᵀ + nλI)⁻¹ G). A layer whose sampled coordinates are
all zero for every train example (e.g. border pixels of sklearn digits) contributes exactly zero
and is dropped with a warning rather than producing NaN. ``damping=0`` means undamped (a singular
H̃ then gets jitter and a warning; with r_l > n it is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from ..errors import ConfigError
from .base import (FitContext, ctx_or_default, dead_layer, kernel_layers, layer_damping, spd_inverse)
from .preconditioner import Block, Preconditioner, estimator_signature, member_index
from .members import layer_member_seed, member_block, member_owner
from .stats import gram_groups, gram_pass


@dataclass(frozen=True)
class GaussNewton:
    """damping_factor: λ_l = damping_factor · mean squared compressed entry of layer l.
    damping: if set, a fixed λ for every layer instead of the rule (0 = undamped), or a dict
             {layer: λ_l} (e.g. from estimators.choose_damping; layers not in it follow the rule).
    members: K > 1 splits every layer's kept coordinates into K disjoint random groups, each with its
             own H̃ and λ (a mask ensemble in one fit: M block-diagonal within the layer, scaled
             1/K; estimators.members); each member's scores stay available (Attributor.ensemble).
    member_size: m > 0 splits every layer instead into groups of about m coordinates (K_l =
             ⌈r_l / m⌉ members, so layers of different widths get the same group size); m = 8 is
             dropinf.mislabel_setting()'s nearly diagonal preconditioner. Excludes members.
    member_seed: seeds that split.
    damping_rn: c > 0 multiplies the rule's λ_l by max(1, c · r_l / n) (r_l: the layer's, or a
             member's, kept coordinates; a projection with r_l > d_l counts d_l): the damping grows
             as r_l approaches n, where H̃'s n-sample estimate is least reliable. The default
             c = 40 was measured best across tasks (benchmarks/defaults.py); it equals the paper's
             rule while r_l ≤ n/40. 0 is the paper's rule exactly (dropinf.paper_setting()).
    head_damping: h multiplies the rule's λ of the model's output layer (the classifier or LM head,
             when tracked: the features' signature names it, capture.layers.output_layer) by h. 1 (the
             field's default) is the paper's rule; the default estimator (dropinf.default_setting)
             uses 0.03 (with Dropout(head_factor=4)), measured on the LDS tasks (benchmarks/defaults.py,
             benchmarks/layer_damping.py): the rule, relative to
             the layer's mean eigenvalue, over-damps the head, whose few large eigenvalues hold the
             classes (README, "The default and how it was chosen")."""

    damping_factor: float = option(0.1, "lambda_l = factor x mean squared compressed entry of layer l (paper App. D.1)")
    damping: float | dict | None = option(None, "a fixed lambda for every layer instead of the rule (0 = undamped; exact: its damping, default 0)")
    members: int = option(1, "K > 1: a mask ensemble in one fit: each layer's r kept coordinates split into K disjoint "
                             "random groups, each its own H and lambda; scores are the members' mean",
                          cli_default="4 without --estimator, 1 with --estimator gauss-newton")
    member_seed: int = option(0, "seeds the split of each layer's coordinates into members")
    member_size: int = option(0, "m > 0: split each layer into groups of about m coordinates instead (ceil(r_l/m) "
                                 "members; 8 = the mislabel setting); excludes members")
    damping_rn: float = option(40.0, "scale the rule's lambda_l by max(1, damping_rn x r_l / n): more damping as r_l "
                                     "nears n (0 = the paper's rule; the default 40 was measured best; README)")
    head_damping: float = option(1.0, "multiply the rule's lambda of the model's output layer (the head, when tracked) "
                                      "by this (1 = the paper's rule)",
                                 cli_default="0.03 without --estimator, 1 with --estimator gauss-newton")
    name: str = "gauss-newton"

    def check(self, train, ctx: FitContext | None = None) -> None:
        """The option errors ``fit`` would raise, without reading a row (Attributor fits in-memory
        rows on first use and calls this at featurize time)."""
        if not self.head_damping > 0:
            raise ConfigError(f"head_damping must be > 0, got {self.head_damping}")
        if self.members < 1 or self.member_size < 0:
            raise ConfigError(f"members must be ≥ 1 and member_size ≥ 0, got {self.members} and {self.member_size}")
        if self.members > 1 and self.member_size:
            raise ConfigError("give members (K groups per layer) or member_size (groups of m coordinates), not both")

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        ctx = ctx_or_default(ctx)
        n = train.n
        self.check(train, ctx)
        split = self.members > 1 or self.member_size > 0
        kern = kernel_layers(train, enabled=not split)   # members: each its own dense block
        # members: each layer's column groups (a layer narrower than K stays one block)
        owners = {name: member_owner(train.layer_r(name), self._members_of(train.layer_r(name)),
                                     layer_member_seed(self.member_seed, train.layer_names(), name))
                  for name in train.layer_names() if self._members_of(train.layer_r(name)) > 1}
        grouped = {name: member_index(o)[0] for name, o in owners.items()}
        blocks, dropped, mean_eig = [], [], {}
        groups = gram_groups(train, kern, ctx.fit_memory_mb, grouped)
        for i, group in enumerate(groups):      # memory: one run's statistics at a time
            desc = "precondition" + (f" (layers {i + 1}/{len(groups)})" if len(groups) > 1 else "")
            st = gram_pass(train, device=ctx.device, shard=ctx.shard, kernel_layers=kern, progress=ctx.progress,
                           layers=group, desc=desc, grouped={l: grouped[l] for l in group if l in grouped})
            self._fit_layers(train, group, kern, st, blocks, dropped, mean_eig, owners)
            del st
        return Preconditioner(estimator_signature(self), n, blocks, dropped, {"hessian_mean_eig": mean_eig})

    def _fit_layers(self, train, names, kern, st, blocks, dropped, mean_eig, owners) -> None:
        n = train.n
        for name in names:
            # trace(G̃ᵀG̃/n)/r: the mean eigenvalue of H̃_l, beside λ_l for the damping diagnostic
            mean_eig[name] = st.sumsq[name] / (n * train.layer_r(name))
            if dead_layer(name, st.sumsq[name]):
                dropped.append(name)
                continue
            fixed = self.damping.get(name) if isinstance(self.damping, dict) else self.damping
            head = self.head_damping if name == getattr(train, "signature", {}).get("output_layer") else 1.0
            if name in owners:
                blocks.append(self._members_block(train, name, st.gram.pop(name), owners[name], fixed, head))
                continue
            lam = layer_damping(st.sumsq[name], n, train.damping_dim(name),
                                head * self._factor(train.layer_r(name), train.damping_dim(name), n), fixed)
            if name in kern:
                if lam <= 0:
                    raise ConfigError(f"layer {name!r} has r={train.layer_r(name)} > n={n}: undamped "
                                      f"Gauss-Newton is singular there. Use damping > 0 (or the default rule).")
                k = st.kernel_gram(name)
                kinv = spd_inverse(k + n * lam * torch.eye(n, dtype=k.dtype, device=k.device),
                                   f"Woodbury kernel of layer {name!r}")
                c = -kinv / lam
                self_k = ((k @ c) * k).sum(1)
                blocks.append(Block((name,), None, 1.0 / lam, c.cpu(), self_k.cpu(), {name: lam}))
            else:
                r = st.gram[name].shape[0]
                h = st.gram[name] / n + lam * torch.eye(r, dtype=torch.float64, device=st.gram[name].device)
                del st.gram[name]
                # factorised in float64; kept (and saved) in float32, the precision scores are taken in
                m = spd_inverse(h, f"H̃ of layer {name!r}").to(torch.float32).cpu()
                blocks.append(Block((name,), m, damping={name: lam}))

    def _members_block(self, train, name: str, grams: torch.Tensor, owner: torch.Tensor, fixed,
                       head: float) -> Block:
        """Layer ``name`` as K members (estimators.members), from its grouped Gram matrix (K, m, m)."""
        coordinate = train.damping_dim(name) == train.layer_r(name)
        sizes = torch.bincount(owner, minlength=grams.shape[0]).tolist()
        parts, lams = member_block(grams, train.n, sizes, None if coordinate else train.damping_dim(name),
                                   head * self._factor(sizes[0], train.damping_dim(name), train.n), fixed,
                                   f"layer {name!r}")
        return Block((name,), damping={name: sum(lams.values()) / len(lams)}, owner=owner,
                     member_damping={name: lams}, parts=parts.to(torch.float32).cpu())

    def _members_of(self, r: int) -> int:
        """K_l for a layer of r kept coordinates (1: one block)."""
        if self.member_size:
            return -(-r // self.member_size)
        return self.members if self.members <= r else 1

    def _factor(self, r: int, d: int, n: int) -> float:
        """The damping factor for a block of r kept coordinates of a layer spanning d dims (a
        projection to r > d still spans only d: damping_rn counts min(r, d)), fitted on n rows."""
        return self.damping_factor * max(1.0, self.damping_rn * min(r, d) / n)
