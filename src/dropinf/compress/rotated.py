"""Rotated dropout: a randomized Hadamard rotation of each layer's gradient, then coordinate
sampling (the subsampled randomized Hadamard transform, Ailon & Chazelle 2006; Tropp 2011).

Why. Uniform coordinate sampling (paper §3.1) preserves inner products well only when a
gradient's energy is spread evenly over coordinates; a layer whose gradient lives in a few
rows or columns (a sequence model's attention projections, a dead-ReLU pattern) loses most of
it. An orthogonal rotation R changes no inner product — ⟨R g, R g'⟩ = ⟨g, g'⟩, so the influence
problem (paper eq. 1) and the Gauss-Newton Hessian are the same problem in the rotated basis —
and a random Hadamard rotation spreads the energy evenly, after which r sampled coordinates
carry ≈ r/p of every gradient's energy.

Fused, like Dropout. For a Kronecker-structured block (Linear, HF Conv1D, Conv2d with groups=1
on its unfolded patches, peft LoRA's A and B, Embedding) the per-example weight gradient is
G = Σ_t δ_t a_tᵀ (native layout d_out × d_in). Rotating the two sides,

    G' = R_out G R_inᵀ = Σ_t (R_out δ_t)(R_in a_t)ᵀ,     b' = R_out Σ_t δ_t   (bias),

with R = H·D/√p (D random signs, H the p × p Walsh–Hadamard matrix, p the next power of two ≥ d,
inputs zero-padded), is orthogonal on the flattened [vec(W), b]. So the hook rotates the saved
input and the output-gradient — O(T·p·log p) per example, below the layer's own O(T·d_in·d_out)
— and then gathers r entries of G' exactly as Dropout gathers entries of G. An Embedding's
one-hot input side stays unrotated (rotating it would make the T one-hot rows dense p-vectors);
only its embedding dimension is rotated. Any other block (tied weights used by several modules,
grouped convolutions, modules on the torch.func path) is rotated as one flat vector of length
p = next power of two ≥ d_l, from its full per-example gradient (correct, slower).

Sampled space: p_out·p_in + p_out entries per Kronecker block (weight, then bias), p for a flat
block; r ≥ that keeps every rotated coordinate, and then every inner product equals Orig's.
Damping follows coordinate sampling (λ_l = factor × mean squared kept entry), as for Dropout.
"""

from __future__ import annotations

import functools
import math

import torch

from ..capture.layers import LayerSpec
from ..capture.modules import Use, UseSpec
from .base import LayerCompressorBase, layer_seed
from .sampling import sample_indices

