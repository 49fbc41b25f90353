"""Every experiment runs end to end at --smoke on the real model and data and writes a complete
report folder (report.md with its tables, PNG plots, raw CSV/JSON)."""

import csv
import os
import subprocess
import sys
from pathlib import Path


from dropinf_experiments import lds, mislabel, r_sweep, retrain_images, retrain_lm, timing

ROOT = Path(__file__).resolve().parents[2]


def check_report(out: Path, headings: list[str], files: list[str]) -> str:
    text = (out / "report.md").read_text()
    for h in headings:
        assert h in text, f"missing section {h!r} in {out / 'report.md'}"
    for f in files + ["settings.json"]:
        assert (out / f).exists() and (out / f).stat().st_size > 0, f"missing {f}"
    for f in files:
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return text


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_mislabel_smoke(tmp_path):
    res = mislabel.run("smoke", out=tmp_path, progress=False)
    text = check_report(tmp_path, ["AUC (mean", "iHVP step", "Fine-tuned models"], ["auc.png", "runs.csv", "summary.json"])
    for m in mislabel.METHODS:
        assert f"| {m} |" in text
    data = rows(tmp_path / "runs.csv")
    assert {r["method"] for r in data} == set(mislabel.METHODS) and {r["lora_rank"] for r in data} == {"2", "8"}
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in data)
    assert set(res) == {f"rank{k}/{m}" for k in (2, 8) for m in mislabel.METHODS}
    # the attribution report of the first run: tweets decoded, flipped labels marked, the mislabel page
    from tests.report.helpers import report_data
    d = report_data(tmp_path / "attribution.html")
    q = d["queries"][0]
    assert q["label"].split()[0] in ("negative", "positive") and q["pred"] in ("negative", "positive")
    assert q["text"] and not q["text"].startswith("token ids") and len(q["harmful"]) == 8
    flipped = mislabel.noisy_tweets(mislabel.PRESETS["smoke"], 0)[2]
    assert all((c.get("mark") == "label flipped (truth)") == bool(flipped[int(i)]) for i, c in d["train"].items())


def test_r_sweep_smoke(tmp_path):
    r_sweep.run("smoke", out=tmp_path, progress=False)
    check_report(tmp_path, ["Mislabel AUC over", "Orig ="], ["r_sweep.png", "aucs.csv"])
    data = rows(tmp_path / "aucs.csv")
    assert {int(r["r"]) for r in data} == {1, 2, 3, 4} and {r["method"] for r in data} == {"Gaussian", "Dropout"}


def test_retrain_images_smoke(tmp_path):
    retrain_images.run("smoke", out=tmp_path, progress=False)
    text = check_report(tmp_path, ["Test accuracy (%) after removing", "Seconds: compression"],
                        ["accuracy.png", "runs.csv", "times.json"])
    for m in ["Random", "Hessian-free", "DataInf", "LoGra (8x8)", "LoGra (64x64)", "Gaussian", "Dropout"]:
        assert f"| {m} |" in text


def test_retrain_lm_smoke(tmp_path):
    retrain_lm.run("smoke", out=tmp_path, progress=False)
    text = check_report(tmp_path, ["Test perplexity after removing", "Seconds: compression"],
                        ["perplexity.png", "runs.csv", "times.json"])
    for m in ["Random", "LoGra", "Gaussian", "Dropout"]:
        assert f"| {m} |" in text


def test_timing_smoke(tmp_path):
    timing.run("smoke", out=tmp_path, progress=False)
    check_report(tmp_path, ["Seconds per step"], ["compression.png", "timing.csv"])
    data = rows(tmp_path / "timing.csv")
    assert len({r["setting"] for r in data}) == 3
    assert {r["compressor"] for r in data} == {"Identity", "Gaussian", "LoGra", "Dropout"}


def test_lds_smoke(tmp_path):
    res = lds.run("smoke", out=tmp_path, progress=False)
    text = check_report(tmp_path, ["Task mlp", "Task cnn", "Task lm", "LDS (oracle λ)"],
                        ["lds_mlp.png", "lds_cnn.png", "lds_lm.png", "lds.csv"])
    methods = {r["method"] for r in res}
    assert {"Dropout", "Dropout+rot", "Dropout+rot+budget", "Gaussian", "Orig", "dropinf default"} <= methods
    assert any(m.startswith("LoGra") for m in methods) and any("ens." in m for m in methods)
    for r in res:      # equal bytes within a budget (Orig aside): every variant keeps the same total
        if r["method"] != "Orig":
            same = [x["bytes"] for x in res if x["task"] == r["task"] and x["r"] == r["r"] and x["method"] != "Orig"]
            assert len(set(same)) == 1, (r["task"], r["r"], same)
        assert -1.0 <= r["lds_rule"] <= 1.0
    assert "| Dropout+rot |" in text
    # the cached ground truth is reused: a second run retrains nothing
    import time
    t0 = time.perf_counter()
    lds.ground_truth("mlp", lds.PRESETS["smoke"], tmp_path, False)
    assert time.perf_counter() - t0 < 5


def test_reproduce_cli_help_and_missing_data_message(tmp_path):
    env = {**os.environ, "DROPINF_FASHION_MNIST": str(tmp_path / "nowhere")}
    res = subprocess.run([sys.executable, "-m", "dropinf", "reproduce", "retrain-images", "--smoke", "--out",
                          str(tmp_path / "r")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "apt-get install -y dataset-fashion-mnist" in res.stderr and "Traceback" not in res.stderr


def test_facts_smoke(tmp_path):
    from dropinf_experiments import facts
    res = facts.run("smoke", out=tmp_path, progress=False)
    text = check_report(tmp_path, ["Recall and MRR of the fact's document", "Where the wrong first choices",
                                   "Seconds per stage", "What it says"], ["facts.png", "ranks.csv", "summary.json"])
    names = [m[0] for m in facts.methods(facts.PRESETS["smoke"], 0)] + ["BM25 (lexical)"]
    for m in names:
        assert f"| {m} |" in text
    assert set(res) == set(names) and all(0 < v <= 1 for v in res.values())
    s = facts.PRESETS["smoke"]
    data = rows(tmp_path / "ranks.csv")
    assert len(data) == len(names) * 2 * s.n_facts
    assert all(1 <= int(r["rank"]) <= 3 * s.n_facts + s.n_background for r in data)
