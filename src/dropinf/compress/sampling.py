"""Coordinate sampling shared by plain and rotated Dropout: r distinct indices of a layer."""

from __future__ import annotations

import torch


#: version of the index sampler; part of the signature, so features drawn by another version are
#: refused instead of silently mixing different index sets
SAMPLER = 2

def sample_indices(dim: int, r: int, seed: int) -> torch.Tensor:
    """r distinct indices in [0, dim), uniformly without replacement, sorted (int64, CPU).

    O(r) time and memory when r ≤ dim/4 (a 4096 × 4096 layer no longer costs a 16M-entry
    permutation): seeded draws with replacement, duplicates dropped keeping the first occurrence,
    topped up until r remain — uniform over r-subsets, and the same set for the same seed."""
    if r >= dim:
        return torch.arange(dim)
    g = torch.Generator().manual_seed(seed)
    if r > dim // 4:
        return torch.sort(torch.randperm(dim, generator=g)[:r]).values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < r:
        need = r - picked.numel()
        cand = torch.cat([picked, torch.randint(0, dim, (need + need // 4 + 16,), generator=g)])
        uniq, inverse = torch.unique(cand, return_inverse=True)
        first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(cand.numel()), reduce="amin")
        picked = cand[torch.sort(first).values][:r]       # distinct, in order of first draw
    return torch.sort(picked).values
