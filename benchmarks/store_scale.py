"""Store scale benchmark (issue 5): stream n synthetic training examples through featurize into an
on-disk store and score 100 queries by top-k, for n up to 200,000, each n in its own process.
Peak RSS should stay flat as n grows (features live on disk; scoring streams chunks).

Model: MLP 64-128-10 (every Linear tracked), Dropout r=64 per layer, chunks of 4096 rows.
Data: generated per index (the dataset itself holds nothing), so only dropinf's memory shows.
Run: python benchmarks/store_scale.py [--sizes 25000,50000,100000,200000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb, run_variants  # noqa: E402


class Synthetic:
    def __init__(self, n: int, offset: int = 0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch
        g = torch.Generator().manual_seed(self.offset + i)
        return torch.randn(64, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def child(n: int, folder: str) -> None:
    import torch
    from dropinf import Attributor, Dropout, StoreOptions
    from dropinf_experiments.models.mlp import ce_loss, mlp

    torch.manual_seed(0)
    model = mlp([64, 128, 10])
    train = torch.utils.data.DataLoader(Synthetic(n), batch_size=512)
    query = torch.utils.data.DataLoader(Synthetic(100, offset=10**9), batch_size=100)
    base = rss_mb()
    attr = Attributor(model, ce_loss, compressor=Dropout(r=64, seed=0), progress=False)
    t0 = time.perf_counter()
    store = attr.featurize(train, store=StoreOptions(Path(folder) / f"store-{n}", chunk_size=4096))
    t1 = time.perf_counter()
    top = attr.topk(query, k=10)
    t2 = time.perf_counter()
    assert top.harmful_idx.shape == (100, 10) and top.harmful_idx.max() < n
    print(json.dumps({"seconds": t2 - t0, "featurize_s": t1 - t0, "topk_s": t2 - t1, "peak_rss_mb": rss_mb(),
                      "extra_rss_mb": rss_mb() - base, "store_mb": store.info()["bytes"] / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="25000,50000,100000,200000")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(int(a.child), a.folder)
        return
    folder = tempfile.mkdtemp(prefix="dropinf-scale-")
    try:
        rows = run_variants(__file__, a.sizes.split(","), ["--folder", folder], timeout=3600)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n| n_train | featurize s | top-k s (100 queries, k=10) | store MB | peak RSS MB | RSS over baseline MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        print(f"| {int(r['variant']):,} | {r['featurize_s']:.1f} | {r['topk_s']:.2f} | {r['store_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['extra_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
