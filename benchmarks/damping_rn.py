"""GaussNewton(damping_rn=c) against the paper's rule (c = 0) on the LDS harness's tasks, from the
ground truth `dropinf reproduce lds` caches in reports/lds (run that first): plain and rotated
Dropout at each budget, mean ± std over the mask seeds. Prints one line per (task, r, rotate).

Run: python benchmarks/damping_rn.py [--tasks mlp,cnn,lm] [--cs 0,10,40,100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,cnn,lm")
    p.add_argument("--cs", default="0,10,40,100")
    p.add_argument("--out", default="reports/lds", help="the folder `dropinf reproduce lds` wrote")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from dropinf import Dropout
    from dropinf.estimators import GaussNewton
    from dropinf.eval.lds import lds
    from dropinf_experiments.lds import PRESETS, _features, _score
    from _common import lds_task

    s, cs = PRESETS["fast"], [float(c) for c in a.cs.split(",")]
    for task in a.tasks.split(","):
        size, gt, model, train_dl, query_dl = lds_task(task, a.out)
        for r in s.budgets[task]:
            for rot in (False, True):
                res = {c: [] for c in cs}
                for seed in s.mask_seeds:
                    _, tr, qu, _ = _features(model, task, Dropout(r=r, seed=seed, rotate=rot), train_dl, query_dl)
                    for c in cs:
                        res[c].append(float(lds(_score(GaussNewton(damping_rn=c), tr, qu)[0], gt).mean))
                print(f"{task} r={r} r/n={r / size.n_train:.3f} rotate={rot} | "
                      + "  ".join(f"c={c:g}: {np.mean(v):.3f} ± {np.std(v):.3f}" for c, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
