"""Compressors: Identity (Orig), Dropout, Gaussian, LoGra."""

from .base import Compressor, LayerCompressor
from .dropout import Dropout
from .gaussian import Gaussian
from .identity import Identity
from .logra import LoGra

__all__ = ["Compressor", "LayerCompressor", "Dropout", "Gaussian", "Identity", "LoGra"]


def from_signature(sig: dict):
    """Rebuild a compressor from its signature() (as recorded in a store manifest)."""
    from ..errors import ConfigError
    kinds = {"identity": Identity, "dropout": Dropout, "gaussian": Gaussian, "logra": LoGra}
    kind = sig.get("kind")
    if kind not in kinds:
        raise ConfigError(f"unknown compressor kind {kind!r} in store manifest")
    return kinds[kind](**{k: v for k, v in sig.items() if k != "kind"})
