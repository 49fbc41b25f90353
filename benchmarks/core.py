"""Core benchmark (issue 2): fused-hook Dropout vs per-example-gradient baselines.

MLP 784-512-256-10 (random init, synthetic MNIST-shaped inputs), n_train=2000, n_query=100,
r=1024 per layer. Every variant runs featurize(train) + fit + score(query) in its own process;
the table gives wall seconds and peak RSS, and ratios to (a).

  (a) fused-hook Dropout: r entries per layer straight from activations × output-grads
  (b) torch.func per-example gradients (full B×d) + index gather (same Dropout indices)
  (c) torch.func per-example gradients + dense Gaussian projection (P regenerated in blocks)
  (d) Orig: uncompressed gradients, per-layer Gauss-Newton solved by Woodbury in n dims
  (e) LiSSA (10 iterations, Gauss-Newton HVPs) on uncompressed gradients
  (f) DataInf on uncompressed gradients
  (g) Hessian-free (gradient dot product) on uncompressed gradients
  (h) LoGra fused hook, r_in = r_out = √r (r per layer), Gauss-Newton
  (i) Gaussian projection fed by the hook's per-example gradients (no vmap; same P as (c))

Run: python benchmarks/core.py            (add --n-train 500 for a quick look)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, rss_mb, run_variants  # noqa: E402

LABELS = {"a": "fused-hook Dropout", "b": "torch.func + index gather", "c": "torch.func + Gaussian",
          "d": "Orig (Woodbury)", "e": "LiSSA, 10 it. (Orig grads, GN HVP)", "f": "DataInf (Orig grads)",
          "g": "Hessian-free (Orig grads)", "h": "LoGra fused, 32x32 (r=1024)", "i": "Gaussian fused-hook input"}


def variant(v: str, r: int):
    from dropinf import CaptureOptions, DataInf, Dropout, Gaussian, GaussNewton, GradDot, Identity, LiSSA, LoGra
    side = int(round(r ** 0.5))
    table = {
        "a": (Dropout(r=r, seed=0), GaussNewton(), True),
        "b": (Dropout(r=r, seed=0), GaussNewton(), False),
        "c": (Gaussian(r=r, seed=0), GaussNewton(), False),
        "d": (Identity(), GaussNewton(), True),
        "e": (Identity(), LiSSA(iterations=10), True),
        "f": (Identity(), DataInf(), True),
        "g": (Identity(), GradDot(), True),
        "h": (LoGra(r_in=side, r_out=side, seed=0), GaussNewton(), True),
        "i": (Gaussian(r=r, seed=0), GaussNewton(), True),
    }
    comp, est, fused = table[v]
    return comp, est, CaptureOptions(fused=fused)


def child(v: str, n_train: int, n_query: int, r: int, batch: int) -> None:
    import torch
    from dropinf import Attributor
    from dropinf_experiments.models.mlp import ce_loss, mlp

    torch.manual_seed(0)
    model = mlp([784, 512, 256, 10])
    x = torch.rand(n_train + n_query, 784)
    y = torch.randint(0, 10, (n_train + n_query,))
    dl = lambda a, b: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[a:b], y[a:b]), batch_size=batch)
    comp, est, opts = variant(v, r)
    base = rss_mb()
    t0 = time.perf_counter()
    attr = Attributor(model, ce_loss, compressor=comp, estimator=est, options=opts, progress=False)
    t1 = time.perf_counter()
    feats = attr.compute_features(dl(0, n_train))
    t2 = time.perf_counter()
    attr.use_features(feats, train_loader=dl(0, n_train))     # fits the estimator
    scores = attr.score(dl(n_train, n_train + n_query))
    t3 = time.perf_counter()
    assert scores.shape == (n_query, n_train)
    print(json.dumps({"seconds": t3 - t0, "featurize_s": t2 - t1, "fit_score_s": t3 - t2,
                      "peak_rss_mb": rss_mb(), "extra_rss_mb": rss_mb() - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-query", type=int, default=100)
    p.add_argument("--r", type=int, default=1024)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--only", default="", help="comma-separated variants, e.g. a,b")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.n_train, a.n_query, a.r, a.batch)
        return
    variants = a.only.split(",") if a.only else list(LABELS)
    print(f"MLP 784-512-256-10, n_train={a.n_train}, n_query={a.n_query}, r={a.r} per layer, batch {a.batch}")
    rows = run_variants(__file__, variants, ["--n-train", str(a.n_train), "--n-query", str(a.n_query),
                                             "--r", str(a.r), "--batch", str(a.batch)])
    print_table(rows, "a", LABELS)


if __name__ == "__main__":
    main()
