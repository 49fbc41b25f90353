"""Fact tracing: which training document taught a language model a fact?

SmolLM2-135M with peft LoRA (rank 8 on q/v/up/down projections) is fine-tuned on a corpus of real
Wikipedia paragraphs in which invented facts are planted (``data/facts.py``): one document per
fact holds it, two distractor documents per fact share the query's wording (the subject with the
relation's words; subject and object together in an unrelated sentence), the rest are plain
paragraphs. Each fact is queried twice — the relation's exact wording and a paraphrase — as a
prompt whose completion is the fact's object; the query measure is the completion's NLL
(``dropinf.lm.completion_loss``). Every method ranks the training documents for every query
(most helpful first: most negative I); we report recall@1, recall@10 and the mean reciprocal rank
of the fact's document, mean ± std over seeds (each seed: new paragraphs, names, LoRA init,
masks). BM25 (rank_bm25, prompt + completion as the query) is the lexical baseline.

Every method's rows come from one capture of the full LoRA gradients (``Identity``), compressed
with ``Featurizer.derive`` — the numbers a fused capture with that compressor gives.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from dropinf import lm
from dropinf.compress import Dropout, Gaussian, LoGra
from dropinf.estimators import DataInf, GaussNewton, GradDot
from dropinf.score import ScoreOptions, influence
from .common import Report, md_table, mean_std, plt, quiet_hf
from .data.facts import make_corpus
from .data.wiki import load_wiki_paragraphs
from .features import capture_full, compress
from .models.hf import load_smollm2


@dataclass(frozen=True)
class FactsSettings:
    n_facts: int = 30
    n_background: int = 60
    max_words: int = 35
    max_length: int = 96
    epochs: int = 5
    lr: float = 5e-3
    batch_size: int = 8
    lora_rank: int = 8
    targets: tuple = ("q_proj", "v_proj", "up_proj", "down_proj")
    seeds: int = 2
    dropout_r: tuple = (16, 64, 512)
    projection_r: int = 64          # Gaussian r and LoGra r_in × r_out = 8 × 8: Dropout r=64's bytes


PRESETS = {
    "smoke": FactsSettings(n_facts=3, n_background=3, max_words=20, max_length=48, epochs=1, seeds=1,
                           dropout_r=(16,), projection_r=16),
    "fast": FactsSettings(),
    "full": FactsSettings(n_facts=100, n_background=300, epochs=6, seeds=3),
}


def methods(s: FactsSettings, seed: int) -> list[tuple[str, object, object, str]]:
    """(name, compressor or None for the full gradients, estimator, normalize). GaussNewton at the
    paper's damping rule everywhere (damping_rn=0), except 'dropinf default' (default_setting())."""
    from dropinf import default_setting
    side = int(round(s.projection_r ** 0.5))
    gn = GaussNewton(damping_rn=0)
    out = [("raw dot (full)", None, GradDot(), "none"), ("cosine (full)", None, GradDot(), "both"),
           ("DataInf (full)", None, DataInf(), "none"), ("Orig: GaussNewton (full)", None, gn, "none"),
           ("GaussNewton normalised (full)", None, gn, "both")]
    out += [(f"Dropout r={r}", Dropout(r=r, seed=seed), gn, "none") for r in s.dropout_r]
    top = max(s.dropout_r)
    out += [(f"Dropout r={top} normalised", Dropout(r=top, seed=seed), gn, "both"),
            (f"Gaussian r={s.projection_r}", Gaussian(r=s.projection_r, seed=seed), gn, "none"),
            (f"LoGra {side}x{side}", LoGra(side, side, seed), gn, "none"),
            ("dropinf default", *default_setting(seed), "none")]
    return out


def fine_tune(model, docs, s: FactsSettings, seed: int, progress: bool) -> list[float]:
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    loss_fn, losses = lm.lm_loss("sum"), []
    model.train()
    for ep in range(s.epochs):
        dl = torch.utils.data.DataLoader(docs, batch_size=s.batch_size, shuffle=True, collate_fn=docs.collate,
                                         generator=torch.Generator().manual_seed(seed * 100 + ep))
        total = 0.0
        for b in tqdm(dl, desc=f"fine-tune epoch {ep + 1}/{s.epochs}", disable=not progress, leave=False):
            opt.zero_grad()
            loss = loss_fn(model, b)
            (loss.sum() / (b["labels"] != -100).sum()).backward()
            opt.step()
            total += float(loss.detach().sum())
        losses.append(total / len(docs))
    model.eval()
    return losses


