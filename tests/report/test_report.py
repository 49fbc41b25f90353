"""The HTML report: its content equals the library's scores, text is escaped, the guidance flags
degenerate runs, and the command line writes it with every estimator and a measure."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dropinf import Attributor, Dropout, GaussNewton, Identity
from dropinf.measures import margin
from dropinf.report import diagnose

from ..helpers import ce_loss, loader, tiny_data, tiny_mlp
from .helpers import report_data

ROOT = Path(__file__).resolve().parents[2]


def test_report_lists_the_topk_of_the_library_and_escapes_text(tmp_path):
    model = tiny_mlp().double()
    tr, q = tiny_data(120), tiny_data(12, seed=1)
    attr = Attributor(model, ce_loss, compressor=Dropout(r=16), progress=False)
    attr.featurize(loader(tr))
    evil = "<script>alert('x')</script> & <b>bold</b>"
    path = attr.report(loader(q), tmp_path / "r.html", k=4, render=lambda ex: {"text": f"{evil} {float(ex[0][0]):.3f}",
                                                                              "label": int(ex[1])},
                       marks={5: "flipped"}, predict=lambda m, b: m(b[0]).argmax(1), suspicious="queries")
    html = path.read_text()
    assert "<script>alert" not in html             # the data block escapes '<'
    d = report_data(path)
    top = attr.topk(loader(q), k=4)
    for j, query in enumerate(d["queries"]):
        assert [e[0] for e in query["harmful"]] == top.harmful_idx[j].tolist()
        assert [e[0] for e in query["helpful"]] == top.helpful_idx[j].tolist()
        np.testing.assert_allclose([e[1] for e in query["harmful"]], top.harmful_scores[j], rtol=1e-5)
        assert query["pred"] == str(int(model(q[j][0][None]).argmax()))
        assert query["text"].startswith(evil)                    # shown as written, not interpreted
    val = attr.mislabeled(loader(q))        # the mislabel estimator on the same rows (Attributor.mislabeled)
    assert [r[0] for r in d["suspicious"]["rows"]][:10] == np.argsort(-val)[:10].tolist()
    # a separate validation loader ranks the same way as its own mean
    other = attr.report(loader(tr), tmp_path / "v.html", k=2, render=lambda ex: "x", suspicious=loader(q))
    assert report_data(other)["suspicious"]["rows"] == d["suspicious"]["rows"]
    assert "validation set" in report_data(other)["suspicious"]["title"]
    assert all(c.get("mark") == ("flipped" if i == "5" else None) for i, c in d["train"].items())
    np.testing.assert_allclose(d["queries"][0]["loss"], float(ce_loss(model, (q[0][0][None], q[0][1][None])).detach()),
                               rtol=1e-5)
    assert any(k == "compressor" for k, _ in d["settings"]) and "harmful" in d["sign"]


def test_report_with_measure_and_images(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).double()
    imgs = torch.utils.data.TensorDataset(torch.rand(40, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (40,)))
    attr = Attributor(model, ce_loss, compressor=Identity(), progress=False)
    attr.featurize(loader(imgs))
    m = margin(lambda mod, b: (mod(b[0]), b[1]))
    path = attr.report(loader(torch.utils.data.Subset(imgs, range(5))), tmp_path / "img.html", k=3, measure=m)
    d = report_data(path)
    assert d["measure"] == "margin" and d["queries"][0]["img"].startswith("data:image/png;base64,")
    want = attr.topk(loader(torch.utils.data.Subset(imgs, range(5))), k=3, measure=m)
    assert [e[0] for e in d["queries"][2]["harmful"]] == want.harmful_idx[2].tolist()
    assert d["suspicious"]["rows"][0][1] <= d["suspicious"]["rows"][-1][1]     # self-influence, most negative first


def test_diagnose_flags_degenerate_runs():
    assert "exactly zero" in diagnose(np.zeros((3, 5)))[0].what
    assert "nearly constant" in diagnose(np.full((3, 5), 2.0))[0].what
    assert diagnose(np.random.default_rng(0).normal(size=(3, 50))) == []
    model = tiny_mlp().double()
    tr = tiny_data(60)
    heavy = Attributor(model, ce_loss, compressor=Dropout(r=8), estimator=GaussNewton(damping_factor=30.0), progress=False)
    heavy.featurize(loader(tr))
    assert any("damping dominates" in f.what for f in diagnose(preconditioner=heavy.preconditioner))
    ok = Attributor(model, ce_loss, compressor=Dropout(r=8), progress=False)
    ok.featurize(loader(tr))
    assert diagnose(preconditioner=ok.preconditioner) == []
    # a layer with no gradient: frozen input features of zero → the first layer is dead
    zero = torch.utils.data.TensorDataset(torch.zeros(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,)))
    dead = Attributor(torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double(),
                      ce_loss, compressor=Identity(), progress=False)
    dead.featurize(loader(zero))
    with pytest.warns(UserWarning, match="dropped"):    # the fit, made on first use
        pre = dead.preconditioner
    assert any("dropped" in f.what for f in diagnose(preconditioner=pre))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dropinf", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_report_every_estimator_and_measure(tmp_path):
    store = tmp_path / "s"
    assert run_cli("featurize", "tests.store.fixture:build", "--store", str(store), "--size", "8",
                   "--no-progress").returncode == 0
    out = tmp_path / "r.html"
    res = run_cli("report", "tests.store.fixture:build", "--store", str(store), "--out", str(out), "-k", "3",
                  "--estimator", "lissa", "--iterations", "5", "--lissa-scale", "4", "--measure", "margin",
                  "--suspicious", "queries", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    d = report_data(out)
    assert d["measure"] == "margin" and len(d["queries"]) == 20 and d["queries"][0]["label"].split()[0] in (
        "north", "east", "south", "west") and "pred" in d["queries"][0]
    est = dict(d["settings"])["estimator"]
    assert est["class"] == "LiSSA" and est["iterations"] == 5 and est["scale"] == 4.0
    # the same top-k through the library
    sys.path.insert(0, str(ROOT))
    from dropinf import LiSSA
    from tests.store.fixture import build
    task = build()
    attr = Attributor.from_store(store, task["model"], task["loss_fn"], estimator=LiSSA(iterations=5, scale=4.0),
                                 progress=False)
    top = attr.topk(loader(task["query"]), k=3, measure=task["measures"]["margin"])
    assert [e[0] for e in d["queries"][4]["harmful"]] == top.harmful_idx[4].tolist()
    for est in ("gauss-newton", "datainf", "hessian-free", "exact", "lissa --lissa-hvp model"):
        res = run_cli("topk", "tests.store.fixture:build", "--store", str(store), "-k", "2", "--estimator",
                      *est.split(), "--damping", "0.01", "--no-progress")
        assert res.returncode == 0 and "harmful_idx" in res.stdout, (est, res.stderr[-2000:])
    res = run_cli("topk", "tests.store.fixture:build", "--store", str(store), "--measure", "nope", "--no-progress")
    assert res.returncode == 2 and "defines no such measure" in res.stderr and "margin" in res.stderr
    info = run_cli("info", str(store))
    assert info.returncode == 0 and "harmful" in info.stdout and "findings" in info.stdout
    assert "dominates" not in info.stdout
    # a fit whose damping swamps H̃ is saved in the store; info then says so, with what to try
    assert run_cli("topk", "tests.store.fixture:build", "--store", str(store), "--damping", "1e6",
                   "--no-progress").returncode == 0
    info = run_cli("info", str(store))
    assert "damping dominates the Hessian" in info.stdout and "lower damping" in info.stdout


def test_every_option_has_help():
    from dropinf.cli import build_parser
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subs.choices.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert not missing, missing
