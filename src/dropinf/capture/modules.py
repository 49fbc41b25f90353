"""Fused per-module-type math: compressed per-example gradient entries from a module's saved
input and its output-gradient, without forming the full per-example gradient.

Every supported module is "linear in its weight": per example, the gradient of the weight in
its *native storage layout* is a sum over positions t of outer products. A ``Use`` knows, for
one module, how to turn (saved input, output-grad δ) into

* ``gather(idx)``: the entries at flat indices ``idx`` of the block's parameter vector (Dropout),
* ``full()``:      the whole flat per-example gradient (Identity, Gaussian),
* ``kron(P_in, P_out)``: LoGra's Σ_t (P ã_t) ⊗ (P δ_t) in native row/column order.

Native layouts (row-major): Linear W (d_out, d_in); HF Conv1D W (d_in, d_out); Conv2d W
(C_out, C_in/groups, kh, kw); Embedding W (V, D). A bias (if tracked) follows the weight.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from .conv import Patches
from .kernels import chunked_dot, columns, fastest, into_, last_dim, scratch, whole_cheaper

_CHUNK_ELEMS = 1 << 18  # cap on B*T*r elements gathered at once: 1 MB fp32 temporaries stay in cache
_BMM_RATIO = 32         # batched matmul over distinct rows × columns when |O|·|K| ≤ this × r
_CONV_CHUNK = 1 << 20   # the same cap for a convolution's entry-by-entry gather (Use._conv_entries), whose
                        # reads of the padded input are spread out: 4 MB chunks measured ~10 % faster


def _conv1d_type():
    """HF's Conv1D class if transformers has loaded it (a model holding one has; importing
    transformers only to learn that a model has none would cost ~30 MB and seconds)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def fused_kind(module: nn.Module) -> str | None:
    """The fused kind for a module, or None if it needs the torch.func fallback."""
    if isinstance(module, nn.Linear):
        return "linear"
    c1 = _conv1d_type()
    if c1 is not None and isinstance(module, c1):
        return "conv1d"
    # sparse=True only changes the format of the batch gradient, and max_norm renormalises rows in
    # place outside the graph: the per-example gradient is the same sum over tokens either way
    if isinstance(module, nn.Embedding) and not module.scale_grad_by_freq:
        return "embedding"
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return "conv2d"
    return None


@dataclass(frozen=True)
class UseSpec:
    """One module's use of a block's weight. rows/cols: native weight layout (2-D view);
    bias_at: offset of this module's bias in the block vector (None: no tracked bias)."""

    module: str
    kind: str
    rows: int
    cols: int
    bias_at: int | None = None
    groups: int = 1
    padding_idx: int | None = None
    conv: tuple = ()  # (kernel, stride, padding, dilation) for conv2d


def use_spec(name: str, module: nn.Module, kind: str, bias_at: int | None) -> UseSpec:
    w = module.weight
    if kind == "linear":
        return UseSpec(name, kind, w.shape[0], w.shape[1], bias_at)
    if kind == "conv1d":
        return UseSpec(name, kind, w.shape[0], w.shape[1], bias_at)
    if kind == "embedding":
        return UseSpec(name, kind, w.shape[0], w.shape[1], None, padding_idx=module.padding_idx)
    if kind == "conv2d":
        k = w.shape[1] * w.shape[2] * w.shape[3]
        return UseSpec(name, kind, w.shape[0], k, bias_at, groups=module.groups,
                       conv=(module.kernel_size, module.stride, module.padding, module.dilation))
    raise ValueError(kind)


