"""Capture on the architectures people use, against a loop of single-example backward passes.

torchvision's models (resnet18, vgg11, vit) are re-implemented module for module in
dropinf_experiments.models.vision — the same module types in the same order, in-place ReLUs and
in-place residual adds included, BatchNorm in eval — used here at smaller widths: PyPI's
torchvision wheels link libtorch_cuda and cannot load beside the CPU torch this project pins. The patterns that broke capture
are the same: Linear/Conv2d → ReLU(inplace=True) (VGG), conv-BN-ReLU(inplace) with `out +=
identity` (ResNet), nn.MultiheadAttention whose out_proj is applied functionally (Transformer,
ViT). Every test uses the default ``track`` unless it says otherwise.
"""

import pytest
import torch
from torch import nn

from dropinf import Attributor, CaptureError, Dropout, GaussNewton, Identity
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from dropinf_experiments.models.vision import ResNet18, TinyViT, TransformerClassifier, VGG11
from tests.helpers import loop_grads


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def check_against_loop(model, batch, track=None, compressor=None, rtol=1e-5, expect_func=()):
    model.eval()
    layers = select_layers(model, track)
    assert {l.name for l in layers if l.kind == "func"} == set(expect_func)
    compressor = compressor or Dropout(r=40, seed=1)
    comps = {l.name: compressor.build(l) for l in layers}
    feats, _ = BatchCapture(model, ce, layers, comps, check="always")(batch)
    for l in layers:
        want = comps[l.name].from_flat(loop_grads(model, ce, batch, l.param_names))
        torch.testing.assert_close(feats[l.name].double(), want.double(), rtol=rtol, atol=rtol * want.abs().max(),
                                   msg=lambda m: f"layer {l.name}: {m}")
    return layers


def images(b, c=3, s=32, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


def randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("track", [None, [nn.Conv2d, nn.Linear]], ids=["default", "conv+linear"])
def test_resnet18_bn_eval_inplace_relu_and_residual(track):
    torch.manual_seed(0)
    model = ResNet18().double()
    randomize_bn(model)
    layers = check_against_loop(model, images(3), track)
    assert len(layers) == (1 if track is None else 21)
    if track is not None:    # rotated dropout through the same hooks, both ways (see RotatedDropoutLayer.path)
        from dropinf.compress.rotated import RotatedDropoutLayer
        for path in ("rotate", "full"):
            RotatedDropoutLayer.path = path
            try:
                check_against_loop(model, images(2), track, compressor=Dropout(r=40, seed=1, rotate=True))
            finally:
                RotatedDropoutLayer.path = "auto"


@pytest.mark.parametrize("track", [None, [nn.Conv2d, nn.Linear]], ids=["default", "conv+linear"])
def test_vgg11_linear_and_conv_followed_by_inplace_relu(track):
    torch.manual_seed(0)
    model = VGG11().double()
    check_against_loop(model, images(4), track, compressor=Dropout(r=60, seed=2))
    check_against_loop(model, images(3), track, compressor=Identity())


def test_transformer_encoder_default_track_routes_out_proj_to_torch_func():
    torch.manual_seed(0)
    model = TransformerClassifier().double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 30, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g))
    out_proj = {f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)}
    layers = check_against_loop(model, batch, expect_func=out_proj)
    assert {l.name for l in layers} >= out_proj | {"head", "encoder.layers.0.linear1"}
    # the whole attention block, in_proj included, with track="all"
    check_against_loop(model, batch, track="all",
                       expect_func={l.name for l in select_layers(model, "all") if l.kind == "func"})


def test_vit_with_multihead_attention():
    torch.manual_seed(0)
    model = TinyViT().double()
    batch = images(3, s=8, classes=4)
    check_against_loop(model, batch, track=[nn.Conv2d, nn.Linear],
                       expect_func={f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)})
    check_against_loop(model, batch, track=[nn.Conv2d, nn.Linear], compressor=Dropout(r=40, seed=1, rotate=True),
                       expect_func={f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)})


def test_functional_use_of_a_tracked_weight_goes_to_torch_func():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):     # b's weight applied without calling b: its hook never fires
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)

    torch.manual_seed(0)
    model = Sneaky().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    attr = Attributor(model, ce, compressor=Identity(), progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    with pytest.warns(UserWarning, match=r"layer 'b' \(Linear\) is captured through torch.func.*never ran"):
        feats = attr.compute_features(loader)
    torch.testing.assert_close(feats.data["b"].double(), loop_grads(model, ce, (x, y), ["b.weight", "b.bias"]))


def test_input_modified_in_place_after_the_call_is_explained():
    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            h = x * 1.0
            out = self.a(h)
            h.mul_(2.0)               # the saved input no longer holds what the layer saw
            return out

    model = Mutates().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    layers = select_layers(model)
    comps = {l.name: Identity().build(l) for l in layers}
    # torch's own backward needs that input too: a plain backward fails, and capture says why
    with pytest.raises(CaptureError, match="in-place operation .* clone it"):
        BatchCapture(model, ce, layers, comps)((x, y))


def test_attribution_end_to_end_on_vgg_matches_torch_func_path():
    """Fused (hooks inside the backward) and torch.func features give the same scores."""
    torch.manual_seed(0)
    model = VGG11().double().eval()
    x, y = images(12)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    from dropinf import CaptureOptions
    fused = Attributor(model, ce, compressor=Dropout(r=30), estimator=GaussNewton(), progress=False)
    fused.featurize(dl)
    func = Attributor(model, ce, compressor=Dropout(r=30), estimator=GaussNewton(), progress=False,
                      options=CaptureOptions(fused=False))
    func.featurize(dl)
    torch.testing.assert_close(torch.from_numpy(fused.score(dl)), torch.from_numpy(func.score(dl)),
                               rtol=1e-4, atol=1e-6)


class Ckpt(nn.Module):
    """torch.utils.checkpoint written into the forward, re-entrant or not."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = torch.tanh(self.a(x))
        h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_manual_torch_checkpoint_both_ways(reentrant):
    """torch.utils.checkpoint written into the model's forward: re-entrant checkpointing refuses
    torch.autograd.grad, so capture falls back to .backward() (restoring every .grad)."""
    torch.manual_seed(0)
    model = Ckpt(reentrant).double()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_loop(model, (x, y))
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())     # untouched


def test_output_layer_in_plain_models():
    """capture.layers.output_layer: the tracked block of the last module registering parameters (a
    parametrized head included), None when that module is frozen or not tracked."""
    from dropinf.capture.layers import output_layer
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert output_layer(mlp, select_layers(mlp)) == "2"
    assert output_layer(mlp, select_layers(mlp, ["0"])) is None
    net = ResNet18(width=8, classes=3)
    assert output_layer(net, select_layers(net, [nn.Conv2d, nn.Linear])) == "fc"
    normed = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(8, 3)))
    spec = select_layers(normed, "all")[-1]
    assert output_layer(normed, select_layers(normed, "all")) == spec.name
    mlp[2].requires_grad_(False)
    assert output_layer(mlp, select_layers(mlp)) is None
