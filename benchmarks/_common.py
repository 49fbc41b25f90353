"""Helpers shared by the benchmarks: run each variant in a fresh subprocess so that its peak RSS
(ru_maxrss) is its own, and print one table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variants(script: str, variants: list[str], extra: list[str], timeout: float = 1800) -> list[dict]:
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, "--child", v, *extra], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - t0
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            oom = proc.returncode in (-9, 137) or "memory" in err.lower()
            rows.append({"variant": v, "error": "out of memory" if oom else err[:120], "proc_s": wall})
            print(f"  {v}: FAILED ({rows[-1]['error']})", flush=True)
            continue
        row = json.loads(lines[-1])
        row["variant"], row["proc_s"] = v, wall
        rows.append(row)
        print(f"  {v}: {row['seconds']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def print_table(rows: list[dict], ref: str, labels: dict[str, str]) -> None:
    base = next((r for r in rows if r["variant"] == ref and "error" not in r), None)
    print(f"\n| variant | wall s (featurize+fit+score) | featurize s | peak RSS MB | RSS over baseline MB | time / ({ref}) | RSS-over-baseline / ({ref}) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"({r['variant']}) {labels.get(r['variant'], '')}"
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | |")
            continue
        tr = f"{r['seconds'] / base['seconds']:.1f}x" if base else "-"
        mr = f"{r['extra_rss_mb'] / max(base['extra_rss_mb'], 1):.1f}x" if base else "-"
        print(f"| {name} | {r['seconds']:.2f} | {r['featurize_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['extra_rss_mb']:.0f} | {tr} | {mr} |")


def lds_task(task: str, lds_out: str = "reports/lds"):
    """(size, ground truth, trained model, train loader, query loader) of one LDS harness task at the
    fast setting, its cached ground truth read from ``lds_out`` (`dropinf reproduce lds` wrote it)."""
    import torch
    from dropinf_experiments.lds import PRESETS, T, _loaders, ground_truth
    s = PRESETS["fast"]
    size = s.sizes[task]
    gt = ground_truth(task, s, lds_out, False)
    torch.manual_seed(0)
    model = T.train(task, size, None, 0)
    return (size, gt, model, *_loaders(task, size))