class Use:
    """Per-batch capture of one module call: ``a`` is the saved input representation
    (B, T, in) — tokens for embedding, unfolded patches for conv2d (from ``Patches``, unfolded
    only when read whole) — and ``d`` the output-gradient (B, T, out)."""

    def __init__(self, spec: UseSpec, a, d: torch.Tensor):
        self.spec, self._a, self.d = spec, a, d

    @property
    def a(self) -> torch.Tensor:
        return self._a.full() if isinstance(self._a, Patches) else self._a

    # ---- the three primitives -------------------------------------------------------
    def gather(self, idx: torch.Tensor, maps: dict, into: torch.Tensor | None = None) -> torch.Tensor:
        """The entries at ``idx`` (B, |idx|), written into ``into`` (the caller's row buffer, any
        row stride) when given, which is then returned."""
        s = self.spec
        key = (s.module, "maps")
        if key not in maps:
            maps[key] = _index_maps(s, idx, self.d.device)
        w_pos, rows_o, cols_k, bias_pos, bias_o, plan = maps[key]
        B, n_w, n_b = self.d.shape[0], w_pos.numel(), bias_pos.numel()
        if plan["prefix"] and not n_b:          # sorted indices, no bias entry: the weight entries are the row
            return into_(self._weight_entries(rows_o, cols_k, plan, maps, into), into)
        # sorted indices: the weight entries first, then the bias entries, written in place (no cat)
        if into is not None:
            out = into if plan["prefix"] else into.zero_()
        else:
            out = (torch.empty if plan["prefix"] else torch.zeros)(B, idx.numel(), device=self.d.device,
                                                                   dtype=self.d.dtype)
        if n_w:
            if plan["prefix"]:
                head = out[:, :n_w]
                into_(self._weight_entries(rows_o, cols_k, plan, maps, head), head)
            else:
                out.index_copy_(1, w_pos, self._weight_entries(rows_o, cols_k, plan, maps))
        if n_b and plan["prefix"] and self.d.shape[1] == 1:     # one position: δ's entries themselves
            columns(self.d[:, 0], bias_o, out[:, n_w:])
        elif n_b:           # not d[:, :, bias_o]: Python's advanced indexing costs more
            b = last_dim(self.d, bias_o).sum(1)
            if plan["prefix"]:
                out[:, n_w:].copy_(b)
            else:
                out.index_copy_(1, bias_pos, b)
        return out

    def _weight_entries(self, o: torch.Tensor, k: torch.Tensor, plan: dict, maps: dict,
                        into: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_t δ_t[o_s] · a_t[k_s] for output index o_s and input index k_s of each sample s.

        A convolution whose per-example weight gradients cost less than reading its kept entries
        (Patches.grads_cheaper: large T, few weights — the early layers of a CNN) takes them all
        from the convolution library (Patches.entries) and gathers. Otherwise two ways, chosen per
        layer by cost: gather the r (o, k) columns of δ and a and sum their products over t
        (O(B·T·r) memory traffic, in cache-sized chunks through reused scratch tensors), or — when
        T is large and the kept entries fall in few rows/columns (convolutions) — one batched
        matmul of δ[:, :, O]ᵀ a[:, :, K] over the distinct rows O and columns K (O(B·T·|O|·|K|)
        BLAS work), then a gather. A convolution with one image per example gathers each entry's
        patch column straight from the padded input (_conv_entries); for the batched matmul, or a
        call holding several images per example, it unfolds only the patch columns its kept
        entries read when that is at most half of them (Patches.columns), otherwise every patch
        once (F.unfold)."""
        d = self.d
        if isinstance(self._a, Patches):
            if self._a.grads_cheaper(o.numel()):
                return self._a.entries(d, plan["native"], maps)
            if self._a.n == self._a.B and plan["uo"].numel() * plan["uk"].numel() > _BMM_RATIO * o.numel():
                return self._conv_entries(o, k, maps, into)
        if isinstance(self._a, Patches) and plan["uk"].numel() * 2 <= self._a.shape[2]:
            a = self._a.columns(plan["uk"], maps)              # only the columns K, in uk's order
            k, plan = plan["k_pos"], {**plan, "uk": torch.arange(plan["uk"].numel(), device=d.device)}
        else:
            a = self.a
        B, T = d.shape[0], d.shape[1]
        if self.spec.kind == "embedding":   # a holds token ids; in-index = token, out = dim
            step = max(1, _CHUNK_ELEMS // max(1, B * T))
            parts = []
            for s0 in range(0, o.numel(), step):
                oo, kk = o[s0:s0 + step], k[s0:s0 + step]
                hit = (a[:, :, None] == kk[None, None, :]).to(d.dtype)
                parts.append((hit * last_dim(d, oo)).sum(1))
            return torch.cat(parts, 1) if len(parts) != 1 else parts[0]
        if T == 1 and plan["whole"] and self.spec.kind == "linear":
            # every entry kept, in native order (a small head under the default's head_factor): the
            # outer product δ ⊗ a itself, the same products as gathering both sides, written once
            rows = into.view(B, self.spec.rows, self.spec.cols) if into is not None and into.stride(-1) == 1 else None
            return torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=rows).view(B, -1) if rows is not None else \
                torch.mul(d[:, 0, :, None], a[:, 0, None, :]).reshape(B, -1)
        if T == 1:          # one position (an MLP): δ's side gathered straight into ``into``, times a's side
            # (one scratch tensor)
            side = columns(a[:, 0], k, scratch(1, (B, k.numel()), a))
            if into is None:
                return torch.mul(columns(d[:, 0], o, scratch(0, (B, o.numel()), d)), side)
            return columns(d[:, 0], o, into).mul_(side)
        # channel-first (B, C, T) when that is the contiguous layout (conv: unfolded patches and
        # δ are stored that way), so that gathering channels copies whole rows
        d_cf, a_cf = d.transpose(1, 2), a.transpose(1, 2)
        cf = d_cf.is_contiguous() and a_cf.is_contiguous()
        if plan["uo"].numel() * plan["uk"].numel() <= _BMM_RATIO * o.numel():
            # a side whose kept entries reach every row (column) is read as it is, not copied
            pick = lambda x, dim, u: x if u.numel() == x.shape[dim] else \
                (last_dim(x, u) if dim == 2 else x.index_select(dim, u))
            if cf:
                sub = torch.bmm(pick(d_cf, 1, plan["uo"]), pick(a_cf, 1, plan["uk"]).transpose(1, 2))
                return sub.reshape(B, -1).index_select(1, plan["flat"])
            ways = {"pick": lambda: torch.bmm(pick(d, 2, plan["uo"]).transpose(1, 2), pick(a, 2, plan["uk"]))
                    .reshape(B, -1).index_select(1, plan["flat"])}
            if whole_cheaper(d.shape[2], a.shape[2], plan):
                # picking δ's and a's columns copies them one number at a time (a strided gather); for
                # a small weight (a LoRA matrix) every per-example entry may cost less (3-5x faster on
                # one CPU, 4x slower on another): timed on the CPU, the rule elsewhere
                if plan.get("dense") is None:        # the kept entries' positions in the (out, in) product
                    plan["dense"] = o * a.shape[2] + k
                whole = lambda: torch.bmm(d.transpose(1, 2), a).reshape(B, -1).index_select(1, plan["dense"])
                ways = {"whole": whole, **ways} if d.device.type == "cpu" else {"whole": whole}
            return fastest(("product", torch.get_num_threads(), B.bit_length(), T.bit_length(), tuple(d.shape[2:]),
                            tuple(a.shape[2:]), plan["uo"].numel(), plan["uk"].numel()), ways)
        out = into if into is not None else torch.empty(B, o.numel(), device=d.device, dtype=d.dtype)
        if cf:                               # (B, step, T) each side, summed over T
            return chunked_dot(d_cf, o, lambda s0, s1, buf: torch.index_select(a_cf, 1, k[s0:s1], out=buf),
                                a, _CHUNK_ELEMS, out)
        step = max(1, _CHUNK_ELEMS // max(1, B * T))
        for s0 in range(0, o.numel(), step):     # (B, T, step) each side, summed over T
            oo, kk = o[s0:s0 + step], k[s0:s0 + step]
            dd = last_dim(d, oo, scratch(0, (B, T, oo.numel()), d))
            out[:, s0:s0 + oo.numel()] = dd.mul_(last_dim(a, kk, scratch(1, dd.shape, a))).sum(1)
        return out

    def _conv_entries(self, o: torch.Tensor, k: torch.Tensor, maps: dict, into: torch.Tensor | None) -> torch.Tensor:
        """Σ_t δ_t[o_s] · patch_t[k_s] of a convolution (one image per example), entry by entry in
        4 MB chunks: δ's channel o_s and the patch column k_s, gathered straight from the
        padded input (Patches.entry_columns), multiplied and summed over positions — 2·B·T·r
        numbers read, no patch unfolded (1.4-2.4× faster than unfolding every patch and gathering
        from that, measured on ResNet-18's 3×3 layers one at a time)."""
        d = self.d
        out = into if into is not None else torch.empty(d.shape[0], o.numel(), device=d.device, dtype=d.dtype)
        return chunked_dot(d.transpose(1, 2), o, lambda s0, s1, buf: self._a.entry_columns(k, s0, s1, maps, buf),
                            d, _CONV_CHUNK, out)

    def full(self, dim: int) -> torch.Tensor:
        """The whole flat per-example gradient of the block (B, dim), zeros where this use has no say."""
        s, a, d = self.spec, self.a, self.d
        B = d.shape[0]
        out = torch.zeros(B, dim, device=d.device, dtype=d.dtype)
        if s.kind == "embedding":
            g = torch.zeros(B, s.rows, s.cols, device=d.device, dtype=d.dtype)
            g.scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, s.cols), d)
            if s.padding_idx is not None:
                g[:, s.padding_idx] = 0
            out[:, :s.rows * s.cols] = g.reshape(B, -1)
            return out
        g = torch.einsum("bto,bti->boi", d, a)            # (B, out, in_total)
        if s.kind == "conv2d" and s.groups > 1:
            og = s.rows // s.groups
            g = torch.cat([g[:, i * og:(i + 1) * og, i * s.cols:(i + 1) * s.cols] for i in range(s.groups)], 1)
        if s.kind == "conv1d":
            g = g.transpose(1, 2)
        out[:, :s.rows * s.cols] = g.reshape(B, -1)
        if s.bias_at is not None:
            nb = d.shape[-1]
            out[:, s.bias_at:s.bias_at + nb] = d.sum(1)
        return out

    def kron(self, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
        """LoGra: Σ_t (P_in ã_t) ⊗ (P_out δ_t), ordered as the native (rows, cols) layout."""
        s, a, d = self.spec, self.a, self.d
        B = d.shape[0]
        if s.kind == "embedding":
            pa = p_in.T[a]                                       # (B, T, r_in)
            if s.padding_idx is not None:
                pa = pa * (a != s.padding_idx).unsqueeze(-1).to(pa.dtype)
        else:
            if s.bias_at is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
            pa = a @ p_in.T
        pd = d @ p_out.T
        if s.kind in ("linear", "conv2d"):                      # rows = out, cols = in
            return torch.einsum("bto,bti->boi", pd, pa).reshape(B, -1)
        return torch.einsum("bti,bto->bio", pa, pd).reshape(B, -1)  # rows = in, cols = out


def _index_maps(s: UseSpec, idx: torch.Tensor, device) -> tuple:
    """Split block indices into this use's weight entries (output o, input column k) and bias."""
    idx = idx.to(device)
    nw = s.rows * s.cols
    in_w = idx < nw
    w_pos = torch.nonzero(in_w).flatten()
    wi = idx[in_w]
    if s.kind in ("linear", "conv2d"):
        o, k = wi // s.cols, wi % s.cols
        if s.kind == "conv2d" and s.groups > 1:
            k = (o // (s.rows // s.groups)) * s.cols + k     # column in the unfolded patches
    elif s.kind == "conv1d":                                  # W[k, o]
        k, o = wi // s.cols, wi % s.cols
    else:                                                     # embedding W[v, j]: in = token v, out = j
        k, o = wi // s.cols, wi % s.cols
        if s.padding_idx is not None:
            keep = k != s.padding_idx
            w_pos, o, k = w_pos[keep], o[keep], k[keep]
    if s.bias_at is not None:
        nb = s.rows if s.kind in ("linear", "conv2d") else s.cols
        in_b = (idx >= s.bias_at) & (idx < s.bias_at + nb)
        bias_pos = torch.nonzero(in_b).flatten()
        bias_o = idx[in_b] - s.bias_at
    else:
        bias_pos = bias_o = torch.zeros(0, dtype=torch.long, device=device)
    uo, o_inv = torch.unique(o, return_inverse=True)
    uk, k_inv = torch.unique(k, return_inverse=True)
    n_w, n_b = w_pos.numel(), bias_pos.numel()
    prefix = bool((w_pos == torch.arange(n_w, device=device)).all()) and \
        bool((bias_pos == torch.arange(n_w, n_w + n_b, device=device)).all()) and n_w + n_b == idx.numel()
    whole = n_w == nw and bool((wi == torch.arange(nw, device=device)).all())     # every entry, in order
    plan = {"uo": uo, "uk": uk, "flat": o_inv * uk.numel() + k_inv, "prefix": prefix, "k_pos": k_inv, "native": wi,
            "whole": whole}
    return w_pos, o, k, bias_pos, bias_o, plan


def prepare(spec: UseSpec, inp: torch.Tensor, B: int) -> torch.Tensor:
    """Saved input representation (B, T, in) — token ids (B, T) for embedding."""
    if spec.kind == "embedding":
        return inp.reshape(B, -1)
    if spec.kind == "conv2d":     # unfolded when read (Patches); batch-major flattened calls included
        return Patches(spec, inp, B)
    return inp.reshape(B, -1, inp.shape[-1])


def prepare_delta(spec: UseSpec, dy: torch.Tensor, B: int) -> torch.Tensor:
    if spec.kind == "conv2d":
        d = dy.reshape(dy.shape[0], dy.shape[1], -1).transpose(1, 2)   # (n, L, C_out)
        return d if d.shape[0] == B else d.reshape(B, -1, d.shape[-1])
    return dy.reshape(B, -1, dy.shape[-1])
