"""Choosing dropinf's default by measurement (issue 24): candidate (compressor, estimator) settings
on every LDS task and two mislabel tasks, each candidate beside the best tuned setting.

Tasks
  mlp, cnn, lm   the LDS harness's tasks (`dropinf reproduce lds` fast setting; its cached ground
                 truth in reports/lds/ground-truth is reused, run that first): LDS, mean ± std
                 over mask seeds; "tuned λ" = the same features at the best damping of the grid
                 (an oracle on the ground truth)
  tweets         MiniLM-L6 + LoRA r=8 on tweets, 20 % flipped (the demo: `reproduce mislabel`),
                 the LoRA matrices tracked: mislabel AUC of the influence on the mean clean
                 validation loss, over runs (new data, flips, fine-tune and masks per run)
  topics         MiniLM-L6 + LoRA r=8 on a 5-class Wikipedia topic task (paragraphs of Alabama,
                 Alaska, Abraham Lincoln, Albert Einstein, Algorithm), 20 % flipped, the default
                 track (LoRA matrices + the classifier head): mislabel AUC
Mislabel baselines on the full (uncompressed) gradients: GradDot, Orig (GaussNewton), and
self-influence (−I(i, i) with GaussNewton; a large value = suspicious).

Run: python benchmarks/defaults.py [--tasks mlp,cnn,lm,tweets,topics] [--runs 3] [--out reports/defaults]
Prints one line per (task, candidate) as it goes and writes OUT/defaults.md and OUT/defaults.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def candidates():
    from dropinf import Dropout
    from dropinf.estimators import GaussNewton
    c = {"paper: Dropout r=16, paper's λ": (Dropout(r=16), GaussNewton(damping_rn=0)),
         "Dropout r=64, paper's λ": (Dropout(r=64), GaussNewton(damping_rn=0)),
         "Dropout r=256, rn40": (Dropout(r=256), GaussNewton(damping_rn=40)),
         "Dropout r=1024, rn40": (Dropout(r=1024), GaussNewton(damping_rn=40)),
         "Dropout r=1024 rot, rn40": (Dropout(r=1024, rotate=True), GaussNewton(damping_rn=40)),
         "Dropout r=1024 x4, rn40": (Dropout(r=1024), GaussNewton(members=4, damping_rn=40)),
         "Dropout r=1024 rot x4, rn40": (Dropout(r=1024, rotate=True), GaussNewton(members=4, damping_rn=40)),
         "Dropout r=1024 x2, rn40": (Dropout(r=1024), GaussNewton(members=2, damping_rn=40)),
         "Dropout r=1024 rot x2, rn40": (Dropout(r=1024, rotate=True), GaussNewton(members=2, damping_rn=40)),
         "Dropout r=2048 rot x4, rn40": (Dropout(r=2048, rotate=True), GaussNewton(members=4, damping_rn=40)),
         "Dropout r=1024 x8, rn40": (Dropout(r=1024), GaussNewton(members=8, damping_rn=40)),
         "Dropout r=1024 x32, rn40": (Dropout(r=1024), GaussNewton(members=32, damping_rn=40)),
         "Dropout r=2048 x2, rn40": (Dropout(r=2048), GaussNewton(members=2, damping_rn=40)),
         "Dropout r=2048 x4, rn40": (Dropout(r=2048), GaussNewton(members=4, damping_rn=40)),
         "Dropout r=2048 x4, rn40, head 0.1": (Dropout(r=2048), GaussNewton(members=4, damping_rn=40,
                                                                            head_damping=0.1)),
         "Dropout r=2048 x4, rn40, head λ × 0.03": (Dropout(r=2048), GaussNewton(members=4, damping_rn=40,
                                                                                head_damping=0.03)),
         "Dropout r=2048 x4, rn40, head r × 4, head λ × 0.1": (Dropout(r=2048, head_factor=4),
                                                                GaussNewton(members=4, damping_rn=40, head_damping=0.1)),
         "Dropout r=2048 x4, rn40, head r × 4, head λ × 0.03 (the default)": (
             Dropout(r=2048, head_factor=4), GaussNewton(members=4, damping_rn=40, head_damping=0.03)),
         "Dropout r=2048 x4, rn40, head r × 4, head λ × 0.01": (Dropout(r=2048, head_factor=4),
                                                                 GaussNewton(members=4, damping_rn=40, head_damping=0.01)),
         "Dropout r=1024 x128, rn40": (Dropout(r=1024), GaussNewton(members=128, damping_rn=40)),
         "Dropout r=2048 in groups of 8, rn40 (mislabel_setting())": (Dropout(r=2048),
                                                                      GaussNewton(member_size=8, damping_rn=40)),
         "Dropout r=1024 x2, rn40, 100x λ": (Dropout(r=1024), GaussNewton(members=2, damping_rn=40,
                                                                          damping_factor=10.0))}
    return {k: v for k, v in c.items() if not ONLY or k in ONLY}


ONLY: set = set()     # --only: run these candidates and merge them into the saved results


def reseed(comp, seed):
    import dataclasses
    return dataclasses.replace(comp, seed=seed)


# ---------------------------------------------------------------- LDS tasks
def lds_task(task: str, seeds: list[int], out_lds: str) -> dict:
    from dropinf.eval.lds import lds
    from dropinf_experiments.lds import DAMPING_GRID, _features, _score
    from _common import lds_task as load_lds_task
    _, gt, model, train_dl, query_dl = load_lds_task(task, out_lds)
    res = {}
    for name, (comp, est) in candidates().items():
        vals, tuned, secs = [], [], []
        for seed in seeds:
            _, tr, qu, cap_s = _features(model, task, reseed(comp, seed), train_dl, query_dl)
            sc, fit_s = _score(est, tr, qu)
            vals.append(float(lds(sc, gt).mean))
            secs.append(cap_s + fit_s)
            grid = [float(lds(_score(_with_factor(est, 0.1 * f), tr, qu)[0], gt).mean) for f in DAMPING_GRID]
            tuned.append(max(grid))
        res[name] = {"value": vals, "tuned": tuned, "seconds": secs,
                     "bytes": _bytes(tr)}
        _line(task, name, res[name])
    return res


def _bytes(feats) -> int:
    """float32 bytes per example of a feature set."""
    return 4 * sum(feats.layer_r(l) for l in feats.layer_names())


def _with_factor(est, factor):
    import dataclasses
    return dataclasses.replace(est, damping_factor=factor)


# ---------------------------------------------------------------- mislabel tasks
def mislabel_task(task: str, runs: int, progress: bool) -> dict:
    from dropinf.estimators import GaussNewton, GradDot
    from dropinf.eval.metrics import mislabel_auc
    from dropinf.score import Scorer
    from dropinf_experiments.features import compress, influence_on_mean
    res: dict = {}
    for run in range(runs):
        attr, feats, flipped = _prepare(task, run, progress)
        rows = {name: (reseed(comp, run), est) for name, (comp, est) in candidates().items()}
        for name, (comp, est) in rows.items():
            t0 = time.perf_counter()
            tr, va = compress(attr, feats["train"], comp), compress(attr, feats["val"], comp)
            sc, _ = influence_on_mean(est, tr, va)
            auc = mislabel_auc(sc.numpy(), flipped)
            aucs = [mislabel_auc(influence_on_mean(_with_factor(est, 0.1 * f), tr, va)[0].numpy(), flipped)
                    for f in (0.01, 0.1, 1.0, 10.0, 100.0)]
            _add(res, name, auc, max(aucs), time.perf_counter() - t0, _bytes(tr))
        full = feats["train"]
        baselines = (("baseline: GradDot (full)", GradDot()),
                     ("baseline: Orig GaussNewton (full)", GaussNewton(damping_rn=0)))
        for name, est in baselines:
            t0 = time.perf_counter()
            auc = mislabel_auc(influence_on_mean(est, full, feats["val"])[0].numpy(), flipped)
            _add(res, name, auc, auc, time.perf_counter() - t0, None)
        t0 = time.perf_counter()
        self_inf = Scorer(GaussNewton(damping_rn=0).fit(full), full, progress=False).self_influence()
        _add(res, "baseline: self-influence (full)", mislabel_auc(-np.asarray(self_inf), flipped),
             mislabel_auc(-np.asarray(self_inf), flipped), time.perf_counter() - t0, None)
        print(f"  {task} run {run}: " + "  ".join(f"{k.split(':')[0][:22]} {v['value'][-1]:.3f}" for k, v in res.items()),
              flush=True)
    for name, v in res.items():
        _line(task, name, v)
    return res


def _add(res, name, value, tuned, secs, nbytes):
    r = res.setdefault(name, {"value": [], "tuned": [], "seconds": [], "bytes": nbytes})
    r["value"].append(float(value))
    r["tuned"].append(float(tuned))
    r["seconds"].append(float(secs))


def _prepare(task: str, run: int, progress: bool):
    from dropinf_experiments import mislabel
    if task == "tweets":
        attr, feats, flipped, accs, _, _ = mislabel.prepare(mislabel.PRESETS["fast"], 8, run, progress)
        print(f"  tweets run {run}: train acc {accs[0]:.3f}, val acc {accs[1]:.3f}", flush=True)
        return attr, feats, flipped
    from dropinf_experiments.common import quiet_hf
    from dropinf_experiments.data.text import TokenDataset, classifier_loss
    from dropinf_experiments.data.wiki import TOPICS, load_wiki_topics
    from dropinf_experiments.features import capture_full
    from dropinf_experiments.models.hf import load_minilm_classifier
    quiet_hf()
    texts, labels = load_wiki_topics()
    rng = np.random.default_rng(run)
    idx = rng.permutation(len(texts))
    n_train, n_val = 450, 120
    tr, va = idx[:n_train], idx[n_train:n_train + n_val]
    y = labels[tr].copy()
    flipped = np.zeros(n_train, dtype=bool)
    flipped[rng.choice(n_train, int(0.2 * n_train), replace=False)] = True
    y[flipped] = (y[flipped] + rng.integers(1, len(TOPICS), flipped.sum())) % len(TOPICS)
    model, tok = load_minilm_classifier(num_labels=len(TOPICS), lora_rank=8, seed=run)
    train_ds = TokenDataset(tok, [texts[i] for i in tr], y, 64)
    val_ds = TokenDataset(tok, [texts[i] for i in va], labels[va], 64)
    mislabel.fine_tune(model, train_ds, 4, 2e-3, 16, run, progress)
    print(f"  topics run {run}: train acc {mislabel.accuracy(model, train_ds):.3f}, "
          f"val acc {mislabel.accuracy(model, val_ds):.3f}", flush=True)
    attr, feats, _ = capture_full(model, classifier_loss, {"train": train_ds.loader(32), "val": val_ds.loader(32)},
                                  track=None, progress=progress)
    return attr, feats, flipped


def _line(task, name, v):
    print(f"{task:7s} {name:36s} {np.mean(v['value']):.3f} ± {np.std(v['value']):.3f}   tuned λ "
          f"{np.mean(v['tuned']):.3f}   {np.mean(v['seconds']):.1f} s", flush=True)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "defaults.json").write_text(json.dumps(results, indent=1))
    names = list(dict.fromkeys(k for t in results.values() for k in t if not k.startswith("baseline")))
    names += ["baseline: GradDot (full)", "baseline: Orig GaussNewton (full)", "baseline: self-influence (full)"]
    tasks = list(results)
    head = "| setting | " + " | ".join(f"{t} ({'LDS' if t in ('mlp', 'cnn', 'lm') else 'AUC'})" for t in tasks) + " |"
    lines = [head, "|---" * (len(tasks) + 1) + "|"]
    for n in names:
        cells = []
        for t in tasks:
            v = results[t].get(n)
            cells.append("-" if v is None else f"{np.mean(v['value']):.3f} ± {np.std(v['value']):.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    best = ["| best tuned (any candidate above at its best λ of the grid) | " + " | ".join(
        f"{max(np.mean(v['tuned']) for k, v in results[t].items() if not k.startswith('baseline')):.3f}"
        for t in tasks) + " |"]
    (out / "defaults.md").write_text("\n".join(lines + best) + "\n")
    print("\n".join(lines + best))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mlp,cnn,lm,tweets,topics")
    p.add_argument("--seeds", default="0,1", help="mask seeds on the LDS tasks")
    p.add_argument("--runs", type=int, default=3, help="runs of each mislabel task")
    p.add_argument("--lds-out", default="reports/lds", help="the folder `dropinf reproduce lds` wrote")
    p.add_argument("--out", default="reports/defaults")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--only", default="", help="';'-separated candidate names: run only these, merged into the "
                                              "saved results (baselines are kept from the earlier run)")
    a = p.parse_args()
    ONLY.update(x for x in a.only.split(";") if x)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    results = json.loads((out / "defaults.json").read_text()) if (out / "defaults.json").exists() else {}
    for task in a.tasks.split(","):
        if task in ("mlp", "cnn", "lm"):
            new = lds_task(task, [int(x) for x in a.seeds.split(",")], a.lds_out)
        else:
            new = mislabel_task(task, a.runs, not a.no_progress)
        results[task] = {**results.get(task, {}), **new} if ONLY else new
        write(results, out)


if __name__ == "__main__":
    main()
