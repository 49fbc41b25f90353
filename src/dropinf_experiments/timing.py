"""Timing (paper Tables 7, 9–11): seconds of compression (a featurize pass with each compressor)
and of the iHVP step (estimator fit + solve) for every method, on each real setting:

* MiniLM-L6 + LoRA rank 8 on tweets (the mislabel setting),
* a ResNet-9-style CNN on Fashion-MNIST (the image retraining setting),
* SmolLM2-135M + LoRA on Wikipedia paragraphs (the LM setting).

Compression rows: Identity (full per-example gradients, what Orig/DataInf/LiSSA/Hessian-free
need), Gaussian (full gradients, then the projection), LoGra and Dropout (fused hooks: the full
per-example gradient is never formed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dropinf.store.featurizer import Featurizer
from dropinf.compress import Dropout, Gaussian, Identity, LoGra
from dropinf.estimators import DataInf, GaussNewton, GradDot, LiSSA
from dropinf.score import influence
from .common import Report, md_table, plt, quiet_hf

PAPER = {"Table 10 (ResNet-9 compression s)": {"Gaussian": 94.02, "Dropout": 5.95},
         "Table 11 (GPT-2 compression s)": {"Gaussian": 964.65, "Dropout": 9.98}}


@dataclass(frozen=True)
class TimingSettings:
    n_text: int = 256
    n_images: int = 1000
    n_lm: int = 16
    r: int = 16
    r_images: int = 64
    r_lm: int = 64
    repeats: int = 1


PRESETS = {"smoke": TimingSettings(n_text=24, n_images=48, n_lm=4),
           "fast": TimingSettings(),
           "full": TimingSettings(n_text=2000, n_images=10000, n_lm=200, repeats=3)}


def _time_setting(name, model, loss_fn, train_dl, query_dl, track, compressors, progress, repeats):
    rows = []
    for cname, comp in compressors:
        best = None
        for _ in range(repeats):
            feat = Featurizer(model, loss_fn, compressor=comp, track=track, progress=progress)
            t0 = time.perf_counter()
            f = feat.features(train_dl, f"{name}: {cname}")
            secs = time.perf_counter() - t0
            best = secs if best is None else min(best, secs)
        q = feat.features(query_dl, f"{name}: {cname} (query)")
        width = sum(v.shape[1] for v in f.data.values())
        est_list = [("Orig (GN)", GaussNewton(damping_rn=0)), ("DataInf", DataInf()), ("LiSSA (10 it.)", LiSSA()),
                    ("Hessian-free", GradDot())] if cname == "Identity" else [("GaussNewton", GaussNewton(damping_rn=0))]
        for ename, est in est_list:
            t0 = time.perf_counter()
            influence(est, f, q.mean())
            rows.append([name, cname, ename, f"{best:.3f}", f"{time.perf_counter() - t0:.4f}", width])
    return rows


def run(preset: str = "fast", out: str = "reports/timing", progress: bool = True, settings=None) -> dict:
    s = settings or PRESETS[preset]
    quiet_hf()
    rep = Report(out, "Timing: compression and iHVP per method on each setting (paper Tables 7, 9–11)", s, preset)
    rows = []

    # 1. MiniLM + LoRA rank 8 on tweets
    from .data.text import TokenDataset, classifier_loss
    from .data.tweets import load_tweets
    from .models.hf import load_minilm_classifier
    data = load_tweets()
    model, tok = load_minilm_classifier(lora_rank=8)
    ds = TokenDataset(tok, data.texts[:s.n_text], data.labels[:s.n_text], max_length=40)
    qds = TokenDataset(tok, data.texts[-32:], data.labels[-32:], max_length=40)
    comps = [("Identity", Identity()), ("Gaussian", Gaussian(r=s.r)), ("LoGra", LoGra(4, 4)), ("Dropout", Dropout(r=s.r))]
    rows += _time_setting("MiniLM-L6 LoRA r=8", model, classifier_loss, ds.loader(32), qds.loader(32), "lora", comps,
                          progress, s.repeats)
    print(md_table(["setting", "compressor", "estimator", "compression s", "iHVP s", "r total"], rows), flush=True)

    # 2. CNN on Fashion-MNIST
    from .data.fashion import load_fashion_mnist
    from .models.mlp import ce_loss
    from .models.resnet import resnet9
    x, y = load_fashion_mnist("train")
    cnn = resnet9(8).eval()
    dl = lambda a, b: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[a:b], y[a:b]), batch_size=128)
    k = int(round(s.r_images ** 0.5))
    comps = [("Identity", Identity()), ("Gaussian", Gaussian(r=s.r_images)), ("LoGra", LoGra(k, k)),
             ("Dropout", Dropout(r=s.r_images))]
    rows += _time_setting("ResNet-9 (w=8) Fashion-MNIST", cnn, ce_loss, dl(0, s.n_images), dl(s.n_images, s.n_images + 64),
                          [nn.Conv2d, nn.Linear], comps, progress, s.repeats)

    # 3. SmolLM2 + LoRA on Wikipedia
    from peft import LoraConfig, get_peft_model

    from .data.text import lm_loss
    from .data.wiki import load_wiki_paragraphs
    from .models.hf import load_smollm2
    lm, ltok = load_smollm2()
    lm = get_peft_model(lm, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n_, p in lm.named_parameters():
            if "lora_B" in n_:
                p.normal_(std=0.01)   # as after fine-tuning: non-zero B, so lora_A gradients are non-trivial
    lm.eval()
    paras = load_wiki_paragraphs()
    lds = TokenDataset(ltok, paras[:s.n_lm], max_length=64)
    lqs = TokenDataset(ltok, paras[-4:], max_length=64)
    k = int(round(s.r_lm ** 0.5))
    comps = [("Identity", Identity()), ("Gaussian", Gaussian(r=s.r_lm)), ("LoGra", LoGra(k, k)), ("Dropout", Dropout(r=s.r_lm))]
    rows += _time_setting("SmolLM2-135M LoRA r=8", lm, lm_loss, lds.loader(4), lqs.loader(4), "lora", comps, progress,
                          s.repeats)

    header = ["setting", "compressor", "estimator", "compression s", "iHVP s", "r total"]
    rep.csv("timing.csv", header, rows)
    table = md_table(header, rows)
    rep.add("Seconds per step", table + "\n\nCompression = one featurize pass over the training examples with that "
            "compressor (forward + backward + compression). Paper, for reference: " +
            "; ".join(f"{k}: " + ", ".join(f"{m} {v}" for m, v in d.items()) for k, d in PAPER.items()) + ".")
    p = plt()
    settings_ = sorted({r[0] for r in rows})
    fig, axes = p.subplots(1, len(settings_), figsize=(4.2 * len(settings_), 3.2), squeeze=False)
    for ax, st in zip(axes[0], settings_):
        comp_rows = {}
        for r in rows:
            if r[0] == st:
                comp_rows.setdefault(r[1], float(r[3]))
        ax.bar(list(comp_rows), list(comp_rows.values()), color=["grey", "tab:blue", "tab:green", "tab:orange"][:len(comp_rows)])
        ax.set_title(st, fontsize=8)
        ax.set_ylabel("compression s")
    rep.figure(fig, "compression.png")
    path = rep.write()
    print("\n" + table + f"\n\nreport: {path}")
    return {"rows": rows}
