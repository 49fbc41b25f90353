"""Identity compressor: no compression at all ("Orig" in the paper, eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture.layers import LayerSpec
from .base import LayerCompressorBase, linear_grad


class _IdentityLayer(LayerCompressorBase):
    def __init__(self, dim: int):
        self.dim = self.r = dim

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def from_linear(self, a, delta, has_bias):
        return linear_grad(a, delta, has_bias)


@dataclass(frozen=True)
class Identity:
    """Keep the full per-example gradient of every tracked layer (r_l = d_l)."""

    kind = "identity"

    def build(self, layer: LayerSpec) -> _IdentityLayer:
        return _IdentityLayer(layer.dim)

    def signature(self) -> dict:
        return {"kind": self.kind}
