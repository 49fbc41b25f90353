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

from ..options import option
from ..capture.layers import LayerSpec
from ..errors import ConfigError
from .base import LayerCompressorBase, RSpec, check_seed, layer_seed, resolve_r
from .sampling import SAMPLER, sample_indices  # noqa: F401 (sample_indices: public here too)

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

    def from_uses(self, uses: list, out: torch.Tensor | None = None) -> torch.Tensor:
        dev = uses[0].d.device
        maps = self._maps.setdefault(dev, {})
        val = uses[0].gather(self.indices, maps, out)
        for u in uses[1:]:         # in place when the rows go to the caller's buffer (the same numbers)
            val = val.add_(u.gather(self.indices, maps)) if out is not None else val + u.gather(self.indices, maps)
        if self.factor != 1.0:
            val = val.mul_(self.factor) if out is not None else val * self.factor
        return val


#: r per layer of the default Dropout() (dropinf.default_setting()); capped at each layer's size
DEFAULT_R = 2048
#: the default setting's head_factor: the model's output layer keeps 4 × r (README, "The default")
DEFAULT_HEAD_FACTOR = 4


@dataclass(frozen=True)
class Dropout:
    """Dropout compressor.

    r:     coordinates kept per tracked layer: an int, or a dict {layer name or glob: int}.
           r ≥ d_l keeps every coordinate (then identical to Identity / Orig).
    seed:  seeds the per-layer index sets (a layer's set depends only on seed and its name).
    scale: multiply kept entries by √(d_l/r_l) (rotated: √(p_l/r_l)) so inner products are unbiased
           for the full ones.
           GaussNewton and DataInf scores are unchanged by it (their per-layer λ_l scales along), and
           ExactHessian's with damping=0; GradDot, LiSSA and a damped ExactHessian change (the factor
           differs between layers). See the README.
    rotate: rotate each layer's gradient by a seeded randomized Hadamard transform before
           sampling (compress.rotated): inner products are unchanged by the rotation, and the
           sampled coordinates carry an even share of every gradient's energy. Still fused.
    head_factor: the model's output layer (its head — ``fc``, ``classifier``, ``lm_head`` — when
           tracked; capture.layers.output_layer) keeps head_factor × r coordinates, capped at its
           size, unless r is a dict with the layer's exact name as a key. 1 (the class default) = the same r everywhere, the
           paper's method; the default setting (dropinf.default_setting) uses 4, measured.
    """

    r: RSpec = option(DEFAULT_R, "r: coordinates kept (dropout, default 2048) or projection size (gaussian, default 64) "
                            "per layer; under torchrun "
                            "write --size (torchrun mistakes --r for its own options)", flag=("--size", "--r"))
    seed: int = option(0, "seeds the index sets / projections")
    scale: bool = option(False, "scale kept entries by sqrt(d/r)")
    sampler: int = SAMPLER
    rotate: bool = option(False, "rotate each layer's gradient by a seeded randomized Hadamard transform before "
                                 "sampling (inner products unchanged; energy spread evenly over the kept coordinates)")
    head_factor: int = option(1, "the model's output layer (its head, when tracked) keeps head_factor x r "
                                 "coordinates, capped at its size (1 = the same r as every layer, the paper)",
                              cli_default="4, the measured default; Dropout() in Python: 1")
    kind: str = field(default="dropout", init=False)

    def __post_init__(self):
        check_seed("Dropout", self.seed)
        if not isinstance(self.rotate, bool):
            raise ConfigError(f"Dropout rotate must be True or False, got {self.rotate!r}")
        if isinstance(self.head_factor, bool) or not isinstance(self.head_factor, int) or self.head_factor < 1:
            raise ConfigError(f"Dropout head_factor must be an int ≥ 1, got {self.head_factor!r}")
        if self.sampler != SAMPLER:
            raise ConfigError(f"these features were drawn with index sampler version {self.sampler}; this dropinf "
                              f"draws version {SAMPLER}, so its index sets differ. Rebuild the store.")

    def build(self, layer: LayerSpec, output: bool = False):
        r = resolve_r(self.r, layer)
        if r > layer.dim and self.r != DEFAULT_R and not self.rotate:   # the default is documented as capped
            warnings.warn(f"Dropout r={r} exceeds d={layer.dim} of layer {layer.name!r}; keeping "
                          f"all {layer.dim} coordinates.", stacklevel=3)
        if output and not (isinstance(self.r, dict) and layer.name in self.r):
            r = min(r * self.head_factor, max(r, layer.dim))      # the head's extra share stops at its size
        if self.rotate:
            from .rotated import RotatedDropoutLayer
            return RotatedDropoutLayer(layer, r, self.seed, self.scale)
        return DropoutLayer(layer, r, self.seed, self.scale)

    def signature(self) -> dict:
        sig = {"kind": self.kind, "r": self.r, "seed": self.seed, "scale": self.scale, "sampler": self.sampler}
        if self.rotate:      # absent when False, so stores written before rotation existed still open
            sig["rotate"] = True
        if self.head_factor != 1:     # likewise (compress.from_signature reads its absence as 1)
            sig["head_factor"] = self.head_factor
        return sig
