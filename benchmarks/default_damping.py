"""The default estimator at more damping on the LDS tasks (issue 24): does any damping serve both
attribution and mislabel detection? (benchmarks/member_size.py measures the mislabel side.)

One capture of the default's Dropout(r=2048) per LDS task (`dropinf reproduce lds` fast setting;
its cached ground truth in reports/lds/ground-truth is reused, run that first), mask seed 0, then
GaussNewton(members=K, damping_rn=c) at damping_factor F (the default: K=4, c=40, F=0.1): LDS per
(K, c, F).

Run: python benchmarks/default_damping.py [--tasks mlp,cnn,lm] [--lds-out reports/lds]
         [--factors 0.1,0.2,0.5,1,10] [--rn 40] [--members 4,8] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,cnn,lm")
    p.add_argument("--lds-out", default="reports/lds", help="the folder `dropinf reproduce lds` wrote")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--factors", default="0.1,0.2,0.5,1,10", help="damping factors F")
    p.add_argument("--rn", default="40", help="damping_rn values c")
    p.add_argument("--members", default="4,8", help="member counts K")
    p.add_argument("--seed", type=int, default=0, help="the Dropout mask seed")
    a = p.parse_args()
    factors = [float(f) for f in a.factors.split(",")]
    rns = [float(c) for c in a.rn.split(",")]
    torch.set_num_threads(a.threads)
    from dropinf import Dropout, GaussNewton
    from dropinf.eval.lds import lds
    from dropinf_experiments.lds import _features, _score
    from _common import lds_task
    print("| task | members | damping_rn | " + " | ".join(f"factor {f:g}" for f in factors) + " |")
    print("|---" * (len(factors) + 3) + "|")
    for task in a.tasks.split(","):
        size, gt, model, train_dl, query_dl = lds_task(task, a.lds_out)
        _, tr, qu, _ = _features(model, task, Dropout(r=2048, seed=a.seed), train_dl, query_dl)
        for k in (int(k) for k in a.members.split(",")):
            for c in rns:
                vals = [float(lds(_score(GaussNewton(members=k, damping_factor=f, damping_rn=c), tr, qu)[0], gt).mean)
                        for f in factors]
                print(f"| {task} | {k} | {c:g} | " + " | ".join(f"{v:.3f}" for v in vals) + " |", flush=True)


if __name__ == "__main__":
    main()
