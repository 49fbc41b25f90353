"""Conv2d and Embedding fused capture against single-example backward passes; LoGra on them."""

import warnings

import pytest
import torch
from torch import nn

from dropinf import Dropout, Gaussian, Identity, LoGra
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from dropinf.errors import IncompatibleMethodError
from tests.helpers import loop_grads


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.c3 = nn.Conv2d(6, 4, (2, 3), stride=(1, 2))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = self.c3(h)
        return self.fc(h.mean((2, 3)))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.out = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + 0.5 * self.emb(ids.flip(1))    # the same module called twice
        return self.out(torch.tanh(h).sum(1))


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def capture_check(model, batch, comp, track="all"):
    layers = select_layers(model, track)
    comps = {l.name: comp.build(l) for l in layers}
    feats, _ = BatchCapture(model, ce, layers, comps)(batch)
    for l in layers:
        ref = loop_grads(model, ce, batch, l.param_names)
        want = comps[l.name].from_flat(ref)
        torch.testing.assert_close(feats[l.name].double(), want, rtol=1e-5, atol=1e-7 * float(want.abs().max() + 1))
    return layers


@pytest.mark.parametrize("comp", [Dropout(r=30, seed=0), Dropout(r=10_000, seed=1), Identity(), Gaussian(r=7, seed=2)],
                         ids=["dropout", "dropout-all", "identity", "gaussian"])
def test_conv2d_stride_padding_groups_dilation(comp):
    torch.manual_seed(0)
    model = ConvNet().double()
    batch = (torch.randn(4, 3, 9, 8, dtype=torch.float64), torch.randint(0, 5, (4,)))
    layers = capture_check(model, batch, comp)
    assert [u.kind for l in layers for u in l.uses] == ["conv2d", "conv2d", "conv2d", "linear"]


@pytest.mark.parametrize("comp", [Dropout(r=25, seed=0), Identity(), Dropout(r=55, seed=3, scale=True)],
                         ids=["dropout", "identity", "dropout-all-scaled"])
def test_embedding_repeated_tokens_and_padding_idx(comp):
    torch.manual_seed(0)
    model = EmbNet().double()
    ids = torch.tensor([[3, 3, 5, 0, 0], [1, 2, 3, 4, 3], [0, 7, 7, 7, 10]])
    batch = (ids, torch.tensor([0, 2, 1]))
    capture_check(model, batch, comp)
    if isinstance(comp, Identity):  # padding row receives exactly zero
        layers = select_layers(model, "all")
        feats, _ = BatchCapture(model, ce, layers, {l.name: comp.build(l) for l in layers})(batch)
        assert torch.all(feats["emb"][:, :5] == 0)


def test_logra_on_conv2d_and_embedding():
    torch.manual_seed(0)
    model = ConvNet().double()
    batch = (torch.randn(3, 3, 9, 8, dtype=torch.float64), torch.randint(0, 5, (3,)))
    capture_check(model, batch, LoGra(r_in=4, r_out=3), track=["c1", "c3", "fc"])
    with pytest.raises(IncompatibleMethodError, match="grouped"):
        capture_check(model, batch, LoGra(), track=["c2"])
    emb = EmbNet().double()
    capture_check(emb, (torch.tensor([[3, 3, 0], [1, 2, 9]]), torch.tensor([0, 1])), LoGra(r_in=4, r_out=2))


def test_unsupported_module_routes_to_func_fallback_not_missing():
    from dropinf import Attributor
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2)).double()
    with pytest.warns(UserWarning, match=r"\['Conv1d'\] have no fused hook"):
        Attributor(model, ce, track="all")
    layers = select_layers(model, "all")
    assert [l.kind for l in layers] == ["func", "fused"]
    capture_check(model, (torch.randn(3, 2, 6, dtype=torch.float64), torch.tensor([0, 1, 1])), Dropout(r=9))


