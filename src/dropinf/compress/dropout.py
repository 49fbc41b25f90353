"""Dropout compression (paper §3.1, eq. 3): keep r_l randomly chosen coordinates of every
per-example gradient block, one index set per layer shared by all train and query examples.

For fused modules (Linear, Conv1D, Conv2d, Embedding) the kept weight entries (o, k) are
computed straight from the layer's inputs and output-gradients, Σ_t δ_t[o]·a_t[k] (see
capture.modules), so the B × d per-example gradient is never formed (O(B·T·r) work and memory
instead of O(B·d)).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..capture.layers import LayerSpec
from .base import LayerCompressorBase, RSpec, layer_seed, resolve_r

def sample_indices(dim: int, r: int, seed: int) -> torch.Tensor:
    """r distinct indices in [0, dim), uniformly without replacement, sorted (int64, CPU)."""
    if r >= dim:
        return torch.arange(dim)
    g = torch.Generator().manual_seed(seed)
    if dim <= 1 << 24 or r > dim // 8:
        idx = torch.randperm(dim, generator=g)[:r]
    else:  # huge blocks: rejection sampling, O(r) memory
        picked: set[int] = set()
        while len(picked) < r:
            cand = torch.randint(0, dim, (2 * (r - len(picked)),), generator=g).tolist()
            for c in cand:
                if len(picked) < r:
                    picked.add(c)
        idx = torch.tensor(sorted(picked))
    return torch.sort(idx).values


class DropoutLayer(LayerCompressorBase):
    def __init__(self, layer: LayerSpec, r: int, seed: int, scale: bool):
        self.dim = layer.dim
        self.indices = sample_indices(self.dim, r, layer_seed(seed, layer.name))
        self.r = int(self.indices.numel())
        self.factor = math.sqrt(self.dim / self.r) if scale else 1.0
        self._maps: dict = {}     # per (device, use) index maps, built on first use
        self._idx: dict = {}

    def _indices_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._idx:
            self._idx[device] = self.indices.to(device)
        return self._idx[device]

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        out = g[:, self._indices_on(g.device)]
        return out * self.factor if self.factor != 1.0 else out

    def from_uses(self, uses: list) -> torch.Tensor:
        dev = uses[0].d.device
        maps = self._maps.setdefault(dev, {})
        out = uses[0].gather(self.indices, maps)
        for u in uses[1:]:
            out = out + u.gather(self.indices, maps)
        return out * self.factor if self.factor != 1.0 else out


@dataclass(frozen=True)
class Dropout:
    """Dropout compressor.

    r:     coordinates kept per tracked layer: an int, or a dict {layer name or glob: int}.
           r ≥ d_l keeps every coordinate (then identical to Identity / Orig).
    seed:  seeds the per-layer index sets (a layer's set depends only on seed and its name).
    scale: multiply kept entries by √(d_l/r_l) so inner products are unbiased for the full ones.
           Influence scores are unchanged by it (λ_l scales along; see GaussNewton).
    """

    r: RSpec = 64
    seed: int = 0
    scale: bool = False
    kind: str = field(default="dropout", init=False)

    def build(self, layer: LayerSpec) -> DropoutLayer:
        r = resolve_r(self.r, layer)
        if r > layer.dim:
            warnings.warn(f"Dropout r={r} exceeds d={layer.dim} of layer {layer.name!r}; keeping "
                          f"all {layer.dim} coordinates.", stacklevel=3)
        return DropoutLayer(layer, r, self.seed, self.scale)

    def signature(self) -> dict:
        return {"kind": self.kind, "r": self.r, "seed": self.seed, "scale": self.scale}
