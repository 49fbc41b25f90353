"""The Compressor seam: how a per-example gradient block of length d_l becomes r_l numbers.

A ``Compressor`` (user-facing options) builds one ``LayerCompressor`` per tracked layer. A layer
compressor takes either

* ``from_flat(g)``: per-example flat gradients ``g`` of shape (B, d_l) (torch.func fallback), or
* ``from_uses(uses, out=None)``: the fused hook's captures — one ``capture.modules.Use`` per
  module call touching the block, each holding the saved input and output-gradient; ``out``, a
  (B, r_l) view of the caller's row buffer, may receive the rows (Dropout writes them there, so a
  batch's rows are not allocated and copied again; others ignore it).

and returns (B, r_l) — ``out`` itself when it wrote there; callers read the returned tensor.
The base class implements ``from_uses`` by forming the full per-example gradient (``Use.full``)
and calling ``from_flat``; compressors that can do better override it (Dropout gathers its r
entries, LoGra projects first) so the full gradient is never formed.
"""

from __future__ import annotations

import zlib
from typing import Protocol, Union, runtime_checkable

import torch

from ..capture.layers import LayerSpec
from ..errors import ConfigError

RSpec = Union[int, dict]


def layer_seed(seed: int, layer_name: str, salt: int = 0) -> int:
    """Stable per-layer seed: independent of layer order and of Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(layer_name.encode()) + salt * 7919) % (2**63 - 1)


def check_seed(owner: str, seed) -> None:
    """A compressor's seed must be an int: every index set / projection is derived from it, so a
    missing seed would make features irreproducible and query/train sets inconsistent."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{owner} seed must be an int (the index sets / projections derive from it, and query "
                          f"and train features must share them), got {seed!r}. Pass e.g. seed=0.")


def resolve_r(r: RSpec, layer: LayerSpec) -> int:
    """r for one layer: an int, or a dict {name or glob pattern: int}: an exact name wins, then the
    first matching glob pattern, then "*"."""
    import fnmatch

    if isinstance(r, bool) or not isinstance(r, (int, dict)):
        raise ConfigError(f"r must be an int or a dict layer-name -> int, got {r!r}")
    if isinstance(r, int):
        value = r
    else:
        # an exact name beats a glob pattern (the first matching one), which beats "*"
        value = r.get(layer.name)
        if value is None:
            value = next((v for key, v in r.items() if key != "*" and fnmatch.fnmatchcase(layer.name, key)), None)
        if value is None:
            value = r.get("*")
        if value is None:
            raise ConfigError(f"r has no entry for tracked layer {layer.name!r}; keys: {list(r)}. "
                              f"Add it or a pattern such as '*' as a default.")
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"r for layer {layer.name!r} must be a positive int, got {value!r}")
    return value


class LayerCompressorBase:
    """Shared behaviour of per-layer compressors. Subclasses set ``dim``/``r`` and ``from_flat``."""

    dim: int
    r: int

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def from_uses(self, uses: list, out: torch.Tensor | None = None) -> torch.Tensor:
        g = uses[0].full(self.dim)
        for u in uses[1:]:
            g = g + u.full(self.dim)
        return self.from_flat(g)


@runtime_checkable
class LayerCompressor(Protocol):
    dim: int
    r: int

    def from_flat(self, g: torch.Tensor) -> torch.Tensor: ...

    def from_uses(self, uses: list, out: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class Compressor(Protocol):
    """User-facing compressor options. ``kind`` names the method; ``signature()`` is what must be
    equal for two feature sets to be comparable (kind, seed, r, scale, ...)."""

    kind: str

    def build(self, layer: LayerSpec, output: bool = False) -> LayerCompressor:
        """The layer's compressor; ``output``: the layer is the model's output layer
        (capture.layers.output_layer), which Dropout(head_factor=...) keeps more of."""
        ...

    def signature(self) -> dict: ...
