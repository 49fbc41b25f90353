"""The capture-only backward (capture.hooks, Round.leaves): on batches that are not self-checked
no weight gradient is computed, and every row is bit for bit the row the full backward gives —
on the architectures and layouts of the rest of this folder, with every compressor."""

import warnings

import pytest
import torch
from torch import nn

from dropinf import Dropout, Gaussian, Identity, LoGra
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from dropinf.capture.tokens import TokenCapture
from dropinf_experiments.models.vision import ResNet18, TransformerClassifier, VGG11
from tests.capture.test_layouts import (Emb, Flattened, SeqFirstEncoder, SeqFirstRNN, autocast_ce, ce, feats,
                                        tokens)


def _batches(make, n=3):
    return [make(seed) for seed in range(n)]


def _session(model, loss, batches, track, compressor, lean: bool):
    layers = select_layers(model, track)
    comps = {l.name: compressor.build(l) for l in layers}
    cap = BatchCapture(model, loss, layers, comps, check="first")
    cap._lean = lean
    calls = {"weight grads": 0}
    handles = [p.register_hook(lambda g: calls.__setitem__("weight grads", calls["weight grads"] + 1))
               for n in cap.fused_names for p in [cap._params[n]]]
    out = []
    try:
        for i, b in enumerate(batches):
            before = calls["weight grads"]
            rows, losses = cap(b)
            out.append((rows, losses, calls["weight grads"] - before))
    finally:
        for h in handles:
            h.remove()
    return out, cap


def assert_lean_equals_full(model, loss, batches, track=None, compressor=None):
    model.eval()
    compressor = compressor or Dropout(r=24, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = _session(model, loss, batches, track, compressor, lean=False)
        lean, cap = _session(model, loss, batches, track, compressor, lean=True)
    assert cap.fused_names, "nothing fused: the case tests nothing"
    for i, ((fr, fl, _), (lr, ll, weight_grads)) in enumerate(zip(full, lean)):
        assert torch.equal(fl, ll)
        for name in fr:
            assert torch.equal(fr[name], lr[name]), f"batch {i}, layer {name}: rows differ"
        if i > 0:          # batch 0 is self-checked (full backward); the others are capture-only
            assert weight_grads == 0, f"batch {i}: {weight_grads} weight gradients computed"
    return cap


def _rows(batch, dtype=torch.float64):
    x, y = batch
    return x[:, 0].to(dtype), y


def _images(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 5, (b,), generator=g)


CASES = {
    "mlp-inplace-relu": lambda: (nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)).double(),
                                 ce, lambda s: _rows(feats(5, 1, 6, seed=s)), None),
    "resnet18-conv": lambda: (ResNet18().double(), ce, _images, [nn.Conv2d, nn.Linear]),
    "vgg11-conv": lambda: (VGG11().double(), ce, _images, [nn.Conv2d, nn.Linear]),
    "encoder-seq-first": lambda: (SeqFirstEncoder().double(), ce, lambda s: tokens(4, 6, seed=s), "all"),
    "encoder-batch-first": lambda: (TransformerClassifier().double(), ce, lambda s: tokens(4, 6, V=30, seed=s), "all"),
    "lstm-seq-first": lambda: (SeqFirstRNN(nn.LSTM).double(), ce, lambda s: feats(3, 5, 5, seed=s), "all"),
    "flattened": lambda: (Flattened().double(), ce, lambda s: feats(4, 3, 4, seed=s), "all"),
    "embedding": lambda: (Emb().double(), ce, lambda s: tokens(4, 5, seed=s), "all"),
    "autocast-bf16": lambda: (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), autocast_ce,
                              lambda s: _rows(feats(6, 1, 8, seed=s), torch.float32), "all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_capture_only_backward_gives_the_same_rows_bit_for_bit(case):
    torch.manual_seed(0)
    model, loss, make, track = CASES[case]()
    assert_lean_equals_full(model, loss, _batches(make), track)


@pytest.mark.parametrize("compressor", [Identity(), Gaussian(r=16, seed=1), LoGra(3, 2, seed=1),
                                        Dropout(r=20, seed=1, rotate=True)], ids=["identity", "gaussian", "logra",
                                                                                   "rotated"])
def test_every_compressor(compressor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batches = [(feats(5, 1, 6, seed=s)[0][:, 0], torch.randint(0, 3, (5,))) for s in range(3)]
    assert_lean_equals_full(model, ce, batches, compressor=compressor)


def test_hf_lora_model():
    peft = pytest.importorskip("peft")
    from tests.capture.test_hf_models import BUILD, LORA_TARGETS, padded_batch
    build, loss, labels = BUILD["llama"]
    torch.manual_seed(0)
    model = peft.get_peft_model(build("eager"), peft.LoraConfig(r=2, target_modules=LORA_TARGETS["llama"]))
    batches = [padded_batch([5, 3, 4], seed=s, labels=labels) for s in range(3)]
    assert_lean_equals_full(model, loss, batches, track="lora")


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_both_ways(reentrant):
    """Re-entrant checkpointing hides the segment from autograd.grad: the session keeps the full
    .backward(); non-re-entrant checkpointing gets the capture-only backward."""
    from tests.capture.test_architectures import Ckpt
    torch.manual_seed(0)
    model = Ckpt(reentrant).double()
    batches = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    if reentrant:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, cap = _session(model, ce, batches, None, Dropout(r=6), lean=True)
        assert cap._backward_mode == "backward" and all(w > 0 for _, _, w in out)
    else:
        assert_lean_equals_full(model, ce, batches)


def test_a_module_the_capture_only_backward_misses_sends_the_session_back_to_full():
    """A module that fired on the checked batch but not on a capture-only one (here: skipped for
    this batch) cannot be told apart from one hidden from the leaf: the batch is redone in full."""
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
            self.skip = False

        def forward(self, x):
            h = x if self.skip else torch.tanh(self.a(x))
            return self.b(h)

    torch.manual_seed(0)
    model = Skip().double()
    layers = select_layers(model, None)
    comps = {l.name: Dropout(r=4).build(l) for l in layers}
    cap = BatchCapture(model, ce, layers, comps, check="first")
    b = (torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))
    cap(b)
    model.skip = True
    rows, _ = cap(b)
    assert not cap._lean and float(rows["a"].abs().sum()) == 0.0


def test_token_level_capture_only_backward_is_bit_identical():
    torch.manual_seed(0)
    model = TransformerClassifier().double().eval()

    def per_token(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y, reduction="none")[:, None].expand(-1, 2) * torch.tensor([1.0, 2.0])

    layers = select_layers(model, ["head", "encoder.layers.*.linear*", "emb"])
    comps = {l.name: Dropout(r=8, seed=1).build(l) for l in layers}
    batches = [tokens(3, 5, V=30, seed=s) for s in range(2)]
    got = [TokenCapture(model, per_token, layers, comps).tokens(b)[0] for b in batches]
    lean = TokenCapture(model, per_token, layers, comps)
    weight_grads = []
    hooks = [lean._params[n].register_hook(lambda g: weight_grads.append(1)) for n in lean.fused_names]
    for i, (b, want) in enumerate(zip(batches, got)):
        weight_grads.clear()
        rows = lean.tokens(b)[0]
        for name in want:
            assert torch.equal(rows[name], want[name])
        assert (len(weight_grads) == 0) == (i > 0)      # the second batch is capture-only
    for h in hooks:
        h.remove()
