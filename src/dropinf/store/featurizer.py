"""Featurizing: a loader in, rows of compressed per-example gradients out, keyed by dataset id.

A ``Featurizer`` is the model, its ``loss_fn``, the tracked layers, their compressors and the
capture options; it is the one loop over data of the library. ``batches(loader)`` yields, for
every batch, (dataset ids, {layer: (B, r_l) rows}, losses (B,)) with the shape and non-finite
checks done once, here; its two sinks are ``features(loader)`` (``Features`` in memory, rows in
increasing dataset-id order) and the on-disk store (store.writer, which takes a Featurizer).
``token_rows`` is the token-level form (one row per example and token of a measurement).

Rows are dataset ids: a shuffled loader or a collate function that drops examples gives rows keyed
by their dataset index, never misaligned ones. Loaders that are not DataLoaders over map-style
datasets number their examples 0, 1, ... in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture.check import nonfinite, raise_nonfinite
from ..capture.engine import BatchCapture
from ..capture.layers import LayerSpec, TrackSpec, output_layer, select_layers
from ..capture.tokens import TokenCapture
from ..errors import ConfigError, EmptyDataError, LossShapeError
from ..methods import default_setting
from .features import Features, check_signatures
from .ids import check_unique, indexed_loader

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


def to_device(batch, device):
    """Move every tensor of a batch to ``device``: tensors, lists, tuples, namedtuples, dicts and
    mappings (HF ``BatchEncoding``), dataclasses, and anything with a ``.to(device)`` method."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):           # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()}) if type(batch) is not dict else \
            {k: to_device(v, device) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, Mapping):                                       # BatchEncoding, UserDict
        to = getattr(batch, "to", None)
        if callable(to):
            return to(device)
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
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


