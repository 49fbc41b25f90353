import numpy as np
import pytest
import torch

from dropinf import Attributor, ConfigError, Dropout, Gaussian, Identity
from dropinf.capture.layers import LayerSpec
from dropinf.compress.dropout import sample_indices
from tests.helpers import ce_loss, loader, tiny_data, tiny_mlp


def _scores(compressor, seed=0, **kw):
    model = tiny_mlp(seed=seed).double()
    ds = tiny_data()
    attr = Attributor(model, ce_loss, compressor=compressor, progress=False, **kw)
    attr.featurize(loader(ds))
    return attr, attr.score(loader(ds, bs=7))


def test_dropout_with_all_coordinates_equals_orig():
    from dropinf import GaussNewton
    _, orig = _scores(Identity(), estimator=GaussNewton())
    _, drop = _scores(Dropout(r=10_000, seed=3), estimator=GaussNewton())
    np.testing.assert_allclose(drop, orig, rtol=1e-5, atol=1e-5 * np.abs(orig).max())


@pytest.mark.parametrize("est,invariant", [("gn", True), ("datainf", True), ("exact0", True), ("graddot", False),
                                           ("lissa", False)])
def test_what_dropout_scale_does_per_estimator(est, invariant):
    """As the README documents: scale=True leaves GaussNewton, DataInf and undamped ExactHessian
    scores unchanged and changes GradDot's and LiSSA's (the √(d_l/r_l) factor differs by layer)."""
    from dropinf import DataInf, ExactHessian, GaussNewton, GradDot, LiSSA
    make = {"gn": GaussNewton, "datainf": DataInf, "graddot": GradDot, "lissa": LiSSA,
            "exact0": lambda: ExactHessian(damping=0.0)}[est]
    _, plain = _scores(Dropout(r=12, seed=1), estimator=make())
    _, scaled = _scores(Dropout(r=12, seed=1, scale=True), estimator=make())
    same = np.allclose(scaled, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
    assert same == invariant


def test_same_seed_bit_identical_different_seed_differs():
    a1, s1 = _scores(Dropout(r=8, seed=5))
    a2, s2 = _scores(Dropout(r=8, seed=5))
    assert np.array_equal(s1, s2)
    a3, s3 = _scores(Dropout(r=8, seed=6))
    for name in a1.compressors:
        assert torch.equal(a1.compressors[name].indices, a2.compressors[name].indices)
        assert not torch.equal(a1.compressors[name].indices, a3.compressors[name].indices)
    assert not np.allclose(s1, s3)


def test_sample_indices_distinct_sorted_in_range():
    for dim, r in [(10, 3), (1000, 999), (50, 50), (5, 10), (1 << 25, 100)]:
        idx = sample_indices(dim, r, seed=1)
        assert idx.numel() == min(dim, r)
        assert torch.unique(idx).numel() == idx.numel()
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < dim


def test_gaussian_blocks_equal_dense_projection_and_variance():
    spec = LayerSpec("x", "func", ("x.w",), ((300,),))
    layer = Gaussian(r=64, seed=2, block=37).build(spec)
    p = layer.dense()
    assert p.shape == (64, 300)
    assert abs(float(p.var()) - 1 / 64) < 0.1 / 64
    g = torch.randn(5, 300)
    torch.testing.assert_close(layer.from_flat(g), g @ p.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.from_flat(g), layer.from_flat(g))  # regenerated identically


def test_r_dict_and_bad_r():
    from dropinf.errors import ConfigError
    _, s = _scores(Dropout(r={"0": 5, "*": 7}))
    assert s.shape == (48, 48)
    with pytest.raises(ConfigError, match="no entry for tracked layer"):
        _scores(Dropout(r={"0": 5}))
    with pytest.raises(ConfigError, match="positive int"):
        _scores(Dropout(r=0))


def test_head_factor_keeps_more_of_the_output_layer_only():
    """Dropout(head_factor=k): the model's output layer (the last Linear here) keeps k × r coordinates,
    capped at its size, with the same rows as naming it in an r dict; other layers keep r; a dict that
    names the head wins; the factor is in the signature (absent at 1, as before it existed)."""
    model = tiny_mlp(hidden=40).double()                 # layers "0": 6·40+40 = 280, "2": 40·3+3 = 123
    ds = loader(tiny_data())
    feats = lambda comp: Attributor(model, ce_loss, compressor=comp, progress=False).compute_features(ds)
    f = feats(Dropout(r=16, seed=1, head_factor=4))
    assert f.signature["output_layer"] == "2" and {n: f.layer_r(n) for n in f.layer_names()} == {"0": 16, "2": 64}
    same = feats(Dropout(r={"*": 16, "2": 64}, seed=1))
    for n in ("0", "2"):
        torch.testing.assert_close(f.data[n], same.data[n], rtol=0, atol=0)
    assert feats(Dropout(r=16, head_factor=100)).layer_r("2") == 123
    assert feats(Dropout(r={"*": 16, "2": 8}, head_factor=4)).layer_r("2") == 8
    assert Dropout(head_factor=4).signature()["head_factor"] == 4 and "head_factor" not in Dropout().signature()
    with pytest.raises(ConfigError, match="head_factor"):
        Dropout(head_factor=0)


def test_gaussian_keeps_its_projection_between_batches_without_changing_numbers():
    from dropinf import Gaussian
    from dropinf.capture.engine import BatchCapture
    from dropinf.capture.layers import select_layers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    batches = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    layers = select_layers(model, None)
    rows = {}
    for cache in (256.0, 0.0):
        comps = {l.name: Gaussian(r=8, seed=1, block=40, cache_mb=cache).build(l) for l in layers}
        cap = BatchCapture(model, loss, layers, comps)
        rows[cache] = [cap(b)[0] for b in batches]
        blocks = {n: -(-c.dim // c.block) for n, c in comps.items()}
        if cache:      # each block generated once per device/dtype, the self-check included
            assert all(comps[n].generated == blocks[n] for n in comps), ({n: c.generated for n, c in comps.items()}, blocks)
        else:
            assert all(comps[n].generated > 3 * blocks[n] for n in comps)
    for a, b in zip(rows[256.0], rows[0.0]):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_gaussian_hash_generator_is_a_counter_based_normal_stream():
    from dropinf.compress import from_signature
    from dropinf.compress.gaussian import hash_normal
    z = hash_normal(11, 0, 256, 2048, "cpu")
    assert z.dtype == torch.float64 and z.shape == (256, 2048)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.003          # normal tails, not uniform ones
    # independent of neighbours, other blocks and other seeds
    for other in (z[:, 1:].flatten(), hash_normal(11, 1, 256, 2048, "cpu").flatten()[:-256],
                  hash_normal(12, 0, 256, 2048, "cpu").flatten()[:-256]):
        assert abs(float(torch.corrcoef(torch.stack([z[:, :-1].flatten(), other]))[0, 1])) < 0.01
    assert torch.equal(z, hash_normal(11, 0, 256, 2048, "cpu"))                  # a function of its counters
    spec = LayerSpec("x", "func", ("x.w",), ((300,),))
    comp = Gaussian(r=64, seed=2, block=37, generator="hash")
    layer = comp.build(spec)
    p = layer.dense()
    assert abs(float(p.var()) - 1 / 64) < 0.1 / 64
    assert not torch.allclose(p, Gaussian(r=64, seed=2, block=37).build(spec).dense())
    g = torch.randn(5, 300)
    torch.testing.assert_close(layer.from_flat(g), g @ p.T, rtol=1e-5, atol=1e-5)
    # the generator is part of the signature; a store written before the option reads as "cpu"
    assert from_signature(comp.signature()) == comp
    assert from_signature(Gaussian(r=64, seed=2, block=37).signature()).generator == "cpu"
    with pytest.raises(Exception, match="'cpu' or 'hash'"):
        Gaussian(generator="philox")
