"""Compressors: Identity (Orig), Dropout, Gaussian."""

from .base import Compressor, LayerCompressor
from .dropout import Dropout
from .gaussian import Gaussian
from .identity import Identity

__all__ = ["Compressor", "LayerCompressor", "Dropout", "Gaussian", "Identity"]
