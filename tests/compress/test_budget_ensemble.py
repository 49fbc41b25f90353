"""Layer budgets (compress.budget), mask ensembles (dropinf.ensemble) and the damping chosen
without retraining (estimators.damping): bytes are respected, members partition the kept
coordinates, and the chosen λ recovers a known noise level."""

import numpy as np
import pytest
import torch

from dropinf import Attributor, Dropout, GaussNewton
from dropinf.compress.budget import allocate
from dropinf.store.budget import split_budget
from dropinf.ensemble import EnsembleScores, member_features, score_ensemble
from dropinf.errors import ConfigError
from dropinf.estimators import choose_damping
from tests.helpers import ce_loss, fit_score, loader, tiny_data, tiny_mlp


def test_allocate_sums_to_total_within_caps_and_follows_weights():
    r = allocate({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 100, "b": 100, "c": 100}, 90, min_r=4)
    assert r == {"a": 30, "b": 30, "c": 30}
    r = allocate({"a": 8.0, "b": 1.0, "c": 1.0}, {"a": 40, "b": 1000, "c": 1000}, 300, min_r=4)
    assert sum(r.values()) == 300 and r["a"] == 40 and r["b"] == r["c"] == 130      # capped, refilled
    r = allocate({"a": 3.0, "b": 1.0}, {"a": 1000, "b": 1000}, 101, min_r=1)
    assert sum(r.values()) == 101 and 74 <= r["a"] <= 76
    assert allocate({"a": 1.0}, {"a": 10}, 50) == {"a": 10}                          # more than exists
    with pytest.raises(ConfigError, match="min_r"):
        allocate({"a": 1.0, "b": 1.0}, {"a": 10, "b": 10}, 5, min_r=4)


def test_split_budget_uses_the_whole_total_and_builds_a_dropout():
    model = tiny_mlp(hidden=12).double()
    ds = tiny_data(n=64)
    r = split_budget(model, ce_loss, loader(ds), total=60, min_r=4)
    assert set(r) == {"0", "2"} and sum(r.values()) == 60
    attr = Attributor(model, ce_loss, compressor=Dropout(r=r, rotate=True), progress=False)
    feats = attr.featurize(loader(ds))
    assert sum(v.shape[1] for v in feats.data.values()) == 60
    assert split_budget(model, ce_loss, loader(ds), total=60, rule="uniform", min_r=4) == {"0": 30, "2": 30}


def test_ensemble_members_partition_the_columns_and_average():
    model = tiny_mlp().double()
    ds = tiny_data(n=40)
    attr = Attributor(model, ce_loss, compressor=Dropout(r=12, seed=1, rotate=True), progress=False)
    tr = attr.featurize(loader(ds))
    qu = attr.compute_features(loader(ds, bs=8))
    parts = member_features(tr, 3, seed=2)
    for name, full in tr.data.items():
        cols = [p.data[name] for p in parts]
        assert sum(c.shape[1] for c in cols) == full.shape[1]                    # equal bytes
        got = torch.sort(torch.cat(cols, 1), dim=1).values
        torch.testing.assert_close(got, torch.sort(full, dim=1).values)         # a partition
    ens = score_ensemble(tr, qu, GaussNewton(), members=3, seed=2)
    assert ens.members.shape == (3, 40, 40)
    one = fit_score(GaussNewton(), parts[0], member_features(qu, 3, seed=2)[0])
    np.testing.assert_allclose(ens.members[0], one, rtol=1e-4, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(ens.mean, ens.members.mean(0), rtol=1e-5, atol=1e-6)
    assert 0 <= ens.topk_stability(5) <= 1 and ens.std.shape == (40, 40) and (ens.std > 0).any()
    same = EnsembleScores(np.stack([ens.members[0]] * 3))
    assert same.topk_stability(5) == 1.0 and float(same.std.max()) == 0.0


def test_choose_damping_recovers_the_noise_level_and_scales():
    g = torch.Generator().manual_seed(0)
    n, r = 60, 200
    u = torch.randn(r, 5, generator=g, dtype=torch.float64)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) @ u.T + 0.3 * torch.randn(n, r, generator=g, dtype=torch.float64)

    class F:
        data = {"w": x}
    lam = choose_damping(F)["w"]
    assert 0.045 < lam < 0.18                      # the isotropic noise variance is 0.09
    F.data = {"w": 10 * x}
    assert choose_damping(F)["w"] == pytest.approx(100 * lam)


def test_gauss_newton_takes_a_per_layer_damping_dict():
    model = tiny_mlp().double()
    ds = tiny_data(n=30)
    attr = Attributor(model, ce_loss, compressor=Dropout(r=8), progress=False)
    tr = attr.featurize(loader(ds))
    rule = {b.layers[0]: b.damping[b.layers[0]] for b in GaussNewton().fit(tr).blocks}
    np.testing.assert_allclose(fit_score(GaussNewton(damping=rule), tr, tr), fit_score(GaussNewton(), tr, tr), rtol=1e-6)
    half = dict(rule, **{"0": 1e3})
    assert not np.allclose(fit_score(GaussNewton(damping=half), tr, tr), fit_score(GaussNewton(), tr, tr))
