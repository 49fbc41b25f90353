"""Counterfactual ground truth by retraining, and the scores that compare attributions with it.

The linear datamodeling score (LDS; Park et al. 2023, the measure TRAK, dattri, kronfluence,
GraSS and bergson report): draw M random subsets S_j of the training set (each example kept with
probability ``fraction``, the same α for all), retrain the model on each — under several seeds,
averaged — and record a measurement f_q(θ_Sj) per query (usually the query's loss). An
attribution τ (q, n) predicts the subset's outcome by the sum of its members' scores,
g_q(S_j) = Σ_{i ∈ S_j} τ[q, i]; LDS is the Spearman rank correlation over j between g_q(S_j) and
f_q(θ_Sj), averaged over queries.

Sign. dropinf's scores are positive for *harmful* training examples (up-weighting i raises q's
loss), so with f = loss a good attribution has LDS > 0 as it stands. Scores of a library whose
positive means helpful (kronfluence, TRAK, dattri) must be negated first (README, conventions).

Ground truth is expensive and is cached: ``build_ground_truth`` writes one small ``.npy`` per
(subset, seed) into a folder, atomically, beside a ``plan.json`` that fixes n, the subsets and
the seeds; a re-run (after an interruption, or with more workers) trains only what is missing,
and a folder made for another plan is refused rather than mixed. Workers are processes
(``spawn``), so ``train`` and ``measure`` must be picklable — module-level functions or
``functools.partial`` of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError


# ---------------------------------------------------------------- subsets


def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(m, n) bool masks: subset j keeps exactly round(fraction·n) examples chosen uniformly."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    if n < 2 or m < 1:
        raise ConfigError(f"need n ≥ 2 training examples and m ≥ 1 subsets, got n={n}, m={m}")
    k = max(1, min(n - 1, int(round(fraction * n))))
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, size=k, replace=False)] = True
    return masks


def leave_one_out_masks(n: int, removed: Sequence[int]) -> np.ndarray:
    """(len(removed), n) masks, each the whole training set but one example."""
    removed = np.asarray(removed, dtype=np.int64)
    if removed.size == 0 or removed.min() < 0 or removed.max() >= n:
        raise ConfigError(f"removed must be non-empty indices in [0, {n}), got {removed[:5]}...")
    masks = np.ones((removed.size, n), dtype=bool)
    masks[np.arange(removed.size), removed] = False
    return masks


# ---------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """masks (M, n) bool; values (M, S, Q): the measurement per subset, seed and query."""

    masks: np.ndarray
    values: np.ndarray
    seeds: tuple

    @property
    def mean(self) -> np.ndarray:
        """(M, Q): the measurement averaged over seeds (what LDS correlates with)."""
        return self.values.mean(1)

    @property
    def n_queries(self) -> int:
        return self.values.shape[2]


def _digest(masks: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(masks, axis=1).tobytes() + str(masks.shape).encode()).hexdigest()[:16]


def _result_path(folder: Path, j: int, seed: int) -> Path:
    return folder / f"subset{j:05d}_seed{seed}.npy"


def _read_values(folder: Path, m: int, seeds) -> np.ndarray:
    """(M, S, Q) measurements of a finished plan."""
    return np.stack([np.stack([np.load(_result_path(folder, j, s)) for s in seeds]) for j in range(m)])


def _job(train: Callable, measure: Callable, keep: np.ndarray, seed: int, path: str, threads: int) -> str:
    """One retraining (runs in a worker process or inline): train on keep, measure, save."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    model = train(keep, seed)
    values = np.asarray(measure(model), dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise FloatingPointError(f"the measurement after training on subset {Path(path).stem} is not finite "
                                 f"(training diverged?); lower the learning rate of train()")
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, values)
    os.replace(tmp, path)
    return path


