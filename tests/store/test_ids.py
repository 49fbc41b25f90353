"""Every row carries its dataset id: a collate function that drops examples, or a shuffled
loader, gives rows keyed by dataset ids — in memory and in a store alike — never misaligned rows;
top-k returns dataset ids."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from dropinf import Attributor, ConfigError, Dropout
from tests.store import fixture
from dropinf.store.writer import StoreOptions


def drop_label_zero(items):
    """A filtering collate, as people write to skip bad rows."""
    return default_collate([it for it in items if int(it[1]) != 0])


def setup():
    t = fixture.build()
    kept = [i for i in range(len(t["train"])) if int(t["train"][i][1]) != 0]
    return t, kept


def test_filtering_collate_store_and_memory_agree_on_rows_ids_and_scores(tmp_path):
    t, kept = setup()
    train = DataLoader(t["train"], batch_size=16, collate_fn=drop_label_zero)
    query = DataLoader(t["query"], batch_size=16)
    mem = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    feats = mem.featurize(train)
    assert feats.n == len(kept) < 230 and feats.ids.tolist() == kept
    disk = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    store = disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    assert store.n == len(kept) and store.n_examples == 230
    assert store.ids().tolist() == kept and disk.train_ids.tolist() == kept
    for name in feats.layer_names():
        got = torch.cat([c[name] for _, c in store.iter_chunks()])
        torch.testing.assert_close(got, feats.data[name])
    want = mem.score(query)
    assert want.shape == (20, len(kept))
    np.testing.assert_allclose(disk.score(query), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    top = disk.topk(query, k=5)
    np.testing.assert_array_equal(top.harmful_idx, np.array(kept)[np.argsort(-want, 1, kind="stable")[:, :5]])
    assert set(top.helpful_idx.ravel()) <= set(kept)
    # reopened: the ids come from the store
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], progress=False)
    np.testing.assert_array_equal(again.topk(query, k=5).harmful_idx, top.harmful_idx)


def test_shuffled_loader_gives_rows_in_dataset_order():
    t, _ = setup()
    seq = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    a = seq.featurize(DataLoader(t["train"], batch_size=16))
    shuf = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    b = shuf.featurize(DataLoader(t["train"], batch_size=16, shuffle=True,
                                  generator=torch.Generator().manual_seed(0)))
    assert b.ids.tolist() == list(range(230))
    for name in a.layer_names():
        torch.testing.assert_close(b.data[name], a.data[name])
    q = DataLoader(t["query"], batch_size=8)
    np.testing.assert_allclose(shuf.score(q), seq.score(q), rtol=1e-5)


def test_sampling_with_replacement_is_refused():
    t, _ = setup()
    sampler = torch.utils.data.RandomSampler(t["train"], replacement=True, num_samples=100,
                                             generator=torch.Generator().manual_seed(0))
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    with pytest.raises(ConfigError, match="more than once"):
        attr.featurize(DataLoader(t["train"], batch_size=16, sampler=sampler))