def completion_nll(model, queries) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([lm.completion_loss(model, b) for b in queries.loader(16)]).numpy()


def ranks(scores: np.ndarray, answer: np.ndarray, higher_better: bool = False) -> np.ndarray:
    """1-based rank of each query's answer document (ties counted against it)."""
    s = -scores if higher_better else scores
    mine = s[np.arange(len(answer)), answer][:, None]
    return (s <= mine).sum(1)


def bm25_scores(docs: list[str], prompts: list[str], completions: list[str]) -> np.ndarray:
    """(n_query, n_docs) BM25 (Okapi) of prompt + completion against each document."""
    from rank_bm25 import BM25Okapi

    def words(t: str) -> list[str]:
        return re.findall(r"\w+", t.lower())
    index = BM25Okapi([words(d) for d in docs])
    return np.stack([index.get_scores(words(p + c)) for p, c in zip(prompts, completions)])


def one_seed(s: FactsSettings, seed: int, paragraphs: list[str], progress: bool):
    """Per method: (ranks (n_query,), seconds per stage), and the seed's facts about the model."""
    quiet_hf()
    corpus = make_corpus(paragraphs, s.n_facts, s.n_background, seed, s.max_words)
    prompts, completions, kinds, answer = corpus.queries()
    model, tok = load_smollm2()
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0,
                                             target_modules=list(s.targets), task_type="CAUSAL_LM"))
    docs = lm.documents(tok, corpus.docs, max_length=s.max_length)
    queries = lm.prompts(tok, prompts, completions, max_length=s.max_length)
    model.eval()
    before = completion_nll(model, queries)
    t0 = time.perf_counter()
    losses = fine_tune(model, docs, s, seed, progress)
    info = {"fine_tune_s": time.perf_counter() - t0, "train_loss": losses[-1], "nll_before": before,
            "nll_after": completion_nll(model, queries), "kinds": kinds, "roles": corpus.role, "answer": answer}
    t0 = time.perf_counter()
    bm = bm25_scores(corpus.docs, prompts, completions)
    out = {"BM25 (lexical)": (ranks(bm, answer, higher_better=True), {"score_s": time.perf_counter() - t0})}
    top1 = {"BM25 (lexical)": bm.argmax(1)}
    # one capture of the full LoRA gradients: training documents (their LM loss) and queries (the
    # completion's NLL), the same tracked layers
    feat, full, cap_s = capture_full(model, lm.lm_loss("sum"), {"train": docs.loader(s.batch_size)}, "lora", progress)
    train_full = full["train"]
    t0 = time.perf_counter()
    query_full = feat.features(queries.loader(s.batch_size), desc="gradients (queries)", measure=lm.completion_loss)
    info["capture_s"] = cap_s + time.perf_counter() - t0
    info["full_dims"] = _dims(train_full)
    for name, comp, est, norm in methods(s, seed):
        t0 = time.perf_counter()
        tr, q = compress(feat, train_full, comp), compress(feat, query_full, comp)
        t1 = time.perf_counter()
        sc = influence(est, tr, q, options=ScoreOptions(normalize=norm))
        t2 = time.perf_counter()
        out[name] = (ranks(sc, answer), {"compress_s": t1 - t0, "fit_score_s": t2 - t1, "dims": _dims(tr)})
        top1[name] = sc.argmin(1)
        if progress:
            print(f"    {name:32s} MRR {np.mean(1 / out[name][0]):.3f}", flush=True)
    info["top1"] = top1
    return out, info


def _dims(feats) -> int:
    return sum(feats.layer_r(n) for n in feats.layer_names())


def metrics(rk: np.ndarray) -> dict:
    return {"recall@1": float(np.mean(rk <= 1)), "recall@10": float(np.mean(rk <= 10)), "mrr": float(np.mean(1.0 / rk))}


