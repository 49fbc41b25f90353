"""Faults: a full disk on every write path, a damaged manifest, a model whose modules were
renamed, all-zero gradients — each a DropinfError (or a warning) that names the problem, nothing
partial left behind, and the store still resumable."""

import errno
import json

import numpy as np
import pytest
import torch
from torch import nn

from dropinf import Attributor, Dropout, FeatureMismatchError, GradDot
from dropinf.store import disk, files
from dropinf.store.disk import FeatureStore, StoreError
from tests.store import fixture
from dropinf.store.writer import StoreOptions


def task():
    t = fixture.build()
    return t, torch.utils.data.DataLoader(t["train"], batch_size=16), torch.utils.data.DataLoader(t["query"], batch_size=16)


def test_full_disk_while_writing_a_shard_is_a_clear_error_and_resumable(tmp_path, monkeypatch):
    t, train, query = task()
    real_replace, calls = files.os.replace, []

    def flaky_replace(src, dst):              # the third shard hits a full disk
        calls.append(str(dst))
        if str(dst).endswith("000002.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", flaky_replace)
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12), progress=False)
    with pytest.raises(StoreError, match=r"no space left.*000002\.bin.*bytes needed.*re-run the same command"):
        attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    assert not list((tmp_path / "s").rglob("*.tmp"))              # nothing partial kept
    assert not (tmp_path / "s" / "chunks" / "000002.json").exists()
    monkeypatch.setattr(files.os, "replace", real_replace)
    store = attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))      # space freed: resume
    assert store.manifest["complete"] and store.n == 230


def test_full_disk_writing_the_manifest(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    t, train, _ = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12), progress=False)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        attr.featurize(train, store=tmp_path / "s")
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_score_matrix_larger_than_the_free_space_is_refused_up_front(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    from dropinf.score import open_scores_memmap
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StoreError, match=r"needs 4,004,096 bytes.*only 1,000"):
        open_scores_memmap(tmp_path / "s.npy", (1000, 1000))
    assert not (tmp_path / "s.npy").exists()


def test_manifest_with_only_the_format_key(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format": disk.FORMAT}))
    with pytest.raises(StoreError, match=r"lacks \['signature'"):
        FeatureStore.open(tmp_path / "s")


def test_from_store_with_renamed_modules_names_the_layers(tmp_path):
    t, train, _ = task()
    Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12), progress=False).featurize(train, store=tmp_path / "s")
    wrapped = nn.Sequential()
    wrapped.add_module("net", t["model"])          # same weights, other module names
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    with pytest.raises(FeatureMismatchError, match=r"tracked layers \['0', '2'\].*does not have"):
        Attributor.from_store(tmp_path / "s", wrapped, loss, progress=False)


def test_all_zero_gradients_warn_or_refuse_instead_of_silent_zeros(tmp_path):
    t, train, query = task()
    model = t["model"]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[2].weight.fill_(0.0)
    zero_loss = lambda m, b: (m(b[0]) * 0.0).sum(1)        # the loss does not depend on the weights
    attr = Attributor(model, zero_loss, compressor=Dropout(r=12), estimator=GradDot(), progress=False)
    attr.featurize(train)
    with pytest.warns(UserWarning, match="every score is 0"):
        attr.score(query)
    from dropinf import ConfigError, GaussNewton
    gn = Attributor(model, zero_loss, compressor=Dropout(r=12), estimator=GaussNewton(), progress=False)
    with pytest.warns(UserWarning, match="dropped"):
        gn.featurize(train, store=tmp_path / "s")
    with pytest.raises(ConfigError, match="every tracked layer was dropped"):
        gn.score(query)
