"""The RowSource contract: in-memory Features and an on-disk FeatureStore of the same rows answer
the same calls the same way (iter_chunks(shard, rows), row_ids(), mean(), the signature)."""

import pytest
import torch

from dropinf import Dropout, FeatureMismatchError, Featurizer
from dropinf.store import RowSource, check_signatures
from dropinf.store.writer import StoreOptions, featurize_to_store
from tests.store import fixture


def _both(tmp_path):
    t = fixture.build()
    loader = torch.utils.data.DataLoader(t["train"], batch_size=16)
    f = Featurizer(t["model"], t["loss_fn"], compressor=Dropout(r=12), progress=False)
    return f, f.features(loader), featurize_to_store(f, loader, StoreOptions(tmp_path / "s", chunk_size=50))


def _rows(source, shard=(0, 1), rows=None):
    got = list(source.iter_chunks(shard=shard, rows=rows))
    return [s for s, _ in got], {l: torch.cat([c[l] for _, c in got]) for l in source.layer_names()}


def test_memory_and_store_answer_alike(tmp_path):
    f, mem, store = _both(tmp_path)
    assert isinstance(mem, RowSource) and isinstance(store, RowSource)
    check_signatures(mem.signature, store.signature)
    assert torch.equal(mem.row_ids(), store.row_ids())
    _, a = _rows(mem, rows=50)
    _, b = _rows(store, rows=50)
    for l in mem.layer_names():
        torch.testing.assert_close(a[l], b[l])
        torch.testing.assert_close(mem.mean().data[l], store.mean().data[l], rtol=1e-6, atol=1e-7)
    # a rank's share: the blocks k ≡ rank (mod world), for either source
    starts_mem, _ = _rows(mem, shard=(1, 2), rows=50)
    starts_store, _ = _rows(store, shard=(1, 2))
    assert starts_mem == starts_store == [50, 150]


def test_signatures_compared_directly_name_the_difference(tmp_path):
    f, mem, _ = _both(tmp_path)
    other = Featurizer(f.model, f.loss_fn, compressor=Dropout(r=12, seed=1), progress=False)
    with pytest.raises(FeatureMismatchError, match=r"compressor\.seed: query=1 vs train=0"):
        check_signatures(other.signature(), mem.signature)


def test_a_store_written_before_output_layer_was_recorded_still_matches(tmp_path):
    """output_layer (derived from the model and layers) is recorded in new signatures, not compared:
    a store whose manifest lacks it resumes, loads and scores against new query features."""
    import json
    f, mem, store = _both(tmp_path)
    assert mem.signature["output_layer"] == f.layers[-1].name
    manifest = tmp_path / "s" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["signature"]["output_layer"]
    manifest.write_text(json.dumps(m))
    check_signatures(f.signature(), m["signature"])
    loader = torch.utils.data.DataLoader(fixture.build()["train"], batch_size=16)
    again = featurize_to_store(f, loader, StoreOptions(tmp_path / "s", chunk_size=50))
    assert "output_layer" not in again.signature
    from dropinf import Attributor
    attr = Attributor.from_store(tmp_path / "s", f.model, f.loss_fn, progress=False)
    assert attr.score(loader).shape == (store.n, store.n)