def run(preset: str = "fast", out: str = "reports/facts", progress: bool = True, settings=None) -> dict:
    s = settings or PRESETS[preset]
    rep = Report(out, "Fact tracing: SmolLM2-135M + LoRA, invented facts planted in Wikipedia paragraphs", s, preset)
    paragraphs = load_wiki_paragraphs(min_words=50)
    per_seed, infos, raw = [], [], []
    for seed in range(s.seeds):
        print(f"  seed {seed}: fine-tuning on {s.n_facts} fact documents, {2 * s.n_facts} distractors and "
              f"{s.n_background} plain paragraphs", flush=True)
        res, info = one_seed(s, seed, paragraphs, progress)
        per_seed.append(res)
        infos.append(info)
        kinds = np.array(info["kinds"])
        for name, (rk, secs) in res.items():
            for k, r in zip(kinds, rk):
                raw.append([seed, name, k, int(r)])
    names = list(per_seed[0])
    rows, summary = [], {}
    for name in names:
        m = [metrics(res[name][0]) for res in per_seed]
        kinds = [np.array(i["kinds"]) for i in infos]
        ex = [metrics(res[name][0][k == "exact"])["mrr"] for res, k in zip(per_seed, kinds)]
        pa = [metrics(res[name][0][k == "paraphrase"])["mrr"] for res, k in zip(per_seed, kinds)]
        summary[name] = {key: [x[key] for x in m] for key in m[0]} | {"mrr_exact": ex, "mrr_paraphrase": pa}
        rows.append([name] + [mean_std(summary[name][k]) for k in ("recall@1", "recall@10", "mrr", "mrr_exact",
                                                                    "mrr_paraphrase")])
    table = md_table(["method", "recall@1", "recall@10", "MRR", "MRR exact", "MRR paraphrase"], rows)
    n_docs = 3 * s.n_facts + s.n_background
    rep.add("Recall and MRR of the fact's document (mean ± std over seeds; higher is better)", table +
            f"\n\n{n_docs} training documents, {2 * s.n_facts} queries per seed ({s.n_facts} exact, {s.n_facts} "
            f"paraphrased). A random ranking has MRR ≈ {np.mean(1 / np.arange(1, n_docs + 1)):.3f}. '(full)' = the "
            f"uncompressed LoRA gradients ({infos[0]['full_dims']:,} dims per document); Dropout/Gaussian/LoGra keep "
            "r per LoRA matrix, every GaussNewton row at the paper's damping rule except 'dropinf default' "
            "(dropinf.default_setting()). 'normalised' = unit-normalised preconditioned gradients "
            "(ScoreOptions(normalize='both'), TrackStar-style); cosine = the same for the raw gradients.")
    rep.add("Where the wrong first choices come from", _confusions(names, infos))
    rep.add("Seconds per stage (mean over seeds)", _times(names, per_seed, infos))
    rep.add("What it says", _verdict(summary, s))
    rep.add("The fine-tuned models", md_table(
        ["seed", "completion NLL before (nats)", "after, exact prompts", "after, paraphrases", "train loss per doc, last epoch"],
        [[i, f"{np.mean(info['nll_before']):.1f}", f"{np.mean(info['nll_after'][np.array(info['kinds']) == 'exact']):.2f}",
          f"{np.mean(info['nll_after'][np.array(info['kinds']) == 'paraphrase']):.2f}", f"{info['train_loss']:.1f}"]
         for i, info in enumerate(infos)]))
    rep.csv("ranks.csv", ["seed", "method", "query_kind", "rank"], raw)
    rep.json("summary.json", summary)
    _plot(rep, names, summary)
    path = rep.write()
    print("\n" + table + f"\n\nreport: {path}")
    return {name: float(np.mean(v["mrr"])) for name, v in summary.items()}


def _confusions(names, infos) -> str:
    cols = ["its fact document", "another fact's document", "subject distractor", "subject+object distractor",
            "plain paragraph"]
    rows = []
    for name in names:
        counts = dict.fromkeys(cols, 0)
        for info in infos:
            for t, a in zip(info["top1"][name], info["answer"]):
                role = info["roles"][int(t)]
                key = {"subject": cols[2], "both": cols[3], "background": cols[4]}.get(role)
                counts[key or (cols[0] if int(t) == int(a) else cols[1])] += 1
        total = sum(counts.values())
        rows.append([name] + [f"{100 * counts[k] / total:.0f} %" for k in cols])
    return ("Each method's first-ranked document, by what it is: the query's own fact document, another fact's "
            "document, a distractor naming the subject with the relation's words, a distractor naming subject and "
            "object together (in an unrelated sentence), or a plain paragraph.\n\n" + md_table(["method"] + cols, rows))


