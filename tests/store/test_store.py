"""On-disk store: round trip, streaming estimators, top-k, refusal of mismatches and corruption."""

import json

import numpy as np
import pytest
import torch

from dropinf import (Attributor, DataInf, Dropout, FeatureMismatchError, Gaussian, GaussNewton, GradDot, LoGra,
                     ScoreOptions)
from dropinf.store.disk import FeatureStore, StoreError
from dropinf.store.writer import StoreOptions
from tests.store import fixture


def task():
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=t["batch_size"], shuffle=False)
    return t, dl(t["train"]), dl(t["query"])


@pytest.mark.parametrize("est", [GaussNewton(), DataInf(), GradDot()], ids=["gn", "datainf", "graddot"])
def test_store_scores_equal_in_memory(tmp_path, est):
    t, train, query = task()
    mem = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20, seed=3), estimator=est, progress=False)
    mem.featurize(train)
    want = mem.score(query)
    disk = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20, seed=3), estimator=est, progress=False)
    store = disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    assert store.n == 230 and store.n_chunks == 5 and store.manifest["complete"]
    np.testing.assert_allclose(disk.score(query), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(disk.self_influence(), mem.self_influence(), rtol=1e-4, atol=1e-6)
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=est, progress=False)
    np.testing.assert_allclose(again.score(query), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_store_falls_back_to_memory_for_row_estimators(tmp_path):
    from dropinf import LiSSA
    t, train, query = task()
    mem = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), estimator=LiSSA(), progress=False)
    mem.featurize(train)
    disk = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), estimator=LiSSA(), progress=False)
    disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=64))
    want = mem.score(query)
    # float32 LiSSA sums cancel: entries near zero carry absolute, not relative, error
    np.testing.assert_allclose(disk.score(query), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_blockwise_topk_equals_dense_topk(tmp_path):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=24), progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=37))
    out = np.lib.format.open_memmap(tmp_path / "scores.npy", mode="w+", dtype=np.float32, shape=(20, 230))
    attr.score(query, out=out)
    dense = np.load(tmp_path / "scores.npy")
    top = attr.topk(query, k=7)
    np.testing.assert_array_equal(top.harmful_idx, np.argsort(-dense, 1, kind="stable")[:, :7])
    np.testing.assert_array_equal(top.helpful_idx, np.argsort(dense, 1, kind="stable")[:, :7])
    np.testing.assert_allclose(top.harmful_scores, -np.sort(-dense, 1)[:, :7], rtol=1e-6)
    # the in-memory path gives the same
    mem = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=24), progress=False)
    mem.featurize(train)
    top2 = mem.topk(query, k=7, options=ScoreOptions(query_batch=6, train_batch=50))
    np.testing.assert_array_equal(top2.harmful_idx, top.harmful_idx)
    np.testing.assert_array_equal(top2.helpful_idx, top.helpful_idx)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores(tmp_path, dtype):
    t, train, query = task()
    a32 = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    a32.featurize(train, store=StoreOptions(tmp_path / "f32", chunk_size=100))
    a16 = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    st = a16.featurize(train, store=StoreOptions(tmp_path / dtype, chunk_size=100, dtype=dtype))
    assert st.data_path(0).stat().st_size * 2 == a32.store.data_path(0).stat().st_size
    s32, s16 = a32.score(query).ravel(), a16.score(query).ravel()
    assert np.corrcoef(s32, s16)[0, 1] > 0.99


@pytest.mark.parametrize("change,field", [
    (dict(compressor=Dropout(r=20, seed=9)), "compressor.seed"),
    (dict(compressor=Dropout(r=21)), "compressor.r"),
    (dict(compressor=Gaussian(r=20)), "compressor.kind"),
    (dict(track=["0"]), "layers"),
])
def test_store_refuses_other_settings(tmp_path, change, field):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    other = Attributor(t["model"], t["loss_fn"], progress=False, **{"compressor": Dropout(r=20), **change})
    with pytest.raises(FeatureMismatchError, match=field.replace(".", r"\.")):
        other.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))     # same folder, other settings
    with pytest.raises(FeatureMismatchError, match=field.split(".")[0]):
        attr.score(other.compute_features(query))                     # query features from elsewhere


def test_store_refuses_another_model(tmp_path):
    t, train, query = task()
    Attributor(t["model"], t["loss_fn"], progress=False).featurize(train, store=tmp_path / "s")
    with torch.no_grad():
        t["model"][0].bias.add_(1.0)
    with pytest.raises(FeatureMismatchError, match="model"):
        Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], progress=False)


def test_truncated_and_corrupted_shards_are_named(tmp_path):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    shard = tmp_path / "s" / "chunks" / "000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(StoreError, match=r"000001\.bin is truncated"):
        attr.score(query)
    shard.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], progress=False)  # saved M: no read
    with pytest.raises(StoreError, match=r"000001\.bin is corrupted"):
        again.score(query)                                   # the first pass over the rows checks them
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        FeatureStore.open(tmp_path / "s")


