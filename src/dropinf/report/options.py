"""``ReportOptions``: everything the HTML report can be told, in one dataclass (the CLI's
``dropinf report`` flags are generated from the fields that carry help text)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from ..errors import ConfigError
from ..options import option


@dataclass(frozen=True)
class ReportOptions:
    """k                      entries per side per query
    train_data, query_data map-style datasets to show examples from (default: the loaders')
    render, query_render   render(example) -> str | image tensor | {"text", "image", "label"}
                           (default: dropinf.report.default_render(tokenizer, label_names))
    tokenizer, label_names for the default renderer (decode input_ids; class names)
    predict                predict(model, batch) -> one prediction per example, shown per query
    measure                the query-side function (dropinf.measures); default: the loss
    suspicious             "self" (self-influence), "queries" (influence on the mean query:
                           mislabel detection against clean queries), a validation DataLoader,
                           or None / "none" (no such page)
    n_suspicious, marks    rows on that page; {train id: badge} or a bool array to mark
                           (e.g. known flipped labels)
    title                  the page title
    token_measure          a token-level measure (B, T), e.g. dropinf.lm.token_losses: adds the
                           generation view — each completion token's influence from each listed
                           training document (needs tokenizer and dict batches with input_ids)
    """

    k: int = option(10, "training examples per side per query", flag="-k")
    train_data: Any = None
    query_data: Any = None
    render: Callable | None = None
    query_render: Callable | None = None
    tokenizer: Any = None
    label_names: Any = None
    predict: Callable | None = None
    measure: Callable | None = None
    suspicious: Literal["self", "queries", "none"] | Iterable | None = option(
        "self", "rank training examples by self-influence (self), by influence on the mean query loss (queries: "
                "mislabel detection when the queries are a clean validation set), or skip that page (none)")
    n_suspicious: int = option(50, "rows on the suspicious page")
    marks: Any = None
    title: str = option("dropinf attribution report", "the page title")
    token_measure: Callable | None = None

    @classmethod
    def of(cls, options: "ReportOptions | None", **kw) -> "ReportOptions":
        """``options`` (or the defaults) with the keyword arguments ``kw`` replaced."""
        unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"report() got unknown option(s) {unknown}; ReportOptions has "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        opts = dataclasses.replace(options or cls(), **kw)
        if opts.k < 1:
            raise ConfigError("k must be ≥ 1")
        return opts