_FACTOR_BITS = 6     # Hadamard applied as a Kronecker product of 2^6 × 2^6 (or smaller) matmuls


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _sylvester(m: int, device, dtype) -> torch.Tensor:
    h = torch.ones(1, 1, device=device, dtype=dtype)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _factors(p: int) -> list[int]:
    """Sizes m_i ≤ 2^_FACTOR_BITS, near-equal powers of two, with Π m_i = p (a power of two)."""
    k = p.bit_length() - 1
    if p != 1 << k:
        raise ValueError(f"hadamard needs a power-of-two length, got {p}")
    if k == 0:
        return []
    n_f = -(-k // _FACTOR_BITS)
    return [1 << (k // n_f + (1 if i < k % n_f else 0)) for i in range(n_f)]


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform along the last dimension (a power of two): x H/√p.

    H_p = H_{m_1} ⊗ … ⊗ H_{m_j} with every m ≤ 64. Each step is one GEMM of (N·p/m, m) by H_m on
    the last axis of the mixed-radix index, then moves that axis to the front; after j steps
    every axis is done and the order is back: O(p·Σ m_i) per row through BLAS instead of log p
    elementwise passes. Symmetric and its own inverse."""
    p = x.shape[-1]
    factors = _factors(p)
    if not factors:
        return x
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    n = y.shape[0]
    for m in reversed(factors):
        y = (y.reshape(-1, m) @ _sylvester(m, y.device, y.dtype)).reshape(n, p // m, m).transpose(1, 2).reshape(n, p)
    return (y / math.sqrt(p)).reshape(*lead, p)


def hadamard_channels(x: torch.Tensor) -> torch.Tensor:
    """The same transform along dim 1 of a (B, p, L) tensor that is contiguous that way (conv
    patches and output-gradients, channel-first): each factor is a left multiplication
    H_m @ (…, m, stride) — B·(p/m)… GEMMs over whole rows of L, no transposes."""
    b, p, length = x.shape
    factors = _factors(p)
    if not factors:
        return x
    y = x.contiguous()
    stride = p
    for m in factors:      # axis t of the channel index: (B·prefix, m, (stride/m)·L)
        stride //= m
        y = torch.matmul(_sylvester(m, y.device, y.dtype), y.reshape(-1, m, stride * length))
    return y.reshape(b, p, length) / math.sqrt(p)


class _Side:
    """One side's rotation R = H·D/√p applied to vectors of length n (zero-padded to p)."""

    def __init__(self, n: int, seed: int | None):
        self.n, self.p = n, next_pow2(n)
        if seed is None:            # identity side (Embedding's token side)
            self.p, self.signs = n, None
        else:
            g = torch.Generator().manual_seed(seed)
            self.signs = torch.randint(0, 2, (self.p,), generator=g).to(torch.float64) * 2 - 1
        self._cache: dict = {}

    def _signs_like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.signs.to(x.device, x.dtype)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is None:
            return x
        if x.shape[-1] < self.p:
            x = torch.nn.functional.pad(x, (0, self.p - x.shape[-1]))
        return hadamard(x * self._signs_like(x))

    def channels(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the channel axis of a (B, L, C) tensor whose transpose (B, C, L) is contiguous,
        and return (B, L, p) with the same channel-first layout (the fused conv gather's fast path)."""
        if self.signs is None:
            return x
        xc = x.transpose(1, 2)
        if xc.shape[1] < self.p:
            xc = torch.nn.functional.pad(xc, (0, 0, 0, self.p - xc.shape[1]))
        return hadamard_channels(xc * self._signs_like(x)[:, None]).transpose(1, 2)


def _rotation_cost(p: int) -> int:
    """Multiply-adds per vector of the factored Hadamard: p · Σ m_i."""
    return p * sum(_factors(p))


class RotatedDropoutLayer(LayerCompressorBase):
    #: "auto": per call, the cheaper of rotating the T inputs/output-grads (O(T·p·Σm)) and forming
    #: each example's weight gradient once and rotating it (O(T·d_out·d_in) + O(d·Σm)); narrow
    #: convolutions with many positions are cheaper the second way. "rotate"/"full" force one (tests).
    path = "auto"

    def __init__(self, layer: LayerSpec, r: int, seed: int, scale: bool):
        self.dim, self.name = layer.dim, layer.name
        use = layer.uses[0] if layer.kind == "fused" and len(layer.uses) == 1 else None
        self.kron = use is not None and use.groups == 1
        s_in, s_out = layer_seed(seed, layer.name, salt=4), layer_seed(seed, layer.name, salt=5)
        if self.kron:
            u = self.use = use
            if u.kind in ("linear", "conv2d"):           # native rows = out, cols = in
                self.rows, self.cols = _Side(u.rows, s_out), _Side(u.cols, s_in)
            elif u.kind == "conv1d":                     # native rows = in, cols = out
                self.rows, self.cols = _Side(u.rows, s_in), _Side(u.cols, s_out)
            else:                                        # embedding: rows = tokens (unrotated), cols = dim
                self.rows, self.cols = _Side(u.rows, None), _Side(u.cols, s_out)
            n_w = self.rows.p * self.cols.p
            self.n_bias = 0 if u.bias_at is None else (self.rows.p if u.kind in ("linear", "conv2d") else self.cols.p)
            self.space = n_w + self.n_bias
            self.vspec = UseSpec(u.module, u.kind, self.rows.p, self.cols.p,
                                 None if u.bias_at is None else n_w, padding_idx=u.padding_idx)
        else:
            self.flat = _Side(self.dim, s_in)
            self.space = self.flat.p
        if r > self.space:
            import warnings
            warnings.warn(f"Dropout(rotate=True) r={r} exceeds the {self.space} rotated coordinates of layer "
                          f"{layer.name!r}; keeping all of them.", stacklevel=4)
        self.indices = sample_indices(self.space, r, layer_seed(seed, layer.name))
        self.r = int(self.indices.numel())
        self.factor = math.sqrt(self.space / self.r) if scale else 1.0
        self._maps: dict = {}

    # the rotation of each native side; which side is the input depends on the layout
    def _in_out(self):
        u = self.use
        if u.kind in ("linear", "conv2d"):
            return self.cols, self.rows
        return self.rows, self.cols       # conv1d: rows = in; embedding: rows = tokens (identity)

    def rotate_flat(self, g: torch.Tensor) -> torch.Tensor:
        """(B, d_l) per-example gradients → (B, space) rotated gradients (every coordinate)."""
        if not self.kron:
            return self.flat(g)
        u, B = self.use, g.shape[0]
        nw = u.rows * u.cols
        w = g[:, :nw].reshape(B, u.rows, u.cols)
        w = self.cols(w)                                   # rotate along columns
        w = self.rows(w.transpose(1, 2)).transpose(1, 2)   # then along rows
        parts = [w.reshape(B, -1)]
        if u.bias_at is not None:
            n_b = u.rows if u.kind in ("linear", "conv2d") else u.cols
            out_side = self.rows if u.kind in ("linear", "conv2d") else self.cols
            parts.append(out_side(g[:, u.bias_at:u.bias_at + n_b]))
        return torch.cat(parts, 1)

    def from_flat(self, g: torch.Tensor) -> torch.Tensor:
        out = self.rotate_flat(g)[:, self.indices.to(g.device)]
        return out * self.factor if self.factor != 1.0 else out

    def from_uses(self, uses: list, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kron:
            return super().from_uses(uses)
        (u,) = uses
        side_in, side_out = self._in_out()
        if u.spec.kind != "embedding" and self.path != "rotate":
            t, rows, cols = u.a.shape[1], u.spec.rows, u.spec.cols
            rotate_cost = t * (_rotation_cost(side_in.p) + _rotation_cost(side_out.p))
            # form Σ_t δ_t a_tᵀ, rotate its columns (rows of them), then its rows (p_cols of them)
            full_cost = t * rows * cols + rows * _rotation_cost(self.cols.p) + self.cols.p * _rotation_cost(self.rows.p)
            if self.path == "full" or full_cost <= rotate_cost:
                return super().from_uses(uses)       # per-example gradient, then rotated (from_flat)
        if u.spec.kind == "embedding":
            a, d = u.a, side_out(u.d)                  # token ids stay ids
        elif u.a.shape[1] > 1 and u.a.transpose(1, 2).is_contiguous() and u.d.transpose(1, 2).is_contiguous():
            a, d = side_in.channels(u.a), side_out.channels(u.d)     # conv: keep channel-first
        else:
            a, d = side_in(u.a), side_out(u.d)
        maps = self._maps.setdefault(u.d.device, {})
        val = Use(self.vspec, a, d).gather(self.indices, maps, out)
        if self.factor != 1.0:
            val = val.mul_(self.factor) if out is not None else val * self.factor
        return val
