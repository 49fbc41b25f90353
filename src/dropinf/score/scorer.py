"""The one scorer: score, top-k, mean-query, per-layer and self-influence all run through it.

For a fitted Preconditioner M and train rows G (a RowSource: in memory or a store),

    S[q, i] = I(q, i) = − Σ_l q̃_l · g_il,   q̃ = q M          (shape (n_query, n_train))

Queries are taken in batches of ``query_batch`` rows and preconditioned once per batch; the train
rows are streamed in chunks (a store's shards, or ``train_batch`` rows in memory) and each
(query batch × train chunk) block is one matmul in ``dtype`` on ``device``. Memory:
O(query_batch·R + chunk·R) plus what the caller keeps: the full matrix (in memory or an
``.npy`` memmap), per-layer matrices, or only the running top-k per query. Self-influence is
O(n·R²) for every estimator: −rowsum((G M) ∘ G) per chunk.

Under torchrun the train chunks are split across ranks (k ≡ rank mod world); dense outputs are
summed across ranks (each fills its own columns), top-k lists gathered and merged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..dist import Shard, all_gather_objects, all_reduce_sum, barrier
from ..errors import ConfigError
from ..options import option
from .topk import RunningTopK, TopK, topk_merge

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ScoreOptions:
    """device:      where the products run (None: the model's device through Attributor, else CPU)
    dtype:       "float32" (default: GPU/BLAS speed) or "float64"
    query_batch: queries preconditioned and scored together (memory O(query_batch · R))
    train_batch: train rows per streamed block when the train features are in memory (a store
                 streams its own shards)
    fit_memory_mb: the fit's statistics held at once (estimators.stats.gram_groups)
    normalize:   "none"; "both": I(q, i) / (‖q‖_M ‖g_i‖_M) with ‖g‖_M = √(g M gᵀ) = √(−I(i, i)) — the
                 cosine of the preconditioned gradients M^½q, M^½g (TrackStar's unit-normalised
                 scores; the plain cosine for GradDot); "train": I(q, i) / ‖g_i‖_M only."""

    device: str | None = option(None, "where fit and scoring run, e.g. cuda, cuda:1, cpu (default: the model's device)")
    dtype: Literal["float32", "float64"] = option("float32", "precision of the scoring products")
    query_batch: int = option(2048, "queries scored together (memory grows with it)")
    train_batch: int = option(16384, "train rows per streamed block when the train rows are in memory")
    fit_memory_mb: float = option(2048.0, "MiB of fit statistics (Gram matrices) held at once; more layers than "
                                          "fit are fitted in several passes over the rows")
    normalize: Literal["none", "both", "train"] = option(
        "none", "unit-normalised scores: both = the cosine of the preconditioned gradients, I / (|q|_M |g|_M), in "
                "[-1, 1] (TrackStar-style; cosine for hessian-free); train = divide by |g|_M only (discounts "
                "train examples whose gradients are large, e.g. mislabeled ones)")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"ScoreOptions.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.query_batch < 1 or self.train_batch < 1:
            raise ConfigError("ScoreOptions.query_batch and train_batch must be ≥ 1")
        if self.normalize not in ("none", "both", "train"):
            raise ConfigError(f"ScoreOptions.normalize must be 'none', 'both' or 'train', got {self.normalize!r}")


def _chunks(source, rows: int, shard=(0, 1)):
    return source.iter_chunks(shard=shard, rows=rows)


def _adjacent(chunk: dict, layers: list[str]) -> torch.Tensor | None:
    """The columns of ``layers`` side by side as one view when they already are (a store shard's
    row block), else None (separate tensors: concatenating would copy the whole chunk)."""
    ts = [chunk[l] for l in layers]
    if len(ts) == 1:
        return ts[0]
    first = ts[0]
    off, ok = first.storage_offset(), first.dim() == 2 and first.stride(1) == 1
    for t in ts:
        ok = ok and t.stride() == first.stride() and t.storage_offset() == off and \
            t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        off += t.shape[1]
    if not ok:
        return None
    return torch.as_strided(first, (first.shape[0], off - first.storage_offset()), first.stride(),
                            first.storage_offset())


def _concat(chunk: dict, layers: list[str]) -> torch.Tensor:
    """Columns of ``layers`` side by side; a view (no copy) when they already are (store shards)."""
    g = _adjacent(chunk, layers)
    return g if g is not None else torch.cat([chunk[l] for l in layers], 1)


class Scorer:
    """Scores of query rows against the train rows a Preconditioner was fitted on."""

    def __init__(self, precond, train, options: ScoreOptions | None = None, progress: bool = True,
                 shard: tuple[int, int] = (0, 1)):
        if train.n != precond.n:
            raise ConfigError(f"the preconditioner was fitted on {precond.n} train rows but the train source "
                              f"has {train.n}; refit it (Attributor.fit()).")
        self.precond, self.train = precond, train
        self.opts = options or ScoreOptions()
        self.device = torch.device(self.opts.device or "cpu")
        self.dtype = DTYPES[self.opts.dtype]
        self.progress, self.shard = progress, Shard(*shard)
        self.layers = [l for l in train.layer_names() if l in set(precond.layers)]
        if not self.layers:
            raise ConfigError("every tracked layer was dropped (all-zero gradients): there is nothing to score. "
                              "Check that the loss depends on the tracked layers.")

    # ------------------------------------------------------------------ core loop
    def _queries(self, query) -> Iterator[tuple[int, dict, torch.Tensor | None]]:
        """(first query row, q̃ = qM {layer: (m_b, r_l)}, 1/‖q‖_M (m_b,) or None) per query batch."""
        for q0, qc in _chunks(query, self.opts.query_batch):
            pre = self.precond.apply(qc, self.train, self.device, self.dtype)
            inv = None
            if self.opts.normalize == "both":
                sq = sum((pre[l] * qc[l].to(self.device, self.dtype)).sum(1) for l in self.layers)
                inv = _inverse_norm(sq)
            yield q0, pre, inv

    def _train_inverse_norm(self) -> torch.Tensor | None:
        """1/‖g_i‖_M (n_train,) on the device for normalised scores (one self-influence pass, kept with
        the preconditioner: it serves the train rows it was fitted on), or None."""
        if self.opts.normalize == "none":
            return None
        key = ("inverse-train-norm", str(self.device), self.dtype)
        cache = self.precond._cache
        if key not in cache:
            cache[key] = _inverse_norm(-torch.from_numpy(self._self_scores()).double()).to(self.device, self.dtype)
        return cache[key]

    def blocks(self, query, per_layer: bool = False):
        """Yield (q0, t0, S) with S (m_b, rows) the scores of one query batch × train chunk — or,
        with per_layer, {layer: S_l} whose sum is S."""
        total = query.n * self.train.n // max(1, self.shard.world)
        t_inv = self._train_inverse_norm()
        with tqdm(total=total, desc="score", unit="pair", unit_scale=True, disable=not self.progress) as bar:
            for q0, pre, q_inv in self._queries(query):
                neg = {l: -v for l, v in pre.items()}           # S = (−q̃) Gᵀ: one matmul per block
                qcat = _concat(neg, self.layers)
                for t0, chunk in _chunks(self.train, self.opts.train_batch, self.shard):
                    if per_layer:
                        s = {l: neg[l] @ chunk[l].to(self.device, self.dtype).T for l in self.layers}
                        rows = next(iter(s.values())).shape[1]
                    else:
                        g = _adjacent(chunk, self.layers)
                        if g is not None:       # one matmul over all layers' columns (store shards)
                            s = qcat @ g.to(self.device, self.dtype, non_blocking=True).T
                        else:                   # separate tensors: per layer, no copy of the chunk
                            s = sum(neg[l] @ chunk[l].to(self.device, self.dtype, non_blocking=True).T
                                    for l in self.layers)
                        rows = s.shape[1]
                    bar.update(qcat.shape[0] * rows)
                    if t_inv is not None:
                        s = _scaled(s, q_inv, t_inv[t0:t0 + rows])
                    yield q0, t0, s

    # ------------------------------------------------------------------ outputs
    def dense(self, query, out: np.ndarray | None = None, per_layer: bool = False):
        """(n_query, n_train) float32 scores (into ``out`` if given, e.g. an .npy memmap), or with
        per_layer a dict {layer: (n_query, n_train)} summing to them."""
        m, n = query.n, self.train.n
        world = self.shard.world
        if per_layer:
            outs = {l: np.zeros((m, n), dtype=np.float32) for l in self.layers}
        else:
            if out is None:
                out = np.zeros((m, n), dtype=np.float32) if world > 1 else np.empty((m, n), dtype=np.float32)
            elif out.shape != (m, n):
                raise ConfigError(f"out has shape {out.shape}; these scores are ({m}, {n}) (n_query, n_train).")
            elif world > 1 and not isinstance(out, np.memmap):
                out[:] = 0
            outs = {None: out}
        lo, hi = float("inf"), float("-inf")
        for q0, t0, s in self.blocks(query, per_layer):
            for key, arr in outs.items():
                sl = s if key is None else s[key]
                arr[q0:q0 + sl.shape[0], t0:t0 + sl.shape[1]] = sl.float().cpu().numpy()
            if not per_layer:
                lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        if not per_layer and world == 1 and m * n > 1 and lo == hi:
            warnings.warn(f"every score is {lo:g}: the attribution is degenerate (the query or train gradients "
                          f"at the tracked layers are zero or constant). Check that loss_fn depends on the tracked "
                          f"layers, that the model is not saturated, and that r is not tiny.", stacklevel=3)
        if world > 1:
            for arr in outs.values():
                if isinstance(arr, np.memmap):
                    arr.flush()
                else:
                    all_reduce_sum(torch.from_numpy(arr), world)
            barrier(world)
        return outs if per_layer else out

    def topk(self, query, k: int) -> TopK:
        """The k most helpful (most negative) and most harmful (most positive) train rows per query."""
        if k < 1:
            raise ConfigError("k must be ≥ 1")
        parts, cur = [], None          # cur: (q0, running top-k on both ends) of this query batch
        for q0, t0, s in self.blocks(query):
            if cur is None or q0 != cur[0]:
                if cur is not None:
                    parts.append((cur[0], cur[1].result()))
                cur = (q0, RunningTopK(s.shape[0], k))
            cur[1].update(s.float().cpu(), t0)     # memory: O(m_b · k) across blocks, never (m, n)
        if cur is not None:
            parts.append((cur[0], cur[1].result()))
        empty = {"idx": np.zeros((query.n, 0), dtype=np.int64), "scores": np.zeros((query.n, 0), dtype=np.float32)}
        local = TopK(*(np.concatenate([getattr(p, f) for _, p in parts]) if parts else empty[f.split("_")[1]]
                       for f in ("helpful_idx", "helpful_scores", "harmful_idx", "harmful_scores")))
        world = self.shard.world
        if world == 1:
            return local
        merged = all_gather_objects(local, world)
        m = query.n
        out = {}
        for side in ("helpful", "harmful"):   # the global top-k lies in the union of the ranks' top-k
            idx = np.concatenate([getattr(t, f"{side}_idx") for t in merged], 1)
            vals = torch.from_numpy(np.concatenate([getattr(t, f"{side}_scores") for t in merged], 1))
            best = topk_merge([(0, vals)], m, k)
            pos = best.helpful_idx if side == "helpful" else best.harmful_idx
            out[side] = (np.take_along_axis(idx, pos, 1), np.take_along_axis(vals.numpy(), pos, 1))
        return TopK(*out["helpful"], *out["harmful"])

    def self_influence(self) -> np.ndarray:
        """I(i, i) for every train row, (n_train,) float32: O(n·R²) for every estimator. Never
        normalised (normalised, every I(i, i) would be −1)."""
        return self._self_scores()

    def _self_scores(self) -> np.ndarray:
        n, world = self.train.n, self.shard.world
        out = torch.zeros(n, dtype=torch.float64)
        with tqdm(total=n // world, desc="self-influence", unit="ex", disable=not self.progress) as bar:
            for t0, chunk in _chunks(self.train, self.opts.train_batch, self.shard):
                s = self.precond.self_scores(chunk, t0, self.device, self.dtype)
                out[t0:t0 + s.shape[0]] = s.cpu()
                bar.update(s.shape[0])
        all_reduce_sum(out, world)
        return out.float().numpy()


def _inverse_norm(sq: torch.Tensor) -> torch.Tensor:
    """1/√|sq|, and 1 where sq is 0 (an all-zero gradient keeps its zero scores)."""
    norm = sq.abs().sqrt()
    return torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.ones_like(norm))


def _scaled(s, q_inv: torch.Tensor | None, t_inv: torch.Tensor):
    """S (or {layer: S_l}) with columns divided by ‖g‖_M and, when given, rows by ‖q‖_M."""
    def one(x):
        x = x * t_inv[None, :]
        return x * q_inv[:, None] if q_inv is not None else x
    return {l: one(v) for l, v in s.items()} if isinstance(s, dict) else one(s)
