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
import dataclasses
import hashlib
import json
import sys
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture.engine import BatchCapture, nonfinite, raise_nonfinite
from .capture.tokens import TokenCapture
from .capture.layers import LayerSpec, TrackSpec, select_layers
from .compress import Dropout
from .errors import ConfigError, DropinfError, EmptyDataError, FeatureMismatchError, LossShapeError
from .estimators import ExactHessian, FitContext, GaussNewton
from .estimators.preconditioner import estimator_signature
from .score.blockwise import TopK
from .score.scorer import ScoreOptions, Scorer
from .store.features import Features, check_compatible

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class CaptureOptions:
    """fused:    use the fused hooks where one exists (False: torch.func for every block).
    eval_mode: run the model in eval() while capturing (dropout/batch-norm frozen), then restore.
    device:   move batches to this device (default: the model's).
    check:    the capture self-check (capture.check): "first" batch of each capture (and any batch
              whose layout is read anew), "always" (every batch), or "never"."""

    fused: bool = True
    eval_mode: bool = True
    device: str | None = None
    check: str = "first"


def _to(batch, device):
    """Move every tensor of a batch to ``device``: tensors, lists, tuples, namedtuples, dicts and
    mappings (HF ``BatchEncoding``), dataclasses, and anything with a ``.to(device)`` method."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):           # namedtuple
        return type(batch)(*(_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)({k: _to(v, device) for k, v in batch.items()}) if type(batch) is not dict else \
            {k: _to(v, device) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _to(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, Mapping):                                       # BatchEncoding, UserDict
        to = getattr(batch, "to", None)
        if callable(to):
            return to(device)
        return type(batch)({k: _to(v, device) for k, v in batch.items()})
    return batch


def model_fingerprint(model: nn.Module, layers: list[LayerSpec]) -> str:
    """Hash of the tracked layers (names, kinds, order) and of *every* parameter and buffer of the
    model (BatchNorm statistics included): name, shape, dtype and 64 entries at positions drawn
    from a seed of the tensor's name. Milliseconds on a 7B model (no pass over the weights), yet a
    changed, retrained or permuted model differs at the sampled entries almost surely."""
    h = hashlib.sha1()
    for l in layers:
        h.update(f"{l.name}|{l.kind}|{l.param_names}|{l.param_shapes};".encode())
    tensors = [("p:" + n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    tensors += [("b:" + n, t) for n, t in model.named_buffers(remove_duplicate=False)]
    # nn.Embedding(max_norm=...) rescales the rows it looks up in place during every forward, so its
    # values change between a train and a query capture of the same model (rows first seen by the
    # queries). A positive rescaling keeps each entry's sign: those are what is hashed for it.
    renormed = {f"p:{n}.weight" if n else "p:weight" for n, m in model.named_modules()
                if isinstance(m, nn.Embedding) and m.max_norm is not None}
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        n = t.numel()
        if n == 0:
            continue
        flat = t.reshape(-1)
        if n > 64:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            flat = flat[torch.randint(0, n, (64,), generator=g).to(flat.device)]
        if name in renormed:
            flat = torch.sign(flat)
        h.update(flat.to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Attributor:
    """Influence of every training example on every query example.

    model:      a trained torch.nn.Module (evaluated at its current parameters)
    loss_fn:    loss_fn(model, batch) -> per-example losses (B,); the batch is whatever the
                DataLoader yields (tensors, tuples, dicts)
    compressor: Identity() (Orig), Dropout(r, seed), Gaussian(r, seed), ...
    estimator:  GaussNewton() (paper default), ExactHessian() (small models), ...
    track:      None → every nn.Linear; "all"; or module names / glob patterns / types
    score_options: ScoreOptions(device, dtype, query_batch, train_batch) for fit and scoring
               (default: the model's device, float32)
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, compressor=None, estimator=None,
                 track: TrackSpec = None, options: CaptureOptions | None = None, progress: bool = True,
                 score_options: ScoreOptions | None = None):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> per-example losses (B,)")
        self.model, self.loss_fn = model, loss_fn
        self.compressor = compressor if compressor is not None else Dropout()
        self.estimator = estimator if estimator is not None else GaussNewton()
        if options is None and isinstance(self.estimator, ExactHessian):
            # the validation reference: per-example gradients from torch.func, exact whatever the
            # model or loss_fn does (a regulariser inside loss_fn included), unless options say otherwise
            options = CaptureOptions(fused=False)
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
        self.score_options = score_options or ScoreOptions()
        self.train_features: Features | None = None
        self.store = None
        self.preconditioner = None     # the fitted estimator (estimators.Preconditioner)
        self.fit_status = None         # "fitted", or "loaded PATH" when reused from a store
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

    def compute_features(self, loader: Iterable, desc: str = "features", measure: LossFn | None = None) -> Features:
        """Compressed per-example gradients of every example the loader yields (of ``measure``
        instead of the loss when given: dropinf.measures), as rows in
        increasing dataset-id order (``Features.ids``): a shuffled loader or a collate function that
        drops examples gives rows keyed by their dataset index, never misaligned ones. Loaders that
        are not DataLoaders over map-style datasets number their examples 0, 1, ... in order."""
        from .store.ids import check_unique, indexed_loader
        capture = BatchCapture(self.model, measure or self.loss_fn, self.layers, self.compressors,
                               check=self.options.check)
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        indexed = indexed_loader(loader)
        # preallocate when the size is known, so the features are never held twice (list + cat)
        out = ({l.name: torch.empty(total, self.compressors[l.name].r) for l in self.layers}
               if total else None)
        parts: dict[str, list[torch.Tensor]] = {l.name: [] for l in self.layers}
        losses, id_parts, n, filled, bad_ids, bad_layers = [], [], 0, 0, [], set()
        with self._mode(), tqdm(total=total, desc=desc, unit="ex", disable=not self.progress) as bar:
            for item in (indexed if indexed is not None else loader):
                ids, batch = item if indexed is not None else (None, item)
                if batch is None:          # the collate function dropped every example of this batch
                    continue
                batch = _to(batch, self.device)
                feats, loss = capture(batch)
                b = loss.shape[0]
                if ids is None:
                    ids = torch.arange(n, n + b)
                elif ids.numel() != b:
                    raise LossShapeError(f"loss_fn returned {b} losses for a batch of {ids.numel()} examples "
                                         f"(dataset ids {ids[:8].tolist()}...); it must return one per example.")
                bad, lays = nonfinite(feats, 0)
                bad_ids += ids[bad].tolist() if bad else []
                bad_layers.update(lays)
                fits = out is not None and n + b <= total and not any(parts.values())
                for k, v in feats.items():
                    if fits:
                        out[k][n:n + b] = v
                    else:
                        parts[k].append(v.cpu())
                filled += b if fits else 0
                losses.append(loss.cpu())
                id_parts.append(ids.cpu())
                n += b
                bar.update(b)
        raise_nonfinite(bad_ids, sorted(bad_layers))
        if n == 0:
            raise EmptyDataError(f"the {desc} loader yielded no examples; pass a non-empty DataLoader.")
        if out is not None and n == total and not any(parts.values()):
            data = out
        else:  # rows dropped by the collate function, or a loader longer than its dataset claims
            data = {k: torch.cat(([out[k][:filled]] if out is not None else []) + v) for k, v in parts.items()}
        ids, loss_all = torch.cat(id_parts), torch.cat(losses)
        check_unique(ids)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):    # a shuffled loader: dataset order
            order = torch.argsort(ids)
            data, ids, loss_all = {k: v[order] for k, v in data.items()}, ids[order], loss_all[order]
        return Features(data, self.signature(), loss_all, self._damping_dims(), ids)

    def _damping_dims(self) -> dict[str, int]:
        """D_l of each layer for the damping rule: r_l for coordinate sampling, d_l for projections."""
        return {l.name: int(getattr(self.compressors[l.name], 'damping_dim', self.compressors[l.name].r))
                for l in self.layers}

    def featurize(self, train_loader: Iterable, store: str | Path | None = None, chunk_size: int = 4096,
                  dtype: str = "float32"):
        """Capture train features and fit the estimator (its preconditioner M).

        store=None: features in memory; returns them (Features).
        store=PATH: stream them to an on-disk FeatureStore in chunks of ``chunk_size`` rows
        (dtype "float32", "float16" or "bfloat16"), resuming a previous interrupted run into the
        same folder, split across processes under torchrun; the fitted preconditioner is saved in
        the store; returns the FeatureStore.
        """
        self._train_loader = train_loader
        if store is not None:
            from .store.build import featurize_to_store
            self.store = featurize_to_store(self, train_loader, store, chunk_size, dtype)
            self.train_features, self._store_ids = None, None
            self.fit()
            return self.store
        self.store = None
        self.use_features(self.compute_features(train_loader, desc="featurize train"))
        return self.train_features

    # ------------------------------------------------------------------ features computed elsewhere
    def derive_features(self, full: Features) -> Features:
        """This attributor's compressed features from full (``Identity()``) features of the same
        model and tracked layers — the numbers a fused capture with this compressor would give.
        Capture once with Identity, then derive Dropout/Gaussian/LoGra features of any seed."""
        if full.signature.get("compressor", {}).get("kind") != "identity":
            raise ConfigError("derive_features needs features captured with compressor=Identity(); got "
                              f"{full.signature.get('compressor')}")
        mine = self.signature()
        check_compatible(Features({}, {k: full.signature.get(k) for k in ("model", "layers")}),
                         Features({}, {k: mine[k] for k in ("model", "layers")}))
        data, dims = {}, {}
        for l in self.layers:
            c = self.compressors[l.name]
            data[l.name] = c.from_flat(full.data[l.name]).float()
            dims[l.name] = int(getattr(c, "damping_dim", c.r))
        return Features(data, self.signature(), full.losses, dims, full.ids)

    def use_features(self, train: Features, train_loader: Iterable | None = None) -> "Attributor":
        """Adopt precomputed train features (from ``compute_features`` or ``derive_features``) and
        fit the estimator on them. ``train_loader`` is needed only by ExactHessian and
        LiSSA(hvp="model"), which re-run the model."""
        check_compatible(train, Features({}, self.signature()))
        if train.n == 0:
            raise EmptyDataError("the train features hold no rows")
        self.train_features, self.store = train, None
        if train_loader is not None:
            self._train_loader = train_loader
        self.fit()
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
        check_compatible(Features({}, attr.signature()), Features({}, sig))
        attr.store, attr._store_ids = st, None
        attr._train_loader = train_loader
        attr.fit()
        return attr

    # ------------------------------------------------------------------ precondition
    @property
    def train_source(self):
        """The train rows (RowSource): the store if there is one, else the in-memory Features."""
        if self.store is not None:
            return self.store
        if self.train_features is None:
            raise ConfigError("call featurize(train_loader) (or use_features / from_store) first")
        return self.train_features

    def _part(self) -> tuple[int, int]:
        from .dist import dist_info
        return dist_info()

    def fit(self, train_loader: Iterable | None = None):
        """Fit the estimator's preconditioner on the train rows (streamed; on ``score_options.device``
        or the model's device; split across torchrun ranks). With a store, a preconditioner saved
        there for the same estimator options is loaded instead, and a new fit is saved."""
        if train_loader is not None:
            self._train_loader = train_loader
        source = self.train_source
        saved = self._saved_path() if self.store is not None else None
        if saved is not None and saved.exists():
            from .estimators.preconditioner import Preconditioner
            try:
                pre = Preconditioner.load(saved)
            except Exception as exc:  # a damaged file: refit and overwrite it
                self._say(f"dropinf: the saved preconditioner {saved} cannot be read ({exc}); refitting.")
            else:
                if pre.estimator == estimator_signature(self.estimator) and pre.n == source.n:
                    self.preconditioner, self.fit_status = pre, f"loaded {saved}"
                    return pre
        if self.store is not None:
            self._say(f"dropinf: fitting {type(self.estimator).__name__} on {source.n} stored rows "
                      f"(no saved preconditioner with these options in {self.store.path})")
        ctx = FitContext(self.model, self.loss_fn, self.layers, self.compressors, self.compressor,
                         self._train_loader, self.progress, self.score_device, self._part(),
                         self._batch_to_device)
        with self._mode():
            pre = self.estimator.fit(source, ctx)
        self.preconditioner, self.fit_status = pre, "fitted"
        if saved is not None and ctx.part[0] == 0:
            try:
                pre.save(saved)
            except (OSError, DropinfError) as exc:    # e.g. a full disk: the fit itself is fine
                warnings.warn(f"could not save the fitted preconditioner to {saved} ({exc}); it will be "
                              f"refitted the next time this store is opened.", stacklevel=2)
        return pre

    def _saved_path(self) -> Path:
        sig = estimator_signature(self.estimator)
        h = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
        return self.store.precond_dir / f"{sig.get('name', sig['class'])}-{h}.npz"

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    @property
    def score_device(self) -> torch.device:
        return torch.device(self.score_options.device) if self.score_options.device else self.device

    def _scorer(self, options: ScoreOptions | None) -> Scorer:
        if self.preconditioner is None:
            raise ConfigError("call featurize(train_loader) before scoring")
        opts = options or self.score_options
        if opts.device is None:
            opts = dataclasses.replace(opts, device=str(self.score_device))
        return Scorer(self.preconditioner, self.train_source, opts, self.progress, self._part())

    # ------------------------------------------------------------------ scores
    def score(self, query, reduce: Literal["none", "mean"] = "none", out: np.ndarray | None = None,
              per_layer: bool = False, options: ScoreOptions | None = None, measure: LossFn | None = None):
        """Influence scores, numpy float32 of shape (n_query, n_train) — or (1, n_train) with
        reduce="mean" (the query is the mean query gradient, paper eq. 1).

        query:     a DataLoader (or any iterable of batches), a Features object, or a FeatureStore
                   of query features (for more queries than fit in memory).
        out:       optional (n_query, n_train) float32 array to fill, e.g. a memmap from
                   np.lib.format.open_memmap(path, "w+", np.float32, shape) for matrices larger than RAM.
        per_layer: return {layer: (n_query, n_train)} whose sum over layers is the score matrix
                   (which layers drive an attribution).
        options:   ScoreOptions (device, dtype, query/train batch sizes) for this call.
        measure:   the query side's function instead of the loss, measure(model, batch) -> (B,)
                   (dropinf.measures: margin, completion_nll, ...); the train side stays the loss.
        scores[q, i] > 0: train example i is harmful to query q (up-weighting it raises q's loss).
        """
        if self.preconditioner is None:
            raise ConfigError("call featurize(train_loader) before score(query)")
        return self._scorer(options).dense(self._query(query, reduce, measure), out=out, per_layer=per_layer)

    def topk(self, query, k: int = 10, reduce: Literal["none", "mean"] = "none",
             options: ScoreOptions | None = None, measure: LossFn | None = None) -> TopK:
        """The k most helpful (most negative I) and most harmful (most positive I) train examples
        per query, as dataset ids (``train_ids``), without holding the (n_query, n_train) matrix."""
        if self.preconditioner is None:
            raise ConfigError("call featurize(train_loader) before topk(query)")
        if k < 1:
            raise ConfigError("k must be ≥ 1")
        top = self._scorer(options).topk(self._query(query, reduce, measure), k)
        ids = self.train_ids.numpy()
        return TopK(ids[top.helpful_idx], top.helpful_scores, ids[top.harmful_idx], top.harmful_scores)

    @property
    def train_ids(self) -> torch.Tensor:
        """(n_train,) dataset index of each score column (increasing; examples a collate function
        dropped are absent)."""
        if self.store is not None:
            if getattr(self, "_store_ids", None) is None:
                self._store_ids = self.store.ids()
            return self._store_ids
        return self.train_source.row_ids()

    def self_influence(self, options: ScoreOptions | None = None) -> np.ndarray:
        """I(i, i) for every train example, shape (n_train,). Always ≤ 0 for PSD M; large −I(i,i)
        marks unusual (often mislabeled) examples. O(n·R²) for every estimator."""
        if self.preconditioner is None:
            raise ConfigError("call featurize(train_loader) before self_influence()")
        return self._scorer(options).self_influence()

    def report(self, query, out: str | Path = "report.html", **kw) -> Path:
        """Write one self-contained HTML page to browse this attribution; returns its path.

        For each query (from the ``query`` DataLoader): the query (text or image), its label,
        prediction and loss, and its ``k`` most helpful and most harmful training examples with
        dataset ids, labels, scores and content; the most suspicious training examples; score
        histograms; the run's settings; what the sign means and any degenerate-run warnings.

        k                      entries per side per query (default 10)
        train_data, query_data map-style datasets to show examples from (default: the loaders')
        render, query_render   render(example) -> str | image tensor | {"text", "image", "label"}
                               (default: dropinf.report.default_render(tokenizer, label_names))
        tokenizer, label_names for the default renderer (decode input_ids; class names)
        predict                predict(model, batch) -> one prediction per example, shown per query
        measure                the query-side function (dropinf.measures); default: the loss
        suspicious             "self" (self-influence, default), "queries" (influence on the mean
                               query: mislabel detection against clean queries), a validation
                               DataLoader, or None
        n_suspicious, marks    rows on that page; {train id: badge} or a bool array to mark
                               (e.g. known flipped labels)
        title                  the page title
        """
        from .report import attribution_report
        return attribution_report(self, query, out, **kw)

    def token_scores(self, query, measure: LossFn, options: ScoreOptions | None = None) -> np.ndarray:
        """Token-level influence, float32 (n_query, T, n_train): scores[q, t, i] is the influence of
        train example i on token t of query q, for a measure returning (B, T) values (e.g.
        ``dropinf.measures.token_nll``: which training examples drove each generated token).
        Summed over t it equals ``score(query, measure=<the summed measure>)`` (influence is linear
        in the measure). One backward pass per token column; batches of different T are padded
        with zero scores. Only layers with fused hooks (Linear, Conv1D, Conv2d, Embedding, LoRA)."""
        if self.preconditioner is None:
            raise ConfigError("call featurize(train_loader) before token_scores(query, measure)")
        capture = TokenCapture(self.model, measure, self.layers, self.compressors, check=self.options.check)
        parts, n_q, T = [], 0, 0
        total = getattr(getattr(query, "dataset", None), "__len__", lambda: None)()
        with self._mode(), tqdm(total=total, desc="token features", unit="ex", disable=not self.progress) as bar:
            for batch in query:
                feats, values = capture.tokens(_to(batch, self.device))
                bad, lays = nonfinite({k: v.flatten(1) for k, v in feats.items()}, n_q)
                raise_nonfinite(bad, lays)
                parts.append(feats)
                n_q, T = n_q + values.shape[0], max(T, values.shape[1])
                bar.update(values.shape[0])
        if n_q == 0:
            raise EmptyDataError("the query loader yielded no examples; pass a non-empty DataLoader.")
        data = {l.name: torch.cat([torch.nn.functional.pad(p[l.name], (0, 0, 0, T - p[l.name].shape[1]))
                                   for p in parts]).reshape(n_q * T, -1) for l in self.layers}
        rows = Features(data, self.signature(), torch.zeros(n_q * T), self._damping_dims(), torch.arange(n_q * T))
        return self.score(rows, options=options).reshape(n_q, T, -1)

    def _query(self, query, reduce, measure=None):
        from .store.disk import FeatureStore
        if isinstance(query, (FeatureStore, Features)):
            if measure is not None:
                raise ConfigError("measure= applies when the query is a loader (features are already captured "
                                  "with their function); pass the query DataLoader instead.")
            feats = query
        else:
            feats = self.compute_features(query, desc="featurize query", measure=measure)
        ref = self.store.manifest["signature"] if self.store is not None else self.train_features.signature
        check_compatible(Features({}, feats.signature), Features({}, ref))
        if reduce == "mean":
            return _mean_rows(feats)
        if reduce != "none":
            raise ConfigError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        return feats


def _mean_rows(src) -> Features:
    """One pseudo-example whose features are the mean over the rows of a RowSource (eq. 1's query)."""
    if isinstance(src, Features):
        return src.mean()
    sums = {l: torch.zeros(1, src.layer_r(l), dtype=torch.float64) for l in src.layer_names()}
    for _, chunk in src.iter_chunks():
        for l, v in chunk.items():
            sums[l] += v.double().sum(0, keepdim=True)
    return Features({l: (v / src.n).float() for l, v in sums.items()}, src.signature,
                    damping_dims={l: src.damping_dim(l) for l in src.layer_names()})
