"""Gaussian random projection (TRAK-style; paper eq. 2): g̃ = P g, P ∈ R^{r×d}, P_ij ~ N(0, 1/r).

P is generated ``block`` columns at a time, the same P on every machine and device, by one of two
generators (``Gaussian(generator=...)``, recorded in the signature):

* ``"cpu"`` (default): torch's CPU generator seeded per block, then copied to the device — fast on
  a CPU, but on a GPU every block not cached crosses the host-device link;
* ``"hash"``: counter-based — each entry is a function of (layer seed, block, position) alone (a
  32-bit integer hash, lowbias32, applied twice, then the normal quantile function), computed on
  the device where it is used with integer tensor ops. Nothing is copied and any block can be
  made anywhere in any order; on a CPU it costs about 30× ``"cpu"``'s generation. Device float
  rounding aside, CPU and GPU give the same P.

The blocks are kept, on the device and in the dtype they are used in, while this layer's cache
stays under ``cache_mb`` — then a layer whose P fits is
generated once per capture (the self-check reuses it) and costs the paper's O(r·d) arithmetic per
example alone. Beyond the cap the remaining blocks are regenerated per batch (memory O(r·block)),
and generating r·d normals per batch then dominates: at a 1.4 B-parameter model's scale that is
the paper's point that Gaussian projection does not scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import ConfigError
from ..options import option
from ..capture.layers import LayerSpec
from .base import LayerCompressorBase, RSpec, check_seed, layer_seed, resolve_r


class GaussianLayer(LayerCompressorBase):
    #: norm-preserving projection: damping is estimated over the full d_l (see Features)
    @property
    def damping_dim(self) -> int:
        return self.dim

    def __init__(self, layer: LayerSpec, r: int, seed: int, block: int, cache_mb: float = 256.0,
                 generator: str = "cpu"):
        self.dim, self.r, self.block, self.generator = layer.dim, r, block, generator
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
        if self.generator == "hash":
            p = (hash_normal(self.seed, j, self.r, width, device) / math.sqrt(self.r)).to(dtype)
        else:
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


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 tensors holding 32-bit values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' integer hash; a bijection of 32-bit values)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_normal(seed: int, block: int, rows: int, width: int, device) -> torch.Tensor:
    """Standard normals (rows × width, float64) of a counter-based stream: entry (i, k) of block
    ``block`` depends only on (seed, block, i·width + k), computed on ``device`` — two rounds of a
    32-bit hash give 24 uniform bits, mapped through the normal quantile function."""
    if rows * width >= 2**32:
        raise ConfigError(f"Gaussian(generator='hash'): a block of {rows} x {width} entries exceeds the 2^32 "
                          "counter; lower `block`")
    device = torch.device(device)
    k1 = int(_hash32(torch.tensor([(seed ^ (seed >> 32)) & _MASK32]))[0])
    k2 = int(_hash32(torch.tensor([(k1 + 0x9E3779B9 * (block + 1)) & _MASK32]))[0])
    u = _hash32(_hash32(torch.arange(rows * width, device=device, dtype=torch.int64) ^ k1) ^ k2)
    # the top 24 bits, centred in their cell: u ∈ (0, 1), so the quantile is finite (|z| < 5.4)
    f = ((u >> 8).to(torch.float64) + 0.5) * 2.0 ** -24
    return torch.special.ndtri(f).reshape(rows, width)


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
    generator: Literal["cpu", "hash"] = option("cpu", "gaussian: cpu = torch's CPU generator, copied to the device; hash = counter-based, "
                                   "generated on the device itself (for GPUs: no host copies); different numbers",
                                                flag="--gaussian-generator")
    kind: str = field(default="gaussian", init=False)

    def __post_init__(self):
        check_seed("Gaussian", self.seed)
        if self.generator not in ("cpu", "hash"):
            raise ConfigError(f"Gaussian generator must be 'cpu' or 'hash', got {self.generator!r}")

    def build(self, layer: LayerSpec, output: bool = False) -> GaussianLayer:
        return GaussianLayer(layer, resolve_r(self.r, layer), self.seed, self.block, self.cache_mb, self.generator)

    def signature(self) -> dict:
        sig = {"kind": self.kind, "r": self.r, "seed": self.seed, "block": self.block}
        if self.generator != "cpu":          # stores written before the option read as "cpu"
            sig["generator"] = self.generator
        return sig
