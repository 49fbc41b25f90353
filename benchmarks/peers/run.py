"""dropinf beside its peers — kronfluence, LogIX, dattri, traker (TRAK) and captum — on the same
checkpoints and data, each variant in its own process: attribution seconds, whole-process seconds,
peak RSS and quality, one table per task.

  bash benchmarks/peers/setup.sh                     # once: benchmarks/peers/.venv with the peers
  benchmarks/peers/.venv/bin/python benchmarks/peers/run.py --fast

Tasks (tasks.py): mlp (LDS, Fashion-MNIST MLP), tweets (mislabel AUC, MiniLM-L6 + LoRA, 20 % flipped
labels), smollm (SmolLM2-135M train-side throughput, tokens/s). The shared inputs (trained models,
the LDS ground truth) are made once under OUT/prep and reused. Variants run in rounds (--repeats), in
the same order each round, so slow drifts of this shared machine hit every variant alike; seconds
are the median over rounds, quality is mean ± std over rounds (each round draws new random
projections / masks with its own seed). A variant that crashes, runs out of memory or passes
--timeout gets its row with the reason. Scores of every library are oriented to dropinf's
convention (positive = harmful) by its documented sign, and the orientation is *checked*: the
row says "sign?" when the oriented scores correlate negatively with dropinf's.
Results: OUT/results.json (every run) and OUT/report.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from _common import rss_mb  # noqa: E402  (the benchmarks' one peak-RSS reader)


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.t0


# ------------------------------------------------------------------ child: one variant

def child(task: str, method: str, preset: str, out: Path, seed: int, threads: int, scores_path: Path) -> None:
    import numpy as np
    import torch
    import methods as M
    import tasks as T
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    s = T.PRESETS[preset]
    prep = out / "prep" / task
    extra = {}
    if task == "mlp":
        model, train, query = T.load_mlp(s, prep)
        names, loss = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)], \
            __import__("dropinf_experiments.lds_tasks", fromlist=["ce_loss"]).ce_loss
    elif task == "tweets":
        model, train, query, names = T.load_tweets_task(s, prep)
        loss = T.tweet_loss
    else:
        model, train, names = T.load_smollm(s, prep)
        query, loss = train, T.lm_loss
        extra["tokens"] = s.smollm_seqs * s.smollm_tokens
    base = rss_mb()
    timer = Timer()
    with tempfile.TemporaryDirectory() as work:
        ctx = M.Ctx(task=task, model=model, train=train, query=query, loss=loss, names=names, seed=seed,
                    batch=M.BATCH[task], timer=timer, workdir=work, extra=extra)
        res = M.METHODS[task][method](ctx)
    row = {"attr_s": timer.seconds, "peak_rss_mb": rss_mb(), "rss_over_model_mb": rss_mb() - base}
    if "scores" in res:
        sc = np.asarray(res["scores"], dtype=np.float64) * res["sign"]
        if sc.shape not in ((len(query), len(train)), (1, len(train))):   # (1, n): on the mean query loss
            raise SystemExit(f"{method}: scores of shape {sc.shape}, expected ({len(query)}, {len(train)})")
        if not np.isfinite(sc).all():
            raise SystemExit(f"{method}: {int((~np.isfinite(sc)).sum())} non-finite scores")
        np.save(scores_path, sc.astype(np.float32))
    elif res.get("tokens"):
        row["tokens_per_s"] = res["tokens"] / timer.seconds
    print("RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------ parent

def prepare(task: str, preset: str, out: Path, threads: int) -> None:
    code = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); torch.set_num_threads({threads}); "
            f"from pathlib import Path; import tasks as T; p = Path({str(out / 'prep' / task)!r}); "
            f"p.mkdir(parents=True, exist_ok=True); T.PREPARE[{task!r}](T.PRESETS[{preset!r}], p)")
    print(f"[prep] {task}: training the attributed model / ground truth if not cached ...", flush=True)
    subprocess.run([sys.executable, "-c", code], check=True)


def run_one(task, method, args, seed, log) -> dict:
    scores = Path(args.out) / "scores" / task / f"{method.replace(' ', '_').replace('/', '_')}_seed{seed}.npy"
    scores.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", task, method, "--preset", args.preset, "--out", args.out,
           "--seed", str(seed), "--threads", str(args.threads), "--scores", str(scores)]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as e:
        log.write(f"\n===== {task} | {method} | seed {seed}: TIMEOUT\n{(e.stderr or b'')[-4000:]!r}\n")
        return {"error": f"did not finish in {args.timeout:.0f} s", "proc_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    log.write(f"\n===== {task} | {method} | seed {seed}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n")
    log.flush()
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = [l for l in proc.stderr.strip().splitlines() if l.strip() and not l.startswith(" ")] or ["?"]
        err = [l for l in err if "Error" in l or "Exception" in l or "SystemExit" in l] or err
        reason = "out of memory (killed)" if proc.returncode in (-9, 137) else err[-1][:160]
        return {"error": reason, "proc_s": wall}
    row = json.loads(lines[-1][len("RESULT "):])
    row["proc_s"] = wall
    if scores.exists():
        row["scores"] = str(scores)
    return row


def quality(task, rows, args):
    """Fill quality (and the orientation check against the first dropinf variant) for each row."""
    import numpy as np
    import methods as M
    import tasks as T
    if task not in T.QUALITY:
        return
    _, fn = T.QUALITY[task]
    s = T.PRESETS[args.preset]
    prep = Path(args.out) / "prep" / task
    ref = {}
    order = list(M.METHODS[task])
    for r in sorted(rows, key=lambda r: order.index(r["method"]) if r.get("method") in order else len(order)):
        if r.get("method", "").startswith("dropinf") and "scores" in r and Path(r["scores"]).exists():
            ref.setdefault(r["seed"], np.load(r["scores"]))
    for r in rows:
        if "scores" not in r or not Path(r["scores"]).exists():
            continue
        sc = np.load(r["scores"])
        r["quality"] = fn(sc, s, prep)
        base = ref.get(r["seed"])
        if base is not None:
            if base.shape != sc.shape:      # one of them scores the mean query: compare on the mean
                sc, base = sc.mean(0, keepdims=True), base.mean(0, keepdims=True)
            a, b = sc - sc.mean(1, keepdims=True), base - base.mean(1, keepdims=True)
            r["corr_with_dropinf"] = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-30))


def table(task, rows, methods, args) -> str:
    import numpy as np
    import tasks as T
    qname = T.QUALITY.get(task, ("tokens/s",))[0]
    by = {m: [r for r in rows if r["method"] == m] for m in methods}

    def med(m, key):
        v = [r[key] for r in by.get(m, []) if key in r]
        return float(np.median(v)) if v else None
    ok = [m for m in methods if m.startswith("dropinf") and med(m, "attr_s") is not None]
    plain = "plain forward+backward" if med("plain forward+backward", "attr_s") is not None else None
    if task in T.QUALITY:
        qual = {m: [r["quality"] for r in by[m] if "quality" in r] for m in methods}
        best = max(ok, key=lambda m: np.mean(qual[m]), default=None)
    else:   # throughput: against the physical limit, one plain forward+backward over the same data
        best, plain = plain, None
    head = ["method", "attribution s", "process s", "peak RSS MB", qname, "corr. with dropinf", f"time / {best}"]
    head += ["time / plain forward+backward"] if plain else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        errs = [r["error"] for r in by[m] if "error" in r]
        a = med(m, "attr_s")
        if a is None:
            lines.append(f"| {m} | failed: {errs[0] if errs else '?'} | {med(m, 'proc_s') or 0:.0f} |"
                         + " |" * (len(head) - 3))
            continue
        if task in T.QUALITY and not qual[m]:      # the plain pass beside a quality task: no scores
            qs, cs = "(no attribution)", "-"
        elif task in T.QUALITY:
            q = qual[m]
            qs = f"{np.mean(q):.3f} ± {np.std(q):.3f}" if len(q) > 1 else f"{q[0]:.3f}"
            c = [r.get("corr_with_dropinf") for r in by[m] if r.get("corr_with_dropinf") is not None]
            cs = f"{np.mean(c):+.2f}" + (" (sign?)" if np.mean(c) < 0 else "") if c else "-"
        else:
            qs, cs = f"{med(m, 'tokens_per_s'):.0f}", "-"
        ratio = f"{a / med(best, 'attr_s'):.1f}x" if best else "-"
        note = f" ({len(errs)} of {len(by[m])} runs failed: {errs[0]})" if errs else ""
        ratio += f" | {a / med(plain, 'attr_s'):.2f}x" if plain else ""
        lines.append(f"| {m}{note} | {a:.1f} | {med(m, 'proc_s'):.1f} | {med(m, 'peak_rss_mb'):.0f} | {qs} | {cs} | {ratio} |")
    return "\n".join(lines)


def task_table(task, all_rows, args) -> str:
    """The table of every row of ``task`` in ``all_rows``, methods in the registry's order."""
    import methods as M
    rows = [r for r in all_rows if r["task"] == task]
    return table(task, rows, [m for m in M.METHODS[task] if any(r["method"] == m for r in rows)], args)


