"""The peer benchmark's table (benchmarks/peers/run.py; CI does not run the peers themselves):
a failed variant keeps its row with the reason, a negatively correlated peer is flagged, and the
ratio column divides by dropinf's best variant."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_module():
    spec = importlib.util.spec_from_file_location("peers_run", ROOT / "benchmarks" / "peers" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_rows_flags_and_ratios():
    run = _run_module()
    rows = [
        {"method": "dropinf A", "attr_s": 2.0, "proc_s": 5.0, "peak_rss_mb": 800, "quality": 0.50, "corr_with_dropinf": 1.0},
        {"method": "dropinf B", "attr_s": 4.0, "proc_s": 7.0, "peak_rss_mb": 900, "quality": 0.40, "corr_with_dropinf": 0.9},
        {"method": "peer flipped", "attr_s": 40.0, "proc_s": 50.0, "peak_rss_mb": 1000, "quality": -0.45,
         "corr_with_dropinf": -0.8},
        {"method": "peer crashed", "error": "RuntimeError: boom", "proc_s": 3.0},
    ]
    tab = run.table("mlp", rows, [r["method"] for r in rows], argparse.Namespace())
    lines = {l.split(" | ")[0].lstrip("| "): l for l in tab.splitlines()[2:]}
    assert "time / dropinf A" in tab.splitlines()[0]           # the best-quality dropinf variant
    assert "20.0x" in lines["peer flipped"] and "(sign?)" in lines["peer flipped"]
    assert "(sign?)" not in lines["dropinf B"] and "2.0x" in lines["dropinf B"]
    assert "failed: RuntimeError: boom" in lines["peer crashed"]


def test_throughput_table_divides_by_plain_pass():
    run = _run_module()
    rows = [{"method": "plain forward+backward", "attr_s": 10.0, "proc_s": 12, "peak_rss_mb": 1, "tokens_per_s": 200},
            {"method": "dropinf X", "attr_s": 11.0, "proc_s": 13, "peak_rss_mb": 1, "tokens_per_s": 180}]
    tab = run.table("smollm", rows, [r["method"] for r in rows], argparse.Namespace())
    assert "time / plain forward+backward" in tab and "| 1.1x |" in tab


def test_help_runs_without_the_peers():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers" / "run.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--fast" in out.stdout and "kronfluence" in out.stdout


def test_quality_table_with_plain_pass_column():
    """On the tweets task the plain forward+backward row has no scores; every row gets a time / plain
    pass column, and a failed row has as many cells as the header."""
    run = _run_module()
    rows = [{"method": "dropinf A", "attr_s": 12.0, "proc_s": 14, "peak_rss_mb": 1, "quality": 0.9, "corr_with_dropinf": 1.0},
            {"method": "plain forward+backward", "attr_s": 10.0, "proc_s": 12, "peak_rss_mb": 1},
            {"method": "peer", "attr_s": 25.0, "proc_s": 27, "peak_rss_mb": 1, "quality": 0.8, "corr_with_dropinf": 0.5},
            {"method": "peer crashed", "error": "out of memory (killed)", "proc_s": 3.0}]
    tab = run.table("tweets", rows, [r["method"] for r in rows], argparse.Namespace()).splitlines()
    assert tab[0].endswith("| time / dropinf A | time / plain forward+backward |")
    cells = {l.split(" | ")[0].lstrip("| "): l.strip("|").split("|") for l in tab[2:]}
    assert all(len(c) == tab[0].count("|") - 1 for c in cells.values())
    assert cells["dropinf A"][-1].strip() == "1.20x" and cells["peer"][-1].strip() == "2.50x"
    assert cells["plain forward+backward"][4].strip() == "(no attribution)"
    assert "failed: out of memory (killed)" in cells["peer crashed"][1]
