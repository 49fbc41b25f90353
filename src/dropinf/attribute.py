"""The user's entry point: featurize the training data once, score any number of query sets.

    attr = Attributor(model, loss_fn, compressor=Dropout(r=64, seed=0), estimator=GaussNewton())
    attr.featurize(train_loader)
    scores = attr.score(query_loader)      # numpy float32, shape (n_query, n_train)

``loss_fn(model, batch)`` returns per-example losses, shape (B,). Rows of ``scores`` follow the
query loader's order, columns the train loader's order. Sign (paper eq. 1/3):
``scores[q, i] = I(q, i) = − g̃_qᵀ H̃⁻¹ g̃_i`` — positive means up-weighting train example i
raises q's loss (harmful), negative means it lowers it (helpful).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture.engine import BatchCapture, nonfinite, raise_nonfinite
from .capture.layers import LayerSpec, TrackSpec, select_layers
from .compress import Dropout
from .errors import ConfigError, EmptyDataError
from .estimators import FitContext, GaussNewton
from .score.blockwise import TopK, stream_scores, topk_merge
from .store.features import Features, check_compatible

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class CaptureOptions:
    """fused:    use the fused hooks where one exists (False: torch.func for every block).
    eval_mode: run the model in eval() while capturing (dropout/batch-norm frozen), then restore.
    device:   move batches to this device (default: the model's)."""

    fused: bool = True
    eval_mode: bool = True
    device: str | None = None


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def model_fingerprint(model: nn.Module, layers: list[LayerSpec]) -> str:
    """Hash of tracked parameter names, shapes and values (cheap sums), to refuse stale features."""
    pm = dict(model.named_parameters(remove_duplicate=False))
    h = hashlib.sha1()
    for l in layers:
        for n in l.param_names:
            p = pm[n].detach()
            h.update(f"{n}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


class Attributor:
    """Influence of every training example on every query example.

    model:      a trained torch.nn.Module (evaluated at its current parameters)
    loss_fn:    loss_fn(model, batch) -> per-example losses (B,); the batch is whatever the
                DataLoader yields (tensors, tuples, dicts)
    compressor: Identity() (Orig), Dropout(r, seed), Gaussian(r, seed), ...
    estimator:  GaussNewton() (paper default), ExactHessian() (small models), ...
    track:      None → every nn.Linear; "all"; or module names / glob patterns / types
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, compressor=None, estimator=None,
                 track: TrackSpec = None, options: CaptureOptions | None = None, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> per-example losses (B,)")
        self.model, self.loss_fn = model, loss_fn
        self.compressor = compressor if compressor is not None else Dropout()
        self.estimator = estimator if estimator is not None else GaussNewton()
        self.options = options or CaptureOptions()
        self.progress = progress
        self.layers = select_layers(model, track, fused=self.options.fused)
        slow = [l.name for l in self.layers if l.kind == "func"]
        if slow and self.options.fused:
            modules = dict(model.named_modules())
            kinds = sorted({type(modules[n]).__name__ for n in slow})
            warnings.warn(f"{len(slow)} tracked module(s) of type {kinds} have no fused hook and use torch.func "
                          f"per-example gradients (same compressor, slower): {slow[:4]}{' ...' if len(slow) > 4 else ''}",
                          stacklevel=2)
        self.compressors = {l.name: self.compressor.build(l) for l in self.layers}
        self.train_features: Features | None = None
        self.store = None
        self._fitted = None
        self._matrices: dict = {}
        self._train_loader = None

    # ------------------------------------------------------------------ features
    @property
    def device(self) -> torch.device:
        if self.options.device:
            return torch.device(self.options.device)
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def signature(self) -> dict:
        return {"model": model_fingerprint(self.model, self.layers),
                "layers": [l.describe() for l in self.layers],
                "r": {l.name: self.compressors[l.name].r for l in self.layers},
                "compressor": self.compressor.signature()}

    @contextlib.contextmanager
    def _mode(self):
        was = self.model.training
        if self.options.eval_mode:
            self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def _batch_to_device(self, batch):
        return _to(batch, self.device)

    def compute_features(self, loader: Iterable, desc: str = "features") -> Features:
        """Compressed per-example gradients of every example the loader yields, in order."""
        capture = BatchCapture(self.model, self.loss_fn, self.layers, self.compressors)
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        # preallocate when the size is known, so the features are never held twice (list + cat)
        out = ({l.name: torch.empty(total, self.compressors[l.name].r) for l in self.layers}
               if total else None)
        parts: dict[str, list[torch.Tensor]] = {l.name: [] for l in self.layers}
        losses, n, filled, bad_ids, bad_layers = [], 0, 0, [], set()
        with self._mode(), tqdm(total=total, desc=desc, unit="ex", disable=not self.progress) as bar:
            for batch in loader:
                batch = _to(batch, self.device)
                feats, loss = capture(batch)
                ids, lays = nonfinite(feats, n)
                bad_ids += ids
                bad_layers.update(lays)
                b = loss.shape[0]
                fits = out is not None and n + b <= total and not any(parts.values())
                for k, v in feats.items():
                    if fits:
                        out[k][n:n + b] = v
                    else:
                        parts[k].append(v.cpu())
                filled += b if fits else 0
                losses.append(loss.cpu())
                n += b
                bar.update(b)
        raise_nonfinite(bad_ids, sorted(bad_layers))
        if n == 0:
            raise EmptyDataError(f"the {desc} loader yielded no examples; pass a non-empty DataLoader.")
        if out is not None and n == total and not any(parts.values()):
            data = out
        else:  # loader length unknown or not what the dataset claimed
            data = {k: torch.cat(([out[k][:filled]] if out is not None else []) + v) for k, v in parts.items()}
        dd = {l.name: int(getattr(self.compressors[l.name], 'damping_dim', self.compressors[l.name].r))
              for l in self.layers}
        return Features(data, self.signature(), torch.cat(losses), dd)

    def featurize(self, train_loader: Iterable, store: str | Path | None = None, chunk_size: int = 4096,
                  dtype: str = "float32"):
        """Capture train features and fit the estimator (H̃ and its solve).

        store=None: features in memory; returns them (Features).
        store=PATH: stream them to an on-disk FeatureStore in chunks of ``chunk_size`` rows
        (dtype "float32", "float16" or "bfloat16"), resuming a previous interrupted run into the
        same folder, split across processes under torchrun; returns the FeatureStore.
        """
        self._train_loader = train_loader
        if store is not None:
            from .store.build import featurize_to_store
            self.store = featurize_to_store(self, train_loader, store, chunk_size, dtype)
            self.fit()
            return self.store
        self.store = None
        self.train_features = self.compute_features(train_loader, desc="featurize train")
        self.fit()
        return self.train_features

    @classmethod
    def from_store(cls, path: str | Path, model: nn.Module, loss_fn: LossFn, estimator=None,
                   options: CaptureOptions | None = None, progress: bool = True) -> "Attributor":
        """Reopen a complete store built earlier (by featurize(..., store=PATH) or `dropinf
        featurize`) with the same model; the compressor, seed, r and layers come from its
        manifest, and a model that differs from the one that built the store is refused."""
        from .compress import from_signature
        from .store.disk import FeatureStore

        st = FeatureStore.open(path)
        sig = st.manifest["signature"]
        fused = any(l["kind"] == "fused" for l in sig["layers"])
        opts = options or CaptureOptions(fused=fused)
        attr = cls(model, loss_fn, compressor=from_signature(sig["compressor"]), estimator=estimator,
                   track=[l["name"] for l in sig["layers"]], options=opts, progress=progress)
        check_compatible(Features({}, attr.signature()), Features({}, sig))
        attr.store = st
        attr.fit()
        return attr

    def fit(self):
        if self.store is not None:
            if hasattr(self.estimator, "fit_stream") and all(l.r <= self.store.n for l in self.store.layers):
                self._matrices = self.estimator.fit_stream(self.store)
                self._fitted = "stream"
                return self._fitted
            # estimators that need every row at once (LiSSA, ExactHessian, Woodbury): load them
            self.train_features = self.store_features()
        if self.train_features is None:
            raise ConfigError("call featurize(train_loader) before fit/score")
        ctx = FitContext(self.model, self.loss_fn, self.layers, self.compressors, self.compressor,
                         self._train_loader, self.progress)
        with self._mode():
            self._fitted = self.estimator.fit(self.train_features, ctx)
        return self._fitted

    # ------------------------------------------------------------------ scores
    def score(self, query, reduce: Literal["none", "mean"] = "none", out: np.ndarray | None = None) -> np.ndarray:
        """Influence scores, numpy float32 of shape (n_query, n_train) — or (1, n_train) with
        reduce="mean" (the query is the mean query gradient, paper eq. 1).

        query: a DataLoader (or any iterable of batches) or a Features object.
        out:   optional (n_query, n_train) float32 array to fill, e.g. a memmap from
               np.lib.format.open_memmap(path, "w+", np.float32, shape) for matrices larger than RAM.
        scores[q, i] > 0: train example i is harmful to query q (up-weighting it raises q's loss).
        """
        if self._fitted is None:
            raise ConfigError("call featurize(train_loader) before score(query)")
        feats = self._query(query, reduce)
        if self._fitted == "stream":
            return stream_scores(self.store, self._precondition(feats), out=out, progress=self.progress)
        s = self._fitted.score(feats).cpu().numpy().astype(np.float32)
        if out is not None:
            out[:] = s
            return out
        return s

    def topk(self, query, k: int = 10, reduce: Literal["none", "mean"] = "none", block: int = 256) -> TopK:
        """The k most helpful (most negative I) and most harmful (most positive I) train examples
        per query, without holding the (n_query, n_train) matrix: streamed over stored chunks,
        or over blocks of ``block`` queries in memory."""
        if self._fitted is None:
            raise ConfigError("call featurize(train_loader) before topk(query)")
        if k < 1:
            raise ConfigError("k must be ≥ 1")
        feats = self._query(query, reduce)
        if self._fitted == "stream":
            return stream_scores(self.store, self._precondition(feats), k=k, progress=self.progress)
        parts = []
        for s in range(0, feats.n, block):
            scores = self._fitted.score(feats.rows(s, s + block))
            parts.append(topk_merge([(0, scores)], scores.shape[0], k))
        return TopK(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("helpful_idx", "helpful_scores", "harmful_idx", "harmful_scores")))

    def _query(self, query, reduce) -> Features:
        feats = query if isinstance(query, Features) else self.compute_features(query, desc="featurize query")
        ref = self.store.manifest["signature"] if self.store is not None else self.train_features.signature
        check_compatible(feats, Features({}, ref))
        if reduce == "mean":
            return feats.mean()
        if reduce != "none":
            raise ConfigError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        return feats

    def _precondition(self, feats: Features) -> dict[str, torch.Tensor]:
        return {name: feats.data[name].double() @ m for name, m in self._matrices.items()}

    def store_features(self) -> Features:
        """All stored train features in memory (for estimators that need every row at once)."""
        parts: dict[str, list] = {l.name: [] for l in self.store.layers}
        for _, chunk in self.store.iter_chunks():
            for k, v in chunk.items():
                parts[k].append(v)
        return Features({k: torch.cat(v) for k, v in parts.items()}, self.store.manifest["signature"],
                        damping_dims={l.name: l.damping_dim for l in self.store.layers})

    def self_influence(self) -> np.ndarray:
        """I(i, i) for every train example, shape (n_train,). Always ≤ 0 for PSD H̃; large −I(i,i)
        marks unusual (often mislabeled) examples."""
        if self._fitted is None:
            raise ConfigError("call featurize(train_loader) before self_influence()")
        if self._fitted == "stream":
            out = []
            for _, chunk in self.store.iter_chunks():
                s = sum((chunk[k].double() @ m * chunk[k].double()).sum(1) for k, m in self._matrices.items())
                out.append(-np.asarray(s, dtype=np.float32))
            return np.concatenate(out)
        return self._fitted.self_scores().cpu().numpy().astype(np.float32)