class Featurizer:
    """model, loss_fn, compressor (default: dropinf.default_setting()'s ``Dropout(head_factor=4)``),
    track, options → rows.

    loss_fn(model, batch) -> per-example losses (B,); ``measure=`` replaces it for one pass (query
    measurements, dropinf.measures)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, compressor=None, track: TrackSpec = None,
                 options: CaptureOptions | None = None, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(model, batch) -> per-example losses (B,)")
        self.model, self.loss_fn = model, loss_fn
        self.compressor = compressor if compressor is not None else default_setting()[0]
        self.options = options or CaptureOptions()
        self.progress = progress
        self.layers = select_layers(model, track, fused=self.options.fused)
        slow = [l.name for l in self.layers if l.kind == "func"]
        if slow and self.options.fused:
            modules = dict(model.named_modules())
            kinds = sorted({type(modules[n]).__name__ for n in slow})
            warnings.warn(f"{len(slow)} tracked module(s) of type {kinds} have no fused hook and use torch.func "
                          f"per-example gradients (same compressor, slower): {slow[:4]}{' ...' if len(slow) > 4 else ''}",
                          stacklevel=3)
        self.output_layer = output_layer(model, self.layers)
        self.compressors = {l.name: self.compressor.build(l, output=l.name == self.output_layer) for l in self.layers}

    @property
    def device(self) -> torch.device:
        if self.options.device:
            return torch.device(self.options.device)
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def signature(self) -> dict:
        """What must be equal for two feature sets to be comparable (model, layers, r, compressor), and
        which tracked layer is the model's output layer (capture.layers.output_layer; derived from the
        model and layers, so not compared: stores written before it was recorded still match)."""
        return {"model": model_fingerprint(self.model, self.layers),
                "layers": [l.describe() for l in self.layers],
                "r": {l.name: self.compressors[l.name].r for l in self.layers},
                "compressor": self.compressor.signature(),
                "output_layer": self.output_layer}

    def damping_dims(self) -> dict[str, int]:
        """D_l of each layer for the damping rule: r_l for coordinate sampling, d_l for projections."""
        return {l.name: int(getattr(self.compressors[l.name], "damping_dim", self.compressors[l.name].r))
                for l in self.layers}

    @contextlib.contextmanager
    def mode(self):
        """The model in eval() while capturing (CaptureOptions.eval_mode), restored afterwards."""
        was = self.model.training
        if self.options.eval_mode:
            self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def to_device(self, batch):
        return to_device(batch, self.device)

    def capture(self, measure: LossFn | None = None) -> BatchCapture:
        """A capture session (one self-check, layouts learned once) for one pass over data."""
        return BatchCapture(self.model, measure or self.loss_fn, self.layers, self.compressors,
                            check=self.options.check, what="measure" if measure is not None else "loss_fn")

    def rows(self, capture: BatchCapture, batch, ids: torch.Tensor | None, first: int = 0, out: dict | None = None):
        """One batch: (ids, {layer: (B, r)}, losses (B,), ids whose rows hold NaN/inf, those layers).
        ids=None numbers the batch's examples from ``first``; out: row buffers the rows are written
        to (BatchCapture's ``out``)."""
        feats, loss = capture(self.to_device(batch), out=out)
        b = loss.shape[0]
        if ids is None:
            ids = torch.arange(first, first + b)
        elif ids.numel() != b:
            raise LossShapeError(f"loss_fn returned {b} losses for a batch of {ids.numel()} examples "
                                 f"(dataset ids {ids[:8].tolist()}...); it must return one per example.")
        bad, lays = nonfinite(feats, 0)
        return ids, feats, loss, (ids[bad].tolist() if bad else []), lays

    def batches(self, loader: Iterable, measure: LossFn | None = None, desc: str = "features",
                out: Callable[[int], dict | None] | None = None) \
            -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
        """(dataset ids, {layer: (B, r_l)}, losses (B,)) for every batch, with a progress bar. Raises
        NonFiniteGradientError (naming every bad id) after the last batch, EmptyDataError if none.
        out(n): row buffers for the batch after the first n examples (BatchCapture's ``out``)."""
        capture = self.capture(measure)
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        indexed = indexed_loader(loader)
        n, bad_ids, bad_layers = 0, [], set()
        with self.mode(), tqdm(total=total, desc=desc, unit="ex", disable=not self.progress) as bar:
            for item in (indexed if indexed is not None else loader):
                ids, batch = item if indexed is not None else (None, item)
                if batch is None:          # the collate function dropped every example of this batch
                    continue
                ids, feats, loss, bad, lays = self.rows(capture, batch, ids, n, out(n) if out is not None else None)
                bad_ids += bad
                bad_layers.update(lays)
                yield ids, feats, loss
                n += loss.shape[0]
                bar.update(loss.shape[0])
        raise_nonfinite(bad_ids, sorted(bad_layers))
        if n == 0:
            raise EmptyDataError(f"the {desc} loader yielded no examples; pass a non-empty DataLoader.")

    def features(self, loader: Iterable, desc: str = "features", measure: LossFn | None = None) -> Features:
        """Every example's rows in memory, in increasing dataset-id order (``Features.ids``)."""
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        # preallocate when the size is known, so the features are never held twice (list + cat)
        out = {l.name: torch.empty(total, self.compressors[l.name].r) for l in self.layers} if total else None
        parts: dict[str, list[torch.Tensor]] = {l.name: [] for l in self.layers}
        losses, id_parts, n, filled = [], [], 0, 0
        # the hooks write each batch's rows straight into the array (no per-batch copy), on its device
        direct = out is not None and self.device.type == "cpu"
        into = (lambda at: None if any(parts.values()) else {k: v[at:] for k, v in out.items()}) if direct else None
        for ids, feats, loss in self.batches(loader, measure, desc, into):
            b = loss.shape[0]
            fits = out is not None and n + b <= total and not any(parts.values())
            for k, v in feats.items():
                if fits:
                    if v.data_ptr() != out[k][n:n + b].data_ptr():
                        out[k][n:n + b] = v
                else:
                    parts[k].append(v.cpu())
            filled += b if fits else 0
            losses.append(loss.cpu())
            id_parts.append(ids.cpu())
            n += b
        if out is not None and n == total and not any(parts.values()):
            data = out
        else:  # rows dropped by the collate function, or a loader longer than its dataset claims
            data = {k: torch.cat(([out[k][:filled]] if out is not None else []) + v) for k, v in parts.items()}
        ids, loss_all = torch.cat(id_parts), torch.cat(losses)
        check_unique(ids)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):    # a shuffled loader: dataset order
            order = torch.argsort(ids)
            data, ids, loss_all = {k: v[order] for k, v in data.items()}, ids[order], loss_all[order]
        if measure is not None:
            _warn_zero_rows(data, ids)
        return Features(data, self.signature(), loss_all, self.damping_dims(), ids)

    def derive(self, full: Features) -> Features:
        """This featurizer's rows from full (``Identity()``) features of the same model and tracked
        layers — the numbers a fused capture with this compressor would give."""
        if full.signature.get("compressor", {}).get("kind") != "identity":
            raise ConfigError("derive_features needs features captured with compressor=Identity(); got "
                              f"{full.signature.get('compressor')}")
        mine = self.signature()
        check_signatures({k: full.signature.get(k) for k in ("model", "layers")},
                         {k: mine[k] for k in ("model", "layers")})
        data = {l.name: self.compressors[l.name].from_flat(full.data[l.name]).float() for l in self.layers}
        return Features(data, mine, full.losses, self.damping_dims(), full.ids)

    def token_rows(self, loader: Iterable, measure: LossFn) -> tuple[dict[str, torch.Tensor], int, int]:
        """Token-level rows of a (B, T)-valued measure: ({layer: (n·T, r)}, n, T) — example q's token t
        at row q·T + t, batches of shorter T padded with zero rows."""
        capture = TokenCapture(self.model, measure, self.layers, self.compressors, check=self.options.check)
        parts, n_q, T = [], 0, 0
        total = getattr(getattr(loader, "dataset", None), "__len__", lambda: None)()
        with self.mode(), tqdm(total=total, desc="token features", unit="ex", disable=not self.progress) as bar:
            for batch in loader:
                feats, values = capture.tokens(self.to_device(batch))
                bad, lays = nonfinite({k: v.flatten(1) for k, v in feats.items()}, n_q)
                raise_nonfinite(bad, lays)
                parts.append(feats)
                n_q, T = n_q + values.shape[0], max(T, values.shape[1])
                bar.update(values.shape[0])
        if n_q == 0:
            raise EmptyDataError("the query loader yielded no examples; pass a non-empty DataLoader.")
        data = {l.name: torch.cat([torch.nn.functional.pad(p[l.name], (0, 0, 0, T - p[l.name].shape[1]))
                                   for p in parts]).reshape(n_q * T, -1) for l in self.layers}
        return data, n_q, T


def _warn_zero_rows(data: dict, ids: torch.Tensor) -> None:
    """Warn, naming them, about query examples whose measure has an all-zero gradient (a completion
    whose every token is masked, say): their scores are all zero, not small."""
    nonzero = None
    for v in data.values():
        nz = (v != 0).any(1)
        nonzero = nz if nonzero is None else nonzero | nz
    if nonzero is not None and not bool(nonzero.all()):
        bad = ids[~nonzero].tolist()
        warnings.warn(f"the measure has an all-zero gradient for query ids {bad[:20]}{' ...' if len(bad) > 20 else ''}"
                      f" (no scored token? e.g. a completion masked entirely by −100 labels or cut by max_length): "
                      f"their scores are all zero.", stacklevel=4)
