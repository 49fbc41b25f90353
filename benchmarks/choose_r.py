"""Guidance for r and damping, measured (README "Choosing r and damping").

sklearn digits, 20 % of the training labels flipped, MLP 64-32-10 (the `dropinf demo --digits`
setting). Every training example is scored by its influence on the clean validation loss.
For Dropout at several r (3 seeds each) the table gives the Pearson correlation with Orig's
scores (no compression, same estimator) and the mislabel-detection AUC; then the damping factor
is swept for Orig and for Dropout at one r.

Run: python benchmarks/choose_r.py [--rs 4,16,64,256,1024] [--seeds 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rs", default="4,16,64,256,1024")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--damping-r", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(2)
    from dropinf import Attributor, Dropout, GaussNewton, Identity
    from dropinf.eval.metrics import mislabel_auc
    from dropinf_experiments.data.tabular import noisy_digits
    from dropinf_experiments.models.mlp import ce_loss, mlp, train_classifier

    torch.manual_seed(0)
    data = noisy_digits(flip=0.2)
    model = train_classifier(mlp([64, 32, 10]), data.x_train, data.y_train)
    dl = lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    train, val = dl(data.x_train, data.y_train), dl(data.x_val, data.y_val)
    full = Attributor(model, ce_loss, compressor=Identity(), progress=False)
    full_train, full_val = full.compute_features(train), full.compute_features(val)
    d = {l.name: l.dim for l in full.layers}

    def scores(comp, est) -> np.ndarray:
        attr = Attributor(model, ce_loss, compressor=comp, estimator=est, progress=False)
        attr.use_features(attr.derive_features(full_train))
        return attr.score(attr.derive_features(full_val), reduce="mean")[0]

    orig = scores(Identity(), GaussNewton())
    print(f"digits: {len(data.y_train)} train ({int(data.flipped.sum())} flipped), MLP 64-32-10, layer sizes {d}")
    print(f"Orig (no compression): AUC {mislabel_auc(orig, data.flipped):.3f}\n")
    print("| r per layer | bytes / example | Pearson with Orig (mean ± std) | AUC (mean ± std) |")
    print("|---|---|---|---|")
    for r in [int(x) for x in a.rs.split(",")]:
        cors, aucs = [], []
        for seed in range(a.seeds):
            s = scores(Dropout(r=r, seed=seed), GaussNewton())
            cors.append(np.corrcoef(s, orig)[0, 1])
            aucs.append(mislabel_auc(s, data.flipped))
        width = sum(min(r, v) for v in d.values())
        print(f"| {r} | {4 * width} | {np.mean(cors):.3f} ± {np.std(cors):.3f} | {np.mean(aucs):.3f} ± {np.std(aucs):.3f} |")
    print("\n| damping_factor | Orig AUC | Orig Pearson with factor 0.1 | "
          f"Dropout r={a.damping_r} AUC (mean over seeds) |")
    print("|---|---|---|---|")
    ref = scores(Identity(), GaussNewton(damping_factor=0.1))
    for f in (0.001, 0.01, 0.1, 1.0, 10.0):
        o = scores(Identity(), GaussNewton(damping_factor=f))
        dr = [mislabel_auc(scores(Dropout(r=a.damping_r, seed=s), GaussNewton(damping_factor=f)), data.flipped)
              for s in range(a.seeds)]
        print(f"| {f:g} | {mislabel_auc(o, data.flipped):.3f} | {np.corrcoef(o, ref)[0, 1]:.3f} | {np.mean(dr):.3f} |")


if __name__ == "__main__":
    main()
