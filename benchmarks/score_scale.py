"""Scoring at scale (issue 9): a store of a million rows through the fit pass, a 1,000-query top-k
and self-influence, each beside its physical limit measured in the same run.

Store: synthetic compressed features (two layers of 512 columns, low-rank signal + noise),
written through the store writer (FeatureStore.write_chunk) in bfloat16, chunks of 16,384 rows
(1M rows = 2 GiB on disk). Each variant runs in its own process (its own peak RSS):

  write      build the store (not timed against anything)
  read       the physical I/O limit: np.fromfile of every shard (page-cached bytes)
  mm-gram    the compute limit of the fit: one float32 Gᵀ G per layer over n rows, in chunks,
             from memory (no I/O)
  mm-score   the compute limit of scoring: (1000 × R) @ chunkᵀ over n rows, from memory
  mm-self    the compute limit of self-influence: chunk @ M_l per layer, from memory
  fit        GaussNewton().fit(store): the streamed Gram pass + r × r factorisations
  topk       1,000 queries, k=10, through the Scorer (the preconditioner loaded from the store)
  self       self-influence of every row through the Scorer

The limit of a stage is read + its matmul (dropinf reads a shard, then multiplies it). Sizes 250k
and 1M show that RSS stays flat in n. Threads: torch.set_num_threads(--threads), default 2.

Run: python benchmarks/score_scale.py [--sizes 250000,1000000] [--device cuda]
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
from _common import rss_mb  # noqa: E402

WIDTH, LAYERS, CHUNK, QUERIES, K = 512, ("a", "b"), 16384, 1000, 10


def synthetic_rows(start: int, rows: int):
    import torch
    g = torch.Generator().manual_seed(1000 + start)
    basis = torch.Generator().manual_seed(7)
    u = torch.randn(32, WIDTH * len(LAYERS), generator=basis)           # shared low-rank signal
    return torch.randn(rows, 32, generator=g) @ u + 0.5 * torch.randn(rows, WIDTH * len(LAYERS), generator=g)


def open_store(folder: str, n: int):
    from dropinf.store.disk import FeatureStore
    return FeatureStore.open(Path(folder) / f"store-{n}")


def child(variant: str, n: int, folder: str, device: str) -> dict:
    import numpy as np
    import torch
    from dropinf.estimators import FitContext, GaussNewton
    from dropinf.score import ScoreOptions, Scorer
    from dropinf.store.disk import FeatureStore, LayerCols
    from dropinf.store.features import Features

    R = WIDTH * len(LAYERS)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    base = rss_mb()
    t0 = time.perf_counter()
    out = {}
    if variant == "write":
        layers = [LayerCols(name, WIDTH, i * WIDTH, WIDTH) for i, name in enumerate(LAYERS)]
        sig = {"model": "synthetic", "layers": list(LAYERS), "compressor": {"kind": "dropout", "r": WIDTH}}
        st = FeatureStore.create(Path(folder) / f"store-{n}", sig, layers, n, CHUNK, "bfloat16")
        for k in range(st.n_chunks):
            s, e = st.rows(k)
            st.write_chunk(k, synthetic_rows(s, e - s))
        st.finalize()
        out["gib"] = st.info()["bytes"] / 2**30
    elif variant == "read":
        st = open_store(folder, n)
        total = 0
        for k in range(st.n_chunks):
            total += np.fromfile(st.data_path(k), dtype=np.uint16).nbytes
        out["gib"] = total / 2**30
    elif variant.startswith("mm-"):
        x = synthetic_rows(0, CHUNK).to(dev)
        q = torch.randn(QUERIES, R, device=dev)
        m = torch.randn(WIDTH, WIDTH, device=dev)
        acc = torch.zeros(WIDTH, WIDTH, dtype=torch.float64, device=dev)
        sync()
        t0 = time.perf_counter()
        for s in range(0, n, CHUNK):
            c = x[: min(CHUNK, n - s)]
            if variant == "mm-gram":
                for i in range(len(LAYERS)):
                    g = c[:, i * WIDTH:(i + 1) * WIDTH]
                    acc += (g.T @ g).double()
            elif variant == "mm-score":
                torch.topk(q @ c.T, K, dim=1)
            else:
                for i in range(len(LAYERS)):
                    g = c[:, i * WIDTH:(i + 1) * WIDTH]
                    ((g @ m) * g).sum(1)
        sync()
    else:
        st = open_store(folder, n)
        ctx = FitContext(device=dev)
        if variant == "fit":
            pre = GaussNewton().fit(st, ctx)
            pre.save(st.precond_dir / "bench-gn.npz")
            out["rows_read"] = st.rows_read
        else:
            from dropinf.estimators.preconditioner import Preconditioner
            pre = Preconditioner.load(st.precond_dir / "bench-gn.npz")
            sc = Scorer(pre, st, ScoreOptions(device=device, query_batch=QUERIES), progress=False)
            sync()
            t0 = time.perf_counter()
            if variant == "topk":
                g = torch.Generator().manual_seed(5)
                qf = Features({l: torch.randn(QUERIES, WIDTH, generator=g) for l in LAYERS}, st.signature)
                top = sc.topk(qf, K)
                assert top.harmful_idx.shape == (QUERIES, K) and top.harmful_idx.max() < n
            else:
                s = sc.self_influence()
                assert s.shape == (n,) and np.isfinite(s).all() and (s < 0).all()
        sync()
    out.update(seconds=time.perf_counter() - t0, peak_rss_mb=rss_mb(), extra_rss_mb=rss_mb() - base)
    return out


def main() -> None:
    import os
    import subprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="250000,1000000")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", default=None, help="where the stores go (default: a temporary folder, removed)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child, a.n, a.folder, a.device)))
        return
    folder = a.folder or tempfile.mkdtemp(prefix="dropinf-score-scale-")
    rows = []
    try:
        for n in [int(s) for s in a.sizes.split(",")]:
            res = {}
            for v in ("write", "read", "mm-gram", "mm-score", "mm-self", "fit", "topk", "self"):
                proc = subprocess.run([sys.executable, __file__, "--child", v, "--n", str(n), "--folder", folder,
                                       "--device", a.device, "--threads", str(a.threads)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                if proc.returncode != 0 or not lines:
                    res[v] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:100]}
                else:
                    res[v] = json.loads(lines[-1])
                r = res[v]
                print(f"  n={n:,} {v}: " + (r["error"] if "error" in r else
                                            f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB"), flush=True)
            rows.append((n, res))
            shutil.rmtree(Path(folder) / f"store-{n}", ignore_errors=True)
    finally:
        if a.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\ndevice {a.device}, {a.threads} threads; store bfloat16, {len(LAYERS)} layers × {WIDTH} columns, "
          f"chunks of {CHUNK:,} rows")
    print("\n| n rows | stage | dropinf s | limit s (read + matmul) | read s | matmul s | dropinf / limit | "
          "peak RSS MB | RSS over start MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, res in rows:
        for stage, mm in (("fit (Gram pass + factorise)", "mm-gram"), (f"top-{K}, {QUERIES:,} queries", "mm-score"),
                          ("self-influence", "mm-self")):
            key = {"mm-gram": "fit", "mm-score": "topk", "mm-self": "self"}[mm]
            d, rd, m = res.get(key, {}), res.get("read", {}), res.get(mm, {})
            if any("error" in x or not x for x in (d, rd, m)):
                err = next((x.get("error") for x in (d, rd, m) if "error" in x), "missing")
                print(f"| {n:,} | {stage} | {err} | | | | | | |")
                continue
            lim = rd["seconds"] + m["seconds"]
            print(f"| {n:,} | {stage} | {d['seconds']:.2f} | {lim:.2f} | {rd['seconds']:.2f} | {m['seconds']:.2f} | "
                  f"{d['seconds'] / lim:.2f}x | {d['peak_rss_mb']:.0f} | {d['extra_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
