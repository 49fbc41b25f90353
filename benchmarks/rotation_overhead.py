"""Featurize time of rotated dropout against plain fused Dropout (issue 11's 1.3× bound), on the
three models of `dropinf reproduce lds`, each variant in its own process (its own peak RSS).

  dropout   Dropout(r) — the paper's coordinate mask, fused
  rotated   Dropout(r, rotate=True) — randomized Hadamard on inputs and output-gradients, then the
            same gather
  plain     forward + loss.sum().backward() of the same batches, no capture: the floor

Each variant featurizes the same training set (untrained weights: timing does not depend on
them) after one warm-up batch, with torch.set_num_threads(--threads).
Run: python benchmarks/rotation_overhead.py [--tasks mlp,cnn,lm] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb, run_variants  # noqa: E402

R = {"mlp": 1024, "cnn": 256, "lm": 512}


def child(variant: str, task: str, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    from dropinf import Dropout, Featurizer
    from dropinf_experiments import lds_tasks as T
    from dropinf_experiments.lds import PRESETS, _loaders, _track
    size = PRESETS["fast"].sizes[task]
    model = T.build(task, size, 0).eval()
    train_dl, _ = _loaders(task, size)
    base = rss_mb()
    lf = T.loss_fn(task)
    if variant == "plain":
        run = lambda: [lf(model, b).sum().backward() for b in train_dl]   # noqa: E731
        lf(model, next(iter(train_dl))).sum().backward()
    else:
        feat = Featurizer(model, lf, compressor=Dropout(r=R[task], rotate=(variant == "rotated")),
                          track=_track(task), progress=False)
        feat.features([next(iter(train_dl))])
        run = lambda: feat.features(train_dl)   # noqa: E731
    t0 = time.perf_counter()
    run()
    sec = time.perf_counter() - t0
    print(json.dumps({"seconds": sec, "featurize_s": sec, "peak_rss_mb": rss_mb(), "extra_rss_mb": rss_mb() - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mlp,cnn,lm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--task", default="mlp")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.task, a.threads)
        return
    for task in a.tasks.split(","):
        print(f"\n## {task} (r = {R[task]} per layer, {a.threads} threads)")
        rows = run_variants(__file__, ["plain", "dropout", "rotated"], ["--task", task, "--threads", str(a.threads)])
        ok = {r["variant"]: r for r in rows if "error" not in r}
        print("| variant | featurize s | peak RSS MB | time / dropout |\n|---|---|---|---|")
        for v, r in ok.items():
            print(f"| {v} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['seconds'] / ok['dropout']['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
