"""Damping weighted across layers (issue 24): does tying each layer's λ to the whole model's gradient
energy, instead of the layer's own (the paper's rule, the default), raise the default's LDS on every
task?

The rule damps each layer relative to itself: λ_l = F · c_l · e_l, with e_l the layer's mean squared
compressed entry (the mean eigenvalue of H̃_l) and c_l = max(1, damping_rn · m_l / n) (m_l: a member's
kept coordinates). Every layer's whitened contribution to a score then has the same scale, whatever
its gradient energy. One full Gauss-Newton over all layers (Orig) has one λ for the model instead.
With ē = Σ_l d_l e_l / Σ_l d_l (the model's mean squared gradient entry, d_l the layer's size) and
g_l = e_l^(1-β) · ē^β, the variants are

  both β   λ_l = F · c_l · g_l                          (β = 1: one λ for the model, as Orig)
  down β   λ_l = F · c_l · min(e_l, g_l)                (less damping on layers above the model's mean)
  up β     λ_l = F · c_l · max(e_l, g_l)                (more damping on layers below it)
  rn β     λ_l = F · e_l · (1 + (c_l - 1) · min(1, (ē/e_l)^β))
                                                          (the damping_rn boost only below the mean)
  head ÷k  the rule, with the model's output layer's λ divided by k (GaussNewton(head_damping=1/k);
           the output layer as the features' signature names it, capture.layers.output_layer)

on the default's rows (Dropout(r=2048) in four members; mask seeds 0 and 1) of the three LDS tasks
(`dropinf reproduce lds` fast setting; its cached ground truth in reports/lds is reused, run that
first). LDS mean ± std over the two mask seeds, beside the rule on every layer (F = 0.1; the default is
"head ÷10").

Run: python benchmarks/layer_damping.py [--tasks mlp,cnn,lm] [--variants both,down,up,rn]
         [--betas 0.5,1] [--factors 0.1] [--head-divisors 3,10,30,100,1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def layer_lambdas(data: dict, sizes: dict, n: int, members: int, rn: float, F: float, variant: str,
                  beta: float) -> dict:
    """{layer: λ_l} of one variant (see the module docstring), for GaussNewton(damping=...)."""
    e = {l: float((x.double() ** 2).sum()) / (n * x.shape[1]) for l, x in data.items()}
    mean = sum(sizes[l] * e[l] for l in data) / sum(sizes.values())
    out = {}
    for l, x in data.items():
        r = x.shape[1]
        c = max(1.0, rn * (r // (members if members <= r else 1)) / n)
        g = e[l] ** (1 - beta) * mean ** beta
        if variant == "rn":
            out[l] = F * e[l] * ((c - 1.0) * min(1.0, (mean / e[l]) ** beta) + 1.0)
        else:
            out[l] = F * c * {"both": g, "down": min(e[l], g), "up": max(e[l], g)}[variant]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,cnn,lm")
    p.add_argument("--lds-out", default="reports/lds", help="the folder `dropinf reproduce lds` wrote")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="both,down,up,rn")
    p.add_argument("--betas", default="0.5,1")
    p.add_argument("--factors", default="0.1", help="damping factors F")
    p.add_argument("--head-divisors", default="3,10,30,100,1000", help="k of the 'head ÷k' rows ('' for none)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from dropinf import GaussNewton, default_setting
    from dropinf.eval.lds import lds
    from dropinf_experiments.lds import _features, _score
    from _common import lds_task
    grid = [(v, float(b), float(f)) for v in a.variants.split(",") for b in a.betas.split(",")
            for f in a.factors.split(",")]
    print("| task | variant | β | F | LDS |\n|---|---|---|---|---|")
    for task in a.tasks.split(","):
        _, gt, model, train_dl, query_dl = lds_task(task, a.lds_out)
        res: dict = {}
        for seed in (0, 1):
            comp, est = default_setting(seed)
            _, tr, qu, _ = _features(model, task, comp, train_dl, query_dl)
            sizes = {l: sum(q.numel() for q in model.get_submodule(l).parameters(recurse=False)) for l in tr.data}
            rule = dataclasses.replace(est, head_damping=1.0)      # the rule on every layer
            res.setdefault(("rule", "", est.damping_factor), []).append(float(lds(_score(rule, tr, qu)[0], gt).mean))
            for k in [float(x) for x in a.head_divisors.split(",") if x]:
                s, _ = _score(dataclasses.replace(rule, head_damping=1.0 / k), tr, qu)
                res.setdefault((f"head ÷{k:g}", "", est.damping_factor), []).append(float(lds(s, gt).mean))
            for v, b, f in grid:
                lam = layer_lambdas(tr.data, sizes, tr.n, est.members, est.damping_rn, f, v, b)
                s, _ = _score(GaussNewton(members=est.members, damping=lam), tr, qu)
                res.setdefault((v, b, f), []).append(float(lds(s, gt).mean))
        for (v, b, f), vals in res.items():
            print(f"| {task} | {v} | {b} | {f:g} | {np.mean(vals):.3f} ± {np.std(vals):.3f} |", flush=True)


if __name__ == "__main__":
    main()
