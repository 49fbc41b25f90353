"""A ResNet-9-style CNN (Page's DAWNBench design) with a width knob, for 28×28 grey images."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


def resnet9(width: int = 8, classes: int = 10, in_channels: int = 1, seed: int = 0) -> nn.Sequential:
    """prep(w) → 2w, pool, res → 4w, pool → 8w, pool, res → global max pool → linear."""
    torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        conv_bn(in_channels, w),
        conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
        conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )


def train_cnn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 0.05,
              batch_size: int = 64, seed: int = 0, progress: bool = False) -> nn.Module:
    """SGD with momentum and a linear-decay schedule (the paper's ResNet-9 recipe, Table 8)."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / steps))
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in tqdm(range(0, len(x), batch_size), desc=f"train epoch {ep + 1}", disable=not progress, leave=False):
            idx = perm[s:s + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(x[s:s + 512]).argmax(-1) for s in range(0, len(x), 512)]).eq(y).float().mean())
