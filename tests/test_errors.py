"""Bad input gets a clear DropinfError naming the problem — never a deep torch traceback."""

import numpy as np
import pytest
import torch
from torch import nn

from dropinf import (Attributor, ConfigError, Dropout, EmptyDataError, ExactHessian, FeatureMismatchError,
                     Gaussian, IncompatibleMethodError, NonFiniteGradientError, NoTrackableLayersError)
from dropinf.errors import LossShapeError
from tests.helpers import ce_loss, loader, tiny_data, tiny_mlp


def fitted(compressor=None, track=None, model=None):
    model = model or tiny_mlp().double()
    attr = Attributor(model, ce_loss, compressor=compressor or Dropout(r=8, seed=0), track=track, progress=False)
    attr.featurize(loader(tiny_data()))
    return attr


@pytest.mark.parametrize("other,field", [
    (dict(compressor=Dropout(r=8, seed=1)), "compressor.seed"),
    (dict(compressor=Dropout(r=9, seed=0)), "compressor.r"),
    (dict(compressor=Gaussian(r=8, seed=0)), "compressor.kind"),
    (dict(track=["0"]), "layers"),
])
def test_query_train_mismatch_names_the_field(other, field):
    train_attr = fitted()
    model = train_attr.model
    other_attr = Attributor(model, ce_loss, progress=False, **{"compressor": Dropout(r=8, seed=0), **other})
    q = other_attr.compute_features(loader(tiny_data(8)))
    with pytest.raises(FeatureMismatchError, match=field.replace(".", r"\.")):
        train_attr.score(q)


def test_model_changed_after_featurize_is_refused():
    attr = fitted()
    q = attr.compute_features(loader(tiny_data(8)))
    with torch.no_grad():
        attr.model[0].weight.add_(0.1)
    q2 = attr.compute_features(loader(tiny_data(8)))
    attr.score(q)  # old features still fine
    with pytest.raises(FeatureMismatchError, match="model"):
        attr.score(q2)


def test_empty_dataset():
    attr = Attributor(tiny_mlp().double(), ce_loss, progress=False)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(EmptyDataError, match="no examples"):
        attr.featurize(loader(empty))


def test_nan_gradient_names_example_ids():
    ds = tiny_data()
    x, y = ds.tensors
    x = x.clone()
    x[21, 2] = float("nan")
    x[40, 0] = float("inf")
    attr = Attributor(tiny_mlp().double(), ce_loss, progress=False)
    with pytest.raises(NonFiniteGradientError, match=r"\[21, 40\]"):
        attr.featurize(loader(torch.utils.data.TensorDataset(x, y)))


def test_model_without_trackable_layers():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    with pytest.raises(NoTrackableLayersError, match="Conv1d"):
        Attributor(model, ce_loss)
    frozen = tiny_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(NoTrackableLayersError, match="requires_grad=False"):
        Attributor(frozen, ce_loss)
    with pytest.raises(ConfigError, match="matches no module"):
        Attributor(tiny_mlp(), ce_loss, track=["encoder.*"])


def test_loss_must_be_per_example():
    attr = Attributor(tiny_mlp().double(), lambda m, b: ce_loss(m, b).mean(), progress=False)
    with pytest.raises(LossShapeError, match=r"shape \(B,\)"):
        attr.featurize(loader(tiny_data()))


def test_exact_hessian_refuses_gaussian_features():
    attr = Attributor(tiny_mlp().double(), ce_loss, compressor=Gaussian(r=4), estimator=ExactHessian(),
                      progress=False)
    with pytest.raises(IncompatibleMethodError, match="gaussian"):
        attr.featurize(loader(tiny_data()))


def test_score_before_featurize():
    attr = Attributor(tiny_mlp().double(), ce_loss, progress=False)
    with pytest.raises(ConfigError, match="featurize"):
        attr.score(loader(tiny_data()))


def test_scores_shape_and_dtype():
    attr = fitted()
    s = attr.score(loader(tiny_data(10)))
    assert s.shape == (10, 48) and s.dtype == np.float32 and np.isfinite(s).all()


def test_loader_yielding_more_than_dataset_length_keeps_every_row():
    """A loader whose dataset under-reports its length (e.g. a wrapper) still gives every row, in order."""
    class Lying(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return 20

    ds = tiny_data()
    batches = [ds[i:i + 16] for i in range(0, 48, 16)]

    class Loader(list):
        dataset = Lying(ds)

    attr = Attributor(tiny_mlp().double(), ce_loss, progress=False)
    feats = attr.compute_features(Loader(batches))
    ref = attr.compute_features(loader(ds))
    assert feats.n == 48
    for k in ref.data:
        assert torch.equal(feats.data[k], ref.data[k])


def test_cli_paths_give_messages_not_tracebacks(tmp_path):
    """`--store` naming a file, `score --out` into a missing folder, `info | head` (broken pipe)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "dropinf", *a], cwd=root, capture_output=True, text=True,
                                    timeout=300)
    afile = tmp_path / "not-a-store.txt"
    afile.write_text("x")
    res = run("info", str(afile))
    assert res.returncode == 2 and "is a file, not a store folder" in res.stderr and "Traceback" not in res.stderr
    store = tmp_path / "s"
    assert run("featurize", "tests.store.fixture:build", "--store", str(store), "--size", "8",
               "--no-progress").returncode == 0
    res = run("score", "tests.store.fixture:build", "--store", str(store), "--out", str(tmp_path / "nope" / "s.npy"),
              "--no-progress")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    piped = subprocess.run(f"{sys.executable} -m dropinf info {store} | head -n 1", shell=True, cwd=root,
                           capture_output=True, text=True, timeout=300)
    assert "Traceback" not in piped.stderr and piped.stdout.strip() == "{"


def test_cli_full_disk_on_any_write_is_a_message(monkeypatch, capsys):
    """Reports and other files written by a command: a full disk ends with a message naming the
    file and exit code 2, not a traceback."""
    import errno
    from dropinf import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "reports/mislabel/report.md")
    monkeypatch.setattr(cli, "_run", full)
    assert cli.main(["info", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device writing reports/mislabel/report.md" in err and "re-run" in err


def test_score_into_a_file(tmp_path):
    """score(out=PATH) writes a .npy memmap (the CLI's `score --out` path, torchrun-aware) equal to the
    in-memory scores; a missing folder is a ConfigError."""
    import numpy as np
    attr = Attributor(tiny_mlp().double(), ce_loss, progress=False)
    attr.featurize(loader(tiny_data()))
    want = attr.score(loader(tiny_data(8, seed=3)))
    got = attr.score(loader(tiny_data(8, seed=3)), out=tmp_path / "s.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), want)
    assert got.shape == want.shape
    with pytest.raises(ConfigError, match="does not exist"):
        attr.score(loader(tiny_data(8, seed=3)), out=tmp_path / "no" / "s.npy")
