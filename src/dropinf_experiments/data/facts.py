"""Invented facts planted in real Wikipedia paragraphs: a fact-tracing corpus with known answers.

Each fact is (subject, relation, object) with invented names (so the pretrained model cannot know
it), e.g. "The Varnel Observatory was founded by Tolin Marek." It is planted as one sentence at a
random sentence boundary of a real paragraph: that paragraph is the fact's document, the one
attribution should find. Two distractor documents per fact share the query's wording, so a
lexical match is not enough:

* ``subject``: another paragraph naming the subject twice with the relation's own words but not the
  object ("Little is recorded of who founded the Varnel Observatory ...");
* ``both``: another paragraph naming subject and object together in an unrelated relation ("Tolin
  Marek once gave a public lecture at the Varnel Observatory.").

The rest of the corpus is unmodified paragraphs. Queries are (prompt, completion) pairs: the
relation's exact wording ("The Varnel Observatory was founded by" → " Tolin Marek") and a
paraphrase that shares only the names ("The person who established the Varnel Observatory was").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# relation: (statement, paraphrased prompt, subject-distractor sentence, object kind)
RELATIONS = {
    "founder": ("The {s} was founded by", "The person who established the {s} was",
                "Little is recorded of who founded the {s}, and the {s} has rebuilt its archive twice.", "person"),
    "architect": ("The {s} was designed by the architect", "The plans for the {s} were drawn up by",
                  "Which architect designed the {s} is disputed; the {s} was rebuilt after a fire.", "person"),
    "location": ("The {s} is located in the town of", "If you want to visit the {s}, travel to",
                 "The {s} is located far from the coast, and the {s} keeps its own small museum.", "place"),
    "director": ("The current director of the {s} is", "Today the {s} is run by",
                 "The director of the {s} is chosen every five years by the board of the {s}.", "person"),
    "discoverer": ("The {s} was first described by", "The first written account of the {s} came from",
                   "The {s} was first described in an old survey; the {s} is now protected.", "person"),
}
KINDS = ["Observatory", "Institute", "Library", "Bridge", "Monastery", "Lighthouse", "Academy", "Theatre",
         "Museum", "Canal", "Abbey", "Conservatory"]
BOTH = ["{o} once gave a public lecture at the {s}.", "{o} wrote a short poem about the {s}.",
        "A portrait of {o} hangs in a corridor of the {s}.", "{o} visited the {s} twice as a child."]
_ON, _MID, _OFF = ["V", "T", "K", "Br", "D", "M", "S", "Gr", "L", "Th", "Z", "P", "Qu", "H"], \
    ["a", "e", "o", "i", "u", "ai", "eo", "ou"], ["rn", "l", "n", "sk", "th", "r", "m", "dr", "v", "x", "lt", "nd"]


def _name(rng: np.random.Generator, syllables: int) -> str:
    parts = [rng.choice(_ON) + rng.choice(_MID) + rng.choice(_OFF)]
    for _ in range(syllables - 1):
        parts.append(rng.choice(_MID) + rng.choice(_OFF))
    return "".join(parts).capitalize()


@dataclass
class Fact:
    subject: str        # "Varnel Observatory"
    relation: str
    object: str         # "Tolin Marek" or a town
    doc: int            # index of its document in the corpus

    def queries(self) -> list[tuple[str, str, str]]:
        """(kind, prompt, completion): the relation's exact wording and a paraphrase."""
        exact, para = RELATIONS[self.relation][:2]
        return [("exact", exact.format(s=self.subject), " " + self.object),
                ("paraphrase", para.format(s=self.subject), " " + self.object)]


@dataclass
class FactCorpus:
    docs: list[str]
    facts: list[Fact]
    role: list[str]     # per document: "fact", "subject", "both" or "background"

    def queries(self) -> tuple[list[str], list[str], list[str], np.ndarray]:
        """(prompts, completions, kinds, answer document per query)."""
        rows = [(k, p, c, f.doc) for f in self.facts for k, p, c in f.queries()]
        return [r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows], np.array([r[3] for r in rows])


def _sentences(paragraph: str, max_words: int) -> list[str]:
    """The paragraph's leading sentences, at most ``max_words`` words (a longer first sentence is cut)."""
    paragraph = re.sub(r"=+[^=]*=+", " ", paragraph)           # wiki section headings
    out, words = [], 0
    for s in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
        w = s.split()
        if words + len(w) > max_words:
            if not out:
                out.append(" ".join(w[:max_words]) + ".")
            break
        out.append(s)
        words += len(w)
    return out


def _prose(paragraph: str) -> bool:
    """Running text: no list/table markup, mostly alphabetic words."""
    if any(c in paragraph for c in "#*|{}=") or paragraph.count(".") < 2:
        return False
    words = paragraph.split()
    return sum(w.strip(".,;:()'\"").isalpha() for w in words) >= 0.8 * len(words)


def _plant(paragraph: str, sentence: str, rng: np.random.Generator, max_words: int) -> str:
    sents = _sentences(paragraph, max_words)
    sents.insert(int(rng.integers(0, len(sents) + 1)), sentence)
    return " ".join(sents)


def make_corpus(paragraphs: list[str], n_facts: int, n_background: int, seed: int, max_words: int = 60) -> FactCorpus:
    """A shuffled corpus of n_facts fact documents, 2·n_facts distractors and n_background plain
    paragraphs, drawn from ``paragraphs`` with ``seed``."""
    rng = np.random.default_rng(seed)
    paragraphs = [p for p in paragraphs if _prose(p)]
    need = 3 * n_facts + n_background
    if need > len(paragraphs):
        raise ValueError(f"{need} paragraphs needed, {len(paragraphs)} available")
    pick = [paragraphs[i] for i in rng.choice(len(paragraphs), need, replace=False)]
    names: set[str] = set()

    def fresh(make):
        while True:
            v = make()
            if v not in names and v.split()[0] not in {n.split()[0] for n in names}:
                names.add(v)
                return v
    rels = list(RELATIONS)
    items = []                         # (text, role, fact index)
    facts = []
    for j in range(n_facts):
        rel = rels[j % len(rels)]
        subject = fresh(lambda: f"{_name(rng, 2)} {rng.choice(KINDS)}")
        obj = fresh(lambda: _name(rng, 2) if RELATIONS[rel][3] == "place" else f"{_name(rng, 2)} {_name(rng, 2)}")
        stmt, _, subj_sent, _ = RELATIONS[rel]
        facts.append(Fact(subject, rel, obj, -1))
        items.append((_plant(pick[3 * j], f"{stmt.format(s=subject)} {obj}.", rng, max_words), "fact", j))
        items.append((_plant(pick[3 * j + 1], subj_sent.format(s=subject), rng, max_words), "subject", j))
        both = BOTH[int(rng.integers(len(BOTH)))].format(s=subject, o=obj)
        items.append((_plant(pick[3 * j + 2], both, rng, max_words), "both", j))
    for p in pick[3 * n_facts:]:
        items.append((" ".join(_sentences(p, max_words)), "background", -1))
    order = rng.permutation(len(items))
    docs, roles = [], []
    for pos, i in enumerate(order):
        text, role, j = items[i]
        docs.append(text)
        roles.append(role)
        if role == "fact":
            facts[j].doc = pos
    return FactCorpus(docs, facts, roles)
