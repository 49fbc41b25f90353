"""Fitted preconditioners saved beside a store: one .npz per estimator configuration (its name and
every option), reused when the same estimator is fitted on the same rows again."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

from ..errors import DropinfError
from .preconditioner import Preconditioner, estimator_signature


class PreconditionerCache:
    """``load(n)`` → the saved Preconditioner of ``estimator`` for n rows, or None; ``save(pre)``."""

    def __init__(self, folder: Path, estimator):
        sig = estimator_signature(estimator)
        self.signature = sig
        h = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(folder) / f"{sig.get('name', sig['class'])}-{h}.npz"

    def load(self, n: int, say: Callable[[str], None] = lambda msg: None) -> Preconditioner | None:
        if not self.path.exists():
            return None
        try:
            pre = Preconditioner.load(self.path)
        except Exception as exc:  # a damaged file: refit and overwrite it
            say(f"dropinf: the saved preconditioner {self.path} cannot be read ({exc}); refitting.")
            return None
        return pre if pre.estimator == self.signature and pre.n == n else None

    def save(self, pre: Preconditioner) -> None:
        try:
            pre.save(self.path)
        except (OSError, DropinfError) as exc:    # e.g. a full disk: the fit itself is fine
            warnings.warn(f"could not save the fitted preconditioner to {self.path} ({exc}); it will be "
                          f"refitted the next time this store is opened.", stacklevel=3)
