"""LoGra (Choe et al. 2024; paper App. B, eq. 11–13): Kronecker-factored Gaussian projection.

For a Linear layer with per-example gradient G = Σ_t δ_t ãᵀ_t (d_out × (d_in [+1])), where
ã_t = [a_t; 1] when the layer has a bias (the bias is the weight of a constant input), LoGra
projects with P = P_out ⊗ P_in, P_in ∈ R^{r_in×d_in'}, P_out ∈ R^{r_out×d_out}, entries
N(0, 1/r_in) and N(0, 1/r_out):

    g̃ = vec(P_out G P_inᵀ) = Σ_t (P_out δ_t) ⊗ (P_in ã_t)        (row-major vec; r = r_out·r_in)

The hook projects activations and output-grads first and sums the r_out × r_in outer products
over tokens, so, like Dropout, the full per-example gradient is never formed. LoGra needs the
Kronecker structure: Linear, HF Conv1D, Conv2d (groups=1) and Embedding (one-hot input) have
it; other blocks and tied weights raise IncompatibleMethodError. The output is ordered as the
native weight layout's rows ⊗ columns (Conv1D and Embedding store W as (in, out)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..options import option
from ..capture.layers import LayerSpec
from ..errors import IncompatibleMethodError
from .base import LayerCompressorBase, check_seed, layer_seed


class LoGraLayer(LayerCompressorBase):
    #: norm-preserving projection: damping is estimated over the full d_l (see Features)
    @property
    def damping_dim(self) -> int:
        return self.dim

    def __init__(self, layer: LayerSpec, r_in: int, r_out: int, seed: int):
        (use,) = layer.uses
        self.use = use
        bias = use.bias_at is not None
        if use.kind in ("linear", "conv2d"):          # native rows = out, cols = in
            d_in, d_out = use.cols + bias, use.rows
        else:                                          # conv1d / embedding: rows = in, cols = out
            d_in, d_out = use.rows + bias, use.cols
        self.d_in, self.d_out = d_in, d_out
        self.dim, self.r = layer.dim, r_in * r_out
        g_in = torch.Generator().manual_seed(layer_seed(seed, layer.name, salt=2))
        g_out = torch.Generator().manual_seed(layer_seed(seed, layer.name, salt=3))
        self.p_in = torch.randn(r_in, d_in, generator=g_in) / math.sqrt(r_in)
        self.p_out = torch.randn(r_out, d_out, generator=g_out) / math.sqrt(r_out)
        self._cache: dict = {}

    def _mats(self, device, dtype):
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.p_in.to(device, dtype), self.p_out.to(device, dtype))
        return self._cache[key]

    def from_uses(self, uses: list, out: torch.Tensor | None = None) -> torch.Tensor:
        p_in, p_out = self._mats(uses[0].d.device, uses[0].d.dtype)
        out = uses[0].kron(p_in, p_out)
        for u in uses[1:]:
            out = out + u.kron(p_in, p_out)
        return out

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        """Same projection from flat per-example gradients (tests): P_row M P_colᵀ of the native
        matrix M, with the bias appended as an extra input column/row."""
        u = self.use
        p_in, p_out = self._mats(g.device, g.dtype)
        B, nw = g.shape[0], u.rows * u.cols
        w = g[:, :nw].reshape(B, u.rows, u.cols)
        if u.kind in ("linear", "conv2d"):
            if u.bias_at is not None:
                w = torch.cat([w, g[:, u.bias_at:u.bias_at + u.rows].unsqueeze(-1)], -1)
            return (p_out @ w @ p_in.T).reshape(B, -1)
        if u.bias_at is not None:
            w = torch.cat([w, g[:, u.bias_at:u.bias_at + u.cols].unsqueeze(1)], 1)
        return (p_in @ w @ p_out.T).reshape(B, -1)


@dataclass(frozen=True)
class LoGra:
    """r_in, r_out: projected input / output sizes per layer (r = r_in·r_out)."""

    r_in: int = option(8, "input projection size")
    r_out: int = option(8, "output projection size")
    seed: int = option(0, "seeds the index sets / projections")
    kind: str = field(default="logra", init=False)

    def __post_init__(self):
        check_seed("LoGra", self.seed)

    def build(self, layer: LayerSpec, output: bool = False) -> LoGraLayer:
        if layer.kind != "fused":
            raise IncompatibleMethodError(
                f"LoGra needs a Kronecker-structured gradient; layer {layer.name!r} is handled by the "
                f"torch.func fallback. Track only Linear/Conv1D/Conv2d/Embedding layers, or use Dropout/Gaussian.")
        if len(layer.uses) != 1:
            raise IncompatibleMethodError(
                f"LoGra on the tied weight of {[u.module for u in layer.uses]}: the uses project different "
                f"sides of the matrix. Track one of the modules, or use Dropout/Gaussian.")
        if layer.uses[0].groups != 1:
            raise IncompatibleMethodError(f"LoGra on grouped Conv2d {layer.name!r} (groups="
                                          f"{layer.uses[0].groups}) has no Kronecker structure; use Dropout.")
        return LoGraLayer(layer, self.r_in, self.r_out, self.seed)

    def signature(self) -> dict:
        return {"kind": self.kind, "r_in": self.r_in, "r_out": self.r_out, "seed": self.seed}
