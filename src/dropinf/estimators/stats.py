"""The statistics every estimator fits from: one streamed pass over the train rows.

Per layer: Σ_i ‖g_il‖² and the (optionally row-weighted) Gram matrix G_lᵀ diag(w) G_l — or, for a
layer split into column groups (GaussNewton(members=K)), only the K diagonal blocks of it, (K, m, m)
zero-padded: K times less memory and arithmetic than the full Gram matrix. Chunks
are multiplied in float32 on the chosen device (a BLAS/cuBLAS matmul of the chunk) and the
r_l × r_l results summed in float64, so the pass runs at float32 matmul speed while the sum over
millions of rows keeps its precision. Memory: one chunk plus the Gram matrices. Layers with
r_l > n (kernel form) keep their rows instead (n × r_l, smaller than the Gram matrix would be).

Under torchrun each rank accumulates the chunks k ≡ rank (mod world) and the sums are
all-reduced, so every rank ends with the same statistics after reading only its share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..dist import all_reduce_sum


@dataclass
class Stats:
    n: int
    sumsq: dict[str, float]
    gram: dict[str, torch.Tensor] = field(default_factory=dict)        # (r, r) or grouped (K, m, m) float64
    rows: dict[str, torch.Tensor] = field(default_factory=dict)        # (n, r) float32: kernel layers
    row_sumsq: dict[str, torch.Tensor] = field(default_factory=dict)   # (n,) float64: kernel layers

    def kernel_gram(self, name: str) -> torch.Tensor:
        """K = G Gᵀ (n × n, float64) of a kernel layer, from float32 column blocks."""
        g = self.rows[name]
        out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64, device=g.device)
        step = max(1, (1 << 24) // max(1, g.shape[0]))
        for s in range(0, g.shape[1], step):
            c = g[:, s:s + step]
            out += (c @ c.T).double()
        return out


Weights = Callable[[str, torch.Tensor], torch.Tensor]


def gram_groups(source, kernel_layers=(), budget_mb: float = 2048.0, grouped=None) -> list[list[str]]:
    """The layers in runs (model order) whose statistics fit in ``budget_mb`` together: float64
    r_l × r_l Gram matrices, or the float32 n × r_l rows of kernel layers. One statistics pass per
    run bounds a fit's memory whatever the number of layers (a run holds at least one layer).
    ``grouped``: {layer: (K, m) column index} of layers whose Gram is kept as K blocks of m × m."""
    groups, cur, used = [], [], 0.0
    grouped = grouped or {}
    for name in source.layer_names():
        r = source.layer_r(name)
        need = (source.n * r * 4 if name in kernel_layers else grouped[name].numel() * grouped[name].shape[1] * 8
                if name in grouped else r * r * 8) / 2**20
        if cur and used + need > budget_mb:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(name)
        used += need
    return groups + ([cur] if cur else [])


def gram_pass(source, *, device, shard: tuple[int, int] = (0, 1), gram: bool = True,
              weights: Weights | None = None, kernel_layers=(), progress: bool = False,
              desc: str = "precondition", layers: list[str] | None = None, grouped=None) -> Stats:
    """Σ‖g‖² per layer and (if ``gram``) Gᵀ diag(w) G, w = weights(layer, chunk rows) or 1.
    ``kernel_layers``: layers whose rows are kept whole instead of a Gram matrix. ``layers``:
    only these (a run of gram_groups); default every layer. ``grouped``: {layer: idx}, idx (K, m)
    the columns of each of K groups padded with r (estimators.preconditioner.member_index): that
    layer's Gram is the (K, m, m) stack of its groups' blocks."""
    device = torch.device(device)
    grouped = {l: i.to(device) for l, i in (grouped or {}).items()}
    rank, world = shard
    names = list(layers) if layers is not None else source.layer_names()
    kernel_layers = set(kernel_layers) & set(names)
    n = source.n
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    grams: dict[str, torch.Tensor] = {}
    from ..store.features import Features
    in_place = isinstance(source, Features) and all(
        source.data[l].device == device and source.data[l].dtype == torch.float32 for l in kernel_layers)
    # in-memory float32 rows on the device are used as they are (no second copy of the features)
    rows = {l: (source.data[l] if in_place else torch.empty(n, source.layer_r(l), device=device))
            for l in kernel_layers}
    # kernel layers need every row on every rank; otherwise each rank reads only its share
    chunks = source.iter_chunks() if (kernel_layers and world > 1) else source.iter_chunks(shard=shard)
    seen = 0
    with tqdm(total=n, desc=desc, unit="ex", leave=False, disable=not progress) as bar:
        for k, (start, chunk) in enumerate(chunks):
            mine = not (kernel_layers and world > 1) or k % world == rank
            for i, name in enumerate(names):
                g = chunk[name].to(device=device, dtype=torch.float32, non_blocking=True)
                if name in kernel_layers and not in_place:
                    rows[name][start:start + g.shape[0]] = g
                if not mine:
                    continue
                if gram and name not in kernel_layers:
                    if name in grouped:       # (K, N, m): each group's columns; the padding reads 0
                        ge = torch.cat([g, g.new_zeros(g.shape[0], 1)], 1)[:, grouped[name]].transpose(0, 1)
                        we = ge if weights is None else ge * weights(name, g).to(g.dtype)[None, :, None]
                        prod = torch.bmm(we.transpose(1, 2), ge).double()
                    else:
                        gw = g if weights is None else g * weights(name, g).to(g.dtype)[:, None]
                        prod = (gw.T @ g).double()
                    if name in grams:
                        grams[name] += prod
                    else:
                        grams[name] = prod
                    if weights is None:      # Σ‖g‖² is the trace of the Gram matrix: no extra pass
                        sums[i] += prod.diagonal(dim1=-2, dim2=-1).sum()
                        continue
                sums[i] += torch.linalg.vector_norm(g).double() ** 2
            if mine:
                seen += next(iter(chunk.values())).shape[0]
            bar.update(next(iter(chunk.values())).shape[0])
    all_reduce_sum(sums, world)
    for name in names:
        if gram and name not in kernel_layers:
            r = source.layer_r(name)
            if name not in grams:    # this rank had no chunk
                shape = (*grouped[name].shape, grouped[name].shape[1]) if name in grouped else (r, r)
                grams[name] = torch.zeros(shape, dtype=torch.float64, device=device)
            all_reduce_sum(grams[name], world)
    total = int(all_reduce_sum(torch.tensor([seen], dtype=torch.float64, device=device), world).item())
    if total != n:
        raise RuntimeError(f"statistics pass saw {total} rows, the source claims {n}")
    row_ss = {l: torch.linalg.vector_norm(rows[l], dim=1, dtype=torch.float64) ** 2 for l in kernel_layers}
    return Stats(n, {nm: float(v) for nm, v in zip(names, sums.tolist())}, grams, rows, row_ss)
