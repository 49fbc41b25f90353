"""Removal and retraining with a language model (paper §4.2.1–4.2.2, Tables 3–5, Table 11).

SmolLM2-135M (Llama architecture) fine-tuned with LoRA (q_proj, v_proj, rank 8) — and, with
``full_ft``, all Linear layers — on Wikipedia paragraphs from the gensim wheel. Every training
paragraph is scored by its influence on the mean loss of held-out paragraphs; the top-k % most
helpful are removed, the model is fine-tuned again from the same starting point and seed, and
test perplexity is reported (higher after removal = better attribution). Methods: Random,
LoGra (r_in = r_out = 8), Gaussian (r = 64 per layer, LoRA only), Dropout (r = 64 per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dropinf.store.featurizer import Featurizer
from dropinf.compress import Dropout, Gaussian, LoGra
from .data.text import TokenDataset, lm_loss
from .data.wiki import load_wiki_paragraphs
from dropinf.estimators import GaussNewton
from dropinf.score import influence
from .models.hf import load_smollm2
from .common import Report, md_table, mean_std, plt, quiet_hf, timed

PAPER_TABLE3 = {"Random": [15.419, 18.182, 23.401, 23.647], "LoGra": [15.438, 18.276, 23.662, 23.962],
                "Gaussian": [15.415, 18.303, 23.640, 23.897], "Dropout": [15.420, 18.310, 23.683, 23.959]}


@dataclass(frozen=True)
class RetrainLMSettings:
    n_train: int = 64
    n_test: int = 16
    max_length: int = 64
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    lora_rank: int = 8
    runs: int = 1
    fractions: tuple = (0.1, 0.3)
    r: int = 64
    logra: int = 8
    full_ft: bool = False


PRESETS = {
    "smoke": RetrainLMSettings(n_train=8, n_test=4, max_length=24, fractions=(0.25,), batch_size=4),
    "fast": RetrainLMSettings(),
    "full": RetrainLMSettings(n_train=2000, n_test=50, max_length=128, epochs=2, runs=5,
                              fractions=(0.075, 0.125, 0.175, 0.225), full_ft=True),
}


def perplexity(model, ds: TokenDataset) -> float:
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in ds.loader(16):
            total += float(lm_loss(model, b).sum())
            tokens += int((b["attention_mask"][:, 1:]).sum())
    return math.exp(total / max(tokens, 1))


def fine_tune(model, ds: TokenDataset, s: RetrainLMSettings, seed: int, keep=None, progress=False):
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    sub = ds if keep is None else torch.utils.data.Subset(ds, [int(i) for i in keep])
    dl = torch.utils.data.DataLoader(sub, batch_size=s.batch_size, shuffle=True, collate_fn=ds.collate,
                                     generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.01)
    model.train()
    for ep in range(s.epochs):
        for b in tqdm(dl, desc=f"fine-tune epoch {ep + 1}", disable=not progress, leave=False):
            opt.zero_grad()
            (lm_loss(model, b).sum() / b["attention_mask"].sum()).backward()
            opt.step()
    model.eval()
    return model


def _setting(s: RetrainLMSettings, mode: str, seed: int):
    """(model, tokenizer, snapshot of trainable weights, track, methods) for 'lora' or 'full'."""
    quiet_hf()
    model, tok = load_smollm2()
    torch.manual_seed(seed)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        track = "lora"
        meths = [("LoGra", LoGra(s.logra, s.logra, seed)), ("Gaussian", Gaussian(r=s.r, seed=seed)),
                 ("Dropout", Dropout(r=s.r, seed=seed))]
    else:
        track = None  # every Linear (the LM head is tied to the embedding: both uses counted)
        meths = [("LoGra", LoGra(s.logra, s.logra, seed)), ("Dropout", Dropout(r=s.r, seed=seed))]
    snap = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return model, tok, snap, track, meths


def _restore(model, snap):
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in snap:
                p.copy_(snap[k])


def run(preset: str = "fast", out: str = "reports/retrain-lm", progress: bool = True, settings=None) -> dict:
    s = settings or PRESETS[preset]
    rep = Report(out, "Removal and retraining: SmolLM2-135M on Wikipedia paragraphs (paper §4.2, Tables 3–5, 11)",
                 s, preset)
    paras = load_wiki_paragraphs()
    raw, times, base = [], [], {}
    modes = ["lora", "full"] if s.full_ft else ["lora"]
    for mode in modes:
        for run_id in range(s.runs):
            rng = np.random.default_rng(run_id)
            idx = rng.choice(len(paras), s.n_train + s.n_test, replace=False)
            model, tok, snap, track, meths = _setting(s, mode, run_id)
            train_ds = TokenDataset(tok, [paras[i] for i in idx[:s.n_train]], max_length=s.max_length)
            test_ds = TokenDataset(tok, [paras[i] for i in idx[s.n_train:]], max_length=s.max_length)
            pre_ppl = perplexity(model, test_ds)
            fine_tune(model, train_ds, s, run_id, progress=progress)
            trained = {k: p.detach().clone() for k, p in model.named_parameters() if k in snap}
            base.setdefault(mode, []).append(perplexity(model, test_ds))
            print(f"  {mode} run {run_id}: test perplexity {pre_ppl:.2f} before, {base[mode][-1]:.2f} after "
                  f"fine-tuning", flush=True)
            scores = {"Random": torch.as_tensor(rng.standard_normal(s.n_train))}
            t = {}
            for name, comp in meths:
                t[name] = {}
                feat = Featurizer(model, lm_loss, compressor=comp, track=track, progress=progress)
                with timed(t[name], "compression_s"):
                    tr_f = feat.features(train_ds.loader(s.batch_size), "featurize train")
                    te_f = feat.features(test_ds.loader(s.batch_size), "featurize test")
                with timed(t[name], "ihvp_s"):
                    scores[name] = torch.from_numpy(influence(GaussNewton(damping_rn=0), tr_f, te_f.mean())[0])
            times.append({"mode": mode, **t})
            for name, sc in scores.items():
                order = np.argsort(sc.numpy(), kind="stable")   # most helpful first
                for f in s.fractions:
                    keep = np.sort(order[int(round(f * s.n_train)):])
                    _restore(model, snap)
                    fine_tune(model, train_ds, s, run_id, keep=keep)
                    ppl = perplexity(model, test_ds)
                    raw.append([mode, run_id, name, f, ppl])
                    print(f"  {mode} run {run_id}: {name:9s} remove {f:4.0%} → test perplexity {ppl:.3f}", flush=True)
            _restore(model, trained)
    rep.csv("runs.csv", ["mode", "run", "method", "removed_fraction", "test_perplexity"], raw)
    out_rows = {}
    for mode in modes:
        names = ["Random"] + [m for m, _ in _method_names(mode)]
        rows = []
        for name in names:
            cells = [mean_std([p for (md, _, m, f, p) in raw if md == mode and m == name and f == fr]) for fr in s.fractions]
            paper = PAPER_TABLE3.get(name)
            rows.append([name] + cells + [", ".join(f"{v:.2f}" for v in paper) if paper else "-"])
        out_rows[mode] = rows
        what = "LoRA (q_proj, v_proj)" if mode == "lora" else "all Linear layers (full fine-tuning)"
        rep.add(f"Test perplexity after removing the most helpful paragraphs — {what} (higher = better attribution)",
                md_table(["method"] + [f"remove {f:.1%}" for f in s.fractions] + ["paper GPT-2 (remove 150/250/350/450 of 2000)"], rows)
                + f"\n\nFull-data perplexity after fine-tuning: {mean_std(base[mode])}. Gaussian is run on LoRA "
                  "gradients only: on all Linear layers of a 135M model its projection does not fit this machine's budget.")
    trows = [[tt["mode"], m, f"{tt[m]['compression_s']:.2f}", f"{tt[m]['ihvp_s']:.4f}"] for tt in times
             for m in tt if m != "mode"]
    rep.add("Seconds: compression (featurize train + test, fused hooks) and iHVP (Table 11's quantities)",
            md_table(["mode", "method", "compression s", "iHVP s"], trows))
    rep.json("times.json", times)
    p = plt()
    fig, axes = p.subplots(1, len(modes), figsize=(5 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in ["Random"] + [m for m, _ in _method_names(mode)]:
            ys = [np.mean([pp for (md, _, m, f, pp) in raw if md == mode and m == name and f == fr]) for fr in s.fractions]
            ax.plot([100 * f for f in s.fractions], ys, marker="o", label=name)
        ax.axhline(np.mean(base[mode]), color="grey", ls="--", lw=0.8, label="full data")
        ax.set_title(mode)
        ax.set_xlabel("% of paragraphs removed (most helpful first)")
        ax.set_ylabel("test perplexity")
        ax.legend(fontsize=7)
    rep.figure(fig, "perplexity.png")
    path = rep.write()
    print("\n" + "\n\n".join(md_table(["method"] + [f"{f:.1%}" for f in s.fractions] + ["paper"], r)
                             for r in out_rows.values()) + f"\n\nreport: {path}")
    return {"base": base, "rows": out_rows}


def _method_names(mode: str):
    return [("LoGra", None), ("Gaussian", None), ("Dropout", None)] if mode == "lora" else [("LoGra", None), ("Dropout", None)]
