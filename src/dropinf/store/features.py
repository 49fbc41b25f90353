"""In-memory feature sets (compressed per-example gradients plus what makes them comparable) and
the RowSource seam that in-memory and on-disk features share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import torch

from ..errors import FeatureMismatchError


@dataclass
class Features:
    """Compressed gradients of n examples.

    data:      {layer name: tensor (n, r_l) float32, CPU}, in tracked-layer order
    signature: JSON-able dict (model fingerprint, layers and shapes, compressor options);
               two feature sets can be scored against each other only if signatures match
    losses:    per-example losses (n,) at capture time
    damping_dims: {layer: D_l} with Σ_i ‖g̃_il‖² / (n·D_l) the estimate of the mean squared entry
               of the *full* gradient of layer l (paper App. D.1's damping rule): D_l = r_l for
               coordinate sampling (Identity, Dropout), D_l = d_l for norm-preserving random
               projections (Gaussian, LoGra). Missing layers default to r_l.
    ids:       (n,) int64 dataset index of each row (None: rows 0..n-1)
    """

    data: dict[str, torch.Tensor]
    signature: dict
    losses: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    damping_dims: dict[str, int] = field(default_factory=dict)
    ids: torch.Tensor | None = None

    def row_ids(self) -> torch.Tensor:
        """(n,) dataset id of every row."""
        return self.ids if self.ids is not None else torch.arange(self.n)

    def damping_dim(self, layer: str) -> int:
        return self.damping_dims.get(layer, self.data[layer].shape[1])

    @property
    def n(self) -> int:
        return next(iter(self.data.values())).shape[0] if self.data else 0

    @property
    def layers(self) -> list[str]:
        return list(self.data)

    def mean(self) -> "Features":
        """One pseudo-example whose features are the mean over examples (paper eq. 1's query)."""
        return Features({k: v.mean(0, keepdim=True) for k, v in self.data.items()}, self.signature,
                        self.losses.mean().reshape(1) if self.losses.numel() else self.losses, self.damping_dims)

    # ------------------------------------------------------------------ the RowSource seam
    def layer_names(self) -> list[str]:
        return list(self.data)

    def layer_r(self, name: str) -> int:
        return self.data[name].shape[1]

    def iter_chunks(self, shard: tuple[int, int] = (0, 1), rows: int | None = None) -> Iterator[tuple[int, dict]]:
        """(first row, {layer: (rows, r_l) view}) over blocks of ``rows`` examples (default 8192); with
        ``shard=(rank, world)`` only blocks k with k % world == rank."""
        rank, world = shard
        rows = rows or 8192
        for k, s in enumerate(range(0, self.n, rows)):
            if k % world == rank:
                yield s, {name: v[s:s + rows] for name, v in self.data.items()}

    def rows(self, start: int, stop: int) -> "Features":
        return Features({k: v[start:stop] for k, v in self.data.items()}, self.signature,
                        self.losses[start:stop] if self.losses.numel() else self.losses, self.damping_dims,
                        self.ids[start:stop] if self.ids is not None else None)


@runtime_checkable
class RowSource(Protocol):
    """Compressed train (or query) rows that can be streamed: in memory (Features) or on disk
    (store.disk.FeatureStore). Every fit and every score pass goes through this seam.

    iter_chunks(shard=(rank, world), rows=None): (first row, {layer: (rows, r_l)}) blocks in row
    order — ``rows`` a block size where the source can choose it (a store's blocks are its shards).
    row_ids(): (n,) dataset id of every row. mean(): one in-memory row, the mean over rows
    (paper eq. 1's query)."""

    n: int
    signature: dict

    def layer_names(self) -> list[str]: ...

    def layer_r(self, name: str) -> int: ...

    def damping_dim(self, name: str) -> int: ...

    def iter_chunks(self, shard: tuple[int, int] = (0, 1), rows: int | None = None) -> Iterator[tuple[int, dict]]: ...

    def row_ids(self) -> torch.Tensor: ...

    def mean(self) -> "Features": ...


def check_compatible(query, train) -> None:
    """Raise FeatureMismatchError naming the first field where two row sources' signatures differ."""
    check_signatures(query.signature, train.signature)


#: signature fields derived from the compared ones (not compared: older stores lack them)
DERIVED = ("output_layer",)


def comparable(signature):
    """The signature without its DERIVED fields: what two feature sets must share."""
    return {k: v for k, v in signature.items() if k not in DERIVED} if isinstance(signature, dict) else signature


def check_signatures(query: dict, train: dict) -> None:
    """Raise FeatureMismatchError naming the first field where the two signatures differ."""
    diffs = _diff(comparable(query), comparable(train), "")
    if diffs:
        raise FeatureMismatchError(
            "query and train features are not comparable: "
            + "; ".join(f"{path}: query={q} vs train={t}" for path, q, t in diffs[:5])
            + ". Compute both with the same model, tracked layers and compressor (kind, r, seed).")


def _diff(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        keys = sorted(set(a) | set(b), key=lambda k: (k not in ("kind", "model"), str(k)))
        for k in keys:
            out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
        return out
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
        short = lambda v: (s if len(s := json.dumps(v, default=str)) < 80 else s[:77] + "...")
        return [(path, short(a), short(b))]
    return []
