"""A Conv2d call's input for the fused hooks (capture.modules): its patches unfolded only as far
as they are read, and — when that is cheaper — every example's weight gradient from one grouped
convolution backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GRADS_ELEMS = 1 << 22  # cap on the B·|W| numbers of per-example conv weight gradients held at once


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
        self._full = None

    def full(self) -> torch.Tensor:
        if self._full is None:
            kernel, stride, padding, dilation = self.spec.conv
            cols = F.unfold(self.x, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, C*k, L)
            self._full = self._batch_major(cols)
        return self._full

    def columns(self, cols: torch.Tensor, maps: dict) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.spec.conv
        n, C, H, W = self.x.shape
        Hp, Wp = H + 2 * ph, W + 2 * pw
        key = (self.spec.module, "patch-index", tuple(self.x.shape))
        if key not in maps:           # flat positions in the padded image of every (column, output position)
            c, rest = cols // (kh * kw), cols % (kh * kw)
            base = c * (Hp * Wp) + (rest // kw) * dh * Wp + (rest % kw) * dw
            ys = torch.arange(self.ho, device=cols.device) * sh * Wp
            xs = torch.arange(self.wo, device=cols.device) * sw
            maps[key] = (base[:, None] + (ys[:, None] + xs[None, :]).reshape(1, -1)).reshape(-1)
        xp = F.pad(self.x, (pw, pw, ph, ph)) if (ph or pw) else self.x
        got = xp.reshape(n, -1).index_select(1, maps[key]).reshape(n, cols.numel(), -1)   # (n, |cols|, L)
        return self._batch_major(got)

    def grads_cheaper(self, kept: int) -> bool:
        """Whole per-example weight gradients (one grouped convolution backward: B·|W| numbers,
        the batch's weight-gradient FLOPs, run by the convolution library) beat reading ``kept``
        entries column by column (2·B·T·kept numbers gathered) when |W| ≤ T·kept / 2."""
        return 2 * self.spec.rows * self.spec.cols <= self.shape[1] * kept

    def entries(self, d: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
        """(B, |native|): the per-example weight gradient at flat native indices ``native``, from
        δ (B, T, C_out) — the batch folded into the channels, groups × B, so that the convolution
        library's weight gradient is every example's at once; in chunks of examples that bound
        the B·|W| numbers held."""
        (kh, kw), stride, padding, dilation = self.spec.conv
        n, C, H, W = self.x.shape
        m, O = n // self.B, d.shape[-1]
        step = max(1, _GRADS_ELEMS // (self.spec.rows * self.spec.cols))
        out = []
        for b0 in range(0, self.B, step):
            b = min(step, self.B - b0)
            x = self.x[b0 * m:(b0 + b) * m].reshape(b, m, C, H, W).transpose(0, 1).reshape(m, b * C, H, W)
            g = d[b0:b0 + b].reshape(b, m, self.ho * self.wo, O).permute(1, 0, 3, 2).reshape(m, b * O, self.ho, self.wo)
            shape = (b * O, C // self.spec.groups, kh, kw)        # the weight: only its shape is read
            w = x.new_empty(()).expand(shape) if x.device.type == "cpu" else x.new_empty(shape)
            gw = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0],
                                                     b * self.spec.groups, [False, True, False])[1]
            out.append(gw.reshape(b, -1).index_select(1, native))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _batch_major(self, cols: torch.Tensor) -> torch.Tensor:
        """(n, C', L) → (B, T, C') channel-first: a transposed view when n == B; batch-major
        flattened calls (capture.layout.FLAT) become (B, n/B·L, C')."""
        if cols.shape[0] != self.B:
            return cols.transpose(1, 2).reshape(self.B, -1, cols.shape[1])
        return cols.transpose(1, 2)
