"""sklearn's bundled datasets (no network) with a share of training labels flipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class NoisySplit:
    x_train: torch.Tensor
    y_train: torch.Tensor      # possibly flipped labels (what the model is trained on)
    y_clean: torch.Tensor      # true labels
    flipped: np.ndarray        # bool (n_train,)
    x_val: torch.Tensor
    y_val: torch.Tensor        # clean
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int


def flip_labels(y: np.ndarray, frac: float, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace the label of a random `frac` of examples with a different class, uniformly."""
    n = len(y)
    idx = rng.choice(n, size=int(round(frac * n)), replace=False)
    y2 = y.copy()
    y2[idx] = (y[idx] + rng.integers(1, classes, size=len(idx))) % classes
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return y2, mask


def noisy_digits(n_train: int = 1000, n_val: int = 300, flip: float = 0.2, seed: int = 0) -> NoisySplit:
    """sklearn digits (1,797 8×8 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    x, y = x[perm] / 16.0, y[perm]
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    y_noisy, mask = flip_labels(y[tr], flip, 10, rng)
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    lab = lambda a: torch.tensor(a, dtype=torch.long)
    return NoisySplit(t(x[tr]), lab(y_noisy), lab(y[tr]), mask, t(x[va]), lab(y[va]), t(x[te]), lab(y[te]), 10)
