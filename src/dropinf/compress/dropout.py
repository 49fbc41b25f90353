"""Dropout compression (paper §3.1, eq. 3): keep r_l randomly chosen coordinates of every
per-example gradient block, one index set per layer shared by all train and query examples.

For ``nn.Linear`` the kept weight entries (o, k) are computed straight from the layer's inputs
and output-gradients, Σ_t δ_t[o]·a_t[k], so the B × d_out × d_in per-example gradient is never
formed (O(B·T·r) work and memory instead of O(B·d)).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..capture.layers import LayerSpec
from .base import LayerCompressorBase, RSpec, layer_seed, resolve_r

#: cap on B*T*r elements gathered at once by the fused Linear path (bounds temporary memory)
_CHUNK_ELEMS = 1 << 24


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
        if layer.kind == "linear":
            d_out, d_in = layer.param_shapes[0]
            nw = d_out * d_in
            w = self.indices[self.indices < nw]
            self._rows, self._cols = w // d_in, w % d_in
            self._bias = self.indices[self.indices >= nw] - nw
        self._cache: dict = {}

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        out = g[:, self._on("indices", g.device)]
        return out * self.factor if self.factor != 1.0 else out

    def from_linear(self, a: torch.Tensor, delta: torch.Tensor, has_bias: bool) -> torch.Tensor:
        rows, cols = self._on("_rows", a.device), self._on("_cols", a.device)
        B, T = a.shape[0], a.shape[1]
        parts = []
        step = max(1, _CHUNK_ELEMS // max(1, B * T))
        for s in range(0, rows.numel(), step):
            o, k = rows[s:s + step], cols[s:s + step]
            if T == 1:
                parts.append(delta[:, 0, o] * a[:, 0, k])
            else:
                parts.append(torch.einsum("btr,btr->br", delta[:, :, o], a[:, :, k]))
        if self._bias.numel():
            parts.append(delta[:, :, self._on("_bias", a.device)].sum(1))
        out = torch.cat(parts, dim=1) if len(parts) != 1 else parts[0]
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
