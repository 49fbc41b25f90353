"""An Attributor's fitted state (``Attributor.state``): the train rows and the preconditioner
fitted on them, made on first use for in-memory rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .estimators import Preconditioner
from .store.features import RowSource


@dataclass
class Fitted:
    """An Attributor's fitted state, in one place: the train rows (in-memory Features or a
    FeatureStore), the preconditioner fitted on them, and how it was obtained.

    In-memory rows are fitted on first use (``pending``): a run that only calls ``mislabeled``
    never pays for the attribution fit. A store's fit is made (and saved) at once."""

    train: RowSource
    fitted_pre: Preconditioner | None
    status: str                          # "fitted", "loaded PATH" when reused from a store, "pending"
    ids: torch.Tensor | None = None      # the train rows' dataset ids, read once
    others: dict = field(default_factory=dict)   # other estimators fitted on the same rows (fitted_with)
    pending: Callable[[], tuple[Preconditioner, str]] | None = None

    @property
    def preconditioner(self) -> Preconditioner:
        if self.fitted_pre is None and self.pending is not None:
            self.fitted_pre, self.status = self.pending()
            self.pending = None
        return self.fitted_pre