def build_ground_truth(train: Callable, measure: Callable, masks: np.ndarray, folder: str | os.PathLike,
                       seeds: Sequence[int] = (0,), workers: int = 1, threads_per_worker: int | None = None,
                       progress: bool = True) -> GroundTruth:
    """Retrain on every subset under every seed; cached and resumable in ``folder``.

    train(indices, seed) -> model: trains from scratch on the training examples ``indices``
        (a sorted int64 array of positions in the training set) with ``seed``.
    measure(model) -> array (Q,): the measurement per query (usually its loss; a margin also works).
    masks: (M, n) bool, e.g. ``random_subsets(n, M, 0.5)`` or ``leave_one_out_masks``.
    workers: processes retraining in parallel (``spawn``; train/measure must be picklable);
        each uses ``threads_per_worker`` torch threads (default: the cores divided among workers).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[0] < 1:
        raise ConfigError(f"masks must be (M, n) bool with M ≥ 1, got shape {masks.shape}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and non-empty, got {seeds}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = {"n": int(masks.shape[1]), "m": int(masks.shape[0]), "seeds": list(seeds), "masks": _digest(masks)}
    plan_path = folder / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan:
            raise ConfigError(f"{folder} holds ground truth for another plan ({old['m']} subsets of n={old['n']}, "
                              f"seeds {old['seeds']}, masks {old['masks']}); this one is {plan['m']} subsets of "
                              f"n={plan['n']}, seeds {plan['seeds']}, masks {plan['masks']}. Use another folder, "
                              f"or delete it to start over.")
    else:
        np.save(folder / "masks.npy", masks)
        plan_path.write_text(json.dumps(plan))
    todo = [(j, s, str(_result_path(folder, j, s))) for j in range(masks.shape[0]) for s in seeds]
    todo = [t for t in todo if not _readable(t[2])]
    from tqdm.auto import tqdm
    bar = tqdm(total=masks.shape[0] * len(seeds), initial=masks.shape[0] * len(seeds) - len(todo),
               desc="retraining for ground truth", unit="model", disable=not progress)
    if todo and workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_job, train, measure, np.flatnonzero(masks[j]), s, p, threads) for j, s, p in todo]
            for f in as_completed(futures):
                f.result()
                bar.update(1)
    else:
        for j, s, p in todo:
            _job(train, measure, np.flatnonzero(masks[j]), s, p, threads_per_worker or 0)
            bar.update(1)
    bar.close()
    return GroundTruth(masks=masks, values=_read_values(folder, masks.shape[0], seeds), seeds=seeds)


def _readable(path: str) -> bool:
    try:
        np.load(path)
        return True
    except Exception:   # missing, or cut short by an interruption: retrain it
        return False


def load_ground_truth(folder: str | os.PathLike) -> GroundTruth:
    """The ground truth a finished ``build_ground_truth`` left in ``folder``."""
    folder = Path(folder)
    try:
        plan = json.loads((folder / "plan.json").read_text())
        masks = np.load(folder / "masks.npy")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} holds no ground truth ({exc}); build it with build_ground_truth") from exc
    missing = [_result_path(folder, j, s).stem for j in range(plan["m"]) for s in plan["seeds"]
               if not _readable(str(_result_path(folder, j, s)))]
    if missing:
        raise ConfigError(f"{folder}: {len(missing)} of {plan['m'] * len(plan['seeds'])} retrainings are missing "
                          f"(first: {missing[0]}); re-run build_ground_truth with the same plan to finish them")
    return GroundTruth(masks=masks, values=_read_values(folder, plan["m"], plan["seeds"]), seeds=tuple(plan["seeds"]))


# ---------------------------------------------------------------- scores


@dataclass
class CorrelationResult:
    """mean over queries (NaN-free ones), per_query (Q,) with NaN where undefined, std over queries."""

    mean: float
    per_query: np.ndarray
    std: float
    n_defined: int

    def __float__(self) -> float:
        return self.mean

    def __repr__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f} over {self.n_defined} queries"


def _columnwise(a: np.ndarray, b: np.ndarray, rank: bool) -> np.ndarray:
    """Pearson (or Spearman, on ranks) correlation of every column of a with the same column of b."""
    if rank:
        from .metrics import _need
        rankdata = _need("scipy.stats").rankdata
        a, b = rankdata(a, axis=0), rankdata(b, axis=0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(0) / den
    out[~(den > 0)] = np.nan          # a constant column: correlation undefined
    return out


def _result(per_query: np.ndarray) -> CorrelationResult:
    ok = np.isfinite(per_query)
    if not ok.any():
        raise ValueError("the correlation is undefined for every query (constant scores or constant "
                         "ground truth); check that the scores are not all zero and that training varies")
    return CorrelationResult(float(per_query[ok].mean()), per_query, float(per_query[ok].std()), int(ok.sum()))


def _check_scores(scores: np.ndarray, q: int, n: int, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (q, n):
        raise ValueError(f"scores must be (n_query, n_train) = ({q}, {n}) to match the {what}, got "
                         f"{scores.shape}; dropinf's scores are (q, n) — transpose a (n, q) peer's")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN/inf")
    return scores


def lds(scores: np.ndarray, truth: GroundTruth) -> CorrelationResult:
    """Linear datamodeling score of ``scores`` (q, n) — dropinf's convention, positive = harmful —
    against ground truth whose measurement is the query loss. Spearman over subsets, per query."""
    scores = _check_scores(scores, truth.n_queries, truth.masks.shape[1], "ground truth")
    predicted = truth.masks.astype(np.float64) @ scores.T          # (M, Q): g_q(S_j)
    if truth.masks.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets, the ground truth has {truth.masks.shape[0]}")
    return _result(_columnwise(predicted, truth.mean, rank=True))


def loo_correlation(scores: np.ndarray, full: np.ndarray, truth: GroundTruth, method: str = "pearson") -> CorrelationResult:
    """Correlation, per query, between the predicted and the actual change of the measurement when
    each removed example is left out. ``full`` (Q,) is the measurement of the model trained on
    everything (averaged over the same seeds); ``truth`` comes from ``leave_one_out_masks``.
    Removing i changes q's loss by about −I(q, i)/n, so the prediction is −scores[:, i]."""
    per_row = (~truth.masks).sum(1)
    if not (per_row == 1).all():
        raise ValueError("loo_correlation needs leave-one-out masks (each row removes exactly one example)")
    order = np.argmax(~truth.masks, axis=1)                        # removed example of each row
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != truth.n_queries or scores.shape[1] != truth.masks.shape[1]:
        raise ValueError(f"scores must be (n_query, n_train) = ({truth.n_queries}, {truth.masks.shape[1]}), "
                         f"got {scores.shape}")
    full = np.asarray(full, dtype=np.float64).reshape(-1)
    if full.shape[0] != truth.n_queries:
        raise ValueError(f"full must hold one measurement per query ({truth.n_queries}), got {full.shape[0]}")
    actual = truth.mean - full.reshape(1, -1)                                # (R, Q)
    predicted = -scores[:, order].T                                          # (R, Q)
    if method not in ("pearson", "spearman"):
        raise ConfigError(f"method must be 'pearson' or 'spearman', got {method!r}")
    return _result(_columnwise(predicted, actual, rank=(method == "spearman")))
