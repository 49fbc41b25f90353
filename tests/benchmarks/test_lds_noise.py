"""benchmarks/lds_noise.py's analysis on synthetic predictions: the same-subsets oracle picks the best
factor, the cross-fitted value is read on unseen subsets, and the bootstrap interval of a real gap
excludes 0 while that of no gap holds it."""

import importlib.util
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("lds_noise", ROOT / "benchmarks" / "lds_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(lines, name):
    line = next(l for l in lines if l.startswith(f"| {name} |"))
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", line.split("|", 3)[3])]


def test_oracle_crossfit_and_interval():
    mod = _module()
    rng = np.random.default_rng(0)
    M, Q = 64, 40
    truth = rng.normal(size=(M, Q))
    noisy = lambda s: truth + s * rng.normal(size=(M, Q))  # noqa: E731
    preds = {}
    for seed in (0, 1):
        preds[("default", seed)] = {1.0: noisy(1.0)}
        # "Dropout": as good as the default at factor 10 only; "LoGra": far worse at every factor
        preds[("Dropout", seed)] = {f: noisy(1.0 if f == 10.0 else 4.0) for f in (0.1, 1.0, 10.0)}
        preds[("LoGra", seed)] = {f: noisy(6.0) for f in (0.1, 1.0, 10.0)}
    lines = mod.analyse("toy", preds, truth, {"default": 8, "Dropout": 4, "LoGra": 4}, 16, draws=300)
    rule, same, cross, point, lo, hi = _row(lines, "Dropout")
    assert same > rule + 0.1                      # the oracle found factor 10
    assert cross <= same + 1e-9 and cross > rule  # picked on one half, read on the other: still factor 10
    assert lo < 0 < hi and lo < point < hi        # no real gap to the default
    rule, same, cross, point, lo, hi = _row(lines, "LoGra")
    assert lo > 0 and lo < point < hi             # a real gap: the interval excludes 0
    assert same >= cross - 0.05
