"""Dataset ids for every captured row.

A DataLoader over a map-style dataset is re-wrapped so that each batch also carries the dataset
index of each of its rows: same batch sampler (shuffled or not), same collate function, same
workers. A collate function that drops examples (filtering bad rows is common) is detected — the
collated batch has fewer rows than the sampled indices — and the surviving ids are found by
collating each example alone; if that does not explain the batch, capture refuses instead of
misaligning rows. Loaders that are not DataLoaders over map-style datasets get ids 0, 1, 2, ...
in the order they yield examples.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from ..errors import ConfigError


def batch_rows(batch) -> int | None:
    """Leading dimension of the first tensor of a batch (None when it holds no tensor)."""
    from torch.utils._pytree import tree_leaves
    for t in tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.dim():
            return int(t.shape[0])
    return None


class Indexed(Dataset):
    """(index, example) for each index of a map-style dataset."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.ds[i]


class IdCollate:
    """Collate (index, example) items into (ids (b,) int64, the user's collated batch)."""

    def __init__(self, collate=None):
        self.collate = collate or default_collate

    def _rows_alone(self, example) -> int:
        try:
            return batch_rows(self.collate([example])) or 0
        except Exception:        # a filtering collate may fail on an empty selection
            return 0

    def __call__(self, items):
        ids = [int(i) for i, _ in items]
        examples = [e for _, e in items]
        try:
            batch = self.collate(examples)
        except Exception:
            if any(self._rows_alone(e) for e in examples):
                raise
            return torch.zeros(0, dtype=torch.long), None           # every example was dropped
        rows = batch_rows(batch)
        if rows is not None and rows != len(ids):
            keep = [i for i, e in zip(ids, examples) if self._rows_alone(e) == 1]
            if len(keep) != rows:
                raise ConfigError(
                    f"the collate function turned {len(ids)} examples (dataset ids {ids[:8]}...) into a batch of "
                    f"{rows} rows, and collating them one by one does not say which were kept; dropinf cannot "
                    f"tell which dataset example each row is. Filter the dataset instead of the batch.")
            ids = keep
        return torch.tensor(ids, dtype=torch.long), batch


def indexed_loader(loader) -> DataLoader | None:
    """The same batches as ``loader`` with the dataset id of every row, or None when ids cannot be
    known (not a DataLoader, an IterableDataset, or automatic batching switched off)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or loader.batch_sampler is None:
        return None
    return DataLoader(Indexed(loader.dataset), batch_sampler=loader.batch_sampler,
                      collate_fn=IdCollate(loader.collate_fn), num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      persistent_workers=loader.persistent_workers)


def chunk_loader(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """Dataset rows [start, stop) in order, batched and collated like ``loader``, with ids."""
    return DataLoader(torch.utils.data.Subset(Indexed(loader.dataset), range(start, stop)),
                      batch_size=loader.batch_size, collate_fn=IdCollate(loader.collate_fn),
                      num_workers=loader.num_workers)


def check_unique(ids: torch.Tensor) -> None:
    if ids.numel() and torch.unique(ids).numel() != ids.numel():
        vals, counts = torch.unique(ids, return_counts=True)
        raise ConfigError(f"the loader yields dataset examples {vals[counts > 1][:8].tolist()} more than once; "
                          f"each training example must appear once (use a sampler without replacement).")
