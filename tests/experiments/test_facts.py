"""The fact-tracing corpus and metrics (dropinf reproduce facts): each fact planted once, in the
document the metrics treat as its answer; distractors share the wording but not the fact."""

import numpy as np

from dropinf_experiments.data.facts import RELATIONS, make_corpus
from dropinf_experiments.facts import bm25_scores, metrics, ranks

PARAS = [f"Paragraph {i} talks about topic number {i}. It has a second sentence here. And a third one follows."
         for i in range(40)]


def test_corpus_plants_each_fact_in_its_answer_document():
    c = make_corpus(PARAS, n_facts=6, n_background=5, seed=3)
    assert len(c.docs) == 3 * 6 + 5 == len(c.role)
    assert sorted(c.role) == sorted(["fact"] * 6 + ["subject"] * 6 + ["both"] * 6 + ["background"] * 5)
    prompts, completions, kinds, answer = c.queries()
    assert kinds == ["exact", "paraphrase"] * 6 and len(answer) == 12
    for f in c.facts:
        stmt = RELATIONS[f.relation][0].format(s=f.subject) + " " + f.object + "."
        holders = [i for i, d in enumerate(c.docs) if stmt in d]
        assert holders == [f.doc] and c.role[f.doc] == "fact"
        with_subject = [i for i, d in enumerate(c.docs) if f.subject in d]
        assert len(with_subject) == 3            # the fact, the subject distractor, the subject+object one
        roles = sorted(c.role[i] for i in with_subject)
        assert roles == ["both", "fact", "subject"]
        obj_docs = [i for i, d in enumerate(c.docs) if f.object in d]
        assert sorted(c.role[i] for i in obj_docs) == ["both", "fact"]
    for (p, comp, k), a in zip(zip(prompts, completions, kinds), answer):
        f = next(f for f in c.facts if f.doc == a)
        assert comp == " " + f.object and f.subject in p
        if k == "paraphrase":          # the paraphrase does not repeat the statement's wording
            assert p not in c.docs[a]
    # a new seed gives new names and a new order
    c2 = make_corpus(PARAS, n_facts=6, n_background=5, seed=4)
    assert {f.subject for f in c2.facts}.isdisjoint({f.subject for f in c.facts})


def test_ranks_and_metrics():
    scores = np.array([[-3.0, -1.0, 0.0], [0.5, -2.0, -2.0]])     # most negative = most helpful
    rk = ranks(scores, np.array([0, 2]))
    assert rk.tolist() == [1, 2]                                    # a tie counts against the answer
    assert ranks(-scores, np.array([0, 2]), higher_better=True).tolist() == [1, 2]
    m = metrics(rk)
    assert m == {"recall@1": 0.5, "recall@10": 1.0, "mrr": 0.75}


def test_bm25_prefers_the_shared_words():
    s = bm25_scores(["the red fox jumps", "a blue whale sings", "green trees grow tall"], ["blue whale"], [" sings"])
    assert s.shape == (1, 3) and s[0].argmax() == 1