def _times(names, per_seed, infos) -> str:
    ft, cap = np.mean([i["fine_tune_s"] for i in infos]), np.mean([i["capture_s"] for i in infos])
    rows = []
    for name in names:
        secs = [res[name][1] for res in per_seed]
        cell = lambda k: f"{np.mean([x[k] for x in secs]):.2f}" if k in secs[0] else "-"   # noqa: E731
        dims = f"{secs[0]['dims']:,}" if "dims" in secs[0] else "-"
        rows.append([name, dims, cell("compress_s"), cell("fit_score_s" if "fit_score_s" in secs[0] else "score_s")])
    return (f"Fine-tuning {ft:.0f} s; one capture of the full LoRA gradients (train documents + queries) {cap:.1f} s, "
            "shared by every gradient method. 'compress' = deriving that method's rows from the full gradients "
            "(a fused capture computes the same rows inside the backward pass); 'fit + score' = the preconditioner "
            "fit and the query × train scores.\n\n" +
            md_table(["method", "dims per document", "compress s", "fit + score s"], rows))


def _verdict(summary: dict, s: FactsSettings) -> str:
    """What the table says, from this run's numbers (the last line is standing guidance)."""
    mrr = {k: float(np.mean(v["mrr"])) for k, v in summary.items()}
    para = {k: float(np.mean(v["mrr_paraphrase"])) for k, v in summary.items()}
    exact = {k: float(np.mean(v["mrr_exact"])) for k, v in summary.items()}
    bm, lex = mrr["BM25 (lexical)"], "BM25 (lexical)"
    grad = {k: v for k, v in mrr.items() if k != lex}
    best = max(grad, key=grad.get)
    orig = mrr["Orig: GaussNewton (full)"]
    drop = {k: v for k, v in mrr.items() if k.startswith("Dropout")}
    best_drop = max(drop, key=drop.get)
    top = max(s.dropout_r)

    def vs(a: float, b: float) -> str:
        return "above" if a > b + 0.01 else "below" if a < b - 0.01 else "level with"
    lines = [f"- Best gradient method: **{best}** (MRR {mrr[best]:.3f}), {vs(mrr[best], bm)} BM25 ({bm:.3f}). On exact "
             f"prompts {max(exact, key=lambda k: exact[k] if k != lex else -1)} reaches "
             f"{max(v for k, v in exact.items() if k != lex):.3f} against BM25's {exact[lex]:.3f}; on paraphrases the "
             f"best gradient method reaches {max(v for k, v in para.items() if k != lex):.3f} against BM25's "
             f"{para[lex]:.3f}.",
             f"- Best Dropout setting: {best_drop} (MRR {drop[best_drop]:.3f}, {drop[best_drop] - orig:+.3f} against the "
             f"uncompressed GaussNewton, {orig:.3f}) at a small fraction of its bytes.",
             f"- dropinf default (dropinf.default_setting()): MRR {mrr['dropinf default']:.3f}, "
             f"{mrr['dropinf default'] - drop[best_drop]:+.3f} against the best Dropout row.",
             f"- Preconditioning matters most: GaussNewton against the raw gradient dot product "
             f"{orig - mrr['raw dot (full)']:+.3f} MRR; cosine against raw dot "
             f"{mrr['cosine (full)'] - mrr['raw dot (full)']:+.3f}. "
             f"Normalising the preconditioned gradients changes MRR by {mrr['GaussNewton normalised (full)'] - orig:+.3f} "
             f"(full) and {mrr[f'Dropout r={top} normalised'] - mrr[f'Dropout r={top}']:+.3f} (Dropout r={top}).",
             "- Every query here, paraphrases included, repeats the invented names, and those names occur only in the "
             "fact's document and its two distractors: a lexical match is strong by construction. Gradient attribution "
             "answers a different question — which document's training lowered this completion's loss — and needs no "
             "shared wording; this table measures how close it gets to the planted answer."]
    return "\n".join(lines)


def _plot(rep: Report, names, summary) -> None:
    p = plt()
    fig, ax = p.subplots(figsize=(8, 3.8))
    x = np.arange(len(names))
    for j, key in enumerate(["recall@1", "mrr"]):
        ax.bar(x + 0.4 * j, [np.mean(summary[n][key]) for n in names], 0.4,
               yerr=[np.std(summary[n][key]) for n in names], capsize=2, label=key)
    ax.set_xticks(x + 0.2, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("fact's document")
    ax.legend()
    rep.figure(fig, "facts.png")
