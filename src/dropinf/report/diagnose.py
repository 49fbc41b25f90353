"""What the numbers mean, and what looks wrong: the guidance printed by `dropinf info` and shown at
the top of every report.

``diagnose`` flags a degenerate run with what to try: all-zero or near-constant scores, layers
dropped as dead (all compressed entries zero), a damping that dominates the Hessian (λ_l above
H̃_l's mean eigenvalue, so H̃⁻¹ ≈ I/λ and the estimator degrades to a gradient dot product), and
layers whose features are zero on most examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIGN = ("Scores are I(q, i) = −∇f(q)ᵀ H̃⁻¹ ∇L(i) with f the query's loss (or the chosen measurement). "
        "I > 0: up-weighting training example i raises the query's loss — i is harmful to (works against) "
        "the query. I < 0: i helps it. Removing i changes the query's loss by about −I/n. Across queries "
        "compare rankings, not magnitudes: the scale depends on r, damping and the estimator.")


@dataclass
class Finding:
    level: str          # "warning" or "note"
    what: str
    todo: str

    def text(self) -> str:
        return f"{self.what} What to try: {self.todo}"


def diagnose(scores: np.ndarray | None = None, preconditioner=None, layer_zero_fraction: dict | None = None,
             compressor: dict | None = None) -> list[Finding]:
    """Findings for a run. scores: any sample of the score matrix; preconditioner: the fitted
    estimator; layer_zero_fraction: {layer: fraction of train rows whose features are all zero}."""
    out: list[Finding] = []
    if scores is not None and np.size(scores):
        s = np.asarray(scores, dtype=np.float64)
        top = float(np.abs(s).max())
        if top == 0.0:
            out.append(Finding("warning", "Every score is exactly zero: no tracked layer carries gradient signal.",
                               "check that the tracked layers are trained (requires_grad) and reached by the loss; "
                               "track other layers (track='all') or raise r."))
        elif float(s.std()) <= 1e-6 * top or np.unique(np.round(s / top, 6)).size <= 2:
            out.append(Finding("warning", "The scores are nearly constant: the ranking carries no information.",
                               "raise r, lower the damping (damping_factor), or check that the loss is not "
                               "saturated (a model at zero training loss has vanishing gradients)."))
    if preconditioner is not None:
        dropped = list(getattr(preconditioner, "dropped", []))
        if dropped:
            out.append(Finding("warning", f"{len(dropped)} layer(s) had all-zero compressed gradients on the train "
                               f"set and were dropped: {dropped[:6]}{' ...' if len(dropped) > 6 else ''}.",
                               "raise r for those layers (r={name: ...}) or leave them out of track= (frozen or "
                               "dead units, border pixels)."))
        eig = preconditioner.info.get("hessian_mean_eig", {}) if preconditioner.info else {}
        lam = {k: v for b in preconditioner.blocks for k, v in b.damping.items()}
        heavy = sorted(l for l in lam if eig.get(l, 0) > 0 and lam[l] > eig[l])
        if heavy:
            ratio = max(lam[l] / eig[l] for l in heavy)
            out.append(Finding("warning", f"The damping dominates the Hessian in {len(heavy)} of {len(lam)} layers "
                               f"(λ up to {ratio:.3g}× the mean eigenvalue of H̃; e.g. {heavy[:3]}): H̃⁻¹ ≈ I/λ, so "
                               f"the scores approach a plain gradient dot product.",
                               "lower damping / damping_factor (the paper's rule, damping_factor=0.1, gives "
                               "λ = 0.1× the mean eigenvalue)."))
    if layer_zero_fraction:
        sparse = sorted(l for l, f in layer_zero_fraction.items() if f >= 0.5)
        if sparse:
            out.append(Finding("note", f"{len(sparse)} layer(s) have all-zero features for at least half of the "
                               f"training examples: {sparse[:6]}.",
                               "raise r for them, or use Dropout(rotate=True), which spreads each gradient's "
                               "energy over every kept coordinate."))
    if compressor and compressor.get("kind") == "dropout" and isinstance(compressor.get("r"), int) \
            and compressor["r"] < 8:
        out.append(Finding("note", f"r={compressor['r']} per layer is very small; rankings of single queries are "
                           "noisy.", "raise r, or average a mask ensemble (dropinf.ensemble)."))
    return out


def store_findings(store) -> list[Finding]:
    """Findings for a complete FeatureStore: layers all-zero on every row (dead) or on most rows,
    and the saved preconditioners' damping (one pass over the shards)."""
    zero_rows = {l: 0 for l in store.layer_names()}
    n = 0
    for _, chunk in store.iter_chunks():
        for l, v in chunk.items():
            zero_rows[l] += int((v == 0).all(dim=1).sum())
        n += next(iter(chunk.values())).shape[0] if chunk else 0
    frac = {l: z / max(n, 1) for l, z in zero_rows.items()}
    out = []
    dead = sorted(l for l, f in frac.items() if f == 1.0)
    if dead:
        out.append(Finding("warning", f"{len(dead)} layer(s) are all-zero on every stored row and will be dropped as "
                           f"dead: {dead[:6]}.", "raise r for them or leave them out of track= (frozen or dead "
                           "units, border pixels)."))
    out += diagnose(layer_zero_fraction={l: f for l, f in frac.items() if f < 1.0},
                    compressor=store.manifest["signature"].get("compressor"))
    from ..estimators.preconditioner import Preconditioner
    for p in sorted(store.precond_dir.glob("*.npz")) if store.precond_dir.exists() else []:
        try:
            pre = Preconditioner.load(p)
        except Exception:    # a damaged file is refitted on the next open; nothing to diagnose
            continue
        for f in diagnose(preconditioner=pre):
            if "dropped" not in f.what:      # dead layers are reported above, from the rows
                out.append(Finding(f.level, f"[{p.name}] {f.what}", f.todo))
    return out
