"""User entry points for the CLI: ``module:function`` returning what dropinf needs.

The function takes no arguments and returns a dict (or an object with these attributes):

    model       torch.nn.Module, trained
    loss_fn     loss_fn(model, batch) -> per-example losses (B,)
    train       map-style Dataset of training examples (fixed order)
    query       map-style Dataset of query examples (needed by `score` / `topk`)
    collate_fn  optional, for both datasets
    batch_size  optional, default 32
    measures    optional {name: measure(model, batch) -> (B,)}: query-side functions for --measure
                (dropinf.measures)
    render, tokenizer, label_names, predict, marks
                optional, for `dropinf report` (see Attributor.report): how to show an example,
                decode text, name classes, predict a query's label, and badge training ids
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError


@dataclass
class Task:
    model: torch.nn.Module
    loss_fn: Callable
    train: Any
    query: Any = None
    collate_fn: Callable | None = None
    batch_size: int = 32
    measures: dict = None
    report: dict = None

    def report_options(self) -> dict:
        return {k: v for k, v in (self.report or {}).items() if v is not None}

    def loader(self, which: str) -> torch.utils.data.DataLoader:
        ds = getattr(self, which)
        if ds is None:
            raise ConfigError(f"the entry point returned no {which!r} dataset")
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn)


def load_entry(spec: str) -> Task:
    if ":" not in spec:
        raise ConfigError(f"entry point must look like 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {mod_name!r} for entry point {spec!r}: {exc}") from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {fn_name!r}")
    out = fn()
    get = (lambda k, d=None: out.get(k, d)) if isinstance(out, dict) else (lambda k, d=None: getattr(out, k, d))
    missing = [k for k in ("model", "loss_fn", "train") if get(k) is None]
    if missing:
        raise ConfigError(f"entry point {spec!r} must return model, loss_fn and train; missing {missing}")
    measures = get("measures") or {}
    if not isinstance(measures, dict) or not all(callable(f) for f in measures.values()):
        raise ConfigError(f"entry point {spec!r}: measures must be a dict {{name: measure(model, batch)}}")
    report = {k: get(k) for k in ("render", "tokenizer", "label_names", "predict", "marks")}
    return Task(get("model"), get("loss_fn"), get("train"), get("query"), get("collate_fn"), int(get("batch_size", 32)),
                measures, report)
