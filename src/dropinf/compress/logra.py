"""LoGra (Choe et al. 2024; paper App. B, eq. 11–13): Kronecker-factored Gaussian projection.

For a Linear layer with per-example gradient G = Σ_t δ_t ãᵀ_t (d_out × (d_in [+1])), where
ã_t = [a_t; 1] when the layer has a bias (the bias is the weight of a constant input), LoGra
projects with P = P_out ⊗ P_in, P_in ∈ R^{r_in×d_in'}, P_out ∈ R^{r_out×d_out}, entries
N(0, 1/r_in) and N(0, 1/r_out):

    g̃ = vec(P_out G P_inᵀ) = Σ_t (P_out δ_t) ⊗ (P_in ã_t)        (row-major vec; r = r_out·r_in)

The hook projects activations and output-grads first and sums the r_out × r_in outer products
over tokens, so, like Dropout, the full per-example gradient is never formed. LoGra needs the
Kronecker structure: it applies to Linear layers only (others raise IncompatibleMethodError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..capture.layers import LayerSpec
from ..errors import IncompatibleMethodError
from .base import LayerCompressorBase, layer_seed


class LoGraLayer(LayerCompressorBase):
    #: norm-preserving projection: damping is estimated over the full d_l (see Features)
    @property
    def damping_dim(self) -> int:
        return self.dim

    def __init__(self, layer: LayerSpec, r_in: int, r_out: int, seed: int):
        d_out, d_in = layer.param_shapes[0]
        self.bias = layer.has_bias
        self.d_out, self.d_in = d_out, d_in + (1 if self.bias else 0)
        self.dim, self.r = layer.dim, r_in * r_out
        g_in = torch.Generator().manual_seed(layer_seed(seed, layer.name, salt=2))
        g_out = torch.Generator().manual_seed(layer_seed(seed, layer.name, salt=3))
        self.p_in = torch.randn(r_in, self.d_in, generator=g_in) / math.sqrt(r_in)
        self.p_out = torch.randn(r_out, d_out, generator=g_out) / math.sqrt(r_out)
        self._cache: dict = {}

    def _mats(self, device, dtype):
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.p_in.to(device, dtype), self.p_out.to(device, dtype))
        return self._cache[key]

    def from_linear(self, a: torch.Tensor, delta: torch.Tensor, has_bias: bool) -> torch.Tensor:
        p_in, p_out = self._mats(a.device, a.dtype)
        if self.bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        pa = a @ p_in.T          # (B, T, r_in)
        pd = delta @ p_out.T     # (B, T, r_out)
        return torch.einsum("bto,bti->boi", pd, pa).reshape(a.shape[0], -1)

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        """Same projection from flat per-example gradients (torch.func path, tests)."""
        p_in, p_out = self._mats(g.device, g.dtype)
        B, nw = g.shape[0], self.d_out * (self.d_in - (1 if self.bias else 0))
        w = g[:, :nw].reshape(B, self.d_out, -1)
        if self.bias:
            w = torch.cat([w, g[:, nw:].unsqueeze(-1)], -1)
        return (p_out @ w @ p_in.T).reshape(B, -1)


@dataclass(frozen=True)
class LoGra:
    """r_in, r_out: projected input / output sizes per Linear layer (r = r_in·r_out)."""

    r_in: int = 8
    r_out: int = 8
    seed: int = 0
    kind: str = field(default="logra", init=False)

    def build(self, layer: LayerSpec) -> LoGraLayer:
        if layer.kind != "linear":
            raise IncompatibleMethodError(
                f"LoGra needs a Kronecker-structured (Linear) gradient; layer {layer.name!r} is "
                f"handled by the torch.func fallback. Track only Linear layers, or use Dropout/Gaussian.")
        return LoGraLayer(layer, self.r_in, self.r_out, self.seed)

    def signature(self) -> dict:
        return {"kind": self.kind, "r_in": self.r_in, "r_out": self.r_out, "seed": self.seed}