def test_track_combines_a_type_with_a_name_pattern_and_keeps_model_order():
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(c)
    names = [l.name for l in select_layers(model, [(nn.Linear, "model.layers.*")])]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert not any("norm" in n for n in names)                    # a bare glob would pull the norms in
    assert len(select_layers(model, ["model.layers.*"])) > len(names)
    # items are OR-ed, blocks come in the model's order whatever the order of the items
    names = [l.name for l in select_layers(model, ["lm_head", (nn.Linear, "*.mlp")])]
    assert names[-1] == "lm_head" and names[0] == "model.layers.0.mlp.gate_proj" and len(names) == 7
    from dropinf import ConfigError
    with pytest.raises(ConfigError, match="matches no module"):
        select_layers(model, [(nn.Conv2d, "model.layers.*")])


@pytest.mark.parametrize("groups,stride,pad,dil,flat", [(1, 1, 1, 1, False), (2, 2, 0, 1, False), (1, 1, 2, 2, False),
                                                        (1, 2, 1, 1, True)])
@pytest.mark.parametrize("path", ["columns", "entries", "grouped-backward", "each-backward", "timed-backward"])
def test_conv_never_unfolds_every_patch_for_a_few_entries(groups, stride, pad, dil, flat, path, monkeypatch):
    """Dropout on a conv never unfolds every patch for a few kept entries: it gathers the patch
    columns they touch (or, entry by entry, each kept entry's column) from the padded input, or
    (cheaper when T is large and the weight small) takes every example's weight gradient from the
    convolution library — one grouped backward, one backward per example, or whichever of the two
    the first call timed faster. Every path equals the full unfold's entries and the true
    per-example gradient, groups, strides, dilation and flattened (several images per example)
    calls included."""
    from dropinf.capture import modules
    from dropinf.capture.conv import Patches
    from dropinf.capture.modules import Use, prepare_delta, use_spec
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride, pad, dilation=dil, groups=groups).double()
    B, m = 3, (2 if flat else 1)
    x = torch.randn(B * m, 4, 9, 9, dtype=torch.float64)
    d = torch.randn_like(conv(x))
    spec = use_spec("c", conv, "conv2d", bias_at=conv.weight.numel())
    dim = conv.weight.numel() + conv.bias.numel()
    idx = torch.randperm(dim)[:8].sort().values
    d3 = prepare_delta(spec, d, B)
    full = Use(spec, Patches(spec, x, B).full(), d3).gather(idx, {})
    monkeypatch.setattr(Patches, "grads_cheaper", lambda self, kept: path.endswith("backward"))
    if not path.endswith("backward"):
        monkeypatch.setattr(Patches, "entries", lambda *a: (_ for _ in ()).throw(AssertionError("grouped")))
    if path == "entries":                      # never the batched matmul over distinct rows × columns
        monkeypatch.setattr(modules, "_BMM_RATIO", 0)
        if not flat:                           # one image per example: no patch column gathered twice
            monkeypatch.setattr(Patches, "columns", lambda *a: (_ for _ in ()).throw(AssertionError("columns")))
    monkeypatch.setattr(Patches, "full", lambda self: (_ for _ in ()).throw(AssertionError("unfolded everything")))
    maps = {} if path != "each-backward" else {("c", "grads-way", tuple(x.shape)): "each"}
    partial = Use(spec, Patches(spec, x, B), d3).gather(idx, maps)
    torch.testing.assert_close(partial, full, rtol=1e-12, atol=1e-12)
    if path == "timed-backward":            # the first call chose a way, and the next call takes it
        assert maps[("c", "grads-way", tuple(x.shape))] in ("grouped", "each")
        torch.testing.assert_close(Use(spec, Patches(spec, x, B), d3).gather(idx, maps), full, rtol=1e-12, atol=1e-12)
    want = []                    # per example: the gradient of Σ_images <δ, conv(x)> w.r.t. the weights
    for b in range(B):
        conv.zero_grad()
        (d[b * m:(b + 1) * m] * conv(x[b * m:(b + 1) * m])).sum().backward()
        want.append(torch.cat([conv.weight.grad.reshape(-1), conv.bias.grad])[idx])
    torch.testing.assert_close(partial, torch.stack(want), rtol=1e-10, atol=1e-10)


