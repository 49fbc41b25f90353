"""Member size against damping on the peer benchmark's tweets (issue 24): mislabel AUC of the
influence on the mean validation loss, from one capture of the full LoRA gradients.

The task is benchmarks/peers' tweets (MiniLM-L6 + LoRA r=8 fine-tuned on 4,000 tweets with 20 %
of the labels flipped; its prep folder is made by `benchmarks/peers/run.py --fast --tasks tweets`).
Every setting is derived from the same full gradients (Featurizer.derive), so the rows differ
only in the compressor's mask and the estimator:

  r=R xK          Dropout(r=R) split into K members of R/K (GaussNewton(members=K), damping_rn=40)
  factor F        the same with damping_factor=F (the default is 0.1: F=10 is 100× the λ)
  groups of 8     GaussNewton(member_size=8): dropinf.mislabel_estimator, what Attributor.mislabeled fits

Mean over mask seeds 0 and 1. Run: python benchmarks/member_size.py [--prep reports/peers/fast/prep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", default="reports/peers/fast/prep", help="the peer benchmark's prep folder")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import tasks as T
    from sklearn.metrics import roc_auc_score
    from dropinf import Dropout
    from dropinf.estimators import GaussNewton
    from dropinf_experiments.features import capture_full, compress, influence_on_mean
    prep = Path(a.prep) / "tweets"
    if not (prep / "flipped.npy").exists():
        sys.exit(f"{prep} has no prepared tweets task: run benchmarks/peers/run.py --fast --tasks tweets first")
    model, train, query, names = T.load_tweets_task(T.PRESETS["fast"], prep)
    flipped = np.load(prep / "flipped.npy")
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=32)
    feat, feats, secs = capture_full(model, T.tweet_loss, {"train": loader(train), "val": loader(query)},
                                     track=names, progress=True)
    print(f"full LoRA gradients of {feats['train'].n} tweets in {secs:.0f} s", flush=True)

    def auc(r: int, est) -> float:
        vals = []
        for seed in (0, 1):
            comp = Dropout(r=r, seed=seed)
            tr, va = compress(feat, feats["train"], comp), compress(feat, feats["val"], comp)
            vals.append(roc_auc_score(flipped, influence_on_mean(est, tr, va)[0].numpy()))
        return float(np.mean(vals))

    print("| setting | members of | mislabel AUC |\n|---|---|---|")
    for r in (1024, 2048):
        for k in (1, 2, 4, 8, 16, 32, 64, 128):
            print(f"| r={r} x{k} | {r // k} | {auc(r, GaussNewton(members=k)):.3f} |", flush=True)
    print(f"| r=2048 in groups of 8 (the mislabel estimator) | 8 | {auc(2048, GaussNewton(member_size=8)):.3f} |")
    for f in (0.2, 0.5, 1.0, 10.0):        # the default (r=2048 x4) at more damping (its factor is 0.1)
        print(f"| r=2048 x4, factor {f:g} | 512 | {auc(2048, GaussNewton(members=4, damping_factor=f)):.3f} |",
              flush=True)

if __name__ == "__main__":
    main()