def test_incomplete_store_is_refused_and_resumed(tmp_path):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    full = {p.name: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    # simulate a kill: chunk 2 never finished, manifest not finalized
    (tmp_path / "s" / "chunks" / "000002.json").unlink()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m.update(complete=False, chunks=[])
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"incomplete: chunks \[2\]"):
        Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    again = {p.name: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert again == full


def test_logra_store_and_empty_loader(tmp_path):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=LoGra(r_in=3, r_out=2), progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    assert attr.score(query).shape == (20, 230)
    from dropinf.errors import ConfigError, EmptyDataError
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 12), torch.zeros(0).long()))
    with pytest.raises(EmptyDataError):
        attr.featurize(empty, store=tmp_path / "e")
    shuffled = torch.utils.data.DataLoader(t["train"], batch_size=8, shuffle=True)
    with pytest.raises(ConfigError, match="deterministic order"):
        attr.featurize(shuffled, store=tmp_path / "x")


def test_from_store_loads_the_saved_preconditioner_without_reading_rows(tmp_path, capsys):
    t, train, query = task()
    first = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), estimator=DataInf(), progress=False)
    first.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    want = first.score(query)
    saved = list((tmp_path / "s" / "precond").glob("datainf-*.npz"))
    assert len(saved) == 1
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=DataInf(), progress=True)
    assert again.store.rows_read == 0 and again.fit_status.startswith("loaded")      # no pass over the rows
    np.testing.assert_allclose(again.score(query), want, rtol=1e-6)
    capsys.readouterr()
    # other options: refit (one streamed pass per statistic) and say so; then both are saved
    other = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=DataInf(damping_factor=1.0))
    assert other.fit_status == "fitted" and other.store.rows_read > 0
    assert "fitting DataInf" in capsys.readouterr().err
    assert len(list((tmp_path / "s" / "precond").glob("datainf-*.npz"))) == 2
    assert np.abs(other.score(query) - want).max() > 1e-3 * np.abs(want).max()
    # a damaged saved preconditioner is refitted, not trusted
    saved[0].write_bytes(b"garbage")
    third = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=DataInf(), progress=False)
    assert third.fit_status == "fitted"
    np.testing.assert_allclose(third.score(query), want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_each_shard_is_checksummed_once_per_open(tmp_path, monkeypatch):
    from dropinf.store import disk
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    calls = []
    real = disk._checksum_ok
    monkeypatch.setattr(disk, "_checksum_ok", lambda *a, **k: calls.append(1) or real(*a, **k))
    st = FeatureStore.open(tmp_path / "s")
    for _ in range(3):
        list(st.iter_chunks())
    assert len(calls) == st.n_chunks == 5


def test_from_store_with_exact_hessian_needs_and_uses_the_train_loader(tmp_path):
    from dropinf import ConfigError, ExactHessian, Identity
    t, train, query = task()
    Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False).featurize(
        train, store=StoreOptions(tmp_path / "s", chunk_size=100))
    with pytest.raises(ConfigError, match="train_loader"):
        Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=ExactHessian(damping=0.1),
                              progress=False)
    exact = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], estimator=ExactHessian(damping=0.1),
                                  progress=False, train_loader=train)
    mem = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), estimator=ExactHessian(damping=0.1),
                     progress=False)
    mem.featurize(train)                        # torch.func features: the same numbers as the fused store
    want = mem.score(query)
    np.testing.assert_allclose(exact.score(query), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_derive_features_keeps_ids_and_equals_fused_capture():
    from dropinf import Identity
    t, train, query = task()
    full = Attributor(t["model"], t["loss_fn"], compressor=Identity(), progress=False).compute_features(train)
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20, seed=5), progress=False)
    derived = attr.derive_features(full)
    fused = attr.compute_features(train)
    assert derived.ids.tolist() == fused.ids.tolist() == list(range(230))
    for name in fused.layer_names():
        torch.testing.assert_close(derived.data[name], fused.data[name], rtol=1e-5, atol=1e-7)


def test_rows_stream_into_the_shard_batch_by_batch_and_shards_are_sized_by_bytes(tmp_path, monkeypatch):
    from dropinf.store import disk as disk_mod
    t, train, _ = task()
    appended = []
    real = disk_mod.ChunkWriter.append
    monkeypatch.setattr(disk_mod.ChunkWriter, "append", lambda self, b, *a: (appended.append(b.shape[0]), real(self, b, *a)))
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20, seed=3), progress=False)
    store = attr.featurize(train, store=tmp_path / "s")             # default: shards sized by bytes
    width = store.width                      # 2 layers × r=20 float32: 160 bytes a row, 64 MiB → the cap
    assert store.chunk_size == StoreOptions(tmp_path / "x").rows_per_chunk(width) == 16384 and store.n_chunks == 1
    assert max(appended) <= t["batch_size"] and sum(appended) == 230           # one batch at a time
    assert StoreOptions(tmp_path / "x", chunk_mb=1 / 1024).rows_per_chunk(256) == 16      # at least 16 rows
    assert StoreOptions(tmp_path / "x", chunk_mb=1).rows_per_chunk(256) == 1024           # 1 MiB of float32 rows
    assert StoreOptions(tmp_path / "x", chunk_mb=1, dtype="float16").rows_per_chunk(256) == 2048
    # a store being resumed keeps the shard size it was started with
    Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20, seed=3), progress=False).featurize(
        train, store=StoreOptions(tmp_path / "r", chunk_size=50))
    assert StoreOptions(tmp_path / "r").rows_per_chunk(width) == 50
