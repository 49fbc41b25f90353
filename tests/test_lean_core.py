"""The core needs torch, numpy, tqdm and crc32c only: `import dropinf` and a full attribution run
(featurize into memory and into a store, every estimator, score, top-k, self-influence, reopen)
work with scikit-learn, scipy and matplotlib unimportable."""

import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import sys
for name in ("sklearn", "scipy", "matplotlib", "transformers", "peft", "dropinf_experiments"):
    sys.modules[name] = None      # `import name` now raises ImportError, as if not installed
import torch, tempfile
import dropinf
from dropinf import Attributor, Dropout, Identity, GaussNewton, DataInf, LiSSA, GradDot, ExactHessian
from dropinf.store.writer import StoreOptions
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
ds = torch.utils.data.TensorDataset(x, y)
dl = torch.utils.data.DataLoader(ds, batch_size=16)
loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
for est in (GaussNewton(), DataInf(), LiSSA(), GradDot(), ExactHessian(damping=0.1)):
    a = Attributor(model, loss, compressor=Dropout(r=12), estimator=est, progress=False)
    a.featurize(dl)
    assert a.score(dl).shape == (64, 64) and a.self_influence().shape == (64,)
with tempfile.TemporaryDirectory() as d:
    a = Attributor(model, loss, compressor=Identity(), progress=False)
    a.featurize(dl, store=StoreOptions(d + "/s", chunk_size=20))
    top = a.topk(dl, k=3)
    b = Attributor.from_store(d + "/s", model, loss, progress=False)
    assert (b.topk(dl, k=3).harmful_idx == top.harmful_idx).all()
bad = [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("sklearn", "scipy", "matplotlib")]
assert not bad, bad
print("LEAN-OK")
'''


def test_core_runs_without_experiment_packages():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and "LEAN-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_demo_without_the_extra_says_how_to_install_it():
    script = SCRIPT.split("import torch, tempfile")[0] + (
        "from dropinf.cli import main\nraise SystemExit(main(['demo']))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "pip install 'dropinf[experiments]'" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
