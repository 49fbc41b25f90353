"""Identity compressor: no compression at all ("Orig" in the paper, eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture.layers import LayerSpec
from .base import LayerCompressorBase


class _IdentityLayer(LayerCompressorBase):
    def __init__(self, dim: int):
        self.dim = self.r = dim

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        return g


@dataclass(frozen=True)
class Identity:
    """Keep the full per-example gradient of every tracked layer (r_l = d_l)."""

    kind = "identity"

    def build(self, layer: LayerSpec, output: bool = False) -> _IdentityLayer:
        return _IdentityLayer(layer.dim)

    def signature(self) -> dict:
        return {"kind": self.kind}
