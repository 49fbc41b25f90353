"""Wikipedia paragraphs from the sample dump inside the gensim wheel (CC BY-SA)."""

from __future__ import annotations

import bz2

from .packages import MissingDataError, package_dir

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def load_wiki_paragraphs(min_words: int = 30) -> list[str]:
    """Paragraphs (≥ min_words words) of the non-redirect articles, in dump order."""
    folder = package_dir("gensim", "gensim", "The Wikipedia sample (inside the gensim wheel)", no_deps=False)
    path = folder / DUMP
    if not path.exists():
        raise MissingDataError(f"{path} is missing from the gensim install; reinstall gensim.")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    paragraphs = []
    with bz2.open(path, "rb") as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            for para in filter_wiki(text).split("\n\n"):
                para = " ".join(para.replace("'''", "").replace("''", "").split())
                if len(para.split()) >= min_words:
                    paragraphs.append(para)
    return paragraphs
