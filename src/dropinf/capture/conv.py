"""A Conv2d call's input for the fused hooks (capture.modules): its patches unfolded only as far
as they are read — each kept entry's patch column gathered straight from the padded input — and,
when that is cheaper, every example's weight gradient from the convolution library (one grouped
convolution backward, or one batch-of-one backward per example, whichever this layer measured
faster on its first call)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

_GRADS_ELEMS = 1 << 22  # cap on the B·|W| numbers of per-example conv weight gradients held at once
_WAYS: dict = {}        # Patches.entries' choice per conv call shape, made once per process


class Patches:
    """A Conv2d call's input, unfolded into patches only as far as it is read: ``full()`` is
    F.unfold's (B, L, C·kh·kw) (cached); ``columns(cols)`` only the patch columns ``cols``,
    (B, L, |cols|), gathered straight from the zero-padded input — O(B·L·|cols|) work and memory
    instead of O(B·L·C·kh·kw), for Dropout when r leaves most patch columns unread. ``shape`` and
    ``dtype`` are known without unfolding anything."""

    def __init__(self, spec, x: torch.Tensor, B: int):      # spec: capture.modules.UseSpec of a conv2d
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.conv
        n, C, H, W = x.shape
        self.ho, self.wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if n % B:
            raise ValueError(f"{n} images for {B} examples")
        self.spec, self.x, self.B, self.n = spec, x, B, n
        self.shape = (B, (n // B) * self.ho * self.wo, C * kh * kw)
        self.dtype, self.device = x.dtype, x.device
        self._full = self._xp = None

    def full(self) -> torch.Tensor:
        if self._full is None:
            kernel, stride, padding, dilation = self.spec.conv
            cols = F.unfold(self.x, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, C*k, L)
            self._full = self._batch_major(cols)
        return self._full

    def columns(self, cols: torch.Tensor, maps: dict) -> torch.Tensor:
        key = (self.spec.module, "patch-index", tuple(self.x.shape))
        if key not in maps:
            maps[key] = self._flat_index(cols)
        got = self._padded().index_select(1, maps[key]).reshape(self.n, cols.numel(), -1)   # (n, |cols|, L)
        return self._batch_major(got)

    def entry_columns(self, k: torch.Tensor, s0: int, s1: int, maps: dict, out: torch.Tensor) -> torch.Tensor:
        """(B, s1 - s0, L) channel-first into ``out``: the patch column k[s] of kept entries s0..s1-1,
        gathered straight from the padded input (one image per example) — B·(s1-s0)·L numbers
        read, none unfolded beside them."""
        key = (self.spec.module, "entry-index", tuple(self.x.shape))
        if key not in maps:
            maps[key] = self._flat_index(k)
        L = self.ho * self.wo
        torch.index_select(self._padded(), 1, maps[key][s0 * L:s1 * L], out=out.view(self.n, -1))
        return out

    def _padded(self) -> torch.Tensor:
        """The zero-padded input, (n, C·Hp·Wp), made once per call."""
        if self._xp is None:
            (ph, pw) = self.spec.conv[2]
            xp = F.pad(self.x, (pw, pw, ph, ph)) if (ph or pw) else self.x
            self._xp = xp.reshape(self.n, -1)
        return self._xp

    def _flat_index(self, cols: torch.Tensor) -> torch.Tensor:
        """Flat positions in the padded image of every (column, output position), column-major."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.spec.conv
        Hp, Wp = self.x.shape[2] + 2 * ph, self.x.shape[3] + 2 * pw
        c, rest = cols // (kh * kw), cols % (kh * kw)
        base = c * (Hp * Wp) + (rest // kw) * dh * Wp + (rest % kw) * dw
        ys = torch.arange(self.ho, device=cols.device) * sh * Wp
        xs = torch.arange(self.wo, device=cols.device) * sw
        return (base[:, None] + (ys[:, None] + xs[None, :]).reshape(1, -1)).reshape(-1)

    def grads_cheaper(self, kept: int) -> bool:
        """Whole per-example weight gradients (one grouped convolution backward: B·|W| numbers,
        the batch's weight-gradient FLOPs, run by the convolution library) beat reading ``kept``
        entries column by column (2·B·T·kept numbers gathered) when |W| ≤ T·kept / 2."""
        return 2 * self.spec.rows * self.spec.cols <= self.shape[1] * kept

    def entries(self, d: torch.Tensor, native: torch.Tensor, maps: dict) -> torch.Tensor:
        """(B, |native|): the per-example weight gradient at flat native indices ``native``, from
        δ (B, T, C_out), by the convolution library: either the batch folded into the channels
        (groups × B, every example's weight gradient from one grouped backward, in chunks of
        examples that bound the B·|W| numbers held) or one batch-of-one backward per example.
        Which is faster depends on the library's kernels (a grouped backward with a few input
        channels per group — an RGB stem — runs at half the speed of B ordinary ones; with many it
        is 3× faster), so on the CPU the first call of each layer shape in a process times both
        and takes one backward per example only where it is clearly faster (under 2/3 of the
        grouped time: a stable choice, so that captures in one process agree bit for bit; the two
        ways agree to rounding); elsewhere the grouped one. The choice is kept per example shape,
        whatever the batch size."""
        key = (self.spec.module, "grads-way", tuple(self.x.shape))
        if key not in maps:
            maps[key] = "grouped" if self.x.device.type != "cpu" or self.B == 1 else self._timed_way(d, native)
        return self._grads(d, native, maps[key])

    def _timed_way(self, d: torch.Tensor, native: torch.Tensor) -> str:
        # keyed by one example's shape, not the batch size: a loader's shorter last batch (or a query
        # set's other batch size) reuses the choice instead of timing both ways again
        shape = (tuple(self.x.shape[1:]), self.n // self.B, self.x.dtype, self.spec.conv, self.spec.groups,
                 self.spec.rows)
        if shape not in _WAYS:
            secs: dict[str, list] = {"grouped": [], "each": []}
            for way in ("grouped", "each", "grouped", "each"):
                t0 = time.perf_counter()
                self._grads(d, native, way)
                secs[way].append(time.perf_counter() - t0)
            _WAYS[shape] = "each" if min(secs["each"]) < 2 / 3 * min(secs["grouped"]) else "grouped"
        return _WAYS[shape]

    def _grads(self, d: torch.Tensor, native: torch.Tensor, way: str) -> torch.Tensor:
        (kh, kw), stride, padding, dilation = self.spec.conv
        n, C, H, W = self.x.shape
        m, O = n // self.B, d.shape[-1]
        step = 1 if way == "each" else max(1, _GRADS_ELEMS // (self.spec.rows * self.spec.cols))
        out = torch.empty(self.B, native.numel(), dtype=d.dtype, device=d.device)
        for b0 in range(0, self.B, step):
            b = min(step, self.B - b0)
            x = self.x[b0 * m:(b0 + b) * m].reshape(b, m, C, H, W).transpose(0, 1).reshape(m, b * C, H, W)
            g = d[b0:b0 + b].reshape(b, m, self.ho * self.wo, O).permute(1, 0, 3, 2).reshape(m, b * O, self.ho, self.wo)
            shape = (b * O, C // self.spec.groups, kh, kw)        # the weight: only its shape is read
            w = x.new_empty(()).expand(shape) if x.device.type == "cpu" else x.new_empty(shape)
            gw = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                     b * self.spec.groups, [False, True, False])[1]
            torch.index_select(gw.reshape(b, -1), 1, native, out=out[b0:b0 + b])
        return out

    def _batch_major(self, cols: torch.Tensor) -> torch.Tensor:
        """(n, C', L) → (B, T, C') channel-first: a transposed view when n == B; batch-major
        flattened calls (capture.layout.FLAT) become (B, n/B·L, C')."""
        if cols.shape[0] != self.B:
            return cols.transpose(1, 2).reshape(self.B, -1, cols.shape[1])
        return cols.transpose(1, 2)
