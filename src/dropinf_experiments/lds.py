"""``dropinf reproduce lds``: the linear datamodeling score of every method at equal bytes per
example, on three tasks (lds_tasks: an MLP and a ResNet-9-style CNN on Fashion-MNIST, a byte-level
causal transformer LM on Wikipedia paragraphs).

Ground truth: M random half-subsets of the training set, each retrained from scratch under S seeds
(dropinf.eval.lds.build_ground_truth; cached in OUT/ground-truth/TASK, resumable), measuring every
query's summed loss. The attributed model is trained on all examples with seed 0 by the same recipe.

Methods, at each budget r per layer (bytes per example: 4 × the sum over layers, reported):
  Dropout           r coordinates per layer (the paper)
  Dropout+rot       randomized Hadamard rotation, then r coordinates (Dropout(rotate=True))
  Dropout+rot+budget  the same total split across layers by gradient energy (compress.split_budget)
  Dropout+rot ×K    the rotated coordinates split into K disjoint masks (dropinf.ensemble), averaged
  Gaussian          dense N(0, 1/r) projection, the same r per layer
  LoGra             r_in × r_out = r Kronecker projection per layer
each with GaussNewton at the paper's damping rule (0.1 × mean squared entry), at the damping
chosen without retraining (estimators.choose_damping), and at the best of DAMPING_GRID (an oracle
tuned on the ground truth); on the Dropout features of the largest budget, the other estimators
(Hessian-free, DataInf, LiSSA). Orig (no compression) where its features fit in 2 GB. And
'dropinf default': dropinf.default_setting() (what Attributor(model, loss_fn) uses), per mask seed.
Every method's result is cached in OUT/results/TASK (delete it to recompute).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dropinf.eval.lds import build_ground_truth, lds, random_subsets

from . import lds_tasks as T
from .common import Report, md_table, mean_std, plt


@dataclass(frozen=True)
class LDSSettings:
    tasks: tuple = ("mlp", "cnn", "lm")
    subsets: int = 64
    fraction: float = 0.5
    gt_seeds: tuple = (0, 1)
    budgets: dict = field(default_factory=lambda: {"mlp": (256, 1024), "cnn": (64, 256), "lm": (128, 512)})
    mask_seeds: tuple = (0, 1)
    members: int = 4
    workers: int = 2
    sizes: dict = field(default_factory=lambda: {
        "mlp": T.TaskSize(10000, 200, 4, 128, 1e-3),
        "cnn": T.TaskSize(4000, 100, 3, 64, 0.05, width=8),
        "lm": T.TaskSize(1000, 100, 4, 32, 3e-3, width=64, seq_len=128)})


PRESETS = {
    "smoke": LDSSettings(subsets=6, gt_seeds=(0,), budgets={"mlp": (32,), "cnn": (16,), "lm": (16,)},
                         mask_seeds=(0,), members=2, workers=1,
                         sizes={"mlp": T.TaskSize(300, 12, 1, 64, 1e-3),
                                "cnn": T.TaskSize(120, 8, 1, 32, 0.05, width=4),
                                "lm": T.TaskSize(60, 8, 1, 16, 3e-3, width=32, seq_len=48)}),
    "fast": LDSSettings(),
    "full": LDSSettings(subsets=256, gt_seeds=(0, 1, 2), mask_seeds=(0, 1, 2),
                        budgets={"mlp": (64, 256, 1024, 4096), "cnn": (16, 64, 256, 1024), "lm": (32, 128, 512, 2048)},
                        sizes={"mlp": T.TaskSize(20000, 200, 4, 128, 1e-3),
                               "cnn": T.TaskSize(10000, 200, 4, 64, 0.05, width=16),
                               "lm": T.TaskSize(2000, 200, 4, 32, 3e-3, width=64, seq_len=192)}),
}


def ground_truth(task: str, s: LDSSettings, out, progress: bool):
    size = s.sizes[task]
    masks = random_subsets(size.n_train, s.subsets, s.fraction, seed=1234)
    return build_ground_truth(functools.partial(T.trainer, task, size), functools.partial(T.measurer, task, size),
                              masks, os.path.join(out, "ground-truth", task), seeds=s.gt_seeds,
                              workers=s.workers, progress=progress)



DAMPING_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)   # × the paper's λ (factor 0.1 × these)


def _loaders(task: str, size):
    from torch.utils.data import DataLoader, TensorDataset
    tr, q = T.data(task, size)
    bs = 64 if task == "lm" else 1024     # large batches: Gaussian regenerates its P once per batch
    return DataLoader(TensorDataset(*tr), batch_size=bs), DataLoader(TensorDataset(*q), batch_size=bs)


def _track(task: str):
    from torch import nn
    return [nn.Conv2d, nn.Linear] if task == "cnn" else None


def _logra(r: int):
    r_out = 2 ** (int(np.log2(r)) // 2)
    return r // r_out, r_out


def _features(model, task, compressor, train_dl, query_dl):
    from dropinf import Featurizer
    feat = Featurizer(model, T.loss_fn(task), compressor=compressor, track=_track(task), progress=False)
    t0 = time.perf_counter()
    tr = feat.features(train_dl, desc="featurize train")
    qu = feat.features(query_dl, desc="featurize queries")
    return feat, tr, qu, time.perf_counter() - t0


def _score(estimator, tr, qu):
    from dropinf.score import ScoreOptions, Scorer
    t0 = time.perf_counter()
    pre = estimator.fit(tr)
    s = Scorer(pre, tr, ScoreOptions(), progress=False).dense(qu)
    return np.asarray(s), time.perf_counter() - t0


def _gn_variants(tr, qu, gt, seed):
    """LDS of GaussNewton at the paper's rule, at choose_damping's λ, and the oracle over the grid."""
    from dropinf.estimators import GaussNewton, choose_damping
    out, secs = {}, {}
    for f in DAMPING_GRID:
        s, t = _score(GaussNewton(damping_factor=0.1 * f, damping_rn=0), tr, qu)
        out[f"x{f:g}"], secs[f"x{f:g}"] = float(lds(s, gt).mean), t
    t0 = time.perf_counter()
    lam = choose_damping(tr, seed=seed)
    s, t = _score(GaussNewton(damping=lam, damping_rn=0), tr, qu)
    out["chosen"], secs["chosen"] = float(lds(s, gt).mean), t + time.perf_counter() - t0 - t
    out["rule"], secs["rule"] = out["x1"], secs["x1"]
    best = max(DAMPING_GRID, key=lambda f: out[f"x{f:g}"])
    out["oracle"] = max(out[f"x{best:g}"], out["chosen"])       # the best damping this run tried
    out["oracle_factor"] = 0.1 * best if out[f"x{best:g}"] >= out["chosen"] else float("nan")
    return out, secs


def _save(path: str, rows: list[dict]) -> None:
    from pathlib import Path
    from dropinf.store.files import write_bytes_atomic
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_bytes_atomic(Path(path), json.dumps(rows))


def run_task(task: str, s: LDSSettings, out, progress: bool) -> list[dict]:
    from dropinf import Dropout, Gaussian, Identity, LoGra
    from dropinf import split_budget
    from dropinf.ensemble import score_ensemble
    from dropinf.estimators import DataInf, GaussNewton, GradDot, LiSSA

    size = s.sizes[task]
    gt = ground_truth(task, s, out, progress)
    torch.manual_seed(0)
    model = T.train(task, size, None, 0)
    train_dl, query_dl = _loaders(task, size)
    rows = []

    def record(method, r, seed, tr, feat_s, gn, secs, extra=None):
        bytes_ = 4 * sum(v.shape[1] for v in tr.data.values())
        rows.append({"task": task, "method": method, "r": r, "seed": seed, "bytes": bytes_, "featurize_s": feat_s,
                     "score_s": secs.get("rule", 0.0), **{f"lds_{k}": v for k, v in gn.items()}, **(extra or {})})
        print(f"  [{task}] {method:<24} r={r:<5} seed={seed} bytes={bytes_:<7} LDS rule {gn['rule']:.3f} "
              f"chosen {gn['chosen']:.3f} oracle {gn['oracle']:.3f} (featurize {feat_s:.1f} s)", flush=True)

    for r in s.budgets[task]:
        for seed in s.mask_seeds:
            plain = Dropout(r=r, seed=seed)
            probe = _features(model, task, plain, [next(iter(train_dl))], [next(iter(query_dl))])[0]
            total = sum(c.r for c in probe.compressors.values())
            budget = split_budget(model, T.loss_fn(task), train_dl, total, track=_track(task), rule="energy",
                                  seed=seed)
            a, b = _logra(r)
            per_layer = {n: c.r for n, c in probe.compressors.items()}    # r capped at d_l: equal bytes
            variants = [("Dropout", plain), ("Dropout+rot", Dropout(r=per_layer, seed=seed, rotate=True)),
                        ("Dropout+rot+budget", Dropout(r=budget, seed=seed, rotate=True)),
                        ("Gaussian", Gaussian(r=per_layer, seed=seed)),
                        (f"LoGra {a}x{b}", LoGra(a, b, seed=seed))]
            for name, comp in variants:
                done = os.path.join(out, "results", task, f"{name.replace(' ', '_')}_r{r}_seed{seed}.json")
                if os.path.exists(done):        # finished in an earlier run: reuse (delete OUT/results to redo)
                    rows += json.load(open(done))
                    print(f"  [{task}] {name} r={r} seed={seed}: reused {done}", flush=True)
                    continue
                first = len(rows)
                _, tr, qu, feat_s = _features(model, task, comp, train_dl, query_dl)
                gn, secs = _gn_variants(tr, qu, gt, seed)
                record(name, r, seed, tr, feat_s, gn, secs)
                if name == "Dropout+rot":
                    t0 = time.perf_counter()
                    ens = score_ensemble(tr, qu, GaussNewton(damping_rn=0), s.members, seed=seed)
                    ens_t = time.perf_counter() - t0
                    e = float(lds(ens.mean, gt).mean)
                    record(f"Dropout+rot x{s.members} ens.", r, seed, tr, feat_s,
                           {"rule": e, "chosen": float("nan"), "oracle": e, "oracle_factor": 0.1}, {"rule": ens_t},
                           {"topk_stability": ens.topk_stability(10), "score_std": float(ens.std.mean())})
                if name == "Dropout" and r == s.budgets[task][-1]:
                    for ename, est in (("Hessian-free", GradDot()), ("DataInf", DataInf()), ("LiSSA", LiSSA())):
                        sc, t = _score(est, tr, qu)
                        v = float(lds(sc, gt).mean)
                        record(f"{ename} (Dropout feats)", r, seed, tr, feat_s,
                               {"rule": v, "chosen": float("nan"), "oracle": v, "oracle_factor": 0.1}, {"rule": t})
                _save(done, rows[first:])
    _default_rows(task, s, out, model, train_dl, query_dl, gt, record, rows)
    d_total = sum(p.numel() for n, p in model.named_parameters()
                  if any(n.startswith(l.name + ".") for l in probe.layers))
    done = os.path.join(out, "results", task, "Orig.json")
    if os.path.exists(done):
        rows += json.load(open(done))
    elif d_total * size.n_train * 4 <= 2e9:
        _, tr, qu, feat_s = _features(model, task, Identity(), train_dl, query_dl)
        gn, secs = _gn_variants(tr, qu, gt, 0)
        record("Orig", d_total, 0, tr, feat_s, gn, secs)
        _save(done, rows[-1:])
    return rows


def _default_rows(task, s, out, model, train_dl, query_dl, gt, record, rows: list) -> None:
    """'dropinf default': what Attributor(model, loss_fn) uses (dropinf.default_setting()), per mask
    seed, at its own damping and at the best factor of the grid (× its own rule)."""
    import dataclasses
    from dropinf import default_setting
    for seed in s.mask_seeds:
        comp, est = default_setting(seed)
        # keyed by the setting itself: a cached row of an earlier default is not this default's
        key = hashlib.sha1(repr((comp, est)).encode()).hexdigest()[:10]
        done = os.path.join(out, "results", task, f"default_{key}_seed{seed}.json")
        if os.path.exists(done):
            rows += json.load(open(done))
            continue
        _, tr, qu, feat_s = _features(model, task, comp, train_dl, query_dl)
        sc, t = _score(est, tr, qu)
        v = float(lds(sc, gt).mean)
        grid = {f: float(lds(_score(dataclasses.replace(est, damping_factor=est.damping_factor * f), tr, qu)[0],
                             gt).mean) for f in DAMPING_GRID}
        best = max(grid, key=grid.get)
        record("dropinf default", comp.r, seed, tr, feat_s,
               {"rule": v, "chosen": float("nan"), "oracle": max(v, grid[best]),
                "oracle_factor": est.damping_factor * best if grid[best] > v else est.damping_factor}, {"rule": t})
        _save(done, rows[-1:])


def _table(task_rows: list[dict]) -> str:
    from collections import defaultdict
    groups = defaultdict(list)
    for row in task_rows:
        groups[(row["method"], row["r"])].append(row)
    body = []
    for (method, r), rs in groups.items():
        f = lambda k: mean_std([x[k] for x in rs if not np.isnan(x[k])]) if any(not np.isnan(x[k]) for x in rs) else "-"  # noqa: E731
        body.append([method, r, rs[0]["bytes"], f("lds_rule"), f("lds_chosen"), f("lds_oracle"),
                     "/".join(f"{x['lds_oracle_factor']:.3g}" for x in rs), f"{np.mean([x['featurize_s'] for x in rs]):.1f}",
                     f"{np.mean([x['score_s'] for x in rs]):.1f}"])
    return md_table(["method", "r/layer", "bytes/ex", "LDS (λ rule 0.1)", "LDS (λ chosen)", "LDS (oracle λ)",
                     "oracle factor", "featurize s", "fit+score s"], body)


def _plots(task: str, task_rows: list[dict], report: Report) -> None:
    p = plt()
    fig, axes = p.subplots(1, 2, figsize=(11, 4))
    methods = sorted({x["method"] for x in task_rows})
    for m in methods:
        rs = [x for x in task_rows if x["method"] == m]
        rs_by = sorted({x["bytes"] for x in rs})
        y = [np.mean([x["lds_oracle"] for x in rs if x["bytes"] == b]) for b in rs_by]
        t = [np.mean([x["featurize_s"] + x["score_s"] for x in rs if x["bytes"] == b]) for b in rs_by]
        axes[0].plot(rs_by, y, "o-", label=m)
        axes[1].plot(t, y, "o-", label=m)
    axes[0].set_xscale("log"), axes[1].set_xscale("log")
    axes[0].set_xlabel("bytes per example"), axes[1].set_xlabel("attribution seconds (featurize + fit + score)")
    for a in axes:
        a.set_ylabel("LDS (best damping)")
        a.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"LDS, task {task}")
    report.figure(fig, f"lds_{task}.png")


def run(preset: str = "fast", out: str = "reports/lds", progress: bool = True):
    s = PRESETS[preset]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    report = Report(out, "Linear datamodeling score (LDS) at equal bytes per example", s, preset)
    report.add("What this measures",
               f"For each task, {s.subsets} random {s.fraction:.0%} subsets of the training set were retrained from "
               f"scratch under seeds {list(s.gt_seeds)} (averaged); LDS is the per-query Spearman correlation between "
               "a method's summed scores over each subset and the retrained models' query loss, averaged over queries "
               "(dropinf.eval.lds). Every method runs GaussNewton at the paper's damping (0.1 × mean squared entry; "
               "Gaussian/LoGra over the full layer size d_l), at the damping chosen without retraining "
               "(estimators.choose_damping), and at the best of the factors "
               f"{[0.1 * f for f in DAMPING_GRID]} and the chosen one — the oracle column is tuned on this ground "
               f"truth (an upper bound; 'oracle factor' is blank where the chosen λ was best). Mean ± std over mask seeds {list(s.mask_seeds)}. Ensembles: {s.members} disjoint "
               "masks splitting the same rotated coordinates (equal bytes), GaussNewton at the rule. 'dropinf default' "
               "is what Attributor(model, loss_fn) uses with no compressor or estimator (dropinf.default_setting(): "
               "Dropout r=2048 per layer and 4 x 2048 on the output layer, in four members, GaussNewton with damping_rn=40 "
               "and head_damping=0.03); its 'λ rule' column is its own damping and "
               "its oracle the best grid factor times it.")
    all_rows = []
    for task in s.tasks:
        print(f"[lds] task {task}", flush=True)
        rows = run_task(task, s, out, progress)
        all_rows += rows
        ens = [x for x in rows if "topk_stability" in x]
        ens_text = ("\n\nEnsembles (members' agreement): " + "; ".join(
            f"r={x['r']} seed {x['seed']}: top-10 stability {x['topk_stability']:.2f}, mean per-score std "
            f"{x['score_std']:.3g}" for x in ens)) if ens else ""
        report.add(f"Task {task}", _table(rows) + ens_text + f"\n\n![LDS {task}](lds_{task}.png)\n")
        _plots(task, rows, report)
        keys = list(dict.fromkeys(k for x in all_rows for k in x))      # union: rows differ in columns
        report.csv("lds.csv", keys, [[x.get(k, "") for k in keys] for x in all_rows])
        report.write()
    print((report.out / "report.md").read_text())
    return all_rows


if __name__ == "__main__":   # ground truth only: python -m dropinf_experiments.lds PRESET OUT TASK...
    import sys
    preset, out, *tasks = sys.argv[1:]
    for t in tasks:
        gt = ground_truth(t, PRESETS[preset], out, True)
        print(t, gt.values.shape, flush=True)
