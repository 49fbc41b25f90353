"""The user's entry point: featurize the training data once, score any number of query sets.

    attr = Attributor(model, loss_fn)          # dropinf.default_setting(): Dropout(r=2048, head_factor=4),
                                               # GaussNewton(members=4, head_damping=0.03)
    attr.featurize(train_loader)
    scores = attr.score(query_loader)      # numpy float32, shape (n_query, n_train)

``loss_fn(model, batch)`` returns per-example losses, shape (B,). Rows of ``scores`` follow the
query loader's order, columns the train loader's order. Sign (paper eq. 1/3):
``scores[q, i] = I(q, i) = − g̃_qᵀ H̃⁻¹ g̃_i`` — positive means up-weighting train example i
raises q's loss (harmful), negative means it lowers it (helpful).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn

from .analyses import Analyses
from .capture.layers import TrackSpec
from .errors import ConfigError, EmptyDataError, FeatureMismatchError
from .estimators import ExactHessian, FitContext, Preconditioner
from .estimators.preconditioner import estimator_signature
from .estimators.cache import PreconditionerCache
from .fitted import Fitted
from .methods import default_estimator
from .report.options import ReportOptions
from .score import open_scores_for_ranks
from .score.topk import TopK
from .score.scorer import ScoreOptions, Scorer
from .store.disk import FeatureStore
from .store.features import Features, RowSource, check_signatures
from .store.featurizer import CaptureOptions, Featurizer
from .store.writer import StoreOptions

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Attributor(Analyses):
    """Influence of every training example on every query example.

    model:      a trained torch.nn.Module (evaluated at its current parameters)
    loss_fn:    loss_fn(model, batch) -> per-example losses (B,); the batch is whatever the
                DataLoader yields (tensors, tuples, dicts)
    compressor: default Dropout(head_factor=4) (r=2048 per layer, 8192 on the output layer);
                Identity() (Orig), Dropout(r, seed), Gaussian(r, seed), ...
    estimator:  default: GaussNewton(members=4, head_damping=0.03) for Dropout (dropinf.default_setting(),
                measured),
                GaussNewton() otherwise; dropinf.paper_setting() is the paper's Dropout(r=16) + rule
    track:      None → every nn.Linear; "all"; or module names / glob patterns / types
    score_options: ScoreOptions(device, dtype, query_batch, train_batch) for fit and scoring
               (default: the model's device, float32)

    Turning loaders into rows is ``self.featurizer``'s job (store.featurizer.Featurizer: model,
    loss_fn, compressor, track, options); the Attributor adds the fitted estimator and scoring.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, compressor=None, estimator=None,
                 track: TrackSpec = None, options: CaptureOptions | None = None, progress: bool = True,
                 score_options: ScoreOptions | None = None):
        estimator = estimator if estimator is not None else default_estimator(compressor)
        if options is None and isinstance(estimator, ExactHessian):
            # the validation reference: per-example gradients from torch.func, exact whatever the
            # model or loss_fn does (a regulariser inside loss_fn included), unless options say otherwise
            options = CaptureOptions(fused=False)
        self.featurizer = Featurizer(model, loss_fn, compressor, track, options, progress)
        self.estimator = estimator
        self.score_options = score_options or ScoreOptions()
        self.state: Fitted | None = None   # set by featurize / use_features / from_store
        self.train_loader = None          # re-read by ExactHessian / LiSSA(hvp='model') and the report

    # ------------------------------------------------------------------ features (store.featurizer)
    model = property(lambda self: self.featurizer.model)
    loss_fn = property(lambda self: self.featurizer.loss_fn)
    compressor = property(lambda self: self.featurizer.compressor)
    layers = property(lambda self: self.featurizer.layers)
    compressors = property(lambda self: self.featurizer.compressors)
    options = property(lambda self: self.featurizer.options)
    device = property(lambda self: self.featurizer.device)

    @property
    def progress(self) -> bool:
        return self.featurizer.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self.featurizer.progress = value

    def signature(self) -> dict:
        return self.featurizer.signature()

    def compute_features(self, loader: Iterable, desc: str = "features", measure: LossFn | None = None) -> Features:
        """Rows of every example the loader yields (of ``measure`` instead of the loss when given:
        dropinf.measures), in increasing dataset-id order: ``Featurizer.features``."""
        return self.featurizer.features(loader, desc, measure)

    def featurize(self, train_loader: Iterable, store: str | Path | StoreOptions | None = None):
        """Capture train features and fit the estimator (its preconditioner M).

        store=None: features in memory; returns them (Features). The estimator's options are
        checked now and it is fitted on first use (score, topk, ... or ``attr.preconditioner``),
        so a run that only calls ``mislabeled`` never fits it; ``fit()`` fits at once.
        store=PATH or StoreOptions(PATH, chunk_size=None (≈ 64 MiB shards), dtype="float32"): stream
        them, batch by batch, to an on-disk FeatureStore in chunks, resuming a previous interrupted run into the same folder,
        split across processes under torchrun; the fitted preconditioner is saved in the store;
        returns the FeatureStore.
        """
        self.train_loader = train_loader
        if store is not None:
            from .store.writer import featurize_to_store
            self._fit(featurize_to_store(self.featurizer, train_loader, store))
            return self.state.train
        self.use_features(self.compute_features(train_loader, desc="featurize train"))
        return self.state.train

    # ------------------------------------------------------------------ features computed elsewhere
    def derive_features(self, full: Features) -> Features:
        """This attributor's compressed features from full (``Identity()``) features of the same
        model and tracked layers — the numbers a fused capture with this compressor would give.
        Capture once with Identity, then derive Dropout/Gaussian/LoGra features of any seed."""
        return self.featurizer.derive(full)

    def use_features(self, train: Features, train_loader: Iterable | None = None) -> "Attributor":
        """Adopt precomputed train features (from ``compute_features`` or ``derive_features``) and
        fit the estimator on them. ``train_loader`` is needed only by ExactHessian and
        LiSSA(hvp="model"), which re-run the model. The fit is made on first use (see ``featurize``)."""
        check_signatures(train.signature, self.signature())
        if train.n == 0:
            raise EmptyDataError("the train features hold no rows")
        if train_loader is not None:
            self.train_loader = train_loader
        self._fit(train, lazy=True)
        return self

    @classmethod
    def from_store(cls, path: str | Path, model: nn.Module, loss_fn: LossFn, estimator=None,
                   options: CaptureOptions | None = None, progress: bool = True, train_loader=None,
                   score_options: ScoreOptions | None = None) -> "Attributor":
        """Reopen a complete store built earlier (by featurize(..., store=PATH) or `dropinf
        featurize`) with the same model; the compressor, seed, r and layers come from its
        manifest, and a model that differs from the one that built the store is refused. The
        preconditioner saved for this estimator (same options) is loaded instead of refitted.
        ``train_loader``: needed only by ExactHessian / LiSSA(hvp="model") when they must refit."""
        from .compress import from_signature
        from .store.disk import FeatureStore

        st = FeatureStore.open(path)
        sig = st.manifest["signature"]
        fused = any(l["kind"] == "fused" for l in sig["layers"])
        opts = options or CaptureOptions(fused=fused)
        names = [l["name"] for l in sig["layers"]]
        modules = dict(model.named_modules())
        absent = [n for n in names if n not in modules]
        if absent:
            raise FeatureMismatchError(
                f"the store {path} was built on tracked layers {absent[:4]}{' ...' if len(absent) > 4 else ''}, which "
                f"this model does not have (renamed modules, a wrapper such as peft or DDP, or another "
                f"architecture). Open it with the model that built it, or rebuild the store.")
        attr = cls(model, loss_fn, compressor=from_signature(sig["compressor"]), estimator=estimator,
                   track=names, options=opts, progress=progress, score_options=score_options)
        check_signatures(attr.signature(), sig)
        attr.train_loader = train_loader
        attr._fit(st)
        return attr

    # ------------------------------------------------------------------ fitted state
    def fitted(self, what: str = "scoring") -> Fitted:
        """The fitted state, or a ConfigError saying what to call first (the one guard)."""
        if self.state is None:
            raise ConfigError(f"call featurize(train_loader) (or use_features / from_store) before {what}")
        return self.state

    store = property(lambda self: self.state.train if self.state and isinstance(self.state.train, FeatureStore)
                     else None, doc="the on-disk FeatureStore of the train rows, or None (rows in memory)")
    train_features = property(lambda self: self.state.train if self.state and isinstance(self.state.train, Features)
                              else None, doc="the in-memory train Features, or None (rows in a store)")
    preconditioner = property(lambda self: self.state.preconditioner if self.state else None,
                              doc="the fitted estimator (estimators.Preconditioner), or None")
    fit_status = property(lambda self: self.state.status if self.state else None,
                          doc='"fitted"; "loaded PATH" when the preconditioner was reused from a store; '
                              '"pending" for in-memory rows not yet scored (fitted on first use)')
    train_source = property(lambda self: self.fitted("reading the train rows").train,
                            doc="the train rows (RowSource): a FeatureStore or in-memory Features")

    def _shard(self):
        from .dist import dist_info
        return dist_info()

    def fit(self, train_loader: Iterable | None = None) -> Preconditioner:
        """Refit the estimator's preconditioner on the train rows (e.g. after changing
        ``self.estimator``); see ``_fit``."""
        if train_loader is not None:
            self.train_loader = train_loader
        return self._fit(self.fitted("fit()").train)

    def _fit(self, source: RowSource, lazy: bool = False) -> Preconditioner | None:
        """Fit on ``source`` (streamed; on ``score_options.device`` or the model's device; split
        across torchrun ranks) and make it the fitted state. With a store, a preconditioner saved
        there for the same estimator options is loaded instead, and a new fit is saved.
        lazy=True and an estimator with ``check(train, ctx)`` (GaussNewton), in one process: check
        its options now (their errors stay here) and fit on first use of ``state.preconditioner``.
        Under torchrun the fit is collective, so every rank fits here, at the same call."""
        estimator = self.estimator
        if lazy and hasattr(estimator, "check") and self._shard().world == 1:
            estimator.check(source, self._fit_context())
            self.state = Fitted(source, None, "pending", pending=lambda: self._fit_estimator(source, estimator))
            return None
        pre, status = self._fit_estimator(source, estimator)
        self.state = Fitted(source, pre, status)
        return pre

    def fitted_with(self, estimator) -> Preconditioner:
        """``estimator``'s preconditioner on this attributor's train rows — its own fit for
        ``self.estimator``; any other is fitted once on the same rows and kept (and saved beside
        a store), e.g. the mislabel estimator of ``mislabeled``."""
        state = self.fitted("fitted_with(estimator)")
        if estimator == self.estimator:
            return state.preconditioner
        key = json.dumps(estimator_signature(estimator), sort_keys=True)
        if key not in state.others:
            state.others[key] = self._fit_estimator(state.train, estimator)[0]
        return state.others[key]

    def _fit_estimator(self, source: RowSource, estimator) -> tuple[Preconditioner, str]:
        on_disk = isinstance(source, FeatureStore)
        cache = PreconditionerCache(source.precond_dir, estimator) if on_disk else None
        pre = cache.load(source.n, self._say) if cache is not None else None
        if pre is not None:
            return pre, f"loaded {cache.path}"
        if on_disk:
            self._say(f"dropinf: fitting {type(estimator).__name__} on {source.n} stored rows "
                      f"(no saved preconditioner with these options in {source.path})")
        ctx = self._fit_context()
        with self.featurizer.mode():
            pre = estimator.fit(source, ctx)
        if cache is not None and ctx.shard.rank == 0:
            cache.save(pre)
        return pre, "fitted"

    def _fit_context(self) -> FitContext:
        return FitContext(self.model, self.loss_fn, self.layers, self.compressors, self.compressor,
                          self.train_loader, self.progress, self.score_device, self._shard(),
                          self.featurizer.to_device, self.score_options.fit_memory_mb)

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    @property
    def score_device(self) -> torch.device:
        return torch.device(self.score_options.device) if self.score_options.device else self.device

    def _scorer(self, options: ScoreOptions | None, preconditioner=None) -> Scorer:
        state = self.fitted()
        opts = options or self.score_options
        if opts.device is None:
            opts = dataclasses.replace(opts, device=str(self.score_device))
        return Scorer(preconditioner or state.preconditioner, state.train, opts, self.progress, self._shard())

    # ------------------------------------------------------------------ scores
    def score(self, query, reduce: Literal["none", "mean"] = "none", out: np.ndarray | None = None,
              per_layer: bool = False, options: ScoreOptions | None = None, measure: LossFn | None = None):
        """Influence scores, numpy float32 of shape (n_query, n_train) — or (1, n_train) with
        reduce="mean" (the query is the mean query gradient, paper eq. 1).

        query:     a DataLoader (or any iterable of batches), a Features object, or a FeatureStore
                   of query features (for more queries than fit in memory).
        out:       optional (n_query, n_train) float32 array to fill, or a path: a .npy memmap is
                   created there (its space reserved up front) and returned — for matrices larger
                   than RAM; under torchrun rank 0 creates it and every rank fills its own columns.
        per_layer: return {layer: (n_query, n_train)} whose sum over layers is the score matrix
                   (which layers drive an attribution).
        options:   ScoreOptions (device, dtype, query/train batch sizes) for this call.
        measure:   the query side's function instead of the loss, measure(model, batch) -> (B,)
                   (dropinf.measures: margin, completion_nll, ...); the train side stays the loss.
        scores[q, i] > 0: train example i is harmful to query q (up-weighting it raises q's loss).
        """
        self.fitted("score(query)")
        q = self._query(query, reduce, measure)
        if isinstance(out, (str, Path)):
            if per_layer:
                raise ConfigError("out=PATH writes one score matrix; per_layer=True returns one per layer in memory")
            out = open_scores_for_ranks(out, (q.n, self.fitted().train.n), self._shard())
            self._scorer(options).dense(q, out=out)
            out.flush()
            return out
        return self._scorer(options).dense(q, out=out, per_layer=per_layer)

    def topk(self, query, k: int = 10, reduce: Literal["none", "mean"] = "none",
             options: ScoreOptions | None = None, measure: LossFn | None = None) -> TopK:
        """The k most helpful (most negative I) and most harmful (most positive I) train examples
        per query, as dataset ids (``train_ids``), without holding the (n_query, n_train) matrix."""
        self.fitted("topk(query)")
        if k < 1:
            raise ConfigError("k must be ≥ 1")
        top = self._scorer(options).topk(self._query(query, reduce, measure), k)
        ids = self.train_ids.numpy()
        return TopK(ids[top.helpful_idx], top.helpful_scores, ids[top.harmful_idx], top.harmful_scores)

    @property
    def train_ids(self) -> torch.Tensor:
        """(n_train,) dataset index of each score column (increasing; examples a collate function
        dropped are absent)."""
        state = self.fitted("train_ids")
        if state.ids is None:
            state.ids = state.train.row_ids()
        return state.ids

    def report(self, query, out: str | Path = "report.html", options: ReportOptions | None = None, **kw) -> Path:
        """Write one self-contained HTML page to browse this attribution; returns its path.

        For each query (from the ``query`` DataLoader): the query (text or image), its label,
        prediction and loss, and its ``k`` most helpful and most harmful training examples with
        dataset ids, labels, scores and content; the most suspicious training examples; score
        histograms; the run's settings; what the sign means and any degenerate-run warnings.
        ``options``: ReportOptions (k, renderers, tokenizer, label_names, predict, measure,
        suspicious, marks, title); keyword arguments replace single fields of it.
        """
        from .report import attribution_report
        return attribution_report(self, query, out, ReportOptions.of(options, **kw))

    def _query(self, query, reduce, measure=None):
        if isinstance(query, RowSource):          # rows captured already (Features, FeatureStore)
            if measure is not None:
                raise ConfigError("measure= applies when the query is a loader (features are already captured "
                                  "with their function); pass the query DataLoader instead.")
            feats = query
        else:
            feats = self.compute_features(query, desc="featurize query", measure=measure)
        check_signatures(feats.signature, self.fitted().train.signature)
        if reduce == "mean":
            return feats.mean()
        if reduce != "none":
            raise ConfigError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        return feats
