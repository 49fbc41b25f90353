"""A small MLP classifier and a deterministic full-batch trainer."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-example cross-entropy, shape (B,)."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 300,
                     lr: float = 1e-2, weight_decay: float = 1e-4) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        ce_loss(model, (x, y)).mean().backward()
        opt.step()
    model.eval()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())
