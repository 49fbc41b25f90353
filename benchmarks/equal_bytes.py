"""dropinf's default against single masks, Gaussian and LoGra at the default's bytes (issue 24): the
LDS harness's three tasks (`dropinf reproduce lds` fast setting, its cached ground truth reused),
every variant keeping the default's r=2048 per layer (capped at each layer's size, so the bytes per
example are equal), scored with GaussNewton at the default's damping rule (GaussNewton(), what a
user gets without choosing) and at the best damping the harness tries (its grid's factors and
choose_damping's λ: an oracle on the ground truth, the most favourable case; for the default, the
best grid factor times its own damping).

  default        Attributor(model, loss_fn): Dropout(r=2048) in four members (dropinf.default_setting)
  Dropout        one mask of r=2048;  Dropout+rot  the same after the randomized Hadamard rotation
  Gaussian       Gaussian(r=r_l), generator="hash" (normals made per block on the device; same law),
                 each layer's P cached (cache_mb=4096: the MLP's first P is 2048 × 401,920, 3.3 GB)
  LoGra a x b    LoGra with a·b = 2048 per layer

With --head every variant is also scored with the default's damping of the model's output layer
(GaussNewton(head_damping=0.1): "X, head 0.1", at the rule and at its best grid factor, damping_rn=40
kept; the other rows' oracle uses the paper's rule × the grid and choose_damping's λ).

Mean ± std over mask seeds 0 and 1.
Run: python benchmarks/equal_bytes.py [--tasks mlp,cnn,lm] [--only Gaussian,LoGra] [--skip mlp:Gaussian] [--head]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

R = 2048


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,cnn,lm")
    p.add_argument("--lds-out", default="reports/lds", help="the folder `dropinf reproduce lds` wrote")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated task:variant pairs not to run (e.g. mlp:Gaussian: "
                                              "the MLP's 400k-wide layer makes it an 8-TFLOP projection per seed)")
    p.add_argument("--only", default="", help="comma-separated variants to run (default, Dropout, Dropout+rot, "
                                              "Gaussian, LoGra); all when empty")
    p.add_argument("--head", action="store_true",
                   help="also score every variant with the default's head_damping (rule, and its best grid factor)")
    a = p.parse_args()
    only = set(filter(None, a.only.split(",")))
    skip = {tuple(x.split(":", 1)) for x in a.skip.split(",") if x}
    run = lambda task, name: (not only or name in only) and (task, name) not in skip
    torch.set_num_threads(a.threads)
    import dataclasses
    from dropinf import Dropout, Gaussian, GaussNewton, LoGra, default_setting
    from dropinf.eval.lds import lds
    from dropinf_experiments.lds import DAMPING_GRID, _features, _gn_variants, _logra, _score
    from _common import lds_task
    print("| task | variant | bytes / example | LDS, rule | LDS, best λ of the grid |\n|---|---|---|---|---|")
    for task in a.tasks.split(","):
        _, gt, model, train_dl, query_dl = lds_task(task, a.lds_out)
        res: dict[str, list] = {}
        best: dict[str, list] = {}
        nbytes = {}
        for seed in (0, 1):
            comp, est = default_setting(seed)
            _, tr, qu, _ = _features(model, task, comp, train_dl, query_dl)
            per_layer = {n: tr.layer_r(n) for n in tr.layer_names()}
            if run(task, "default"):
                res.setdefault("default", []).append(float(lds(_score(est, tr, qu)[0], gt).mean))
                best.setdefault("default", []).append(max(
                    float(lds(_score(dataclasses.replace(est, damping_factor=0.1 * f), tr, qu)[0], gt).mean)
                    for f in DAMPING_GRID))
                nbytes["default"] = 4 * sum(per_layer.values())
            ra, rb = _logra(R)
            for name, c in (("Dropout", Dropout(r=R, seed=seed)), ("Dropout+rot", Dropout(r=R, seed=seed, rotate=True)),
                            ("Gaussian", Gaussian(r=per_layer, seed=seed, generator="hash", cache_mb=4096)),
                            (f"LoGra {ra}x{rb}", LoGra(ra, rb, seed=seed))):
                if not run(task, name.split()[0]):
                    continue
                _, tr, qu, _ = _features(model, task, c, train_dl, query_dl)
                res.setdefault(name, []).append(float(lds(_score(GaussNewton(), tr, qu)[0], gt).mean))
                best.setdefault(name, []).append(_gn_variants(tr, qu, gt, seed)[0]["oracle"])
                nbytes[name] = 4 * sum(tr.layer_r(n) for n in tr.layer_names())
                if a.head:          # the default's damping of the output layer given to this variant too
                    nbytes[f"{name}, head 0.1"] = nbytes[name]
                    gn = lambda f: GaussNewton(damping_factor=0.1 * f, head_damping=est.head_damping)
                    res.setdefault(f"{name}, head 0.1", []).append(float(lds(_score(gn(1), tr, qu)[0], gt).mean))
                    best.setdefault(f"{name}, head 0.1", []).append(max(
                        float(lds(_score(gn(f), tr, qu)[0], gt).mean) for f in DAMPING_GRID))
        for name, v in res.items():
            print(f"| {task} | {name} | {nbytes[name]:,} | {np.mean(v):.3f} ± {np.std(v):.3f} | "
                  f"{np.mean(best[name]):.3f} ± {np.std(best[name]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