TITLES = {"mlp": "MLP on Fashion-MNIST: LDS (Spearman, retrained half-subsets)",
          "tweets": "MiniLM-L6 + LoRA on tweets, 20 % flipped labels: mislabel AUC",
          "smollm": "SmolLM2-135M, train-side pass over the data: tokens/s"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", action="store_const", dest="preset", const="fast",
                   help="20,000-example MLP, 4,000 tweets, 16 SmolLM2 sequences; 1 round; 400 s per variant (default)")
    g.add_argument("--full", action="store_const", dest="preset", const="full",
                   help="more tweets and ground truth, 3 rounds, 1800 s per variant")
    g.add_argument("--smoke", action="store_const", dest="preset", const="smoke", help="tiny sizes: checks the plumbing")
    p.add_argument("--tasks", default="mlp,tweets,smollm", help="comma-separated subset of mlp,tweets,smollm")
    p.add_argument("--only", default="", help="comma-separated substrings: run only methods whose name contains one")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default: 1 fast, 3 full)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant (default 400 fast, 1800 full)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every variant")
    p.add_argument("--out", default=None, help="output folder (default reports/peers/PRESET)")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT/report.md from OUT/results.json, run nothing")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.preset = args.preset or "fast"
    args.out = str(Path(args.out or Path("reports") / "peers" / args.preset).resolve())   # LogIX chdirs
    if args.child:
        child(args.child[0], args.child[1], args.preset, Path(args.out), args.seed, args.threads, Path(args.scores))
        return
    import methods as M
    repeats = args.repeats or (3 if args.preset == "full" else 1)
    args.timeout = args.timeout or (1800 if args.preset == "full" else 400)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in M.METHODS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(M.METHODS)}")
    only = [o for o in args.only.split(",") if o]
    import platform
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}"
    report = [f"# dropinf beside its peers ({args.preset})", "",
              f"Command: `python benchmarks/peers/run.py --{args.preset}`. Attribution s = featurize + precondition "
              "+ score (the model is already trained), median over rounds; process s = the whole child process "
              "(imports, model and data loading included); peak RSS = the child's ru_maxrss; quality = mean ± std "
              "over rounds; corr. with dropinf = Pearson correlation of the oriented scores with dropinf's first "
              "variant (a negative value would mean the orientation is wrong); time / X = attribution seconds over "
              "dropinf's best variant (best quality), and over one plain forward+backward pass on the throughput task; "
              "time / plain forward+backward (tweets) = attribution seconds over one forward+backward of the summed "
              "loss over the training data, the cost no attribution of per-example gradients can avoid.", ""]
    results = out / "results.json"
    # rows of the (task, method) pairs this run repeats are replaced; every other row is kept
    ran = {(t, m) for t in tasks for m in M.METHODS[t] if not only or any(o in m for o in only)}
    kept = [r for r in (json.loads(results.read_text()) if results.exists() else [])
            if (r["task"], r["method"]) not in ran and r["method"] in M.METHODS.get(r["task"], {})]
    if args.report_only:
        kept, tasks = json.loads(results.read_text()), []
    log = open(out / "runs.log", "a")
    for task in tasks:
        prepare(task, args.preset, out, args.threads)
        names = [m for m in M.METHODS[task] if not only or any(o in m for o in only)]
        rows = []
        for rep in range(repeats):
            for m in names:
                print(f"[{task}] round {rep + 1}/{repeats}: {m} ...", end=" ", flush=True)
                row = run_one(task, m, args, seed=rep, log=log)
                row.update(task=task, method=m, seed=rep, date=time.strftime("%Y-%m-%d"), machine=machine,
                           timeout=args.timeout, repeats=repeats)
                rows.append(row)
                print(row.get("error") or f"{row['attr_s']:.1f} s attribution, {row['peak_rss_mb']:.0f} MB", flush=True)
        # quality and the orientation check over this run's rows and the task's kept ones (one reference)
        quality(task, [r for r in kept if r["task"] == task] + rows, args)
        kept += rows
        print(f"\n## {TITLES[task]}\n\n{task_table(task, kept, args)}\n", flush=True)   # kept rows included
        results.write_text(json.dumps(kept, indent=1))
    # the report covers every task in results.json (a run of --tasks X replaces only X's rows)
    for task in M.METHODS:
        rows = [r for r in kept if r["task"] == task]
        if rows:
            r0 = next((r for r in rows if r.get("date")), rows[0])
            report += [f"## {TITLES[task]}", "", f"{r0.get('date', '?')}; {r0.get('machine', '?')}; "
                       f"{r0.get('repeats', 1)} round(s); timeout {r0.get('timeout', 0):.0f} s per variant.", "",
                       task_table(task, kept, args), ""]
    (out / "report.md").write_text("\n".join(report))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
