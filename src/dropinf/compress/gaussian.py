"""Gaussian random projection (TRAK-style; paper eq. 2): g̃ = P g, P ∈ R^{r×d}, P_ij ~ N(0, 1/r).

P is generated from a seed block of ``block`` columns at a time (torch's CPU generator, so the
same P on every machine and device); the blocks are kept, on the device and in the dtype they are
used in, while this layer's cache stays under ``cache_mb`` — then a layer whose P fits is
generated once per capture (the self-check reuses it) and costs the paper's O(r·d) arithmetic per
example alone. Beyond the cap the remaining blocks are regenerated per batch (memory O(r·block)),
and generating r·d normals per batch then dominates: at a 1.4 B-parameter model's scale that is
the paper's point that Gaussian projection does not scale.
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

    def __init__(self, layer: LayerSpec, r: int, seed: int, block: int, cache_mb: float = 256.0):
        self.dim, self.r, self.block = layer.dim, r, block
        self.seed = layer_seed(seed, layer.name, salt=1)
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0
        self.generated = 0                  # blocks generated so far (tests, benchmarks)

    def block_matrix(self, j: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Columns [j*block, (j+1)*block) of P (r × width), identical on every call."""
        key = (str(device), dtype, j)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        start = j * self.block
        width = min(self.block, self.dim - start)
        g = torch.Generator().manual_seed(self.seed + j)
        p = (torch.randn(self.r, width, generator=g) / math.sqrt(self.r)).to(device=device, dtype=dtype)
        self.generated += 1
        nbytes = p.numel() * p.element_size()
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[key] = p
            self._cached_bytes += nbytes
        return p

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
    cache_mb: MiB of each layer's P kept between batches (numbers unchanged; see the module docstring).
    """

    r: RSpec = option(64, "r: coordinates kept (dropout) or projection size (gaussian) per layer; under torchrun "
                          "write --size (torchrun mistakes --r for its own options)", flag=("--size", "--r"))
    seed: int = option(0, "seeds the index sets / projections")
    block: int = option(8192, "columns of the projection generated at a time (memory r x block floats)",
                        flag="--gaussian-block")
    cache_mb: float = option(256.0, "gaussian: MiB of each layer's projection kept between batches (the rest is "
                                    "regenerated per batch); does not change the numbers")
    kind: str = field(default="gaussian", init=False)

    def __post_init__(self):
        check_seed("Gaussian", self.seed)

    def build(self, layer: LayerSpec) -> GaussianLayer:
        return GaussianLayer(layer, resolve_r(self.r, layer), self.seed, self.block, self.cache_mb)

    def signature(self) -> dict:
        return {"kind": self.kind, "r": self.r, "seed": self.seed, "block": self.block}
