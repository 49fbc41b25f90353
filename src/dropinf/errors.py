"""Exceptions raised by dropinf. Every message names the problem and what to do about it."""

from __future__ import annotations


class DropinfError(Exception):
    """Base class for every error dropinf raises on purpose."""


class ConfigError(DropinfError, ValueError):
    """An option or an argument is invalid (bad r, unknown layer name, ...)."""


class NoTrackableLayersError(ConfigError):
    """The model has no module that dropinf can track with the given selection."""


class EmptyDataError(DropinfError, ValueError):
    """A data loader yielded no examples."""


class NonFiniteGradientError(DropinfError, FloatingPointError):
    """A per-example gradient contains NaN or inf; the message names the example ids."""


class FeatureMismatchError(DropinfError, ValueError):
    """Query and train features were produced by different models / layers / compressors / seeds."""


class IncompatibleMethodError(DropinfError, TypeError):
    """An estimator cannot run on the features of the chosen compressor (e.g. ExactHessian + Gaussian)."""


class LossShapeError(DropinfError, ValueError):
    """loss_fn(model, batch) did not return one loss per example."""


class StoreError(DropinfError, OSError):
    """A store is missing, incomplete, truncated or corrupted; the message names the file."""


class MissingDataError(DropinfError, FileNotFoundError):
    """A real dataset or model that ships in a package is not installed; the message names the package."""


class CaptureError(DropinfError, RuntimeError):
    """Capture could not compute per-example gradients of this model (its backward pass failed, or
    the torch.func path could not run it); the message names the cause and what to change."""


class CaptureCheckError(CaptureError):
    """The self-check (capture.check) found a layer whose captured rows are not its examples' own
    gradients, and no correct path is left for it; the message names the layer and the cause."""
