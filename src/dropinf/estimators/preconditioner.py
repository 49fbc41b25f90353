"""One fitted representation for every estimator: a preconditioner M in the compressed space.

    I(q, i) = − Σ_b  q̃_b · g_ib,      q̃_b = g_qb M_b                 (shape: (n_query, n_train))

A block b is one tracked layer (every estimator but ExactHessian and LiSSA(hvp="model")) or all
tracked layers concatenated in tracked order (those two: their Hessian has cross-layer terms).
M_b is stored in one of four forms:

    dense     M_b given as an (R_b × R_b) matrix                       (r_l ≤ n)
    members   M_b = (1/K) blockdiag_k H̃_bk⁻¹ over K disjoint column groups (GaussNewton(members=K)):
              only the K blocks are kept, (K, m, m) zero-padded, and ``owner`` names each
              column's group — K times less memory and arithmetic than the dense r × r form
    kernel    M_b = a·I + G_bᵀ C_b G_b with C_b (n × n)                (r_l > n: Woodbury form;
              G_b are the train rows of the block, so applying it reads them)
    identity  M_b = a·I                                                (GradDot)

GaussNewton: M = H̃⁻¹; GradDot: I; DataInf: its Sherman–Morrison average; LiSSA: the truncated
series, a polynomial in H̃; ExactHessian: the restricted inverse. A layer whose compressed
gradients are all zero is listed in ``dropped`` and contributes nothing.

The preconditioner is saved next to a store (``save``/``load``: one .npz, no pickle) and
reused by ``Attributor.from_store`` when the estimator's options match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

FORMAT = "dropinf-precond/2"    # /1 (members kept as a dense r × r M) still loads


@dataclass
class Block:
    layers: tuple[str, ...]
    matrix: torch.Tensor | None = None      # dense M (R × R), float64 or float32 (GaussNewton)
    scale: float = 1.0                      # a in a·I (+ Gᵀ C G)
    kernel: torch.Tensor | None = None      # C (n × n), float64
    self_kernel: torch.Tensor | None = None  # (n,) diag(K C K), K = G Gᵀ: kernel part of I(i, i)
    damping: dict = field(default_factory=dict)   # λ per layer (reported, saved)
    owner: torch.Tensor | None = None       # (R,) member of each column: GaussNewton(members=K)
    member_damping: dict = field(default_factory=dict)   # {layer: {member: λ}} (members only)
    parts: torch.Tensor | None = None       # (K, m, m) the members' blocks of M, zero-padded (members form)

    @property
    def form(self) -> str:
        return ("dense" if self.matrix is not None else "members" if self.parts is not None
                else "kernel" if self.kernel is not None else "identity")

    def dense(self, width: int | None = None) -> torch.Tensor:
        """M_b as an (R × R) float64 CPU matrix, for checks and diagnostics (``width``: R, needed only
        by the identity form; a kernel block has none without its train rows)."""
        if self.form == "dense":
            return self.matrix.double().cpu()
        if self.form == "members":
            idx, _ = member_index(self.owner)
            r = self.owner.numel()
            full = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            full[idx[:, :, None], idx[:, None, :]] = self.parts.double().cpu()
            return full[:r, :r]
        if self.form == "identity" and width is not None:
            return torch.eye(width, dtype=torch.float64) * self.scale
        raise ValueError(f"a {self.form}-form block has no dense M here")


@dataclass
class Preconditioner:
    estimator: dict                 # name and options: what must match to reuse it
    n: int                          # train rows it was fitted on
    blocks: list[Block]
    dropped: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)   # estimator-specific facts (e.g. LiSSA's scale)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[str]:
        return [n for b in self.blocks for n in b.layers]

    @property
    def members(self) -> int:
        """K of a mask ensemble fitted as one (GaussNewton(members=K)), else 1."""
        return max((int(b.owner.max()) + 1 for b in self.blocks if b.owner is not None), default=1)

    def member(self, k: int) -> "Preconditioner":
        """Member k of an ensemble on its own: its block of every layer's M (times K), zero elsewhere."""
        if not 0 <= k < self.members:
            raise ValueError(f"member {k} of a preconditioner with {self.members} members")
        if len({int(b.owner.max()) for b in self.blocks if b.owner is not None}) > 1:
            raise ConfigError("this fit splits its layers into different numbers of members (member_size), so "
                              "it has no member k common to every layer; per-member scores need members=K")
        blocks = [_member_block(b, k) if b.owner is not None else b for b in self.blocks]
        return Preconditioner(self.estimator, self.n, blocks, self.dropped, dict(self.info, member=k))

    def needs_train_rows(self) -> bool:
        return any(b.form == "kernel" for b in self.blocks)

    def _on(self, b: int, what: str, device, dtype) -> torch.Tensor:
        key = (b, what, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self.blocks[b], what).to(device=device, dtype=dtype)
        return self._cache[key]

    def _members(self, b: int, x: torch.Tensor) -> torch.Tensor:
        """x M_b for a members-form block: each group's columns times its own block, in one batched matmul."""
        key = (b, "index", str(x.device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(x.device) for t in member_index(self.blocks[b].owner))
        idx, inv = self._cache[key]
        g = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)[:, idx]            # (N, K, m); padding reads 0
        y = torch.bmm(g.transpose(0, 1), self._on(b, "parts", x.device, x.dtype)).transpose(0, 1)
        return y.reshape(x.shape[0], -1)[:, inv]

    # ------------------------------------------------------------------ apply
    def apply(self, q: dict[str, torch.Tensor], train=None, device=None, dtype=torch.float32,
              progress: bool = False) -> dict[str, torch.Tensor]:
        """q̃ = q M per block for query rows q {layer: (m, r_l)}; returns {layer: (m, r_l)} on
        ``device`` in ``dtype`` (dropped layers left out). Kernel blocks read the train rows
        (two streamed passes over ``train``, a RowSource)."""
        device = torch.device(device) if device is not None else next(iter(q.values())).device
        out: dict[str, torch.Tensor] = {}
        kernels = []
        for b, blk in enumerate(self.blocks):
            qb = torch.cat([q[l].to(device=device, dtype=dtype) for l in blk.layers], 1)
            if blk.form == "dense":
                qb = qb @ self._on(b, "matrix", device, dtype)
            elif blk.form == "members":
                qb = self._members(b, qb)
            else:
                qb = qb * blk.scale
                if blk.form == "kernel":
                    kernels.append(b)
            off = 0
            for l in blk.layers:
                r = q[l].shape[1]
                out[l] = qb[:, off:off + r]
                off += r
        if kernels:
            self._apply_kernels(kernels, q, out, train, device, dtype)
        return out

    def _apply_kernels(self, kernels, q, out, train, device, dtype):
        """q̃ += (q Gᵀ) C G for kernel blocks (single-layer), in two passes over the train rows."""
        if train is None:
            raise ValueError("this preconditioner has kernel blocks (r_l > n); applying it needs the train rows")
        names = [self.blocks[b].layers[0] for b in kernels]
        m = next(iter(q.values())).shape[0]
        qg = {l: torch.zeros(m, self.n, device=device, dtype=dtype) for l in names}
        for start, chunk in train.iter_chunks():
            for l in names:
                g = chunk[l].to(device=device, dtype=dtype)
                qg[l][:, start:start + g.shape[0]] = q[l].to(device=device, dtype=dtype) @ g.T
        p = {l: qg[l] @ self._on(b, "kernel", device, dtype) for b, l in zip(kernels, names)}
        for start, chunk in train.iter_chunks():
            for l in names:
                g = chunk[l].to(device=device, dtype=dtype)
                out[l] = out[l] + p[l][:, start:start + g.shape[0]] @ g

    def self_scores(self, chunk: dict[str, torch.Tensor], start: int, device=None,
                    dtype=torch.float32) -> torch.Tensor:
        """I(i, i) = − Σ_b g_ib M_b g_ibᵀ for the train rows of one chunk starting at row ``start``."""
        rows = next(iter(chunk.values())).shape[0]
        device = torch.device(device) if device is not None else next(iter(chunk.values())).device
        s = torch.zeros(rows, device=device, dtype=torch.float64)
        for b, blk in enumerate(self.blocks):
            parts = [chunk[l].to(device=device, dtype=dtype) for l in blk.layers]
            g = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            if blk.form == "dense":   # per-row sums of r products in dtype, accumulated in float64
                s += ((g @ self._on(b, "matrix", device, dtype)) * g).sum(1).double()
            elif blk.form == "members":
                s += (self._members(b, g) * g).sum(1).double()
            else:
                s += blk.scale * (g * g).sum(1).double()
                if blk.form == "kernel":
                    s += self._on(b, "self_kernel", device, torch.float64)[start:start + rows]
        return -s

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> None:
        """One .npz, no pickle, written atomically (store.files.write_bytes_atomic: a full disk is a
        StoreError and leaves nothing partial)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta_blocks = {}, []
        for i, b in enumerate(self.blocks):
            meta_blocks.append({"layers": list(b.layers), "scale": b.scale, "damping": b.damping,
                                "member_damping": {l: {str(k): v for k, v in d.items()}
                                                   for l, d in b.member_damping.items()}})
            for what in ("matrix", "kernel", "self_kernel", "owner", "parts"):
                t = getattr(b, what)
                if t is not None:
                    t = t.detach().cpu()          # saved in its own precision (float32 or float64)
                    keep = t.dtype in (torch.float32, torch.float64, torch.int64)
                    arrays[f"b{i}_{what}"] = (t if keep else t.double()).numpy()
        meta = {"format": FORMAT, "estimator": self.estimator, "n": self.n, "blocks": meta_blocks,
                "dropped": self.dropped, "info": self.info}
        import io
        from ..store.files import write_bytes_atomic
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        write_bytes_atomic(path, buf.getbuffer())

    @classmethod
    def load(cls, path: str | Path) -> "Preconditioner":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") not in (FORMAT, "dropinf-precond/1"):
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
            blocks = []
            for i, mb in enumerate(meta["blocks"]):
                t = {w: torch.from_numpy(z[f"b{i}_{w}"]) if f"b{i}_{w}" in z.files else None
                     for w in ("matrix", "kernel", "self_kernel", "owner", "parts")}
                if t["owner"] is not None and t["matrix"] is not None:     # format /1: members kept dense
                    t["parts"], t["matrix"] = member_parts(t["matrix"], t["owner"]), None
                md = {l: {int(k): v for k, v in d.items()} for l, d in mb.get("member_damping", {}).items()}
                blocks.append(Block(tuple(mb["layers"]), t["matrix"], mb["scale"], t["kernel"], t["self_kernel"],
                                    mb["damping"], t["owner"], md, t["parts"]))
        return cls(meta["estimator"], meta["n"], blocks, meta["dropped"], meta["info"])


def member_index(owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, inv) of a members-form block with column groups ``owner`` (R,): idx (K, m) holds each
    group's columns in increasing order, padded with R (a zero column); inv (R,) is each column's
    position in idx flattened."""
    r, k_all = owner.numel(), int(owner.max()) + 1
    sizes = torch.bincount(owner, minlength=k_all).tolist()
    m = max(sizes)
    order = torch.argsort(owner, stable=True)
    idx = torch.full((k_all, m), r, dtype=torch.long)
    inv = torch.empty(r, dtype=torch.long)
    pos = 0
    for k, size in enumerate(sizes):
        idx[k, :size] = order[pos:pos + size]
        inv[order[pos:pos + size]] = k * m + torch.arange(size)
        pos += size
    return idx, inv


def member_parts(matrix: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The (K, m, m) zero-padded group blocks of a block-diagonal (R × R) M."""
    idx, _ = member_index(owner)
    padded = torch.nn.functional.pad(matrix, (0, 1, 0, 1))
    return padded[idx[:, :, None], idx[:, None, :]]


def _member_block(b: Block, k: int) -> Block:
    """Member k of a members-form block on its own: its group's block times K, the others zero."""
    parts = torch.zeros_like(b.parts)
    parts[k] = b.parts[k] * b.parts.shape[0]
    return Block(b.layers, scale=b.scale, damping={l: b.member_damping[l][k] for l in b.layers},
                 owner=b.owner, parts=parts)


def estimator_signature(estimator) -> dict:
    """What identifies an estimator's fit: its name and every option (a frozen dataclass)."""
    from dataclasses import asdict, is_dataclass
    opts = asdict(estimator) if is_dataclass(estimator) else {}
    return json.loads(json.dumps({"class": type(estimator).__name__, **opts}, default=str))
