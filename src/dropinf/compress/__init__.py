"""Compressors: Identity (Orig), Dropout, Gaussian, LoGra."""

from .base import Compressor, LayerCompressor
from .dropout import Dropout
from .gaussian import Gaussian
from .identity import Identity
from .logra import LoGra

__all__ = ["Compressor", "LayerCompressor", "Dropout", "Gaussian", "Identity", "LoGra"]
