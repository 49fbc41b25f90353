"""The LDS harness (dropinf.eval.lds) on problems whose answer is known: scores equal to the
ground truth's linear model give LDS 1, random scores ≈ 0; ground truth is cached, resumed after
an interruption, refused for another plan, and the same with worker processes."""

import numpy as np
import pytest

from dropinf.errors import ConfigError
from dropinf.eval.lds import (GroundTruth, build_ground_truth, leave_one_out_masks, lds, load_ground_truth,
                              loo_correlation, random_subsets)

CALLS = []


def linear_train(tau, indices, seed):
    """A 'model' trained on ``indices``: the subset's summed true effects plus seeded noise."""
    CALLS.append((len(indices), seed))
    rng = np.random.default_rng(seed)
    return tau[:, indices].sum(1) + 0.01 * rng.standard_normal(tau.shape[0])


def identity_measure(model):
    return model


def _tau(q=40, n=60, seed=0):
    return np.random.default_rng(seed).standard_normal((q, n))


def test_subsets_have_the_asked_fraction_and_differ():
    m = random_subsets(50, 8, 0.3, seed=1)
    assert m.shape == (8, 50) and (m.sum(1) == 15).all() and len({r.tobytes() for r in m}) == 8
    with pytest.raises(ConfigError):
        random_subsets(50, 8, 1.0)


def test_true_linear_model_gives_lds_one_and_random_scores_about_zero():
    tau = _tau()
    masks = random_subsets(60, 50, 0.5, seed=2)
    truth = GroundTruth(masks, (masks.astype(float) @ tau.T)[:, None, :], (0,))
    assert lds(tau, truth).mean == pytest.approx(1.0)
    assert lds(-tau, truth).mean == pytest.approx(-1.0)          # sign matters: positive = harmful
    assert lds(3.0 * tau + 1.0, truth).mean == pytest.approx(1.0)  # only ranks matter
    rand = lds(np.random.default_rng(5).standard_normal(tau.shape), truth)
    assert abs(rand.mean) < 0.1 and rand.n_defined == 40
    with pytest.raises(ValueError, match="n_query, n_train"):
        lds(tau.T, truth)


def test_build_caches_resumes_and_refuses_another_plan(tmp_path):
    import functools
    tau = _tau(q=5, n=30)
    masks = random_subsets(30, 12, 0.5)
    train = functools.partial(linear_train, tau)
    CALLS.clear()
    gt = build_ground_truth(train, identity_measure, masks, tmp_path, seeds=(0, 1), progress=False)
    assert len(CALLS) == 24 and gt.values.shape == (12, 2, 5)
    assert lds(tau, gt).mean > 0.95
    CALLS.clear()
    again = build_ground_truth(train, identity_measure, masks, tmp_path, seeds=(0, 1), progress=False)
    assert CALLS == [] and np.array_equal(again.values, gt.values)
    (tmp_path / "subset00003_seed1.npy").write_bytes(b"cut short")        # an interrupted write
    (tmp_path / "subset00007_seed0.npy").unlink()
    with pytest.raises(ConfigError, match="2 of 24 retrainings are missing"):
        load_ground_truth(tmp_path)
    build_ground_truth(train, identity_measure, masks, tmp_path, seeds=(0, 1), progress=False)
    assert sorted(CALLS) == [(15, 0), (15, 1)]
    assert np.array_equal(load_ground_truth(tmp_path).values, gt.values)
    with pytest.raises(ConfigError, match="another plan"):
        build_ground_truth(train, identity_measure, random_subsets(30, 12, 0.5, seed=9), tmp_path, progress=False)


def test_worker_processes_give_the_same_ground_truth(tmp_path):
    import functools
    tau = _tau(q=3, n=20)
    masks = random_subsets(20, 4, 0.5)
    train = functools.partial(linear_train, tau)
    one = build_ground_truth(train, identity_measure, masks, tmp_path / "a", progress=False)
    two = build_ground_truth(train, identity_measure, masks, tmp_path / "b", workers=2, progress=False)
    assert np.array_equal(one.values, two.values)


def test_loo_correlation_of_the_true_effects_is_one():
    tau = _tau(q=6, n=25)
    removed = [0, 3, 7, 11, 19, 24]
    masks = leave_one_out_masks(25, removed)
    full = tau.sum(1)
    truth = GroundTruth(masks, (masks.astype(float) @ tau.T)[:, None, :], (0,))
    # leaving i out changes the loss by −τ[q, i]; dropinf predicts −I(q, i)/n, so I = n·τ
    assert loo_correlation(25 * tau, full, truth).mean == pytest.approx(1.0)
    assert loo_correlation(tau, full, truth, method="spearman").mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="leave-one-out"):
        loo_correlation(tau, full, GroundTruth(random_subsets(25, 4), np.zeros((4, 1, 6)), (0,)))
