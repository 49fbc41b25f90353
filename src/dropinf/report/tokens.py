"""The report's generation view: for a language-model query, its completion token by token, and
for each training document the report lists beside it, that document's influence on every
completion token (``Attributor.token_scores`` with a token-level measure such as
``dropinf.lm.token_losses``). Token t of a causal LM's measure is the prediction of input token
t + 1; the view shows the tokens whose label counts (not −100: the completion) with the text the
tokenizer gives each one.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..measures import lm_targets


def _positions(batch) -> list[list[tuple[int, int]]]:
    """Per example of a dict batch: (measure column t, predicted token id) of every counted token."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError("the generation view (ReportOptions.token_measure) needs dict batches with input_ids "
                          "(and labels: −100 where a token does not count), as dropinf.lm.prompts makes them")
    tgt = lm_targets(batch)
    return [[(t, int(tgt[b, t])) for t in range(tgt.shape[1]) if int(tgt[b, t]) != -100] for b in range(tgt.shape[0])]


def token_view(attr, query, token_measure, tokenizer, q_ids: list[int], wanted: dict[int, set[int]]) -> dict:
    """{query id: {"tokens": [text of each completion token], "scores": {train id: [influence on each
    token]}}} for the training ids ``wanted[query id]`` (the ones the report lists for that query)."""
    if tokenizer is None:
        raise ConfigError("the generation view needs the tokenizer (ReportOptions.tokenizer) to show the tokens")
    scores = attr.token_scores(query, token_measure)                 # (n_query, T, n_train), query order
    positions = [p for batch in query for p in _positions(batch)]
    if len(positions) != scores.shape[0] or len(q_ids) != scores.shape[0]:
        raise ConfigError(f"the generation view saw {len(positions)} query examples in the loader's batches but "
                          f"{scores.shape[0]} token-score rows; the query loader must yield the same batches each pass")
    column = {int(i): j for j, i in enumerate(attr.train_ids.tolist())}
    out = {}
    for row, (qid, pos) in enumerate(zip(q_ids, positions)):
        ts = [t for t, _ in pos]
        toks = [tokenizer.decode([tok]) for _, tok in pos]
        per = {str(i): np.asarray(scores[row, ts, column[i]], dtype=np.float64).round(6).tolist()
               for i in sorted(wanted.get(qid, ())) if i in column}
        out[qid] = {"tokens": toks, "scores": per}
    return out


def attach(queries: list[dict], view: dict) -> None:
    """Add each query's generation view to its entry of the report data."""
    for q in queries:
        v = view.get(q["id"])
        if v is not None and v["tokens"]:
            q["gen"] = v


def wanted_ids(top, q_ids: list[int]) -> dict[int, set[int]]:
    return {qid: {int(i) for i in np.concatenate([np.asarray(top.helpful_idx[j]), np.asarray(top.harmful_idx[j])])}
            for j, qid in enumerate(q_ids)}


__all__ = ["token_view", "attach", "wanted_ids"]
