"""The mask-ensemble fit (GaussNewton(members=K)) against one dense block per layer, each variant in
its own process: fit seconds and the memory the fit adds over the train rows.

The fit accumulates only the members' diagonal blocks of each layer's Gram matrix, (K, r/K, r/K),
and keeps M in that form (estimators.preconditioner, "members"): K times less arithmetic and
memory than the layer's r × r Gram matrix and dense M. Variants, on the same random float32 rows
(n examples × L layers × r coordinates; the default shape is the peer benchmark's tweets, 24 LoRA
matrices at the default r):

  dense      GaussNewton(), one r × r block per layer (what members=4 held before it kept blocks)
  default    GaussNewton(members=4), dropinf's default estimator: four blocks of r/4
  mislabel   GaussNewton(member_size=8), dropinf.mislabel_estimator(): r/8 blocks of 8

Run: python benchmarks/fit_members.py [--n 4000] [--layers 24] [--r 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb  # noqa: E402

VARIANTS = {"dense": {}, "default": {"members": 4}, "mislabel": {"member_size": 8}}


def child(variant: str, n: int, layers: int, r: int) -> dict:
    import torch
    from dropinf.estimators import GaussNewton
    from dropinf.store.features import Features
    g = torch.Generator().manual_seed(0)
    rows = Features({f"layer{i}": torch.randn(n, r, generator=g) for i in range(layers)}, {})
    base = rss_mb()
    t0 = time.perf_counter()
    pre = GaussNewton(**VARIANTS[variant]).fit(rows)
    secs = time.perf_counter() - t0
    kept = sum(t.numel() * t.element_size() for b in pre.blocks for t in (b.matrix, b.parts) if t is not None)
    return {"seconds": secs, "peak_rss_mb": rss_mb(), "fit_rss_mb": rss_mb() - base, "m_mb": kept / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--r", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child, a.n, a.layers, a.r)))
        return
    from _common import run_variants
    rows = run_variants(__file__, list(VARIANTS), ["--n", str(a.n), "--layers", str(a.layers), "--r", str(a.r),
                                                   "--threads", str(a.threads)])
    print(f"\n{a.n} rows × {a.layers} layers × r={a.r}, float32, {a.threads} threads")
    print("| variant | fit s | RSS the fit adds MB | M kept MB | fit s / dense |\n|---|---|---|---|---|")
    dense = next((r for r in rows if r["variant"] == "dense" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | |")
            continue
        ratio = f"{r['seconds'] / dense['seconds']:.2f}x" if dense else "-"
        print(f"| {r['variant']} ({VARIANTS[r['variant']] or 'one block'}) | {r['seconds']:.2f} | "
              f"{r['fit_rss_mb']:.0f} | {r['m_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
