"""``attribution_report``: from a fitted Attributor and a query loader to one HTML file.

It captures the queries once (their loss, or ``measure``), takes each query's top-k most helpful
and most harmful training examples with the one scorer, ranks the most suspicious training
examples — by influence on the mean query (``suspicious="queries"``: mislabel detection against a
validation set), on a separate ``validation`` loader, or by self-influence — draws the score
histograms from a sample of queries, and runs ``diagnose``. Example content comes from the
datasets behind the loaders through a render hook (``report.content``).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import ConfigError
from ..store.featurizer import to_device
from .content import default_render, show
from .diagnose import SIGN, diagnose
from .html import histogram_svg, write_html
from .options import ReportOptions
from .tokens import attach, token_view, wanted_ids

HIST_CELLS = 20_000_000     # at most this many scores are held for the histograms


def _dataset(loader, given, what):
    ds = given if given is not None else getattr(loader, "dataset", None)
    if ds is None or not hasattr(ds, "__getitem__"):
        raise ConfigError(f"the report needs the {what} examples to show them: pass {what}_data= (a map-style "
                          f"dataset indexed by dataset id), or a DataLoader over one.")
    return ds


def _marks(marks) -> Callable[[int], str | None]:
    if marks is None:
        return lambda i: None
    if isinstance(marks, dict):
        return lambda i: marks.get(int(i))
    arr = np.asarray(marks)
    if arr.dtype == bool:
        return lambda i: "flagged" if 0 <= i < len(arr) and arr[i] else None
    raise ConfigError("marks must be a dict {train id: badge text} or a boolean array over train ids")


def _settings(attr, measure_name: str, n_query: int) -> list[list]:
    sig = attr.signature()
    pre = attr.preconditioner
    lams = [v for b in pre.blocks for v in b.damping.values()]
    rs = sorted(set(sig["r"].values()))
    from ..estimators.preconditioner import estimator_signature
    return [["model fingerprint", sig["model"]],
            ["tracked layers", f"{len(sig['layers'])}: {', '.join(l['name'] for l in sig['layers'][:8])}"
                               f"{' …' if len(sig['layers']) > 8 else ''}"],
            ["compressor", sig["compressor"]],
            ["r per layer", rs[0] if len(rs) == 1 else f"{rs[0]} … {rs[-1]}"],
            ["estimator", estimator_signature(attr.estimator)],
            ["damping λ per layer", (f"{min(lams):.3g} … {max(lams):.3g} (median {np.median(lams):.3g})"
                                     if lams else "none")],
            ["layers dropped as dead", pre.dropped or "none"],
            ["training examples (columns)", pre.n],
            ["queries", n_query],
            ["query measurement", measure_name],
            ["written", f"{datetime.datetime.now():%Y-%m-%d %H:%M} by dropinf {__version__}"]]


def attribution_report(attr, query: Iterable, out: str | Path = "report.html",
                       options: ReportOptions | None = None) -> Path:
    """Write the report; returns its path. ``options``: ReportOptions (report.options)."""
    attr.fitted("report()")
    o = ReportOptions.of(options)
    k, render, measure, predict, marks = o.k, o.render, o.measure, o.predict, o.marks
    suspicious, n_suspicious = (None if o.suspicious == "none" else o.suspicious), o.n_suspicious
    train_data, query_data, query_render = o.train_data, o.query_data, o.query_render
    train_ds = _dataset(attr.train_loader, train_data, "train")
    query_ds = _dataset(query, query_data, "query")
    render = render or default_render(o.tokenizer, o.label_names)
    query_render = query_render or render
    mark = _marks(marks)

    qf = attr.featurizer.features(query, desc="report: query features", measure=measure)
    q_ids = qf.ids.tolist() if qf.ids is not None else list(range(qf.n))
    top = attr.topk(qf, k=k)
    # a sample of the score matrix for the histograms and the diagnostics
    m = max(1, min(qf.n, HIST_CELLS // max(attr.preconditioner.n, 1)))
    sample = attr.score(qf.rows(0, m))

    preds: dict[int, str] = {}
    if predict is not None:
        loader = torch.utils.data.DataLoader(query_ds, batch_size=getattr(query, "batch_size", None) or 32,
                                             shuffle=False, collate_fn=getattr(query, "collate_fn", None))
        j = 0
        with torch.no_grad():
            for b in tqdm(loader, desc="report: predictions", disable=not attr.progress):
                for p in predict(attr.model, to_device(b, attr.device)):
                    preds[j] = str(p.item() if isinstance(p, torch.Tensor) else p)
                    j += 1

    sus = None
    train_ids = attr.train_ids.numpy()          # dataset id of each score column
    if suspicious is not None:
        if isinstance(suspicious, str) and suspicious == "self":
            v = attr.self_influence()
            order = np.argsort(v)[:n_suspicious]            # most negative I(i, i): largest self-influence
            sus_vals, sus_title = v, "Most suspicious training examples: largest self-influence"
            explain = ("Self-influence I(i, i) = −∇L(i)ᵀ H̃⁻¹ ∇L(i) ≤ 0; the most negative are examples the model "
                       "finds hardest to fit: often mislabeled, ambiguous or unusual. Sorted from most negative.")
        else:
            src = qf if (isinstance(suspicious, str) and suspicious == "queries") else suspicious
            if isinstance(src, str):
                raise ConfigError(f"suspicious must be 'self', 'queries', None or a validation DataLoader; got {src!r}")
            v = attr.mislabeled(src)                         # the mislabel estimator, same train rows
            order = np.argsort(-v)[:n_suspicious]           # most harmful to the mean query loss first
            sus_vals = v
            sus_title = "Most suspicious training examples: most harmful to the " + (
                "queries' mean loss" if src is qf else "validation set's mean loss")
            explain = ("I(mean query, i) > 0: up-weighting i raises the mean loss of the clean queries — the "
                       "signature of a mislabeled or harmful example (paper eq. 1), scored as Attributor.mislabeled "
                       "scores it (the preconditioner measured best for finding flipped labels, fitted on the same "
                       "training rows). Sorted from most harmful.")
        rows = [[int(train_ids[j]), float(sus_vals[j])] for j in order]
        marked = [r for r in rows if mark(r[0])]
        if marks is not None:
            explain += f" Of these {len(rows)}, {len(marked)} carry a mark."
        sus = {"title": sus_title, "explain": explain, "rows": rows, "values": sus_vals}

    train_needed = {int(i) for arr in (top.helpful_idx, top.harmful_idx) for i in np.asarray(arr).ravel()}
    if sus:
        train_needed |= {r[0] for r in sus["rows"]}
    train = {}
    for i in tqdm(sorted(train_needed), desc="report: training examples", disable=not attr.progress):
        c = show(render, train_ds[i])
        if mark(i):
            c["mark"] = mark(i)
        train[str(i)] = c
    queries = []
    losses = qf.losses.tolist() if qf.losses is not None else [float("nan")] * qf.n
    for j, qid in enumerate(tqdm(q_ids, desc="report: queries", disable=not attr.progress)):
        c = show(query_render, query_ds[qid])
        c.update(id=qid, loss=float(losses[j]),
                 helpful=[[int(a), float(b)] for a, b in zip(top.helpful_idx[j], top.helpful_scores[j])],
                 harmful=[[int(a), float(b)] for a, b in zip(top.harmful_idx[j], top.harmful_scores[j])])
        if qid in preds:
            c["pred"] = preds[qid]
        queries.append(c)
    if o.token_measure is not None:          # the generation view (report.tokens)
        attach(queries, token_view(attr, query, o.token_measure, o.tokenizer, q_ids, wanted_ids(top, q_ids)))

    mname = getattr(measure, "__name__", "measure") if measure is not None else "loss"
    findings = diagnose(sample, attr.preconditioner, compressor=attr.signature()["compressor"])
    hists = [histogram_svg(sample.ravel(), f"All scores I(q, i) of {m} quer{'y' if m == 1 else 'ies'} "
                                           f"× {attr.preconditioner.n} training examples (dashed: 0)")]
    if sus is not None:
        vals = np.asarray(sus["values"])
        flagged = None
        if marks is not None:
            flagged = vals[np.array([bool(mark(int(i))) for i in train_ids])]
        hists.append(histogram_svg(vals, "Suspicion scores of every training example"
                                   + (" (red: marked)" if flagged is not None else ""), marked=flagged))
        del sus["values"]
    data = {"title": o.title, "sign": SIGN, "measure": mname,
            "findings": [{"level": f.level, "text": f.text()} for f in findings],
            "settings": _settings(attr, mname, qf.n), "queries": queries, "train": train, "suspicious": sus}
    path = write_html(out, data, hists)
    attr._say(f"dropinf: report written to {path}")
    return path
