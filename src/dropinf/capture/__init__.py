"""Capture: compressed per-example gradients from hooks (fused) or torch.func (fallback)."""

from .engine import BatchCapture
from .layers import LayerSpec, select_layers

__all__ = ["BatchCapture", "LayerSpec", "select_layers"]
