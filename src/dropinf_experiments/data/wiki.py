"""Wikipedia paragraphs from the sample dump inside the gensim wheel (CC BY-SA)."""

from __future__ import annotations

import bz2
from typing import Iterator

import numpy as np

from .packages import MissingDataError, package_dir

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_articles(min_words: int = 30) -> Iterator[tuple[str, list[str]]]:
    """(title, paragraphs of ≥ min_words words) of every non-redirect article, in dump order."""
    folder = package_dir("gensim", "gensim", "The Wikipedia sample (inside the gensim wheel)", no_deps=False)
    path = folder / DUMP
    if not path.exists():
        raise MissingDataError(f"{path} is missing from the gensim install; reinstall gensim.")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path, "rb") as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            paras = (" ".join(p.replace("'''", "").replace("''", "").split()) for p in filter_wiki(text).split("\n\n"))
            yield title, [p for p in paras if len(p.split()) >= min_words]


def load_wiki_paragraphs(min_words: int = 30) -> list[str]:
    """Paragraphs (≥ min_words words) of the non-redirect articles, in dump order."""
    return [p for _, paras in wiki_articles(min_words) for p in paras]


TOPICS = ("Alabama", "Alaska", "Abraham Lincoln", "Albert Einstein", "Algorithm")


def load_wiki_topics(articles=TOPICS, min_words: int = 30) -> tuple[list[str], np.ndarray]:
    """A topic-classification set: the paragraphs (≥ min_words words) of the given articles,
    labelled by article (0..k-1, in ``articles`` order). The default five include two US states,
    so the classes are not all far apart."""
    want = {a: i for i, a in enumerate(articles)}
    texts, labels = [], []
    for title, paras in wiki_articles(min_words):
        if title in want:
            texts += paras
            labels += [want[title]] * len(paras)
    missing = set(articles) - {articles[i] for i in set(labels)}
    if missing:
        raise MissingDataError(f"articles {sorted(missing)} are not in the gensim Wikipedia sample")
    return texts, np.array(labels)
