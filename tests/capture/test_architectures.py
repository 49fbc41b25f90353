"""Capture on the architectures people use, against a loop of single-example backward passes.

torchvision's models (resnet18, vgg11, vit) are re-implemented here module for module — the same
module types in the same order, in-place ReLUs and in-place residual adds included, BatchNorm in
eval — at smaller widths: PyPI's torchvision wheels link libtorch_cuda and cannot load beside the
CPU torch this project pins (see the closing note of issue 10). The patterns that broke capture
are the same: Linear/Conv2d → ReLU(inplace=True) (VGG), conv-BN-ReLU(inplace) with `out +=
identity` (ResNet), nn.MultiheadAttention whose out_proj is applied functionally (Transformer,
ViT). Every test uses the default ``track`` unless it says otherwise.
"""

import pytest
import torch
from torch import nn

from dropinf import Attributor, CaptureCheckError, Dropout, GaussNewton, Identity
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
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


# ------------------------------------------------------------------ torchvision-style models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layout (stem, 4 stages of 2 BasicBlocks, avgpool, fc)."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, w in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG11(nn.Module):
    """torchvision.models.vgg11's layout: conv → ReLU(inplace) stacks, avgpool, classifier
    Linear → ReLU(inplace) → Dropout → Linear → ReLU(inplace) → Dropout → Linear."""

    def __init__(self, width=4, hidden=32, classes=5):
        super().__init__()
        cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v * width, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v * width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(cin * 4, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=30, d=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class TinyViT(nn.Module):
    """torchvision ViT's pieces: Conv2d patch embedding, class token, position embedding,
    encoder blocks with nn.MultiheadAttention, LayerNorm, Linear head."""

    def __init__(self, d=16, patch=4, size=8, classes=4):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.heads = nn.Linear(d, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.heads(self.ln(self.encoder(x))[:, 0])


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


def test_functional_use_of_a_tracked_weight_is_refused_by_the_self_check():
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
    attr = Attributor(model, ce, compressor=Dropout(r=8), progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    with pytest.raises(CaptureCheckError, match=r"layer 'b'.*never ran.*fused=False"):
        attr.featurize(loader)


def test_input_modified_in_place_after_the_call_is_refused():
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
    comps = {l.name: Dropout(r=8).build(l) for l in layers}
    with pytest.raises((CaptureCheckError, RuntimeError), match="in place|inplace"):
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


@pytest.mark.parametrize("reentrant", [True, False])
def test_manual_torch_checkpoint_both_ways(reentrant):
    """torch.utils.checkpoint written into the model's forward: re-entrant checkpointing refuses
    torch.autograd.grad, so capture falls back to .backward() (restoring every .grad)."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=reentrant)
            return self.c(h)

    torch.manual_seed(0)
    model = Ckpt().double()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_loop(model, (x, y))
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())     # untouched
