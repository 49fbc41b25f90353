"""Entry point used by the store tests through the CLI (`dropinf featurize tests.store.fixture:build`)."""

import os
import time

import torch
from torch import nn


def loss_fn(model, batch):
    delay = float(os.environ.get("DROPINF_FIXTURE_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    model = model.to(os.environ.get("DROPINF_FIXTURE_DEVICE", "cpu"))        # tests/test_cuda.py: cuda
    g = torch.Generator().manual_seed(1)
    n = int(os.environ.get("DROPINF_FIXTURE_N", "230"))
    x = torch.randn(n + 20, 12, generator=g)
    y = torch.randint(0, 4, (n + 20,), generator=g)
    ds = torch.utils.data.TensorDataset
    from dropinf.measures import margin
    return {"model": model, "loss_fn": loss_fn, "train": ds(x[:n], y[:n]), "query": ds(x[n:], y[n:]),
            "batch_size": 16, "measures": {"margin": margin(lambda m, b: (m(b[0]), b[1]))},
            "label_names": ["north", "east", "south", "west"], "predict": lambda m, b: m(b[0]).argmax(1)}
