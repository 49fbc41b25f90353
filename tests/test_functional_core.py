"""The functional core, without an Attributor: Featurizer → Estimator.fit → Preconditioner →
Scorer gives exactly the numbers the front door gives, for rows in memory and in a store."""

import numpy as np
import torch

from dropinf import Attributor, Dropout, Featurizer, GaussNewton, StoreOptions
from dropinf.estimators import Preconditioner
from dropinf.score import Scorer
from dropinf.store.writer import featurize_to_store
from tests.store import fixture


def test_featurizer_fit_scorer_equals_the_attributor(tmp_path):
    t = fixture.build()
    train = torch.utils.data.DataLoader(t["train"], batch_size=16)
    query = torch.utils.data.DataLoader(t["query"], batch_size=16)
    f = Featurizer(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=3), progress=False)
    rows, q = f.features(train), f.features(query)
    pre = GaussNewton().fit(rows)
    assert isinstance(pre, Preconditioner) and pre.n == len(t["train"])
    scores = Scorer(pre, rows, progress=False).dense(q)

    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=3), estimator=GaussNewton(),
                      progress=False)
    attr.featurize(train)
    np.testing.assert_allclose(scores, attr.score(query), rtol=1e-5, atol=1e-7)

    store = featurize_to_store(f, train, StoreOptions(tmp_path / "s", chunk_size=50))
    from_store = Scorer(GaussNewton().fit(store), store, progress=False)
    np.testing.assert_allclose(from_store.dense(q), scores, rtol=1e-4, atol=1e-6 * np.abs(scores).max())
    top = from_store.topk(q, k=3)                       # row positions; the Attributor maps them to ids
    assert (top.harmful_idx[:, 0] == scores.argmax(1)).all()
