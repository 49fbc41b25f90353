"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (idx .gz files, MIT)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .packages import MissingDataError

DEFAULT = "/usr/share/datasets/fashion-mnist"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) float32 standardised, labels (N,) int64); split 'train' or 'test'."""
    folder = Path(os.environ.get("DROPINF_FASHION_MNIST", DEFAULT))
    prefix = "train" if split == "train" else "t10k"
    img, lab = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise MissingDataError(f"Fashion-MNIST not found in {folder}: install Debian's package with "
                               f"`apt-get install -y dataset-fashion-mnist` (bash run.sh does this when it can), "
                               f"or point DROPINF_FASHION_MNIST at a folder holding the four idx .gz files.")
    x = torch.tensor(_idx(img), dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - 0.2860) / 0.3530
    return x, torch.tensor(_idx(lab), dtype=torch.long)
