"""Gaussian random projection (TRAK-style; paper eq. 2): g̃ = P g, P ∈ R^{r×d}, P_ij ~ N(0, 1/r).

P is regenerated from a seed block of ``block`` columns at a time, so it is never held in
memory whole (memory O(r·block) instead of O(r·d)); compute is the paper's O(r·d) per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..options import option
from ..capture.layers import LayerSpec
from .base import LayerCompressorBase, RSpec, check_seed, layer_seed, resolve_r


class GaussianLayer(LayerCompressorBase):
    #: norm-preserving projection: damping is estimated over the full d_l (see Features)
    @property
    def damping_dim(self) -> int:
        return self.dim

    def __init__(self, layer: LayerSpec, r: int, seed: int, block: int):
        self.dim, self.r, self.block = layer.dim, r, block
        self.seed = layer_seed(seed, layer.name, salt=1)

    def block_matrix(self, j: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Columns [j*block, (j+1)*block) of P (r × width), identical on every call."""
        start = j * self.block
        width = min(self.block, self.dim - start)
        g = torch.Generator().manual_seed(self.seed + j)
        p = torch.randn(self.r, width, generator=g) / math.sqrt(self.r)
        return p.to(device=device, dtype=dtype)

    def dense(self) -> torch.Tensor:
        """The whole P (for tests on small layers only)."""
        nb = math.ceil(self.dim / self.block)
        return torch.cat([self.block_matrix(j, torch.device("cpu"), torch.float32) for j in range(nb)], 1)

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.r, device=g.device, dtype=g.dtype)
        for j in range(math.ceil(self.dim / self.block)):
            s = j * self.block
            p = self.block_matrix(j, g.device, g.dtype)
            out.addmm_(g[:, s:s + p.shape[1]], p.T)
        return out


@dataclass(frozen=True)
class Gaussian:
    """Dense Gaussian projection to r dims per tracked layer (r may exceed d_l).

    block: columns of P generated at a time (memory r·block floats).
    """

    r: RSpec = option(64, "r: coordinates kept (dropout) or projection size (gaussian) per layer; under torchrun "
                          "write --size (torchrun mistakes --r for its own options)", flag=("--size", "--r"))
    seed: int = option(0, "seeds the index sets / projections")
    block: int = option(8192, "columns of the projection generated at a time (memory r x block floats)",
                        flag="--gaussian-block")
    kind: str = field(default="gaussian", init=False)

    def __post_init__(self):
        check_seed("Gaussian", self.seed)

    def build(self, layer: LayerSpec) -> GaussianLayer:
        return GaussianLayer(layer, resolve_r(self.r, layer), self.seed, self.block)

    def signature(self) -> dict:
        return {"kind": self.kind, "r": self.r, "seed": self.seed, "block": self.block}