class SeqNet(nn.Module):
    """Linear layers over positions (B, T, d): LoRA-sized factors whose kept entries reach every row
    and column at a large r (the batched-matmul gather reads δ and a without copying them)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(6, 2, bias=False)
        self.up = nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(self.down(x)) + x).sum(1))


@pytest.mark.parametrize("r", [2, 10, 40], ids=["few", "most", "all"])
def test_linear_over_positions_every_gather_path(r):
    torch.manual_seed(0)
    model = SeqNet().double()
    batch = (torch.randn(5, 7, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    capture_check(model, batch, Dropout(r=r, seed=3))


class WideCNN(nn.Module):
    """Convolutions wide enough that Dropout's kept entries reach many rows × columns (the
    entry-by-entry gather) on few positions, and a stem with many positions and a small weight
    (the library's weight gradient); in-place ReLU after each, a bias on one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2, bias=False)
        self.wide = nn.Conv2d(16, 96, 3, padding=1)
        self.down = nn.Conv2d(96, 48, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(48, 4)

    def forward(self, x):
        h = nn.functional.relu(self.stem(x), inplace=True)
        h = nn.functional.relu(self.wide(h), inplace=True)
        h = nn.functional.relu(self.down(h), inplace=True)
        return self.fc(h.mean((2, 3)))


def test_every_conv_path_row_by_row_in_one_model(monkeypatch):
    """A whole capture whose convolutions take their two paths by cost — the stem its weight
    gradient from the convolution library, the wide layers each kept entry's patch column from
    the padded input — gives every example's own row (against one backward per example)."""
    from dropinf.capture import conv, modules
    used = {"entries": 0, "grads": 0}
    for name, cls, key in (("_conv_entries", modules.Use, "entries"), ("entries", conv.Patches, "grads")):
        orig = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _o=orig, _k=key: (used.__setitem__(_k, used[_k] + 1), _o(*a))[1])
    torch.manual_seed(0)
    model = WideCNN().double()
    batch = (torch.randn(5, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        capture_check(model, batch, Dropout(r=96, seed=4))
    # the fused rows themselves are right: no layer was sent to the torch.func path by the self-check
    assert not [w for w in seen if "torch.func" in str(w.message)], [str(w.message)[:120] for w in seen]
    assert used["entries"] >= 2 and used["grads"] >= 1


def test_a_head_kept_whole_is_its_outer_product_bit_for_bit(monkeypatch):
    """A Linear whose every entry is kept (a small head under the default's head_factor) is written
    as δ ⊗ a at once: the same numbers as gathering both sides, and as the loop's rows."""
    import dropinf.capture.modules as modules
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    layers = select_layers(model, None)
    batch = (torch.randn(6, 20), torch.randint(0, 4, (6,)))
    comps = {l.name: Dropout(r=12, head_factor=8).build(l, output=l.name == "2") for l in layers}
    assert comps["2"].r == comps["2"].dim == 68
    calls = {"whole": 0}
    real = modules._index_maps

    def no_whole(*args):
        maps = real(*args)
        calls["whole"] += maps[5]["whole"]
        maps[5]["whole"] = False
        return maps

    got, _ = BatchCapture(model, ce, layers, comps, check="always")(batch)
    comps = {l.name: Dropout(r=12, head_factor=8).build(l, output=l.name == "2") for l in layers}
    monkeypatch.setattr(modules, "_index_maps", no_whole)
    gathered, _ = BatchCapture(model, ce, layers, comps, check="always")(batch)
    assert calls["whole"] == 1 and torch.equal(got["2"], gathered["2"]) and torch.equal(got["0"], gathered["0"])
    want = loop_grads(model.double(), lambda m, b: ce(m, (b[0].double(), b[1])), batch, ["2.weight", "2.bias"])
    torch.testing.assert_close(got["2"].double(), want, rtol=1e-5, atol=1e-6)
