"""Shared pieces of the experiments: reports (markdown + CSV/JSON + PNG), timing, statistics."""

from __future__ import annotations

import csv
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch


def quiet_hf() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing
        pass


@contextmanager
def timed(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def mean_std(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "-"
    return f"{v.mean():.3f} ± {v.std():.3f}" if v.size > 1 else f"{v.mean():.3f}"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


class Report:
    """Collects markdown sections and files for one experiment's report folder."""

    def __init__(self, out: str | Path, title: str, settings, preset: str):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title, self.preset = title, preset
        self.settings = asdict(settings) if is_dataclass(settings) else dict(settings)
        self.sections: list[str] = []
        self.t0 = time.perf_counter()

    def add(self, heading: str, text: str) -> None:
        self.sections.append(f"## {heading}\n\n{text}\n")

    def csv(self, name: str, header: list[str], rows: list[list]) -> Path:
        path = self.out / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        return path

    def json(self, name: str, obj) -> Path:
        path = self.out / name
        path.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        return path

    def figure(self, fig, name: str) -> Path:
        path = self.out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt
        plt.close(fig)
        return path

    def write(self) -> Path:
        env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"{platform.machine()} {platform.system()}, wall {time.perf_counter() - self.t0:.0f} s")
        head = (f"# {self.title}\n\nSetting: `{self.preset}` — " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
                + f"\n\nEnvironment: {env}\n")
        path = self.out / "report.md"
        path.write_text(head + "\n" + "\n".join(self.sections))
        self.json("settings.json", {"preset": self.preset, **self.settings})
        return path


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as p
    return p
