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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture.engine import BatchCapture, nonfinite, raise_nonfinite
from .capture.functional import batch_size
from .capture.layers import LayerSpec, TrackSpec, select_layers
from .compress import Dropout, Identity
from .errors import ConfigError, EmptyDataError
from .estimators import FitContext, GaussNewton
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
        self.compressors = {l.name: self.compressor.build(l) for l in self.layers}
        self.train_features: Features | None = None
        self._fitted = None
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

    def compute_features(self, loader: Iterable, desc: str = "features") -> Features:
        """Compressed per-example gradients of every example the loader yields, in order."""
        capture = BatchCapture(self.model, self.loss_fn, self.layers, self.compressors)
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        # preallocate when the size is known, so the features are never held twice (list + cat)
        out = ({l.name: torch.empty(total, self.compressors[l.name].r) for l in self.layers}
               if total else None)
        parts: dict[str, list[torch.Tensor]] = {l.name: [] for l in self.layers}
        losses, n, bad_ids, bad_layers = [], 0, [], set()
        with self._mode(), tqdm(total=total, desc=desc, unit="ex", disable=not self.progress) as bar:
            for batch in loader:
                batch = _to(batch, self.device)
                feats, loss = capture(batch)
                ids, lays = nonfinite(feats, n)
                bad_ids += ids
                bad_layers.update(lays)
                b = loss.shape[0]
                for k, v in feats.items():
                    if out is not None and n + b <= total:
                        out[k][n:n + b] = v
                    else:
                        parts[k].append(v.cpu())
                losses.append(loss.cpu())
                n += b
                bar.update(b)
        raise_nonfinite(bad_ids, sorted(bad_layers))
        if n == 0:
            raise EmptyDataError(f"the {desc} loader yielded no examples; pass a non-empty DataLoader.")
        if out is not None and n == total and not any(parts.values()):
            data = out
        else:  # loader length unknown or not what the dataset claimed
            data = {k: torch.cat(([out[k][:min(n, total)]] if out is not None else []) + v) for k, v in parts.items()}
        dd = {l.name: int(getattr(self.compressors[l.name], 'damping_dim', self.compressors[l.name].r))
              for l in self.layers}
        return Features(data, self.signature(), torch.cat(losses), dd)

    def featurize(self, train_loader: Iterable) -> Features:
        """Capture train features and fit the estimator (H̃ and its solve). Returns the features."""
        self._train_loader = train_loader
        self.train_features = self.compute_features(train_loader, desc="featurize train")
        self.fit()
        return self.train_features

    def fit(self):
        if self.train_features is None:
            raise ConfigError("call featurize(train_loader) before fit/score")
        ctx = FitContext(self.model, self.loss_fn, self.layers, self.compressors, self.compressor,
                         self._train_loader, self.progress)
        with self._mode():
            self._fitted = self.estimator.fit(self.train_features, ctx)
        return self._fitted

    # ------------------------------------------------------------------ scores
    def score(self, query, reduce: Literal["none", "mean"] = "none") -> np.ndarray:
        """Influence scores, numpy float32 of shape (n_query, n_train) — or (1, n_train) with
        reduce="mean" (the query is the mean query gradient, paper eq. 1).

        query: a DataLoader (or any iterable of batches) or a Features object.
        scores[q, i] > 0: train example i is harmful to query q (up-weighting it raises q's loss).
        """
        if self._fitted is None:
            raise ConfigError("call featurize(train_loader) before score(query)")
        feats = query if isinstance(query, Features) else self.compute_features(query, desc="featurize query")
        check_compatible(feats, self.train_features)
        if reduce == "mean":
            feats = feats.mean()
        elif reduce != "none":
            raise ConfigError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        return self._fitted.score(feats).cpu().numpy().astype(np.float32)

    def self_influence(self) -> np.ndarray:
        """I(i, i) for every train example, shape (n_train,). Always ≤ 0 for PSD H̃; large −I(i,i)
        marks unusual (often mislabeled) examples."""
        if self._fitted is None:
            raise ConfigError("call featurize(train_loader) before self_influence()")
        return self._fitted.self_scores().cpu().numpy().astype(np.float32)
