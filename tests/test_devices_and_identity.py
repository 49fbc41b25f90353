"""Batches of any structure reach the model's device; the model fingerprint refuses a stale or
different model (changed BatchNorm statistics, permuted hidden units); r-dict precedence;
Dropout's O(r) index sampler."""

import collections
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from dropinf import Attributor, ConfigError, Dropout, FeatureMismatchError
from dropinf.store.featurizer import to_device as _to
from dropinf.capture.layers import select_layers


def test_every_batch_structure_is_moved():
    Pair = collections.namedtuple("Pair", "x y")

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        meta: str = "m"

    class Encoding(collections.UserDict):      # what a BatchEncoding looks like without .to()
        pass

    dev = torch.device("meta")
    moved = _to({"a": Pair(torch.ones(2), [torch.ones(1), 3]), "b": Batch(torch.ones(2)),
                 "c": Encoding(ids=torch.ones(2))}, dev)
    assert isinstance(moved["a"], Pair) and moved["a"].x.device == dev and moved["a"].y[0].device == dev
    assert moved["a"].y[1] == 3
    assert isinstance(moved["b"], Batch) and moved["b"].x.device == dev and moved["b"].meta == "m"
    assert isinstance(moved["c"], Encoding) and moved["c"]["ids"].device == dev


def test_hf_batch_encoding_is_moved():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    out = _to(enc, torch.device("meta"))
    assert out["input_ids"].device.type == "meta"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _loss(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _loader():
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=10)


def test_stale_batchnorm_statistics_are_refused():
    model = _model()
    attr = Attributor(model, _loss, compressor=Dropout(r=8), progress=False)
    attr.featurize(_loader())
    with torch.no_grad():
        model[1].running_mean.add_(0.5)           # BN buffers change (e.g. a forward in train mode)
    with pytest.raises(FeatureMismatchError, match="model"):
        attr.score(_loader())


def test_permuted_hidden_units_are_refused(tmp_path):
    model = _model()
    attr = Attributor(model, _loss, compressor=Dropout(r=8), progress=False)
    attr.featurize(_loader(), store=tmp_path / "s")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                         # same function, different parametrisation
        model[0].weight.copy_(model[0].weight[perm])
        model[0].bias.copy_(model[0].bias[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(model[1], name)
            t.copy_(t[perm])
        model[3].weight.copy_(model[3].weight[:, perm])
    with pytest.raises(FeatureMismatchError, match="model"):
        Attributor.from_store(tmp_path / "s", model, _loss, progress=False)


def test_r_dict_exact_name_beats_glob_beats_star():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    attr = Attributor(model, _loss, compressor=Dropout(r={"*": 3, "[0-9]": 5, "2": 7}), progress=False)
    assert {n: c.r for n, c in attr.compressors.items()} == {"0": 5, "2": 7, "4": 5}


def test_dropout_seed_must_be_an_int():
    with pytest.raises(ConfigError, match="seed must be an int"):
        Dropout(r=4, seed=None)


def test_o_r_sampler_is_uniform_distinct_and_fast():
    import time
    from dropinf.compress.dropout import sample_indices
    t0 = time.perf_counter()
    idx = sample_indices(4096 * 11008, 4096, 0)       # a 7B MLP projection
    assert time.perf_counter() - t0 < 0.5
    assert idx.numel() == idx.unique().numel() == 4096 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, sample_indices(4096 * 11008, 4096, 0))
    counts = np.bincount(np.concatenate([sample_indices(40, 4, s).numpy() for s in range(4000)]), minlength=40)
    assert counts.min() > 0.8 * 400 and counts.max() < 1.2 * 400      # 400 expected per coordinate
